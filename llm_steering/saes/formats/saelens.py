"""SAELens folders: `cfg.json` + `sae_weights.safetensors`, `W_dec` [d_sae, d_out], `W_enc` [d_in, d_sae].

The hook point is `metadata.hook_name` (SAELens 6), `hook_name` (5.x) or `hook_point` (older);
a transcoder also names the hook it writes (`hook_name_out`) and has `d_out`. Encoders as
`SAE.encode` computes them: (x, normalised at run time for `constant_norm_rescale` and
`layer_norm`, identity for the others) - b_dec (unless `apply_b_dec_to_input` is false; never for
a transcoder), @ W_enc + b_enc, then ReLU, JumpReLU (`threshold` [d_sae]) or per-token TopK.
"""

from __future__ import annotations

import re
from typing import Any

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, sae_file
from llm_steering.saes.common import check_config_shape, check_mirror, config_beside, pick_decoder, positive_int
from llm_steering.saes.registry import register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef

FIND_ARCHITECTURES = ("standard", "jumprelu", "topk", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                      "jumprelu_skip_transcoder")
# normalize_activations: what SAE.encode does with it at inference
NORMS = {"none": None, "expected_average_only_in": None, "covariance_whitening": None,  # folded in or unused: identity
         "constant_norm_rescale": "token", "layer_norm": "layer_norm"}


def _meta(cfg: dict, key: str) -> Any:
    meta = cfg.get("metadata")
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if value not in (None, "") else cfg.get(key)


def hook_of(cfg: Any, label: str) -> str:
    """The hook point in a SAELens cfg.json of any version."""
    if isinstance(cfg, dict):
        for key in ("hook_name", "hook_point"):
            if isinstance(value := _meta(cfg, key), str) and value:
                return value
    raise ValueError(f"{label} names no hook point (metadata.hook_name, hook_name or hook_point)")


def is_transcoder(cfg: dict) -> bool:
    return "transcoder" in str(cfg.get("architecture", "")) or isinstance(cfg.get("d_out"), int)


@register("saelens", r"(?:^|/)sae_weights\.safetensors$",
          looks_like="cfg.json + sae_weights.safetensors")
class SAELens(SAEFormat):
    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        cfg_rel = config_beside(src, file, "cfg.json", layer, hook_point)
        if cfg_rel is None:
            return None
        cfg = src.read_json(cfg_rel)
        hook = hook_of(cfg, f"{src.name}/{cfg_rel}")
        out_hook = _meta(cfg, "hook_name_out") if is_transcoder(cfg) else None
        if is_transcoder(cfg) and not isinstance(out_hook, str):
            raise ValueError(f"{src.name}/{cfg_rel} is a transcoder but names no output hook (metadata.hook_name_out)")
        return sae_file(src, file, self.name, hook, out_hook, architecture=str(cfg.get("architecture", "standard")),
                        model_name=_meta(cfg, "model_name"))

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        dec = pick_decoder(tensors, [("W_dec", 0)], sae.label)
        cfg = src.read_json(src.beside(sae.file, "cfg.json"))
        transcoder = is_transcoder(cfg)
        check_config_shape(dec, cfg.get("d_sae"), cfg.get("d_out") if transcoder else cfg.get("d_in"), sae.label)
        check_mirror(dec, tensors, "W_enc", 1, sae.label, same_width=not transcoder)
        return dec

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        label, cfg = sae.label, src.read_json(src.beside(sae.file, "cfg.json"))
        dec = self.decoder(src, sae, tensors)
        arch = str(cfg.get("architecture", "standard"))
        if arch not in FIND_ARCHITECTURES:
            raise ValueError(f"{label} is a {arch} SAE: finding features from text supports "
                             f"{', '.join(FIND_ARCHITECTURES)} (and batchtopk saved for inference) SAELens SAEs")
        norm = cfg.get("normalize_activations") or "none"
        if norm not in NORMS:
            raise ValueError(f"{label} normalizes its inputs with {norm!r}, which SAELens does not know: use one of {', '.join(NORMS)}")
        if cfg.get("activation_fn", "relu") not in ("relu", "topk"):
            raise ValueError(f"{label} uses activation {cfg['activation_fn']!r}: only ReLU-based SAEs are supported for finding")
        if "W_enc" not in tensors:
            raise ValueError(f"{label} has no encoder tensor 'W_enc': features cannot be found from text with it")
        topk = None
        if arch == "topk" or cfg.get("activation_fn") == "topk":
            kwargs = cfg.get("activation_fn_kwargs") or {}
            topk = positive_int(cfg["k"] if "k" in cfg else kwargs.get("k"), "k", label)
        b_dec_in = cfg.get("apply_b_dec_to_input", True) and not is_transcoder(cfg)
        jump = "jumprelu" in arch
        if jump and "threshold" not in tensors:
            raise ValueError(f"{label} is a {arch} SAE without a 'threshold' tensor")
        return Encoder(tensors["W_enc"], 1, tensors.get("b_enc"), tensors.get("b_dec") if b_dec_in else None,
                       input_norm=NORMS[norm], threshold=tensors["threshold"] if jump else None, threshold_per_feature=jump,
                       topk=topk, decoder_norm=dec if topk and cfg.get("rescale_acts_by_decoder_norm") else None, label=label)
