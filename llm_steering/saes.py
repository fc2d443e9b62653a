"""SAE files as their libraries write them: find the SAE of a layer, read decoder directions.

    from llm_steering import saes
    feats = saes.read_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576)])
    feats[0].direction.shape, feats[0].sae.file, feats[0].sae.hook_point
    # (torch.Size([4096]), 'resid_post_layer_15/trainer_1/ae.pt', 'resid_post_layer_15')
    saes.neuronpedia_url(15, 21576)   # 'https://www.neuronpedia.org/llama3.1-8b-it/15-resid-post-aa/21576'

Layouts (`sae_format`; detected from the file names when not given):
- `andyrdt` (dictionary_learning): `{hook}_layer_{L}/trainer_{N}/ae.pt`, a torch state dict with
  `decoder.weight` [d_model, d_sae] (BatchTopKSAE, AutoEncoderTopK, AutoEncoder) or `W_dec`
  [d_sae, d_model] (MatryoshkaBatchTopKSAE, JumpReluAutoEncoder); trainer 1 unless `trainer=`.
- `llamascope`: `*-L{L}{R|A|M|TC}-*/checkpoints/final.safetensors`, `decoder.weight` [d_model, d_sae].
- `saelens`: folders with `cfg.json` + `sae_weights.safetensors`, `W_dec` [d_sae, d_in]; the hook
  point from `metadata.hook_name` (SAELens 6), `hook_name` (5.x) or `hook_point` (older).
- `sparsify` (EleutherAI): `{hookpoint}/cfg.json` + `sae.safetensors`, `W_dec` [num_latents, d_in].
- `goodfire`: `*-SAE-l{L}.pth`, a state dict with `decoder_linear.weight` [d_model, d_sae].

A layer here is a steering layer: the residual stream after decoder layer L (`resid_post`).
An SAE on `resid_post` L is layer L, one on `resid_pre` L is layer L-1; SAEs on other hook
points (mlp_out, attn_out, ...) are used only when `hook_point=` names them. Only the needed
elements of a file are read, with positioned reads at offsets from the file's own metadata.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_steering.steering import SteeringVector

import torch

SAE_FORMATS = ("andyrdt", "llamascope", "saelens", "sparsify", "goodfire")
# file pattern of each layout; group 1 (when there) is the folder naming the SAE
_PATTERNS = {
    "andyrdt": re.compile(r"(?:^|/)(([a-z][a-z_]*?)_layer_(\d+))/trainer_(\d+)/ae\.pt$"),
    "llamascope": re.compile(r"(?:^|/)([^/]*?(?<![0-9A-Za-z])L(\d+)(TC|R|A|M)-[^/]*)/checkpoints/final\.safetensors$"),
    "saelens": re.compile(r"(?:^|/)sae_weights\.safetensors$"),
    "sparsify": re.compile(r"(?:^|/)([^/]+)/sae\.safetensors$"),
    "goodfire": re.compile(r"(?:^|/)[^/]*-SAE-l(\d+)\.pth?$"),
}
# decoder tensor name, axis along which features lie; the encoder it must mirror
DECODERS = {
    "andyrdt": [("decoder.weight", 1, "encoder.weight"), ("W_dec", 0, "W_enc")],
    "llamascope": [("decoder.weight", 1, "encoder.weight")],
    "saelens": [("W_dec", 0, "W_enc")],
    "sparsify": [("W_dec", 0, "encoder.weight")],
    "goodfire": [("decoder_linear.weight", 1, "encoder_linear.weight")],
}
_LLAMASCOPE_HOOKS = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out", "TC": "ln2.hook_normalized"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Neuronpedia sources for SAE sets with public dashboards (from SAELens 6.54's pretrained_saes.yaml:
# "llama-3.1-8b-instruct-andyrdt" lists neuronpedia "llama3.1-8b-it/{L}-resid-post-aa" for layers
# 3-27 step 4, and the Goodfire l19 SAE "llama3.1-8b-it/19-resid-post-gf"). Fairly sure of the ids;
# not checked against neuronpedia.org itself (no network here).
NEURONPEDIA = {
    "andyrdt/saes-llama-3.1-8b-instruct": ("llama3.1-8b-it", "{layer}-resid-post-aa", (3, 7, 11, 15, 19, 23, 27)),
    "Goodfire/Llama-3.1-8B-Instruct-SAE-l19": ("llama3.1-8b-it", "{layer}-resid-post-gf", (19,)),
}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEFile:
    """One SAE in a source: its file, layout, hook point and steering layer (None: before layer 0)."""

    source: str
    file: str
    format: str
    hook_point: str
    layer: int | None
    residual: bool
    rank: tuple = field(default=(), compare=False, repr=False)  # preference among SAEs of a layer


@dataclass(frozen=True)
class SAEFeature:
    """A feature's unit decoder direction (float32 [d_model]) and the SAE it came from."""

    layer: int
    index: int
    direction: torch.Tensor
    sae: SAEFile

    @property
    def name(self) -> str:
        return f"L{self.layer}F{self.index}"

    def metadata(self) -> dict[str, Any]:
        """What a vector file records about where the feature came from."""
        return {"source": self.sae.source, "file": self.sae.file, "format": self.sae.format,
                "hook_point": self.sae.hook_point, "layer": self.layer, "index": self.index}

    def steering_vector(self) -> SteeringVector:
        return SteeringVector(name=self.name, layer=self.layer, vector=self.direction, index=self.index,
                              source=self.sae.source, metadata=self.metadata(), description=(
                                  f"SAE feature {self.index} at layer {self.layer} ({self.sae.format}: "
                                  f"{self.sae.file}, hook {self.sae.hook_point})"))


