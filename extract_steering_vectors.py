"""Extract steering vectors into a `steering_vectors.pt` file: SAE decoder columns or contrastive prompts.

    # SAE features (hub repo id or a local directory with the same layout), for Llama-3.1-8B-Instruct:
    python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct \\
        --features 15:21576 19:93 --model meta-llama/Llama-3.1-8B-Instruct --output steering_vectors_llama31_8b.pt
    # Contrastive concepts (YAML of positive/negative texts) for the embedded model, at each concept's layer:
    python extract_steering_vectors.py --contrastive concepts.yaml --output steering_vectors.pt
    # ... or at given layers (one layer: named after the concept; several: "{concept}_L{layer}"):
    python extract_steering_vectors.py --contrastive concepts.yaml --layers 6 9 12 --output sweep_vectors.pt

SAE layouts (detected from the files; `--sae-format` forces one): `andyrdt`
(resid_post_layer_{L}/trainer_{N}/ae.pt, decoder.weight [d_model, d_sae]), `llamascope`
(*-L{L}R-*/checkpoints/final.safetensors, decoder.weight [d_model, d_sae]) and `saelens`
(a folder with cfg.json + sae_weights.safetensors, W_dec [d_sae, d_in]). Only the needed
columns are read (mmap / safetensors slices). Vectors are scaled to unit length.

The output records the model's typical residual norm after every layer it has vectors for
(measured on a neutral text; `--skip-norms` to leave it out). An existing output file is
kept and merged into (same name: replaced) unless `--overwrite`. Errors: one line on
stderr, exit code 2, and the output file is left as it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import steering  # noqa: E402
from steering import SteeringVector, SteeringVectorSet  # noqa: E402

SAE_FORMATS = ("andyrdt", "llamascope", "saelens")
_ANDYRDT_RE = re.compile(r"(?:^|/)resid_post_layer_(\d+)/trainer_(\d+)/ae\.pt$")
_LLAMASCOPE_RE = re.compile(r"(?:^|/)([^/]*?L(\d+)R[^/]*)/checkpoints/final\.safetensors$")
_SAELENS_RE = re.compile(r"(?:^|/)sae_weights\.safetensors$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def extract_sae_features(
    source: str, features: list[tuple[int, int]], sae_format: str | None = None
) -> list[SteeringVector]:
    """Unit decoder columns of SAE features, named "L{layer}F{index}", read without loading whole files.

    `source` is a hub repo id (downloaded once, cached by huggingface_hub) or a local
    directory laid out like one; `sae_format` is one of andyrdt, llamascope, saelens, or
    None to detect it from the files.

        >>> vecs = extract_sae_features("andyrdt/saes-llama-3.1-8b-instruct", [(15, 21576), (19, 93)])
        >>> vecs[0].name, vecs[0].vector.shape
        ('L15F21576', torch.Size([4096]))
    """
    if not features:
        raise ValueError("no features given: name them as layer:index, e.g. 15:21576")
    src = _Source.open(source)
    fmt = sae_format or detect_format(src)
    if fmt not in SAE_FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}: use one of {', '.join(SAE_FORMATS)}")
    by_layer: dict[int, list[int]] = {}
    for layer, index in features:
        if layer < 0 or index < 0:
            raise ValueError(f"feature {layer}:{index}: layer and index must be non-negative")
        by_layer.setdefault(int(layer), []).append(int(index))
    columns: dict[tuple[int, int], torch.Tensor] = {}
    d_model = None
    for layer, indices in by_layer.items():
        rel = _locate(src, fmt, layer)
        cols = _read_columns(src.fetch(rel), fmt, indices, f"{src.name}/{rel}")
        for index, col in zip(indices, cols, strict=True):
            if d_model is not None and col.numel() != d_model:
                raise ValueError(f"SAEs in {src.name} disagree on d_model ({d_model} vs {col.numel()})")
            d_model = col.numel()
            columns[(layer, index)] = col
    out = []
    for layer, index in features:
        name = f"L{layer}F{index}"
        if any(v.name == name for v in out):
            continue
        out.append(SteeringVector(name=name, layer=layer, vector=columns[(layer, index)], index=index,
                                  source=source, description=f"SAE feature {index} at layer {layer} ({fmt})"))
    return out


def extract_contrastive(model: Any, tokenizer: Any, concepts: dict[str, dict], layers: Sequence[int] | None,
                        method: str = "mean", source: str = "") -> list[SteeringVector]:
    """One unit vector per concept and layer: mean(positive activations) - mean(negative ones).

    Activations are the residual stream after each layer, averaged over the tokens of a
    text (the first token left out), then over the texts. `method="pca"` takes the first
    principal component of the paired differences (positive i - negative i), with the
    sign of the mean difference. `layers=None` uses each concept's own `layer`.

        >>> concepts = load_concepts("concepts.yaml")
        >>> extract_contrastive(model, tok, concepts, [9])[0].name
        'eiffel_tower'
    """
    if method not in ("mean", "pca"):
        raise ValueError(f"unknown method {method!r}: use mean or pca")
    plan: dict[str, list[int]] = {}
    for name, concept in concepts.items():
        if layers:
            plan[name] = sorted(set(layers))
        elif concept.get("layer") is not None:
            plan[name] = [concept["layer"]]
        else:
            raise ValueError(f"concept {name!r} has no layer: give --layers or a 'layer:' for it in the YAML")
    n_layers = steering.num_layers(model)
    all_layers = sorted({layer for ls in plan.values() for layer in ls})
    for layer in all_layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: this model has {n_layers} layers (0-{n_layers - 1})")
    cache: dict[str, dict[int, torch.Tensor]] = {}
    many = layers is not None and len(set(layers)) > 1
    out = []
    for name, concept in concepts.items():
        pos = _text_means(model, tokenizer, concept["positive"], all_layers, cache)
        neg = _text_means(model, tokenizer, concept["negative"], all_layers, cache)
        # pos, neg: [texts, layers, d_model]
        for layer in plan[name]:
            j = all_layers.index(layer)
            diff = pos[:, j].mean(0) - neg[:, j].mean(0)
            if method == "pca":
                n = min(len(pos), len(neg))
                pairs = pos[:n, j] - neg[:n, j]  # [n, d_model]
                centered = pairs - pairs.mean(0)
                direction = torch.linalg.svd(centered, full_matrices=False).Vh[0] if n > 1 else pairs[0]
                diff = direction if direction @ diff >= 0 else -direction
            out.append(SteeringVector(
                name=f"{name}_L{layer}" if many else name, layer=layer, vector=diff, concept=name,
                source=source, description=concept.get("description", ""),
            ))
    return out


def load_concepts(path: str | os.PathLike) -> dict[str, dict]:
    """Read a contrastive YAML: {"concepts": {name: {positive: [...], negative: [...], description?, layer?}}}."""
    path = Path(path)
    data = steering.read_yaml_file(path, "concept file")
    if not isinstance(data, dict) or not isinstance(data.get("concepts"), dict) or not data["concepts"]:
        raise ValueError(f"{path}: expected a top-level 'concepts:' mapping of concept names to positive/negative texts")
    concepts = {}
    for name, raw in data["concepts"].items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ValueError(f"{path}: concept name {name!r} must be snake_case (a-z, 0-9, _)")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: concept {name!r} must be a mapping with positive and negative texts")
        unknown = sorted(set(raw) - {"positive", "negative", "description", "layer"})
        if unknown:
            raise ValueError(f"{path}: concept {name!r}: unknown field {unknown[0]!r}")
        for side in ("positive", "negative"):
            texts = raw.get(side)
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"{path}: concept {name!r} is empty: '{side}' must be a non-empty list of texts")
        layer = raw.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise ValueError(f"{path}: concept {name!r}: layer must be a non-negative integer")
        concepts[name] = dict(raw)
    return concepts


def with_negatives(concepts: dict[str, dict], mode: str = "given") -> dict[str, dict]:
    """Concepts with their negatives replaced: "given" (as in the YAML), "others" (the other
    concepts' positives: one-vs-rest, which cancels what all concepts share) or "both"."""
    if mode == "given":
        return concepts
    if mode not in ("others", "both"):
        raise ValueError(f"unknown negatives {mode!r}: use given, others or both")
    out = {}
    for name, concept in concepts.items():
        others = [t for other, c in concepts.items() if other != name for t in c["positive"]]
        if not others:
            raise ValueError("--negatives others needs at least two concepts")
        negative = others if mode == "others" else list(concept["negative"]) + others
        out[name] = {**concept, "negative": negative}
    return out


def detect_format(src: _Source) -> str:
    """The SAE layout of a source, from its file names."""
    found = [fmt for fmt, rx in (("andyrdt", _ANDYRDT_RE), ("llamascope", _LLAMASCOPE_RE), ("saelens", _SAELENS_RE))
             if any(rx.search(f) for f in src.files)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"cannot tell the SAE format of {src.name}: no resid_post_layer_L/trainer_N/ae.pt (andyrdt), "
            "*L{L}R*/checkpoints/final.safetensors (llamascope) or sae_weights.safetensors (saelens) in it"
        )
    raise ValueError(f"{src.name} holds several SAE layouts ({', '.join(found)}): choose one with --sae-format")


# ---------------------------------------------------------------------------
# Sources: a local directory or a hub repository
# ---------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    files: list[str]
    local: Path | None = None

    @classmethod
    def open(cls, source: str) -> _Source:
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
        if importlib.util.find_spec("hf_transfer") is not None:
            os.environ.setdefault("HF_HUB_ENABLE_HF_TRANSFER", "1")
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(source)
        except Exception as exc:  # offline, missing or gated repo
            raise ValueError(f"cannot list hub repo {source!r}: {_first_line(exc)}") from None
        return cls(name=source, files=sorted(files))

    def fetch(self, rel: str) -> Path:
        if self.local is not None:
            return self.local / rel
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, rel))
        except Exception as exc:
            raise ValueError(f"cannot download {rel} from {self.name}: {_first_line(exc)}") from None

    def read_text(self, rel: str) -> str:
        return self.fetch(rel).read_text(encoding="utf-8")


