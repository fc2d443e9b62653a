"""Extract steering vectors into a `steering_vectors.pt` file: SAE decoder directions or contrastive prompts.

    # SAE features (hub repo id or a local directory with the same layout), for Llama-3.1-8B-Instruct:
    python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct \\
        --features 15:21576 19:93 --model meta-llama/Llama-3.1-8B-Instruct --output steering_vectors_llama31_8b.pt
    # Find the features that fire most on a text (printed; with --output, also written as vectors):
    python extract_steering_vectors.py --sae-source andyrdt/saes-llama-3.1-8b-instruct --layers 15 \\
        --find "The Eiffel Tower in Paris" --top-k 10 --model meta-llama/Llama-3.1-8B-Instruct
    # Contrastive concepts (YAML of positive/negative texts) for the embedded model, at each concept's layer:
    python extract_steering_vectors.py --contrastive concepts.yaml --output steering_vectors.pt
    # ... or at given layers (one layer: named after the concept; several: "{concept}_L{layer}"):
    python extract_steering_vectors.py --contrastive concepts.yaml --layers 6 9 12 --output sweep_vectors.pt

SAE layouts: one module each in llm_steering/saes/formats/, detected from the files
(`--sae-format` forces one; --help lists them). A layer is the residual stream after that decoder
layer, and an SAE is at the layer of the hook its decoder writes: resid_post L is layer L,
resid_pre L is layer L-1, a transcoder is at its output hook's layer. SAEs that do not write the
residual stream (mlp_out, attn_out, hook_z, transcoders) are used only when `--hook-point` names
them; hook_z rows are mapped into the residual stream through the layer's o_proj (so they need
the model). `--find` encodes the activations of the SAE's own input hook. An SAE whose config
names another model than --model is refused unless `--allow-other-model`. Only the needed
elements are read. Vectors are scaled to unit length; each SAE vector records its source, file,
format and hook point in its metadata.

The output records the model's typical residual norm after every layer it has vectors for
(measured on a neutral text; `--skip-norms` to leave it out). An existing output file is
kept and merged into (same name: replaced) unless `--overwrite`. Errors (OS errors too):
one line on stderr, exit code 2, and the output file is left as it was.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_steering import steering
from llm_steering.core import one_line
from llm_steering.saes import (  # noqa: F401
    SAE_FORMATS,
    extract_sae_features,
    find_features,
    neuronpedia_url,
    read_features,
)
from llm_steering.steering import SteeringVector, SteeringVectorSet

import torch

# ---------------------------------------------------------------------------
# Public API (SAE features: saes.extract_sae_features, re-exported here)
# ---------------------------------------------------------------------------


def extract_contrastive(model: Any, tokenizer: Any, concepts: dict[str, dict], layers: Sequence[int] | None,
                        method: str = "mean", source: str = "", cache: dict | None = None) -> list[SteeringVector]:
    """One unit vector per concept and layer: mean(positive activations) - mean(negative ones).

    Activations are the residual stream after each layer, averaged over the tokens of a
    text (the first token left out), then over the texts. `method="pca"` takes the first
    principal component of the paired differences (positive i - negative i), with the
    sign of the mean difference. `layers=None` uses each concept's own `layer`. `cache` ({text: mean
    activations after each layer used}) is read and filled; pass one only for calls on the same model
    and layers (concepts.py keeps the neutral texts' means so).

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
    cache = {} if cache is None else cache  # text -> [layers, d_model]
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
    _, layer_list = steering.decoder_layers(model)
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
                hidden = steering.layer_hidden(output).float()  # [batch, seq, d_model]
                got[layer] = ((hidden * keep).sum(1) / keep.sum(1)).cpu()  # [batch, d_model]
            return hook

        with steering.forward_hooks((layer_list[layer], hook_for(layer)) for layer in layers), torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        for b, text in enumerate(chunk):
            cache[text] = torch.stack([got[layer][b] for layer in layers])  # [layers, d_model]
    return torch.stack([cache[t] for t in texts])


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
    parser.add_argument("--find", metavar="TEXT", help="SAE: list the features that fire most on TEXT at each of --layers")
    parser.add_argument("--top-k", type=int, default=10, help="--find: how many features per layer (default 10)")
    parser.add_argument("--sae-format", choices=SAE_FORMATS, help="force the SAE layout instead of detecting it")
    parser.add_argument("--hook-point", help="use the SAE at this hook point (e.g. blocks.5.hook_mlp_out; a transcoder's input "
                        "or output hook) even if it does not write the residual stream; its decoder directions are then added "
                        "after that block (hook_z rows mapped through the layer's o_proj)")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="use SAEs whose config names another model than --model (e.g. a base model's SAEs on its instruct model)")
    parser.add_argument("--trainer", type=int, help="andyrdt (dictionary_learning): use trainer_N (default: trainer_1)")
    parser.add_argument("--layers", nargs="+", type=int,
                        help="contrastive: layers for the vectors (default: each concept's 'layer'); --find: SAE layers to look in")
    parser.add_argument("--method", choices=("mean", "pca"), default="mean", help="contrastive: diff of means or PCA of pairs")
    parser.add_argument("--negatives", choices=("given", "others", "both"), default="given",
                        help="contrastive negatives: the YAML's, the other concepts' positives, or both")
    parser.add_argument("--model", default=None, help="model the vectors are for (hub id or dir; default: the embedded model)")
    parser.add_argument("--output", help="steering vector file to write or merge into (optional with --find)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file instead of merging into it")
    parser.add_argument("--skip-norms", action="store_true",
                        help="SAE only: do not load --model to measure layer norms (the file then has none)")
    return parser