def read_features(source: str, features: list[tuple[int, int]], sae_format: str | None = None,
                  hook_point: str | None = None, trainer: int | None = None) -> list[SAEFeature]:
    """Unit decoder directions of SAE features (layer, index), each with the SAE it came from.

    `source` is a hub repo id (files downloaded once, cached by huggingface_hub) or a local
    directory; one file is read per layer, and of it only the features' elements.

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
        for index, vec in zip(indices, read_directions(src, sae, indices), strict=True):
            if d_model is not None and vec.numel() != d_model:
                raise ValueError(f"SAEs in {src.name} disagree on d_model ({d_model} vs {vec.numel()})")
            d_model = vec.numel()
            if not torch.isfinite(vec).all() or vec.norm() == 0:
                raise ValueError(f"feature {index} of {src.name}/{sae.file} has NaN/infinite values or zero norm")
            found[(layer, index)] = SAEFeature(layer, index, vec / vec.norm(), sae)
    return list({(f.layer, f.index): f for f in (found[(int(L), int(i))] for L, i in features)}.values())


def extract_sae_features(source: str, features: list[tuple[int, int]], sae_format: str | None = None,
                         hook_point: str | None = None, trainer: int | None = None) -> list[SteeringVector]:
    """`read_features` as SteeringVectors named "L{layer}F{index}".

        >>> vecs = extract_sae_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576), (19, 93)])
        >>> vecs[0].name, vecs[0].vector.shape
        ('L15F21576', torch.Size([4096]))
    """
    return [f.steering_vector() for f in read_features(source, features, sae_format, hook_point, trainer)]


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
    found = [fmt for fmt, rx in _PATTERNS.items() if any(rx.search(f) for f in src.files)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"cannot tell the SAE format of {src.name}: no resid_post_layer_L/trainer_N/ae.pt (andyrdt), "
            "*-L{L}R-*/checkpoints/final.safetensors (llamascope), cfg.json + sae_weights.safetensors (saelens), "
            "layers.L/sae.safetensors (sparsify) or *-SAE-l{L}.pth (goodfire) in it"
        )
    raise ValueError(f"{src.name} holds several SAE layouts ({', '.join(found)}): choose one with --sae-format")


def locate_sae(src: SAESource | str, layer: int, sae_format: str | None = None, hook_point: str | None = None,
               trainer: int | None = None) -> SAEFile:
    """The SAE of steering layer `layer` in a source: the residual-stream one, or the one at `hook_point`."""
    src = SAESource.open(src) if isinstance(src, str) else src
    fmt = sae_format or detect_format(src)
    if fmt not in SAE_FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}: use one of {', '.join(SAE_FORMATS)}")
    if trainer is not None and fmt != "andyrdt":
        raise ValueError(f"--trainer is for andyrdt (dictionary_learning) SAEs, not {fmt}")
    cands = _candidates(src, fmt, layer, hook_point)
    if trainer is not None:
        cands = [c for c in cands if f"/trainer_{trainer}/" in "/" + c.file]
    if hook_point is not None:
        hits = [c for c in cands if c.hook_point == hook_point]
        if not hits:
            there = ", ".join(sorted({c.hook_point for c in cands})) or "none found"
            raise ValueError(f"no {fmt} SAE at hook point {hook_point!r} in {src.name} (hook points: {there})")
        if hits[0].layer != layer:
            raise ValueError(f"hook point {hook_point} is at layer {hits[0].layer}, not {layer}")
    else:
        hits = [c for c in cands if c.residual and c.layer == layer]
        if not hits:
            others = sorted({c.hook_point for c in cands if not c.residual and c.layer == layer})
            if others:
                raise ValueError(
                    f"layer {layer} has no residual-stream {fmt} SAE (there: {', '.join(others)}; "
                    f"name one with --hook-point to steer with it anyway) in {src.name}")
            have = ", ".join(str(n) for n in sorted({c.layer for c in cands if c.residual and c.layer is not None}))
            extra = f" for trainer {trainer}" if trainer is not None else ""
            raise ValueError(f"layer {layer} has no {fmt} SAE{extra} in {src.name} (layers available: {have or 'none found'})")
    return min(hits, key=lambda c: (c.rank, c.file))


def read_directions(src: SAESource, sae: SAEFile, indices: list[int]) -> list[torch.Tensor]:
    """Decoder directions (not normalised) for `indices` from one SAE: float32 [d_model] each."""
    label = f"{src.name}/{sae.file}"
    tensors = tensor_index(src.fetch(sae.file), label)
    name, axis, enc = decoder_of(tensors, sae.format, label)
    dec = tensors[name]
    cfg_shape = _configured_shape(src, sae)
    if cfg_shape is not None and dec.features_first(axis) != cfg_shape:
        raise ValueError(f"{label}: {name} has shape {list(dec.shape)}, but its config says d_sae, d_in = {list(cfg_shape)}")
    if enc in tensors and tensors[enc].shape != (dec.shape if sae.format == "sparsify" else dec.shape[::-1]):
        raise ValueError(f"{label}: {name} has shape {list(dec.shape)}, which does not match {enc} {list(tensors[enc].shape)}")
    d_sae = dec.shape[axis]
    for i in indices:
        if not 0 <= i < d_sae:
            raise ValueError(f"feature index {i} is out of range: {label} has {d_sae} features (0-{d_sae - 1})")
    if axis == 0:  # [d_sae, d_model]: row i
        return [dec.block(i, i + 1, 0, dec.shape[1])[0] for i in indices]
    return [dec.block(0, dec.shape[0], i, i + 1)[:, 0] for i in indices]  # [d_model, d_sae]: column i


def decoder_of(tensors: dict[str, TensorRef], fmt: str, label: str) -> tuple[str, int, str]:
    """(decoder tensor name, features axis, encoder name) of an SAE file; ValueError if it has none."""
    for name, axis, enc in DECODERS[fmt]:
        if name in tensors:
            if len(tensors[name].shape) != 2:
                raise ValueError(f"{label}: {name} must be 2-D, got shape {list(tensors[name].shape)}")
            return name, axis, enc
    wanted = " or ".join(repr(n) for n, _, _ in DECODERS[fmt])
    found = ", ".join(sorted(tensors)[:8])
    raise ValueError(f"{label} has no 2-D tensor {wanted} (found: {found})")


# ---------------------------------------------------------------------------
# Sources and the SAEs in them
# ---------------------------------------------------------------------------


@dataclass
class SAESource:
    """A local directory or a hub repository of SAE files."""

    name: str
    files: list[str]
    local: Path | None = None

    @classmethod
    def open(cls, source: str) -> SAESource:
        path = Path(source).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"SAE source {source!r} is a file: give the directory (or hub repo) that holds the SAEs")
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = Path(root).relative_to(path)
                files += [(rel / n).as_posix() for n in names]
            return cls(name=str(path), files=sorted(files), local=path)
        if not _HUB_ID_RE.match(source):
            raise ValueError(f"SAE source {source!r} is neither a local directory nor a hub repo id (owner/name)")
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(source)
        except Exception as exc:  # offline, missing or gated repo
            raise ValueError(f"cannot list hub repo {source!r}: {first_line(exc)}") from None
        return cls(name=source, files=sorted(files))

    def fetch(self, rel: str) -> Path:
        """A local path for file `rel` (downloaded and cached for a hub repo)."""
        if self.local is not None:
            path = self.local / rel
            if not path.is_file():
                raise ValueError(f"{self.name}/{rel} not found")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, rel))
        except Exception as exc:
            raise ValueError(f"cannot download {rel} from {self.name}: {first_line(exc)}") from None

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.fetch(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.name}/{rel} is not valid JSON ({first_line(exc)})") from None


def hook_layer(hook: str) -> tuple[int | None, bool]:
    """(steering layer, is the residual stream) of a hook point name, in any library's naming."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook):
        layer = int(m.group(1)) - (m.group(2) == "pre")
        return (layer, True) if layer >= 0 else (None, True)  # resid_pre 0: the embeddings
    if m := re.fullmatch(r"(?:model\.)?(?:layers|h)\.(\d+)", hook) or re.fullmatch(r"resid_post_layer_(\d+)", hook):
        return int(m.group(1)), True
    if m := re.fullmatch(r"resid_pre_layer_(\d+)", hook):
        return (int(m.group(1)) - 1, True) if int(m.group(1)) > 0 else (None, True)
    if m := re.match(r"(?:blocks|(?:model\.)?layers|h)\.(\d+)\.", hook) or re.fullmatch(r"[a-z_]+_layer_(\d+)", hook):
        return int(m.group(1)), False
    return None, False


