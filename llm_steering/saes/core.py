"""Finding the SAE of a layer in a source and reading feature directions from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_steering.saes.base import SAEFile
from llm_steering.saes.registry import FORMATS, SAE_FORMATS, get_format
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import tensor_index
from llm_steering.steering import SteeringVector

import torch

# Neuronpedia sources for SAE sets with public dashboards (from SAELens 6.54's pretrained_saes.yaml:
# "llama-3.1-8b-instruct-andyrdt" lists neuronpedia "llama3.1-8b-it/{L}-resid-post-aa" for layers
# 3-27 step 4, and the Goodfire l19 SAE "llama3.1-8b-it/19-resid-post-gf"). Fairly sure of the ids;
# not checked against neuronpedia.org itself (no network here).
NEURONPEDIA = {
    "andyrdt/saes-llama-3.1-8b-instruct": ("llama3.1-8b-it", "{layer}-resid-post-aa", (3, 7, 11, 15, 19, 23, 27)),
    "Goodfire/Llama-3.1-8B-Instruct-SAE-l19": ("llama3.1-8b-it", "{layer}-resid-post-gf", (19,)),
}


@dataclass(frozen=True)
class SAEFeature:
    """A feature's unit decoder direction in the residual stream (float32 [d_model]) and its SAE."""

    layer: int
    index: int
    direction: torch.Tensor
    sae: SAEFile

    @property
    def name(self) -> str:
        return f"L{self.layer}F{self.index}"

    def metadata(self) -> dict[str, Any]:
        """What a vector file records about where the feature came from."""
        meta = {"source": self.sae.source, "file": self.sae.file, "format": self.sae.format,
                "hook_point": self.sae.hook_point, "layer": self.layer, "index": self.index}
        if self.sae.hook_out != self.sae.hook_point:
            meta["hook_out"] = self.sae.hook_out
        return meta

    def steering_vector(self) -> SteeringVector:
        mapped = " through the layer's o_proj" if self.sae.writes_z else ""
        return SteeringVector(name=self.name, layer=self.layer, vector=self.direction, index=self.index,
                              source=self.sae.source, metadata=self.metadata(), description=(
                                  f"SAE feature {self.index} at layer {self.layer} ({self.sae.format}: "
                                  f"{self.sae.file}, hook {self.sae.hook_out}{mapped})"))


def read_features(source: str, features: list[tuple[int, int]], sae_format: str | None = None,
                  hook_point: str | None = None, trainer: int | None = None, model: Any = None,
                  model_id: str | None = None, allow_other_model: bool = False) -> list[SAEFeature]:
    """Unit residual-stream directions of SAE features (layer, index), each with the SAE it came from.

    `source` is a hub repo id (files downloaded once, cached by huggingface_hub) or a local
    directory; one file is read per layer, and of it only the features' elements. An SAE on
    `attn.hook_z` writes per-head z vectors: they are mapped through the layer's o_proj of
    `model` (the model, or a function that loads it when it is first needed). With `model_id`, an
    SAE whose config names another model is refused unless `allow_other_model`.

        >>> f = read_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576)])[0]
        >>> f.name, f.sae.hook_point
        ('L15F21576', 'resid_post_layer_15')
    """
    if not features:
        raise ValueError("no features given: name them as layer:index, e.g. 15:21576")
    src = SAESource.open(source)
    by_layer: dict[int, list[int]] = {}
    for layer, index in features:
        if layer < 0 or index < 0:
            raise ValueError(f"feature {layer}:{index}: layer and index must be non-negative")
        by_layer.setdefault(int(layer), []).append(int(index))
    found: dict[tuple[int, int], SAEFeature] = {}
    d_model = None
    for layer, indices in by_layer.items():
        sae = locate_sae(src, layer, sae_format, hook_point, trainer)
        check_model(sae, model_id, allow_other_model)
        vecs = read_directions(src, sae, indices)
        if sae.writes_z:
            vecs = z_to_residual(vecs, sae, model)
        for index, vec in zip(indices, vecs, strict=True):
            if d_model is not None and vec.numel() != d_model:
                raise ValueError(f"SAEs in {src.name} disagree on d_model ({d_model} vs {vec.numel()})")
            d_model = vec.numel()
            if not torch.isfinite(vec).all() or vec.norm() == 0:
                raise ValueError(f"feature {index} of {sae.label} has NaN/infinite values or zero norm")
            found[(layer, index)] = SAEFeature(layer, index, vec / vec.norm(), sae)
    return list({(f.layer, f.index): f for f in (found[(int(L), int(i))] for L, i in features)}.values())


