"""Additive steering as a llama.cpp control vector: a GGUF file that llama.cpp applies by itself.

llama.cpp (`llama-cli` / `llama-server --control-vector FILE`, `--control-vector-scaled FILE S`,
`--control-vector-layer-range A B`, and the libraries built on it) reads a GGUF with the
architecture `controlvector` and one float32 tensor `direction.N` per layer, and adds
`direction.N` to the output of decoder block N (0-based: `l_out` after the FFN's residual add)
at every position, the prompt's and the answer's. That is exactly an `add` at layer N here
(`h + s·v` after `model.model.layers[N]`, steering the prompt too), so an export writes, per
layer, the sum of strength × unit vector over the layer's `add` components. The layer
convention is checked against llama.cpp itself in tests/test_control_vector.py.

What a control vector cannot say is refused with one line each, never approximated:
- `clamp`, `cap`, `ablate`, `add_keepnorm`, `clamp_keepnorm`: their edit depends on the hidden
  state (its projection on v, or its norm), while a control vector is one fixed vector per
  layer; none of them has an exact additive equivalent.
- layer 0: llama.cpp steers blocks 1 and up (`direction.0` is an error there).
- steering that leaves the prompt alone (`steer_prompt: false`): llama.cpp steers every position.

    >>> comps = catalog.components(catalog.preset_spec("Eiffel Tower"))
    >>> export_for_model(model, comps, "eiffel.gguf")          # {15: float32 [576]}
    # then: llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector eiffel.gguf
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_steering.core import atomic_write
from llm_steering.models import hidden_size as model_hidden_size
from llm_steering.models import num_layers
from llm_steering.steering import SteeringComponent

import numpy as np

ARCH = "controlvector"
SUFFIX = ".gguf"


def export_for_model(model: Any, components: Sequence[SteeringComponent], path: str | os.PathLike,
                     steer_prompt: bool = True) -> dict[int, np.ndarray]:
    """Export `components` for `model` (its layer count, hidden size and type) as a control vector.

        >>> export_for_model(model, [SteeringComponent(layer=15, vector=v, strength=43.9)], "eiffel.gguf")
    """
    return export_control_vector(components, path, n_layers=num_layers(model), hidden_size=model_hidden_size(model),
                                 model_hint=str(getattr(model.config, "model_type", "") or ""), steer_prompt=steer_prompt)


def export_control_vector(components: Sequence[SteeringComponent], path: str | os.PathLike, n_layers: int | None = None,
                          hidden_size: int | None = None, model_hint: str = "",
                          steer_prompt: bool = True) -> dict[int, np.ndarray]:
    """Write `components` as a llama.cpp control vector at `path` (*.gguf), atomically; return
    {layer: float32 vector} as written. A one-line ValueError, and no file, for what a control
    vector cannot express (see the module's docstring).

        >>> export_control_vector([comp], "eiffel.gguf", n_layers=30, hidden_size=576, model_hint="llama")
    """
    check_path(path)
    if not steer_prompt:
        raise ValueError("a llama.cpp control vector steers the prompt too: switch 'steer the prompt' on to export this steering")
    directions = control_directions(components, n_layers, hidden_size)
    write_control_vector(directions, path, model_hint)
    return directions


def check_path(path: str | os.PathLike) -> Path:
    """`path` if it names a .gguf file, else a one-line ValueError."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX or not path.stem:
        raise ValueError(f"name the control vector file *.gguf (llama.cpp reads GGUF), not {path.name!r}")
    return path


def control_directions(components: Sequence[SteeringComponent], n_layers: int | None = None,
                       hidden_size: int | None = None) -> dict[int, np.ndarray]:
    """{layer: float32 [hidden_size]}: strength × v of the `add` components, summed per layer.

    A one-line ValueError for an op other than add, layer 0, a layer outside the model's
    (when `n_layers` is given), a vector of another size, or no component at all.
    """
    if not components:
        raise ValueError("nothing to export: steer with a feature (op add) first")
    sums: dict[int, np.ndarray] = {}
    for comp in components:
        label = repr(comp.name) if comp.name else "a steering component"
        if comp.op != "add":
            raise ValueError(f"{label} uses {comp.op}, which a llama.cpp control vector cannot express "
                             "(it adds one fixed vector per layer): export add steering only")
        if comp.layer == 0:
            raise ValueError(f"{label} steers layer 0, which llama.cpp control vectors cannot reach (they start at "
                             "layer 1): use another layer")
        if n_layers is not None and comp.layer >= n_layers:
            raise ValueError(f"{label}: layer {comp.layer} is out of range: this model has {n_layers} layers (0-{n_layers - 1})")
        vec = comp.vector.double().numpy() * comp.strength  # [d_model], summed in float64, written in float32
        if hidden_size is not None and vec.shape[0] != hidden_size:
            raise ValueError(f"{label}: vector has size {vec.shape[0]}, but this model's hidden size is {hidden_size}")
        if comp.layer in sums and sums[comp.layer].shape != vec.shape:
            raise ValueError(f"{label}: vector has size {vec.shape[0]}, unlike the others at layer {comp.layer}")
        sums[comp.layer] = sums.get(comp.layer, 0.0) + vec
    return {layer: vec.astype(np.float32) for layer, vec in sorted(sums.items())}


def write_control_vector(directions: dict[int, np.ndarray], path: str | os.PathLike, model_hint: str = "") -> Path:
    """Write {layer: vector} as a control-vector GGUF (repeng's layout: `controlvector.model_hint`,
    `controlvector.layer_count`, one `direction.N` each); a temp file renamed, so never half a file."""
    path = check_path(path)

    import gguf  # here, not at the top: it costs every console and app start a second (it imports mistral_common, cv2)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for layer, vec in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vec, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return path


def read_control_vector(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{layer: float32 vector} of a control-vector GGUF (written here, by repeng or by llama.cpp)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ValueError(f"{Path(path).name} is not a llama.cpp control vector (its architecture is not {ARCH!r})")
    out = {}
    for tensor in reader.tensors:
        kind, _, layer = tensor.name.partition(".")
        if kind == "direction" and layer.isdigit():
            out[int(layer)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return dict(sorted(out.items()))


def llama_cpp_buffer(path: str | os.PathLike, n_embd: int, n_layer: int, scale: float = 1.0) -> np.ndarray:
    """A control-vector file as llama.cpp's C API takes it: float32 [(n_layer - 1) x n_embd], block 1
    first (llama.h: "an n_embd x n_layers buffer starting from layer 1"), scale × `direction.N` at block N,
    as llama.cpp's own loader places it (common.cpp, common_control_vector_load_one)."""
    buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    for layer, vec in read_control_vector(path).items():
        if not 1 <= layer < n_layer or vec.shape != (n_embd,):
            raise ValueError(f"{Path(path).name}: direction.{layer} of size {vec.shape[0]} does not fit a model of "
                             f"{n_layer} layers and hidden size {n_embd}")
        buf[layer - 1] += scale * vec
    return buf.reshape(-1)


def describe(directions: dict[int, np.ndarray]) -> str:
    """One line on what was written: 'layer 15 (norm 43.9)', for the console and the app."""
    return ", ".join(f"layer {layer} (norm {float(np.linalg.norm(vec)):.1f})" for layer, vec in directions.items())