def _candidates(src: SAESource, fmt: str, layer: int, hook_point: str | None) -> list[SAEFile]:
    rx, out = _PATTERNS[fmt], []
    for f in src.files:
        if not (m := rx.search(f)):
            continue
        folder = f.rsplit("/", 1)[0] if "/" in f else ""
        rank: tuple = ()
        if fmt == "andyrdt":
            hook, trainer = m.group(1), int(m.group(4))
            rank = (trainer != 1, trainer)
        elif fmt == "llamascope":
            hook, rank = f"blocks.{m.group(2)}.{_LLAMASCOPE_HOOKS[m.group(3)]}", (len(f),)
        elif fmt == "goodfire":
            hook = f"blocks.{m.group(1)}.hook_resid_post"
        else:
            cfg_rel = f"{folder}/cfg.json" if folder else "cfg.json"
            if cfg_rel not in src.files:
                continue
            numbers = {int(n) for n in re.findall(r"\d+", folder)}
            wanted = {int(n) for n in re.findall(r"\d+", hook_point)} if hook_point else {layer, layer + 1}
            if src.local is None and numbers and not numbers & wanted:
                continue  # on the hub, skip downloading cfg.json of other layers' folders
            if fmt == "sparsify":
                hook = folder.rsplit("/", 1)[-1]
                if src.read_json(cfg_rel).get("transcode"):
                    continue  # a transcoder maps a module's input to its output: not an SAE of one stream
            else:
                hook = _saelens_hook(src.read_json(cfg_rel), f"{src.name}/{cfg_rel}")
        at, residual = hook_layer(hook)
        if "resid_pre" in hook:
            rank = (1, *rank)  # resid_post L and resid_pre L+1 are the same stream: prefer resid_post
        out.append(SAEFile(src.name, f, fmt, hook, at, residual, rank or (0,)))
    return out