def extract_sae_features(source: str, features: list[tuple[int, int]], sae_format: str | None = None,
                         hook_point: str | None = None, trainer: int | None = None, model: Any = None,
                         model_id: str | None = None, allow_other_model: bool = False) -> list[SteeringVector]:
    """`read_features` as SteeringVectors named "L{layer}F{index}".

        >>> vecs = extract_sae_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576), (19, 93)])
        >>> vecs[0].name, vecs[0].vector.shape
        ('L15F21576', torch.Size([4096]))
    """
    return [f.steering_vector() for f in read_features(source, features, sae_format, hook_point, trainer, model,
                                                       model_id, allow_other_model)]


def z_to_residual(rows: list[torch.Tensor], sae: SAEFile, model: Any) -> list[torch.Tensor]:
    """hook_z decoder rows (heads x d_head, head-major as SAELens flattens them) mapped into the
    residual stream through the attention output projection of their layer: W_O @ z."""
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()
    if model is None:
        raise ValueError(f"{sae.label} is on {sae.hook_out}: its rows are per-head z vectors, and mapping them into the "
                         "residual stream needs the model's o_proj: give --model without --skip-norms")
    from llm_steering.steering import decoder_layers

    layers = decoder_layers(model)[1]
    if sae.layer is None or not 0 <= sae.layer < len(layers):
        raise ValueError(f"{sae.label}: layer {sae.layer} is out of range for the model ({len(layers)} layers)")
    o_proj = layers[sae.layer].self_attn.o_proj.weight.detach().float().cpu()  # [d_model, heads * d_head]
    out = []
    for row in rows:
        if row.numel() != o_proj.shape[1]:
            raise ValueError(f"{sae.label} has z vectors of size {row.numel()}, but layer {sae.layer}'s o_proj takes "
                             f"{o_proj.shape[1]} (heads x head size): use the model these SAEs were trained for")
        out.append(o_proj @ row)
    return out


def neuronpedia_url(layer: int, index: int, source: str = "andyrdt/saes-llama-3.1-8b-instruct") -> str | None:
    """The feature's public Neuronpedia dashboard, or None where there is none.

        >>> neuronpedia_url(15, 21576)
        'https://www.neuronpedia.org/llama3.1-8b-it/15-resid-post-aa/21576'
    """
    model, pattern, layers = NEURONPEDIA.get(source, (None, "", ()))
    if model is None or layer not in layers or index < 0:
        return None
    return f"https://www.neuronpedia.org/{model}/{pattern.format(layer=layer)}/{index}"


def detect_format(src: SAESource) -> str:
    """The SAE layout of a source, from its file names."""
    found = [name for name, fmt in FORMATS.items() if any(fmt.pattern.search(f) for f in src.files)]
    if len(found) == 1:
        return found[0]
    if not found:
        there = ", ".join(f"{fmt.looks_like} ({name})" for name, fmt in FORMATS.items())
        raise ValueError(f"cannot tell the SAE format of {src.name}: none of {there} in it")
    raise ValueError(f"{src.name} holds several SAE layouts ({', '.join(found)}): choose one with --sae-format")