def _locate(src: _Source, fmt: str, layer: int) -> str:
    """The file (relative to the source) holding the SAE of `layer`."""
    if fmt == "andyrdt":
        hits = [(int(m.group(2)) != 1, int(m.group(2)), f) for f in src.files
                if (m := _ANDYRDT_RE.search(f)) and int(m.group(1)) == layer]
        have = sorted({int(m.group(1)) for f in src.files if (m := _ANDYRDT_RE.search(f))})
    elif fmt == "llamascope":
        hits = [(0, len(f), f) for f in src.files
                if (m := _LLAMASCOPE_RE.search(f)) and int(m.group(2)) == layer
                and re.search(rf"(?:^|[^0-9A-Za-z])L{layer}R(?:[^A-Za-z]|$)", m.group(1))]
        have = sorted({int(m.group(2)) for f in src.files if (m := _LLAMASCOPE_RE.search(f))})
    else:
        hits, have = [], []
        for f in src.files:
            if not _SAELENS_RE.search(f):
                continue
            folder = f.rsplit("/", 1)[0] if "/" in f else ""
            cfg_rel = f"{folder}/cfg.json" if folder else "cfg.json"
            if cfg_rel not in src.files:
                continue
            numbers = [int(n) for n in re.findall(r"\d+", folder)]
            if numbers and layer not in numbers and src.local is None:
                continue  # on the hub, skip downloading cfg.json of other layers' folders
            found = _saelens_layer(src, cfg_rel)
            if found is not None:
                have.append(found)
                if found == layer:
                    hits.append((0, len(f), f))
    if not hits:
        listed = ", ".join(map(str, sorted(set(have)))) or "none found"
        raise ValueError(f"layer {layer} has no {fmt} SAE in {src.name} (layers available: {listed})")
    return sorted(hits)[0][2]