def _saelens_hook(cfg: Any, label: str) -> str:
    """The hook point in a SAELens cfg.json of any version."""
    meta = cfg.get("metadata") if isinstance(cfg, dict) else None
    for where in (meta, cfg):
        if isinstance(where, dict):
            for key in ("hook_name", "hook_point"):
                if isinstance(where.get(key), str) and where[key]:
                    return where[key]
    raise ValueError(f"{label} names no hook point (metadata.hook_name, hook_name or hook_point)")


def _configured_shape(src: SAESource, sae: SAEFile) -> tuple[int, int] | None:
    """(d_sae, d_in) from a SAELens or sparsify cfg.json, where it says."""
    if sae.format not in ("saelens", "sparsify"):
        return None
    cfg = src.read_json(sae.file.rsplit("/", 1)[0] + "/cfg.json" if "/" in sae.file else "cfg.json")
    d_in = cfg.get("d_in")
    d_sae = cfg.get("d_sae") if sae.format == "saelens" else (cfg.get("num_latents") or (d_in or 0) * cfg.get("expansion_factor", 0))
    return (d_sae, d_in) if isinstance(d_in, int) and isinstance(d_sae, int) and d_sae > 0 else None


# ---------------------------------------------------------------------------
# Tensors inside files: positioned reads at offsets from the file's own metadata
# ---------------------------------------------------------------------------


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a file: read a block of it without reading (or mapping in) the rest.

    Slicing a memory map is not enough: reading one column maps in whole large folios of the
    file and grows the process's memory by the size of the decoder.
    """

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int | None  # bytes from the file's start to element 0; None: read through `mapped`
    mapped: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def features_first(self, axis: int) -> tuple[int, ...]:
        return self.shape if axis == 0 else self.shape[::-1]

    def read(self) -> torch.Tensor:
        """The whole tensor (for small ones: biases, thresholds), float32."""
        if len(self.shape) == 2:
            return self.block(0, self.shape[0], 0, self.shape[1])
        n = self.shape[0] if self.shape else 1
        if self.offset is None:
            return self.mapped.float().clone().reshape(self.shape)
        return self._span(0, n, self.stride[0] if self.shape else 1).reshape(self.shape)

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Rows r0:r1, columns c0:c1 of a 2-D tensor, float32 [r1 - r0, c1 - c0]."""
        if self.offset is None:
            return self.mapped[r0:r1, c0:c1].float().clone()
        (s0, s1), n1 = self.stride, self.shape[1]
        if s1 == 1 and s0 == n1 and c0 == 0 and c1 == n1:  # whole rows of a row-major tensor: one read
            return self._span(r0 * s0, (r1 - r0) * n1, 1).reshape(r1 - r0, n1)
        if s1 == 1 or s1 < s0:  # row by row
            return torch.stack([self._span(r * s0 + c0 * s1, c1 - c0, s1) for r in range(r0, r1)])
        return torch.stack([self._span(r0 * s0 + c * s1, r1 - r0, s0) for c in range(c0, c1)], dim=1)

    def _span(self, first: int, n: int, step: int) -> torch.Tensor:
        """n elements from element `first`, `step` apart, as float32."""
        item = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if step == 1:  # straight into the buffer the tensor will use: no second copy of a large chunk
                buf, got = bytearray(n * item), 0
                while got < len(buf) and (r := os.preadv(fd, [memoryview(buf)[got:]], self.offset + first * item + got)):
                    got += r
            else:
                buf = bytearray(b"".join(os.pread(fd, item, self.offset + (first + i * step) * item) for i in range(n)))
                got = len(buf)
        finally:
            os.close(fd)
        if got != n * item:
            raise ValueError(f"{self.path} is truncated")
        return torch.frombuffer(buf, dtype=self.dtype).float() if n else torch.empty(0)