def locate_sae(src: SAESource | str, layer: int, sae_format: str | None = None, hook_point: str | None = None,
               trainer: int | None = None) -> SAEFile:
    """The SAE of steering layer `layer` in a source: the residual-stream one, or the one at `hook_point`
    (the hook it reads or, for a transcoder, the one it writes)."""
    src = SAESource.open(src) if isinstance(src, str) else src
    name = sae_format or detect_format(src)
    fmt = get_format(name)
    if trainer is not None and not fmt.takes_trainer:
        raise ValueError(f"--trainer is for {', '.join(n for n, f in FORMATS.items() if f.takes_trainer)} "
                         f"(dictionary_learning) SAEs, not {name}")
    cands = fmt.candidates(src, layer, hook_point)
    if trainer is not None:
        cands = [c for c in cands if f"/trainer_{trainer}/" in "/" + c.file]
    if hook_point is not None:
        hits = [c for c in cands if hook_point in (c.hook_point, c.hook_out)]
        if not hits:
            there = ", ".join(sorted({c.hook_out for c in cands})) or "none found"
            raise ValueError(f"no {name} SAE at hook point {hook_point!r} in {src.name} (hook points: {there})")
        if hits[0].layer != layer:
            raise ValueError(f"hook point {hook_point} is at layer {hits[0].layer}, not {layer}")
    else:
        hits = [c for c in cands if c.residual and c.layer == layer]
        if not hits:
            raise ValueError(_no_sae_message(src, name, cands, layer, trainer))
    # an SAE that reads `hook_point` before a transcoder that writes it
    return min(hits, key=lambda c: (hook_point is not None and c.hook_point != hook_point, c.rank, c.file))


def _no_sae_message(src: SAESource, name: str, cands: list[SAEFile], layer: int, trainer: int | None) -> str:
    others = sorted({c.hook_out for c in cands if not c.residual and c.layer == layer})
    if others:
        return (f"layer {layer} has no residual-stream {name} SAE (there: {', '.join(others)}; "
                f"name one with --hook-point to steer with it anyway) in {src.name}")
    have = ", ".join(str(n) for n in sorted({c.layer for c in cands if c.residual and c.layer is not None}))
    extra = f" for trainer {trainer}" if trainer is not None else ""
    return f"layer {layer} has no {name} SAE{extra} in {src.name} (layers available: {have or 'none found'})"


def read_directions(src: SAESource, sae: SAEFile, indices: list[int]) -> list[torch.Tensor]:
    """Decoder directions (not normalised, in the space of the SAE's output hook) for `indices`: float32 each."""
    dec = get_format(sae.format).decoder(src, sae, tensor_index(src.fetch(sae.file), sae.label))
    for i in indices:
        if not 0 <= i < dec.d_sae:
            raise ValueError(f"feature index {i} is out of range: {sae.label} has {dec.d_sae} features (0-{dec.d_sae - 1})")
    t = dec.tensor
    if dec.axis == 0:  # [d_sae, d_out]: row i
        return [t.block(i, i + 1, 0, t.shape[1])[0] for i in indices]
    return [t.block(0, t.shape[0], i, i + 1)[:, 0] for i in indices]  # [d_out, d_sae]: column i


def check_model(sae: SAEFile, model_id: str | None, allow_other_model: bool = False) -> None:
    """A one-line error if the SAE's config names another model than `model_id` (unless allowed)."""
    if allow_other_model or not sae.model_name or not model_id:
        return
    if _model_key(sae.model_name) != _model_key(model_id):
        raise ValueError(f"{sae.label} was trained on {sae.model_name}, not {model_id}: pass --model {sae.model_name}, "
                         "or --allow-other-model to use it anyway")


def _model_key(name: str) -> str:
    """A model name compared without owner, path or case: meta-llama/Llama-3.1-8B == /models/llama-3.1-8b/."""
    return name.strip().rstrip("/").rsplit("/", 1)[-1].lower()


__all__ = ["SAE_FORMATS", "NEURONPEDIA", "SAEFeature", "read_features", "extract_sae_features", "neuronpedia_url",
           "detect_format", "locate_sae", "read_directions", "check_model", "z_to_residual"]
