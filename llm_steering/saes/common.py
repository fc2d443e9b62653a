"""Helpers the format modules share: picking and checking the decoder, reading config numbers."""

from __future__ import annotations

import re
from typing import Any

from llm_steering.saes.base import Decoder
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef


def pick_decoder(tensors: dict[str, TensorRef], options: list[tuple[str, int]], label: str) -> Decoder:
    """The first of `options` (tensor name, features axis) in the file; it must be 2-D."""
    for name, axis in options:
        if name in tensors:
            if len(tensors[name].shape) != 2:
                raise ValueError(f"{label}: {name} must be 2-D, got shape {list(tensors[name].shape)}")
            return Decoder(tensors[name], name, axis)
    wanted = " or ".join(repr(n) for n, _ in options)
    raise ValueError(f"{label} has no 2-D tensor {wanted} (found: {', '.join(sorted(tensors)[:8])})")


def check_mirror(dec: Decoder, tensors: dict[str, TensorRef], enc_name: str, enc_axis: int, label: str,
                 same_width: bool = True) -> None:
    """The encoder (when the file has one) must have as many features as the decoder (and, for an
    SAE, the decoder's width): a transposed or mismatched file would read the wrong vectors."""
    if enc_name not in tensors:
        return
    enc = tensors[enc_name].shape
    ok = len(enc) == 2 and enc[enc_axis] == dec.d_sae
    if ok and same_width:
        ok = enc[1 - enc_axis] == dec.tensor.shape[1 - dec.axis]
    if not ok:
        raise ValueError(f"{label}: {dec.name} has shape {list(dec.tensor.shape)}, which does not match {enc_name} {list(enc)}")


def check_config_shape(dec: Decoder, d_sae: Any, d_out: Any, label: str) -> None:
    """A decoder must have the shape its config says ([d_sae, d_out] features first)."""
    if not (isinstance(d_sae, int) and isinstance(d_out, int) and d_sae > 0):
        return
    shape = dec.tensor.shape if dec.axis == 0 else dec.tensor.shape[::-1]
    if tuple(shape) != (d_sae, d_out):
        raise ValueError(f"{label}: {dec.name} has shape {list(dec.tensor.shape)}, but its config says d_sae, d_in = {[d_sae, d_out]}")


def skip_on_hub(src: SAESource, folder: str, layer: int, hook_point: str | None) -> bool:
    """On the hub, skip folders whose numbers cannot name the layer (saves downloading their cfg.json)."""
    if src.local is not None:
        return False
    numbers = {int(n) for n in re.findall(r"\d+", folder)}
    wanted = {int(n) for n in re.findall(r"\d+", hook_point)} if hook_point else {layer, layer + 1}
    return bool(numbers) and not numbers & wanted


def config_beside(src: SAESource, file: str, name: str, layer: int, hook_point: str | None) -> str | None:
    """The path of the config `name` beside `file`, or None when there is none (or, on the hub, when the
    folder cannot be at `layer`)."""
    rel = src.beside(file, name)
    return None if rel not in src.files or skip_on_hub(src, rel, layer, hook_point) else rel


def positive_int(value: Any, what: str, label: str) -> int:
    """An integer config value (k, top_k); a one-line error for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{label}: {what} is {value!r}, not a whole number")
    return int(value)
