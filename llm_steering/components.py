"""Steering components and the steering math every backend shares.

A `SteeringComponent` is one edit of the residual stream after decoder layer `layer`;
`steer_hidden` applies a list of them to a hidden state [batch, seq, d_model], the same
function in the hooks, NNsight and vLLM backends (so the three agree token for token).

    >>> comp = SteeringComponent(layer=10, vector=v, strength=60.0, op="clamp")
    >>> steered = steer_hidden(hidden, [comp], [comp.vector])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from llm_steering.models import hidden_size, is_finite_number, num_layers
from llm_steering.traces import ComponentTrace, SteeringTrace

import torch

OPS = ("add", "clamp", "cap", "ablate", "add_keepnorm", "clamp_keepnorm")
KEEPNORM = "_keepnorm"  # op suffix: the edited state is rescaled to the norm it had before the edit


# ---------------------------------------------------------------------------
# Steering components (their traces: traces.py)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringComponent:
    """One edit of the residual stream after decoder layer `layer`.

    `vector` is stored as a float32 unit vector. `op` is one of:
    "add" (h + strength·v), "clamp" (component along v set to `strength`),
    "cap" (component along v limited to [cap_min, cap_max]; None = unbounded),
    "ablate" (component along v multiplied by `scale`; 0 removes it),
    "add_keepnorm" / "clamp_keepnorm" (norm-preserving: add or clamp, then the edited hidden
    state is rescaled to the norm it had before, position by position, so only its direction
    turns towards v; after a clamp_keepnorm the component along v is s·|h|/|h + (s - p)·v|).

        >>> SteeringComponent(layer=15, vector=v, strength=8.5, op="clamp", name="eiffel_tower")
    """

    layer: int
    vector: torch.Tensor
    strength: float = 0.0
    op: str = "add"
    cap_min: float | None = None
    cap_max: float | None = None
    scale: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        label = f"component {self.name!r}" if self.name else "steering component"
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"{label}: layer must be a non-negative integer, got {self.layer!r}")
        if self.op not in OPS:
            raise ValueError(f"{label}: unknown op {self.op!r}; use one of {', '.join(OPS)}")
        for key in ("strength", "scale"):
            value = getattr(self, key)
            if not is_finite_number(value):
                raise ValueError(f"{label}: {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        for key in ("cap_min", "cap_max"):
            value = getattr(self, key)
            if value is not None:
                if not is_finite_number(value):
                    raise ValueError(f"{label}: {key} must be a finite number or None, got {value!r}")
                object.__setattr__(self, key, float(value))
        if self.op == "cap" and self.cap_min is None and self.cap_max is None:
            raise ValueError(f"{label}: op 'cap' needs cap_min, cap_max or both")
        if self.cap_min is not None and self.cap_max is not None and self.cap_min > self.cap_max:
            raise ValueError(f"{label}: cap_min {self.cap_min} is above cap_max {self.cap_max}")
        vec = self.vector
        if not isinstance(vec, torch.Tensor):
            raise ValueError(f"{label}: vector must be a torch.Tensor, got {type(vec).__name__}")
        if vec.dim() != 1 or vec.numel() == 0:
            raise ValueError(f"{label}: vector must be 1-D of the model's hidden size, got shape {tuple(vec.shape)}")
        if not vec.is_floating_point():
            raise ValueError(f"{label}: vector must be floating point, got {vec.dtype}")
        vec = vec.detach().to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(vec).all():
            raise ValueError(f"{label}: vector contains NaN or infinite values")
        norm = vec.norm()
        if norm == 0 or not torch.isfinite(norm):
            raise ValueError(f"{label}: vector has zero norm; give a non-zero direction")
        object.__setattr__(self, "vector", vec / norm)

    def with_op(self, op: str, **changes: Any) -> SteeringComponent:
        """A copy with another op (and any other field changed)."""
        return replace(self, op=op, **changes)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def validate_components(model: Any, components: Sequence[SteeringComponent]) -> None:
    """Raise ValueError if a component does not fit this model (layer range, vector size)."""
    n_layers, d_model = num_layers(model), hidden_size(model)
    for comp in components:
        if not isinstance(comp, SteeringComponent):
            raise ValueError(f"components must be SteeringComponent objects, got {type(comp).__name__}")
        label = f"component {comp.name!r}" if comp.name else "steering component"
        if comp.layer >= n_layers:
            raise ValueError(
                f"{label}: layer {comp.layer} is out of range: this model has {n_layers} layers (0-{n_layers - 1})"
            )
        if comp.vector.numel() != d_model:
            raise ValueError(
                f"{label}: vector has size {comp.vector.numel()}, but this model's hidden size is {d_model}"
            )


# ---------------------------------------------------------------------------
# The steering math, shared by both backends
# ---------------------------------------------------------------------------


def steer_hidden(
    hidden: torch.Tensor,
    components: Sequence[SteeringComponent],
    vectors: Sequence[torch.Tensor],
    steer_from: int = 0,
    start_pos: int = 0,
    record: list[ComponentTrace] | None = None,
) -> torch.Tensor:
    """Apply `components` in order to `hidden` [batch, seq, d_model]; return the edited tensor.

    `vectors` are the components' directions already on hidden's device (float32 at least).
    Positions are numbered from `start_pos`; those before `steer_from` are left as they
    are. When `record` is given, the projections before and after each edit (batch
    row 0) are recorded in it, one ComponentTrace per component (call `flush` after).
    A 16-bit hidden state is steered in float32 and rounded once: in bfloat16, projecting
    on a rounded v put a clamp off by up to 2% of its strength at hidden size 4096.
    """
    seq = hidden.shape[1]
    first = max(0, steer_from - start_pos)  # first position of this chunk that is steered
    for i, (comp, v) in enumerate(zip(components, vectors, strict=True)):
        v = v.to(device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
        h = hidden.to(v.dtype)  # no copy for float32 states
        before = h @ v  # [batch, seq]
        if first < seq:
            part = h[:, first:]
            edited = part + _delta(comp, before[:, first:]).unsqueeze(-1) * v  # [batch, seq - first, d]
            if comp.op.endswith(KEEPNORM):  # back to each position's old norm (a zero state stays zero)
                edited = edited * (part.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            edited = edited.to(hidden.dtype)
            hidden = edited if first == 0 else torch.cat([hidden[:, :first], edited], dim=1)
        if record is not None:
            record[i].record(before[0], hidden[0].to(v.dtype) @ v)
    return hidden


def _delta(comp: SteeringComponent, proj: torch.Tensor) -> torch.Tensor:
    """How far to move along v, given the current projections `proj` (before any keepnorm rescale)."""
    op = comp.op.removesuffix(KEEPNORM)
    if op == "add":
        return torch.full_like(proj, comp.strength)
    if op == "clamp":
        return comp.strength - proj
    if op == "cap":
        return proj.clamp(min=comp.cap_min, max=comp.cap_max) - proj
    return (comp.scale - 1.0) * proj  # ablate


def resolve_components(components: Sequence[SteeringComponent], clamp_intensity: bool) -> list[SteeringComponent]:
    """The components as a backend applies them: with `clamp_intensity`, every add becomes a clamp
    (add_keepnorm a clamp_keepnorm)."""
    comps = list(components)
    if clamp_intensity:
        comps = [c.with_op(c.op.replace("add", "clamp", 1)) if c.op.startswith("add") else c for c in comps]
    return comps


def by_layer(components: Sequence[SteeringComponent]) -> dict[int, list[int]]:
    """Component indices grouped by layer, in the given order within a layer."""
    groups: dict[int, list[int]] = {}
    for i, comp in enumerate(components):
        groups.setdefault(comp.layer, []).append(i)
    return dict(sorted(groups.items()))


def new_trace(components: Sequence[SteeringComponent], prompt_ids: list[int]) -> SteeringTrace:
    """An empty trace for these components, its token ids the prompt."""
    return SteeringTrace(
        prompt_len=len(prompt_ids),
        token_ids=list(prompt_ids),
        components=[ComponentTrace(layer=c.layer, name=c.name, op=c.op) for c in components],
    )


def device_vectors(model: Any, components: Sequence[SteeringComponent]) -> list[torch.Tensor]:
    """The components' directions on the model's device, in float32 at least."""
    param = next(model.parameters())  # float32 even for a 16-bit model: steer_hidden computes in it
    return [c.vector.to(device=param.device, dtype=torch.promote_types(param.dtype, torch.float32)) for c in components]

