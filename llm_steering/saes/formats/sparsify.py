"""EleutherAI sparsify: `{hookpoint}/cfg.json` + `sae.safetensors` (SparseCoder.save_to_disk).

Tensors `encoder.weight` [num_latents, d_in], `encoder.bias`, `W_dec` [num_latents, d_in],
`b_dec`. Encoder: relu(encoder(x - b_dec)), then each token's top k (cfg `k`). Transcoders
(`transcode: true`) map a module's input to its output and are not read.
"""

from __future__ import annotations

import re

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, sae_file
from llm_steering.saes.common import check_config_shape, check_mirror, config_beside, pick_decoder, positive_int
from llm_steering.saes.registry import register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef


@register("sparsify", r"(?:^|/)([^/]+)/sae\.safetensors$",
          looks_like="layers.L/sae.safetensors")
class Sparsify(SAEFormat):
    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        cfg_rel = config_beside(src, file, "cfg.json", layer, hook_point)
        if cfg_rel is None or src.read_json(cfg_rel).get("transcode"):
            return None  # (a transcoder maps a module's input to its output: not an SAE of one stream)
        return sae_file(src, file, self.name, match.group(1), architecture="topk")

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        dec = pick_decoder(tensors, [("W_dec", 0)], sae.label)
        cfg = src.read_json(src.beside(sae.file, "cfg.json"))
        d_in = cfg.get("d_in")
        d_sae = cfg.get("num_latents") or (d_in if isinstance(d_in, int) else 0) * cfg.get("expansion_factor", 0)
        check_config_shape(dec, d_sae, d_in, sae.label)
        check_mirror(dec, tensors, "encoder.weight", 0, sae.label)
        return dec

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        self.decoder(src, sae, tensors)
        cfg = src.read_json(src.beside(sae.file, "cfg.json"))
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{sae.label} uses activation {cfg.get('activation')!r}: only topk sparsify SAEs are supported for finding")
        if "encoder.weight" not in tensors:
            raise ValueError(f"{sae.label} has no encoder tensor 'encoder.weight': features cannot be found from text with it")
        return Encoder(tensors["encoder.weight"], 0, tensors.get("encoder.bias"), tensors.get("b_dec"),
                       topk=positive_int(cfg.get("k", 32), "k", sae.label), label=sae.label)