def _saelens_layer(src: _Source, cfg_rel: str) -> int | None:
    try:
        cfg = json.loads(src.read_text(cfg_rel))
    except (OSError, ValueError, UnicodeDecodeError):
        raise ValueError(f"{src.name}/{cfg_rel} is not valid JSON") from None
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("hook_layer"), int):
        return cfg["hook_layer"]
    hook = str(cfg.get("hook_name") or cfg.get("hook_point") or "")
    match = re.search(r"blocks\.(\d+)\.", hook) or re.search(r"layers?[._](\d+)", hook)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------
# Reading decoder columns
# ---------------------------------------------------------------------------


def _read_columns(path: Path, fmt: str, indices: list[int], label: str) -> list[torch.Tensor]:
    """Decoder directions for `indices` from one SAE file, as float32 [d_model] tensors.

    Only the needed elements are read, with positioned reads (os.pread) at offsets taken
    from the file's metadata: slicing a memory map instead can map in whole large folios
    of the file and grow the process's memory by the size of the decoder.
    """
    if not path.is_file():
        raise ValueError(f"{label} not found")
    if fmt == "andyrdt":
        return _read_pt_columns(path, indices, label)
    name, by_row = ("decoder.weight", False) if fmt == "llamascope" else ("W_dec", True)
    dtype, shape, offset = _safetensors_entry(path, name, label)
    _check_indices(indices, shape[0] if by_row else shape[1], label)
    # W_dec [d_sae, d_in]: row i; decoder.weight [d_model, d_sae]: column i
    return [_pread_vector(path, offset, dtype, shape, (shape[1], 1), i, by_row) for i in indices]