def tensor_index(path: Path, label: str) -> dict[str, TensorRef]:
    """Every floating-point tensor in a safetensors or torch file, by name (nothing read but metadata)."""
    if path.suffix == ".safetensors":
        return _safetensors_index(path, label)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{label} is not a readable SAE checkpoint (torch.load weights_only refused it: {first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{label} is not a state dict")
    out = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            out[str(name)] = TensorRef(path, t.dtype, tuple(t.shape), tuple(t.stride()), _file_offset_of(t, path), t)
    return out


def _file_offset_of(tensor: torch.Tensor, path: Path) -> int | None:
    """Where a tensor loaded with torch.load(mmap=True) starts in its file, from /proc/self/maps."""
    ptr, real = tensor.data_ptr(), os.path.realpath(path)
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == real:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    if start <= ptr < end:
                        return ptr - start + int(parts[2], 16)
    except OSError:
        return None
    return None


def _safetensors_index(path: Path, label: str) -> dict[str, TensorRef]:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label} is not a readable safetensors file ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label} is not a readable safetensors file (header is not a mapping)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        shape, dtype, offsets = entry.get("shape"), _ST_DTYPES.get(entry.get("dtype")), entry.get("data_offsets")
        if dtype is None:
            continue  # integer tensors: nothing an SAE reader needs
        if not (isinstance(shape, list) and all(isinstance(x, int) and x > 0 for x in shape) and len(shape) <= 2):
            raise ValueError(f"{label}: {name} has shape {shape!r}; 0-, 1- or 2-D is expected")
        count = 1
        for x in shape:
            count *= x
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == count * dtype.itemsize
                and 8 + n + offsets[1] <= size):
            raise ValueError(f"{label} is not a readable safetensors file (offsets of {name} do not fit the file)")
        stride = tuple(shape[1:]) + (1,) if shape else ()
        out[name] = TensorRef(path, dtype, tuple(shape), stride, 8 + n + offsets[0])
    return out


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