def run(args: argparse.Namespace) -> SteeringVectorSet | None:
    """Do what the command line asks; return the set that was written (None: --find printed only)."""
    if args.find is not None and not args.sae_source:
        raise ValueError("--find needs --sae-source: the SAEs to look in")
    if args.output is None and args.find is None:
        raise ValueError("--output is needed: the steering vector file to write or merge into")
    output = Path(args.output) if args.output else None
    existing = None
    if output is not None and output.exists() and not args.overwrite:
        existing = SteeringVectorSet.load(output)  # an unreadable file stops us here, untouched
    if args.contrastive:
        concepts = with_negatives(load_concepts(args.contrastive), args.negatives)
        model, tok = steering.load_model(args.model)
        vectors = extract_contrastive(model, tok, concepts, args.layers, args.method, source=str(args.contrastive))
        model_id, d_model = steering.model_id_of(model), steering.hidden_size(model)
    else:
        got = _sae_vectors(args, print_only=output is None)
        if got is None:
            return None
        vectors, model, tok, model_id = got
        d_model = vectors[0].vector.numel()
    norms = {} if model is None else steering.measure_layer_norms(model, tok, sorted({v.layer for v in vectors}))
    new = SteeringVectorSet(model_id=model_id, hidden_size=d_model, vectors=vectors, layer_norms=norms)
    result = existing.merged(new) if existing is not None else new
    result.save(output)
    return result


def _sae_vectors(args: argparse.Namespace, print_only: bool) -> tuple[list[SteeringVector], Any, Any, str] | None:
    """The SAE vectors the command line asks for (--features, or the features --find prints), the model
    loaded for their norms (None with --skip-norms), its tokenizer and id; None: --find printed only."""
    features = list(args.features)
    if args.find is not None and features:
        raise ValueError("give --find or --features, not both")
    if args.find is None and not features:
        raise ValueError("--sae-source needs --features layer:index ... (or --find TEXT --layers L)")
    loaded: dict[str, Any] = {"model": None, "tok": None}

    def load() -> Any:  # the model, loaded once, when it is first needed
        if loaded["model"] is None:
            loaded["model"], loaded["tok"] = steering.load_model(args.model)
        return loaded["model"]

    if args.find is not None:
        if not args.layers:
            raise ValueError("--find needs --layers: the SAE layer(s) to look in, e.g. --layers 15")
        load()
        for layer in args.layers:
            found = find_features(args.sae_source, layer, args.find, loaded["model"], loaded["tok"], args.top_k,
                                  args.sae_format, args.hook_point, args.trainer,
                                  allow_other_model=args.allow_other_model, model_id=args.model)
            vecs = extract_sae_features(args.sae_source, [(f.layer, f.index) for f in found], args.sae_format,
                                        args.hook_point, args.trainer, model=load,
                                        model_id=args.model or steering.EMBEDDED_MODEL_ID,
                                        allow_other_model=args.allow_other_model) if found else []
            _print_found(args.sae_source, layer, found, [_lens_words(loaded["model"], loaded["tok"], v) for v in vecs])
            features += [(f.layer, f.index) for f in found]
        if print_only:
            return None
        if not features:
            raise ValueError("no feature fires on the text: nothing to write")
    if args.skip_norms and not args.model:
        raise ValueError("--skip-norms needs --model: the id of the model these SAEs belong to, to record in the file")
    vectors = extract_sae_features(args.sae_source, features, args.sae_format, args.hook_point, args.trainer,
                                   model=(lambda: loaded["model"]) if args.skip_norms else load,
                                   model_id=args.model or steering.EMBEDDED_MODEL_ID, allow_other_model=args.allow_other_model)
    if args.skip_norms:
        return vectors, None, None, args.model
    model = load()
    model_id, d_model = steering.model_id_of(model), vectors[0].vector.numel()
    if steering.hidden_size(model) != d_model:
        raise ValueError(f"the SAE vectors have size {d_model}, but {model_id}'s hidden size is {steering.hidden_size(model)}: "
                         "pass the model these SAEs were trained for with --model")
    n_layers = steering.num_layers(model)
    for vec in vectors:
        if vec.layer >= n_layers:
            raise ValueError(f"layer {vec.layer} is out of range: {model_id} has {n_layers} layers (0-{n_layers - 1})")
    return vectors, model, loaded["tok"], model_id


def _print_found(source: str, layer: int, found: list, words: list[str]) -> None:
    """Each found feature: its key, activations, dashboard link, and the tokens its direction pushes up."""
    if not found:
        print(f"layer {layer}: no feature fires on the text")
    for f, pushes in zip(found, words, strict=True):
        url = neuronpedia_url(f.layer, f.index, source)
        print(f"{f.key:>12}  mean {f.mean:9.4f}  max {f.max:9.4f}  pushes up (logit lens): {pushes}" + (f"  {url}" if url else ""))


def _lens_words(model: Any, tokenizer: Any, vector: SteeringVector) -> str:
    """The tokens a feature's direction promotes most, by the logit lens (an SAE feature: where it reads,
    lens.lens_reads), or why they cannot be shown (another model's width)."""
    from llm_steering.lens import token_words, top_tokens

    if vector.vector.numel() != steering.hidden_size(model):
        return "(not shown: this SAE is for a model of another width)"
    return ", ".join(token_words(top_tokens(model, tokenizer, vector.vector, k=6).promoted))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as exc:  # OSError: an unreadable file, a full disk, a read-only directory
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if result is not None:
        names = ", ".join(v.name for v in result.vectors)
        print(f"wrote {args.output}: {len(result.vectors)} vectors for {result.model_id} ({names})")
    elif args.find is not None:
        print("steer with: --features LAYER:INDEX ... --output FILE (or add --output FILE to --find to write them all)")
    return 0