def _read_pt_columns(path: Path, indices: list[int], label: str) -> list[torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{label} is not a readable SAE checkpoint (torch.load weights_only refused it: {_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{label} is not a state dict")
    if "decoder.weight" not in state and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    weight = state.get("decoder.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        names = ", ".join(sorted(map(str, state))[:8])
        raise ValueError(f"{label} has no 2-D tensor 'decoder.weight' (found: {names})")
    _check_indices(indices, weight.shape[1], label)
    offset = _file_offset_of(weight, path)
    if offset is None:  # not Linux, or torch mapped it some other way: slice the map
        return [weight[:, i].float().clone() for i in indices]  # [d_model, d_sae] -> column
    return [_pread_vector(path, offset, weight.dtype, tuple(weight.shape), tuple(weight.stride()), i, False)
            for i in indices]


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


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _safetensors_entry(path: Path, name: str, label: str) -> tuple[torch.dtype, tuple[int, int], int]:
    """(dtype, shape, absolute data offset) of tensor `name` in a safetensors file, from its JSON header."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label} is not a readable safetensors file ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label} is not a readable safetensors file (header is not a mapping)")
    entry = header.get(name)
    if not isinstance(entry, dict):
        found = ", ".join(sorted(k for k in header if k != "__metadata__")[:8])
        raise ValueError(f"{label} has no tensor {name!r} (found: {found})")
    shape, dtype, offsets = entry.get("shape"), _ST_DTYPES.get(entry.get("dtype")), entry.get("data_offsets")
    if dtype is None:
        raise ValueError(f"{label}: {name} has dtype {entry.get('dtype')!r}; floating point (F32, F16, BF16, F64) is needed")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)):
        raise ValueError(f"{label}: {name} must be 2-D, got shape {shape!r}")
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == nbytes
            and 8 + n + offsets[1] <= size):
        raise ValueError(f"{label} is not a readable safetensors file (offsets of {name} do not fit the file)")
    return dtype, (shape[0], shape[1]), 8 + n + offsets[0]


def _pread_vector(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, int], stride: tuple[int, int],
                  i: int, by_row: bool) -> torch.Tensor:
    """Row i (by_row) or column i of a 2-D tensor stored at `offset`, read element by element: float32 [n]."""
    item = dtype.itemsize
    n, step, first = (shape[1], stride[1], i * stride[0]) if by_row else (shape[0], stride[0], i * stride[1])
    fd = os.open(path, os.O_RDONLY)
    try:
        if step == 1:
            buf = os.pread(fd, n * item, offset + first * item)
        else:
            buf = b"".join(os.pread(fd, item, offset + (first + r * step) * item) for r in range(n))
    finally:
        os.close(fd)
    if len(buf) != n * item:
        raise ValueError(f"{path} is truncated")
    return torch.frombuffer(bytearray(buf), dtype=dtype).float()


def _check_indices(indices: list[int], d_sae: int, label: str) -> None:
    for i in indices:
        if not 0 <= i < d_sae:
            raise ValueError(f"feature index {i} is out of range: {label} has {d_sae} features (0-{d_sae - 1})")


# ---------------------------------------------------------------------------
# Contrastive helpers
# ---------------------------------------------------------------------------


def _text_means(model: Any, tokenizer: Any, texts: list[str], layers: list[int], cache: dict,
                batch_size: int = 16) -> torch.Tensor:
    """Mean residual activation over each text's tokens (first left out) after each layer: [texts, layers, d_model].

    Texts are run in right-padded batches (causal attention: padding after a text does
    not change it); results are cached by text.
    """
    todo = [t for t in dict.fromkeys(texts) if t not in cache]
    _, layer_list = steering._decoder_layers(model)
    device = next(model.parameters()).device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = [tokenizer(t)["input_ids"] for t in chunk]
        for text, ids in zip(chunk, rows, strict=True):
            if len(ids) < 2:
                raise ValueError(f"text {text!r} is too short: give at least two tokens")
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # [batch, seq]
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        keep = mask.clone()
        keep[:, 0] = 0  # the first token carries a huge outlier norm
        keep = keep.unsqueeze(-1).float()  # [batch, seq, 1]
        got: dict[int, torch.Tensor] = {}

        def hook_for(layer: int, got: dict = got, keep: torch.Tensor = keep):
            def hook(module: Any, args: Any, output: Any) -> None:
                hidden = steering._untuple(output).float()  # [batch, seq, d_model]
                got[layer] = ((hidden * keep).sum(1) / keep.sum(1)).cpu()  # [batch, d_model]
            return hook

        handles = [layer_list[layer].register_forward_hook(hook_for(layer)) for layer in layers]
        try:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        for b, text in enumerate(chunk):
            cache[text] = torch.stack([got[layer][b] for layer in layers])  # [layers, d_model]
    return torch.stack([cache[t] for t in texts])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _parse_feature(text: str) -> tuple[int, int]:
    match = re.match(r"^(\d+):(\d+)$", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"feature {text!r} must be layer:index, e.g. 15:21576")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sae-source", help="hub repo id or local directory of SAEs")
    what.add_argument("--contrastive", metavar="FILE", help="YAML of concepts with positive and negative texts")
    parser.add_argument("--features", nargs="+", type=_parse_feature, default=[], help="SAE features as layer:index")
    parser.add_argument("--sae-format", choices=SAE_FORMATS, help="force the SAE layout instead of detecting it")
    parser.add_argument("--layers", nargs="+", type=int, help="layers for contrastive vectors (default: each concept's 'layer')")
    parser.add_argument("--method", choices=("mean", "pca"), default="mean", help="contrastive: diff of means or PCA of pairs")
    parser.add_argument("--negatives", choices=("given", "others", "both"), default="given",
                        help="contrastive negatives: the YAML's, the other concepts' positives, or both")
    parser.add_argument("--model", default=None, help="model the vectors are for (hub id or dir; default: the embedded model)")
    parser.add_argument("--output", required=True, help="steering vector file to write or merge into")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file instead of merging into it")
    parser.add_argument("--skip-norms", action="store_true",
                        help="SAE only: do not load --model to measure layer norms (the file then has none)")
    return parser


def run(args: argparse.Namespace) -> SteeringVectorSet:
    """Do what the command line asks; return the set that was written."""
    output = Path(args.output)
    existing = None
    if output.exists() and not args.overwrite:
        existing = SteeringVectorSet.load(output)  # an unreadable file stops us here, untouched
    model = tok = None
    if args.contrastive:
        concepts = with_negatives(load_concepts(args.contrastive), args.negatives)
        model, tok = steering.load_model(args.model)
        vectors = extract_contrastive(model, tok, concepts, args.layers, args.method, source=str(args.contrastive))
        model_id, d_model = steering.model_id_of(model), steering.hidden_size(model)
    else:
        if not args.features:
            raise ValueError("--sae-source needs --features layer:index ...")
        if args.skip_norms and not args.model:
            raise ValueError("--skip-norms needs --model: the id of the model these SAEs belong to, to record in the file")
        vectors = extract_sae_features(args.sae_source, args.features, args.sae_format)
        d_model = vectors[0].vector.numel()
        if args.skip_norms:
            model_id = args.model
        else:
            model, tok = steering.load_model(args.model)
            model_id = steering.model_id_of(model)
            if steering.hidden_size(model) != d_model:
                raise ValueError(
                    f"the SAE vectors have size {d_model}, but {model_id}'s hidden size is {steering.hidden_size(model)}: "
                    "pass the model these SAEs were trained for with --model"
                )
            n_layers = steering.num_layers(model)
            for vec in vectors:
                if vec.layer >= n_layers:
                    raise ValueError(f"layer {vec.layer} is out of range: {model_id} has {n_layers} layers (0-{n_layers - 1})")
    norms = {} if model is None else steering.measure_layer_norms(model, tok, sorted({v.layer for v in vectors}))
    new = SteeringVectorSet(model_id=model_id, hidden_size=d_model, vectors=vectors, layer_norms=norms)
    result = existing.merged(new) if existing is not None else new
    result.save(output)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 2
    names = ", ".join(v.name for v in result.vectors)
    print(f"wrote {args.output}: {len(result.vectors)} vectors for {result.model_id} ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
