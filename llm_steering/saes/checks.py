"""An encoder's parameters checked as its library would: shapes, 1 <= k <= d_sae, finite values."""

from __future__ import annotations

import math

from llm_steering.saes.base import Encoder
from llm_steering.saes.tensors import TensorRef

import torch


def check_encoder(enc: Encoder) -> Encoder:
    """`enc` if every parameter fits; a one-line ValueError naming the first that does not."""
    label, w = enc.label, enc.weight
    if len(w.shape) != 2:
        raise ValueError(f"{label}: the encoder weight must be 2-D, got shape {list(w.shape)}")
    for what, ref, want in (("encoder bias", enc.bias, (enc.d_sae,)), ("input bias", enc.input_bias, (enc.d_model,))):
        if ref is not None and tuple(ref.shape) != want:
            raise ValueError(f"{label}: the {what} {ref.name} has shape {list(ref.shape)}, which does not fit "
                             f"the encoder {w.name} {list(w.shape)} ({want[0]} expected)")
    if isinstance(enc.threshold, TensorRef):
        want = (enc.d_sae,) if enc.threshold_per_feature else ()
        if tuple(enc.threshold.shape) != want:
            what = f"one per feature ([{enc.d_sae}])" if want else "one number (shape [])"
            raise ValueError(f"{label}: the threshold {enc.threshold.name} has shape {list(enc.threshold.shape)}; "
                             f"its library needs {what}")
    if enc.topk is not None and not 1 <= enc.topk <= enc.d_sae:
        raise ValueError(f"{label}: k = {enc.topk}, but a TopK SAE needs 1 <= k <= d_sae ({enc.d_sae})")
    if not (math.isfinite(enc.input_scale) and enc.input_scale > 0):
        raise ValueError(f"{label}: the input scale is {enc.input_scale}; it must be a positive finite number")
    for ref in (enc.bias, enc.input_bias, enc.threshold):
        if isinstance(ref, TensorRef):
            finite_or_fail(ref.read(), ref.name, label)
        elif isinstance(ref, float) and not math.isfinite(ref):
            raise ValueError(f"{label}: the threshold is {ref}; it must be finite")
    return enc


def finite_or_fail(values: torch.Tensor, name: str, label: str, first_feature: int | None = None) -> None:
    """A one-line error if `values` holds NaN or infinite numbers."""
    if not torch.isfinite(values).all():
        bad = ~torch.isfinite(values)
        where = ""
        if first_feature is not None:
            where = f" (feature {first_feature + int(bad.nonzero()[0, -1])})"
        raise ValueError(f"{label}: {name} holds NaN or infinite values{where}: the file is damaged")
