"""Goodfire: `*-SAE-l{L}.pth`, the state dict of the model card's SparseAutoEncoder.

`encoder_linear` = Linear(d_model, d_sae), `decoder_linear` = Linear(d_sae, d_model): the
decoder is `decoder_linear.weight` [d_model, d_sae]. Encoder: relu(encoder_linear(x)).
"""

from __future__ import annotations

import re

from llm_steering.saes.base import Decoder, Encoder, SAEFile, SAEFormat, sae_file
from llm_steering.saes.common import check_mirror, pick_decoder
from llm_steering.saes.registry import register
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef


@register("goodfire", r"(?:^|/)[^/]*-SAE-l(\d+)\.pth?$",
          looks_like="*-SAE-l{L}.pth")
class Goodfire(SAEFormat):
    def candidate(self, src: SAESource, file: str, match: re.Match, layer: int, hook_point: str | None) -> SAEFile | None:
        return sae_file(src, file, self.name, f"blocks.{match.group(1)}.hook_resid_post")

    def decoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Decoder:
        dec = pick_decoder(tensors, [("decoder_linear.weight", 1)], sae.label)
        check_mirror(dec, tensors, "encoder_linear.weight", 0, sae.label)
        return dec

    def encoder(self, src: SAESource, sae: SAEFile, tensors: dict[str, TensorRef]) -> Encoder:
        self.decoder(src, sae, tensors)
        if "encoder_linear.weight" not in tensors:
            raise ValueError(f"{sae.label} has no encoder tensor 'encoder_linear.weight': features cannot be found from text with it")
        return Encoder(tensors["encoder_linear.weight"], 0, tensors.get("encoder_linear.bias"), label=sae.label)
