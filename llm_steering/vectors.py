"""Steering vector files: named unit directions for one model, with its layer norms.

A `steering_vectors.pt` file is a plain dict that `torch.load(weights_only=True)` reads:
  {"format": "llm-steering/vectors", "version": 1, "model_id": str, "hidden_size": int,
   "layer_norms": {layer: float}, "vectors": [{"name", "layer", "index", "concept",
   "source", "description", "metadata", "vector": float32 [hidden_size]}, ...]}

    >>> vectors = load_vectors("steering_vectors.pt")
    >>> vectors.get("pirate").layer, vectors.norm(15)
    >>> comp = vectors.component("pirate", 0.2, op="clamp")     # strength = 0.2 x the layer's norm
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_steering.components import SteeringComponent
from llm_steering.core import FILE_VERSION, atomic_write, check_header, check_name, is_finite_number, parse_layer_index
from llm_steering.models import decoder_layers, forward_hooks, layer_hidden

import torch

VECTORS_FORMAT = "llm-steering/vectors"
CONTRASTIVE_HINT = "python extract_steering_vectors.py --contrastive concepts.yaml --output {path}"
SAE_HINT = "python extract_steering_vectors.py --sae-source {source} --features {features} --output {path}"
DEFAULT_NORM_TEXT = (
    "The library opens at nine in the morning on weekdays. Visitors can borrow up to five books "
    "at a time and return them within three weeks. The reading room on the second floor is quiet, "
    "with long tables, good lamps and a few comfortable chairs near the windows."
)


@dataclass(frozen=True)
class SteeringVector:
    """A named unit direction in the residual stream after decoder layer `layer`.

    From an SAE (`index` = feature index, name like "L15F21576") or from contrastive
    prompts (`concept` = the concept's name). The vector is stored as float32, unit length.

        >>> SteeringVector(name="eiffel_tower", layer=9, vector=v, concept="eiffel_tower", source="concepts.yaml")
    """

    name: str
    layer: int
    vector: torch.Tensor
    index: int | None = None
    concept: str | None = None
    source: str = ""
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # where it came from (SAE file, hook point, ...)

    def __post_init__(self) -> None:
        check_name(self.name, "steering vector")
        label = f"steering vector {self.name!r}"
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"{label}: layer must be a non-negative integer, got {self.layer!r}")
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0):
            raise ValueError(f"{label}: index must be a non-negative integer or None, got {self.index!r}")
        for key in ("source", "description"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{label}: {key} must be a string")
        if not isinstance(self.metadata, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in self.metadata.items()
        ):
            raise ValueError(f"{label}: metadata must be a dict of strings, numbers and booleans")
        object.__setattr__(self, "metadata", dict(self.metadata))
        if self.concept is not None and not isinstance(self.concept, str):
            raise ValueError(f"{label}: concept must be a string or None")
        vec = self.vector
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() == 0 or not vec.is_floating_point():
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{label}: vector must be a 1-D floating-point tensor, got {shape}")
        vec = vec.detach().to(device="cpu", dtype=torch.float32)
        norm = vec.norm()
        if not torch.isfinite(vec).all() or norm == 0:
            raise ValueError(f"{label}: vector has NaN/infinite values or zero norm")
        object.__setattr__(self, "vector", (vec / norm).contiguous())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "index": self.index, "concept": self.concept,
            "source": self.source, "description": self.description, "metadata": dict(self.metadata),
            "vector": self.vector.clone(),
        }


@dataclass
class SteeringVectorSet:
    """Steering vectors for one model, with the typical residual norm at their layers.

        >>> vs = SteeringVectorSet.load("steering_vectors.pt")
        >>> vs.get("eiffel_tower").layer, vs.norm(9)
        >>> comp = vs.component("eiffel_tower", 0.5, op="clamp")   # strength = 0.5 x norm(layer)
    """

    model_id: str
    hidden_size: int
    vectors: list[SteeringVector]
    layer_norms: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError("steering vector set: model_id must be a non-empty string")
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"steering vector set: hidden_size must be a positive integer, got {self.hidden_size!r}")
        self.vectors = list(self.vectors)
        seen: set[str] = set()
        for vec in self.vectors:
            if not isinstance(vec, SteeringVector):
                raise ValueError(f"steering vector set: vectors must be SteeringVector objects, got {type(vec).__name__}")
            if vec.name in seen:
                raise ValueError(f"steering vector set: the name {vec.name!r} is used twice; names must be unique")
            seen.add(vec.name)
            if vec.vector.numel() != self.hidden_size:
                raise ValueError(
                    f"steering vector {vec.name!r} has size {vec.vector.numel()}, but the set's hidden size is {self.hidden_size}"
                )
        norms: dict[int, float] = {}
        for layer, value in dict(self.layer_norms).items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"steering vector set: layer_norms key {layer!r} is not a layer number")
            if not is_finite_number(value) or value <= 0:
                raise ValueError(f"steering vector set: the norm of layer {layer} must be a positive number, got {value!r}")
            norms[layer] = float(value)
        self.layer_norms = dict(sorted(norms.items()))

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def get(self, key: str) -> SteeringVector:
        """A vector by name ("eiffel_tower", "L15F21576") or by "layer:index" ("15:21576")."""
        for vec in self.vectors:
            if vec.name == key:
                return vec
        layer_index = parse_layer_index(key)
        if layer_index:
            layer, index = layer_index
            for vec in self.vectors:
                if vec.layer == layer and vec.index == index:
                    return vec
        names = ", ".join(self.names) or "none"
        raise ValueError(f"no steering vector {key!r} in this file; available: {names} (or 'layer:index' of an SAE feature)")

    def norm(self, layer: int) -> float:
        """The typical residual norm after `layer` (mean over the tokens of a neutral text)."""
        if layer not in self.layer_norms:
            have = ", ".join(str(k) for k in self.layer_norms) or "none"
            raise ValueError(
                f"this vector file has no residual norm for layer {layer} (it has: {have}); "
                "re-run extract_steering_vectors.py for that layer"
            )
        return self.layer_norms[layer]

    def component(self, key: str, fraction: float, op: str = "add") -> SteeringComponent:
        """A SteeringComponent for vector `key`, strength = fraction x norm(its layer)."""
        if not is_finite_number(fraction):
            raise ValueError(f"fraction must be a finite number (0.5 = half the typical residual norm), got {fraction!r}")
        vec = self.get(key)
        return SteeringComponent(layer=vec.layer, vector=vec.vector, strength=fraction * self.norm(vec.layer), op=op, name=vec.name)

    def merged(self, other: SteeringVectorSet) -> SteeringVectorSet:
        """This set with `other`'s vectors and norms added (same name: other's replaces this one's)."""
        if other.model_id != self.model_id or other.hidden_size != self.hidden_size:
            raise ValueError(
                f"cannot merge vectors for {other.model_id!r} (hidden size {other.hidden_size}) into a file for "
                f"{self.model_id!r} (hidden size {self.hidden_size}): use another --output file"
            )
        new = {v.name: v for v in other.vectors}
        vectors = [new.pop(v.name, v) for v in self.vectors] + list(new.values())
        return SteeringVectorSet(self.model_id, self.hidden_size, vectors, {**self.layer_norms, **other.layer_norms})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VECTORS_FORMAT, "version": FILE_VERSION, "model_id": self.model_id,
            "hidden_size": self.hidden_size, "layer_norms": dict(self.layer_norms),
            "vectors": [v.to_dict() for v in self.vectors],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the set to `path` atomically (a temp file, then os.replace)."""
        data = self.to_dict()
        atomic_write(path, lambda tmp: torch.save(data, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, create_hint: str | None = None) -> SteeringVectorSet:
        """Read a vector file with `torch.load(weights_only=True)`; ValueError for anything wrong with it.

        `create_hint` is the command a missing file's message suggests (default: the
        contrastive extraction; `catalog` passes the SAE command for SAE profiles).
        """
        path = Path(path)
        if not path.is_file():
            hint = create_hint or CONTRASTIVE_HINT.format(path=path)
            raise ValueError(f"steering vector file {str(path)!r} not found: create it with `{hint}`")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt zip, truncated file, or a pickle that asks for code
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(
                f"{path} is not a readable steering vector file (refused by torch.load(weights_only=True): {first})"
            ) from None
        try:
            return cls._from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: Any) -> SteeringVectorSet:
        check_header(data, VECTORS_FORMAT, FILE_VERSION, "steering vector file")
        raw = data.get("vectors")
        if not isinstance(raw, list):
            raise ValueError("'vectors' must be a list")
        allowed = {"name", "layer", "index", "concept", "source", "description", "metadata", "vector"}
        vectors = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not {"name", "layer", "vector"} <= item.keys():
                raise ValueError(f"vector #{i} must be a dict with at least name, layer and vector")
            vectors.append(SteeringVector(**{k: v for k, v in item.items() if k in allowed}))
        norms = data.get("layer_norms", {})
        if not isinstance(norms, dict):
            raise ValueError("'layer_norms' must be a dict {layer: norm}")
        return cls(data.get("model_id"), data.get("hidden_size"), vectors, norms)


SHIPPED_VECTORS = Path(__file__).resolve().parent / "data" / "steering_vectors.pt"  # the embedded model's ten concepts


def load_vectors(path: str | os.PathLike | None = None) -> SteeringVectorSet:
    """Same as `SteeringVectorSet.load(path)`; without a path, the ten concepts shipped for the embedded
    model (package data, so it works from any folder once the package is installed).

        >>> vectors = load_vectors()                       # the shipped concepts
        >>> vectors = load_vectors("my_vectors.pt")
    """
    return SteeringVectorSet.load(SHIPPED_VECTORS if path is None else path)


def measure_layer_norms(model: Any, tokenizer: Any, layers: Sequence[int], text: str | None = None) -> dict[int, float]:
    """Typical residual norm after each of `layers`: mean over the tokens of `text` (first token left out).

    The first token carries a huge outlier norm, so it is not counted. `text` defaults
    to a short neutral paragraph.

        >>> measure_layer_norms(model, tok, [9, 15])
        {9: 121.3, 15: 152.8}
    """
    layer_list = decoder_layers(model)[1]
    layers = sorted({int(layer) for layer in layers})
    for layer in layers:
        if not 0 <= layer < len(layer_list):
            raise ValueError(f"layer {layer} is out of range: this model has {len(layer_list)} layers (0-{len(layer_list) - 1})")
    ids = tokenizer(text or DEFAULT_NORM_TEXT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    if ids.shape[1] < 2:
        raise ValueError("the text for measuring residual norms needs at least two tokens")
    found: dict[int, float] = {}

    def hook_for(layer: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden = layer_hidden(output)[0, 1:].float()  # [seq - 1, d_model]
            found[layer] = float(hidden.norm(dim=-1).mean())
        return hook

    with forward_hooks((layer_list[layer], hook_for(layer)) for layer in layers), torch.inference_mode():
        model(input_ids=ids)
    return {layer: found[layer] for layer in layers}


def load_saes_from_file(path: str | os.PathLike, cfg: dict, device: Any = None) -> list[SteeringComponent]:
    """Deprecated name of `components_from_file` (it loads steering components, not SAEs); `device` is ignored."""
    warnings.warn("load_saes_from_file is deprecated: use components_from_file(path, cfg)", DeprecationWarning,
                  stacklevel=2)
    return components_from_file(path, cfg)


def components_from_file(path: str | os.PathLike, cfg: dict) -> list[SteeringComponent]:
    """Steering components for `cfg["features"]`, taken from a steering vector file.

    `cfg` keys (as in the reference's config):
      features: list of `[layer, index, strength]` (an SAE feature in the file), `[name, strength]`,
        or a bare name (strength = half the layer's typical norm); strengths are absolute.
      reduced_strengths: multiply each strength by its layer index (default False).
      clamp_intensity (or mode: "clamp"): clamp instead of add (default: add).
      model_id (or model_name): must equal the file's model id, when given.
      hidden_size: must equal the file's hidden size, when given.
    Components hold float32 CPU vectors (the steering functions move them to the model's device).

        >>> cfg = {"features": [[15, 21576, 0.57]], "reduced_strengths": True, "clamp_intensity": True,
        ...        "model_id": "meta-llama/Llama-3.1-8B-Instruct"}
        >>> components_from_file("llama_vectors.pt", cfg)    # one clamp at layer 15, strength 8.55
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a dict with a 'features' list, got {type(cfg).__name__}")
    vectors = load_vectors(path)
    want_model = cfg.get("model_id", cfg.get("model_name"))
    if want_model is not None and str(want_model) != vectors.model_id:
        raise ValueError(
            f"{path} holds vectors for {vectors.model_id!r}, not for {want_model!r}: use that model or extract vectors for this one"
        )
    want_hidden = cfg.get("hidden_size")
    if want_hidden is not None and want_hidden != vectors.hidden_size:
        raise ValueError(
            f"{path} holds vectors of size {vectors.hidden_size}, but the model's hidden size is {want_hidden}: "
            "extract vectors for this model"
        )
    features = cfg.get("features")
    if not isinstance(features, list) or not features:
        raise ValueError("cfg['features'] must be a non-empty list of [layer, index, strength] triples or names")
    reduced = bool(cfg.get("reduced_strengths", False))
    op = "clamp" if cfg.get("clamp_intensity") or cfg.get("mode") == "clamp" else "add"
    comps = []
    for item in features:
        if isinstance(item, str):
            vec, strength = vectors.get(item), None
        elif isinstance(item, (list, tuple)) and len(item) == 3 and all(is_finite_number(x) for x in item):
            layer, index, strength = item
            if layer != int(layer) or index != int(index):
                raise ValueError(f"feature {list(item)}: layer and index must be integers")
            key = f"{int(layer)}:{int(index)}"
            try:
                vec = vectors.get(key)
            except ValueError:
                raise ValueError(
                    f"feature {key} is not in {path}: extract it with "
                    f"`python extract_steering_vectors.py --sae-source SOURCE --features {key} --output {path}`"
                ) from None
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and is_finite_number(item[1]):
            vec, strength = vectors.get(item[0]), item[1]
        else:
            raise ValueError(f"feature {item!r} must be [layer, index, strength], [name, strength] or a name")
        if strength is None:
            strength = 0.5 * vectors.norm(vec.layer)
        elif reduced:
            strength = strength * vec.layer
        comps.append(SteeringComponent(layer=vec.layer, vector=vec.vector, strength=strength, op=op, name=vec.name))
    return comps


