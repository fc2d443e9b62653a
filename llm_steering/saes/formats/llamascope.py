"""Llama Scope (fnlp / OpenMOSS): `*-L{L}{R|A|M|TC}-*/hyperparams.json` + `checkpoints/final.safetensors`.

Tensors `encoder.weight` [d_sae, d_model], `encoder.bias`, `decoder.weight` [d_model, d_sae],
`decoder.bias`. Positions: R the residual stream after block L, A attn_out, M mlp_out, TC a
transcoder reading the MLP's normalised input and writing mlp_out. Encoder (sae_lens's
llama_scope loader): x scaled by sqrt(d_model) / dataset_average_activation_norm.in (or each
token to norm sqrt(d_model)), minus decoder.bias if apply_decoder_bias_to_pre_encoder, then
JumpReLU at jump_relu_threshold, ReLU or per-token top_k.
"""

from __future__ import annotations

import math
import re

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, sae_file
from llm_steering.saes.common import check_mirror, pick_decoder, positive_int
from llm_steering.saes.registry import register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef

HOOKS = {"R": ("hook_resid_post", "hook_resid_post"), "A": ("hook_attn_out", "hook_attn_out"),
         "M": ("hook_mlp_out", "hook_mlp_out"), "TC": ("ln2.hook_normalized", "hook_mlp_out")}


@register("llamascope", r"(?:^|/)([^/]*?(?<![0-9A-Za-z])L(\d+)(TC|R|A|M)-[^/]*)/checkpoints/final\.safetensors$",
          looks_like="*-L{L}R-*/checkpoints/final.safetensors")
class LlamaScope(SAEFormat):
    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        hook_in, hook_out = (f"blocks.{match.group(2)}.{h}" for h in HOOKS[match.group(3)])
        return sae_file(src, file, self.name, hook_in, hook_out, rank=(len(file),),
                        architecture="transcoder" if match.group(3) == "TC" else "sae")

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        dec = pick_decoder(tensors, [("decoder.weight", 1)], sae.label)
        check_mirror(dec, tensors, "encoder.weight", 0, sae.label, same_width=sae.architecture != "transcoder")
        return dec

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        label = sae.label
        self.decoder(src, sae, tensors)
        hp = src.read_json(sae.file.rsplit("/checkpoints/", 1)[0] + "/hyperparams.json")
        if "encoder.weight" not in tensors:
            raise ValueError(f"{label} has no encoder tensor 'encoder.weight': features cannot be found from text with it")
        weight = tensors["encoder.weight"]
        scale, norm = 1.0, hp.get("norm_activation", "dataset-wise")
        if norm == "dataset-wise":
            avg = (hp.get("dataset_average_activation_norm") or {}).get("in")
            if isinstance(avg, bool) or not isinstance(avg, int | float) or not avg > 0:
                raise ValueError(f"{label}: hyperparams.json has no dataset_average_activation_norm.in")
            scale = math.sqrt(weight.shape[1]) / avg
        act = hp.get("act_fn", "jumprelu")
        if act not in ("jumprelu", "relu", "topk"):
            raise ValueError(f"{label}: act_fn {act!r} is not one of jumprelu, relu, topk")
        return Encoder(weight, 0, tensors.get("encoder.bias"),
                       tensors.get("decoder.bias") if hp.get("apply_decoder_bias_to_pre_encoder") else None, scale,
                       "token" if norm == "token-wise" else None,
                       threshold=float(hp.get("jump_relu_threshold", 0.0)) if act == "jumprelu" else None,
                       topk=positive_int(hp.get("top_k"), "top_k", label) if act == "topk" else None, label=label)
