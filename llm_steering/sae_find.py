"""Finding SAE features from text: which features fire most on a text's tokens.

    import steering, sae_find
    model, tok = steering.load_model("meta-llama/Llama-3.1-8B-Instruct")
    for f in sae_find.find_features("andyrdt/saes-llama-3.1-8b-instruct", 15, "The Eiffel Tower in Paris", model, tok):
        print(f.key, f.mean, f.max)          # "15:21576" 4.1 9.8 ... (best first)

The text runs through the model once; the residual stream after decoder layer `layer` (the
first token left out: it carries a huge outlier norm) goes through the SAE's encoder as its
library computes it (ReLU, JumpReLU/threshold, per-token TopK, input bias and scaling), with
the encoder read in chunks of features (about 64 MiB each), on the GPU when there is one.
Features are ranked by their mean activation over the tokens, then by their maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm_steering import steering
from llm_steering.saes import SAEFile, SAESource, TensorRef, decoder_of, locate_sae, tensor_index

import torch

CHUNK_BYTES = 64 * 2**20  # encoder bytes (float32) per chunk
MAX_CHUNK_ELEMENTS = 2**25  # tokens x features of one chunk's activations


@dataclass(frozen=True)
class FoundFeature:
    """An SAE feature that fires on a text: its mean and max activation over the text's tokens."""

    layer: int
    index: int
    mean: float
    max: float

    @property
    def name(self) -> str:
        return f"L{self.layer}F{self.index}"

    @property
    def key(self) -> str:
        """The "layer:index" form that vector files, specs and --features take."""
        return f"{self.layer}:{self.index}"


@dataclass(frozen=True)
class Encoder:
    """How an SAE computes activations: pre = (x * input_scale - input_bias) @ W + bias, then
    relu(pre) * (pre > threshold), or per token only the `topk` largest pre (then ReLU)."""

    weight: TensorRef
    axis: int  # the axis of `weight` that runs over features
    bias: TensorRef | None = None
    input_bias: TensorRef | None = None
    input_scale: float | str = 1.0  # a factor, or "token" to scale each token to norm sqrt(d_model)
    threshold: TensorRef | float | None = None
    topk: int | None = None
    decoder_norm: tuple[TensorRef, int] | None = None  # SAELens rescale_acts_by_decoder_norm: (W_dec, axis)

    @property
    def d_sae(self) -> int:
        return self.weight.shape[self.axis]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1 - self.axis]


def find_features(source: str, layer: int, text: str, model: Any, tokenizer: Any, k: int = 10,
                  sae_format: str | None = None, hook_point: str | None = None, trainer: int | None = None,
                  chunk_size: int | None = None) -> list[FoundFeature]:
    """The k features of the layer's SAE that fire most on `text` (best first; only features that fire).

        >>> found = find_features("andyrdt/saes-llama-3.1-8b-instruct", 15, "The Eiffel Tower", model, tok, k=5)
        >>> found[0].key, round(found[0].mean, 2)
        ('15:21576', 3.97)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    src = SAESource.open(source)
    sae = locate_sae(src, layer, sae_format, hook_point, trainer)
    enc = load_encoder(src, sae)
    hidden = layer_activations(model, tokenizer, text, layer)  # [tokens, d_model]
    if hidden.shape[1] != enc.d_model:
        raise ValueError(f"the SAE reads vectors of size {enc.d_model}, but the model's hidden size is {hidden.shape[1]}: "
                         "use the model these SAEs were trained for")
    return top_features(enc, hidden, layer, k, chunk_size)


def layer_activations(model: Any, tokenizer: Any, text: str, layer: int) -> torch.Tensor:
    """The residual stream after decoder layer `layer` at each token of `text`, the first left out: [tokens - 1, d_model]."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to find features for is empty")
    layers = steering.decoder_layers(model)[1]
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: this model has {len(layers)} layers (0-{len(layers) - 1})")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        raise ValueError(f"the text is {ids.shape[1]} tokens long; this model reads at most {limit}: shorten it")
    if ids.shape[1] < 2:
        raise ValueError("the text is too short: give at least two tokens (the first one is left out)")
    got = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        got["h"] = steering.layer_hidden(output)[0, 1:].detach()  # [tokens - 1, d_model]

    handle = layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return got["h"].float()


def top_features(enc: Encoder, hidden: torch.Tensor, layer: int, k: int = 10, chunk_size: int | None = None,
                 device: str | torch.device | None = None) -> list[FoundFeature]:
    """The k features with the highest mean activation over `hidden` ([tokens, d_model]), reading the
    encoder `chunk_size` features at a time (default: about 64 MiB a chunk).

        >>> top_features(load_encoder(src, sae), hidden, 15, k=3)
        [FoundFeature(layer=15, index=21576, mean=3.9, max=9.1), ...]
    """
    device = torch.device(device) if device else (hidden.device if hidden.is_cuda else
                                                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    n_tok = hidden.shape[0]
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * enc.d_model))
    chunk = max(1, min(chunk, MAX_CHUNK_ELEMENTS // max(1, n_tok)))
    x = hidden.to(device, torch.float32)  # [tokens, d_model]
    if enc.input_scale == "token":
        x = x * (enc.d_model**0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    else:
        x = x * float(enc.input_scale)
    if enc.input_bias is not None:
        x = x - enc.input_bias.read().to(device)
    bias = enc.bias.read().to(device) if enc.bias is not None else None
    thr = enc.threshold.read().to(device) if isinstance(enc.threshold, TensorRef) else enc.threshold
    best_mean = torch.empty(0, device=device)
    best_max = torch.empty(0, device=device)
    best_idx = torch.empty(0, dtype=torch.long, device=device)
    if enc.topk:  # per token: the k largest pre-activations over all features, merged chunk by chunk
        top_val = torch.empty(n_tok, 0, device=device)
        top_idx = torch.empty(n_tok, 0, dtype=torch.long, device=device)
    for start in range(0, enc.d_sae, chunk):
        stop = min(start + chunk, enc.d_sae)
        pre = x @ _weight_block(enc, start, stop).to(device)  # [tokens, chunk]
        if bias is not None:
            pre = pre + bias[start:stop]
        if enc.decoder_norm is not None:
            dec, axis = enc.decoder_norm
            rows = dec.block(start, stop, 0, dec.shape[1]) if axis == 0 else dec.block(0, dec.shape[0], start, stop).T
            pre = pre * rows.to(device).norm(dim=-1)
        if enc.topk:
            vals = torch.cat([top_val, pre], dim=1)
            idx = torch.cat([top_idx, torch.arange(start, stop, device=device).expand(n_tok, -1)], dim=1)
            top_val, pos = vals.topk(min(enc.topk, vals.shape[1]), dim=1)
            top_idx = idx.gather(1, pos)
            continue
        acts = pre.relu()
        if thr is not None:
            acts = acts * (pre > (thr[start:stop] if isinstance(thr, torch.Tensor) and thr.dim() else thr))
        means, maxes = acts.mean(0), acts.max(0).values  # [chunk]
        best_mean, best_max, best_idx = _keep_best(
            torch.cat([best_mean, means]), torch.cat([best_max, maxes]),
            torch.cat([best_idx, torch.arange(start, stop, device=device)]), k)
    if enc.topk:  # the per-token top-k, made dense only over the features that appear in it
        feats, inverse = top_idx.unique(return_inverse=True)
        dense = torch.zeros(n_tok, feats.numel(), device=device).scatter_(1, inverse, top_val.relu())
        best_mean, best_max, best_idx = _keep_best(dense.mean(0), dense.max(0).values, feats, k)
    return [FoundFeature(layer, int(i), float(m), float(mx))
            for i, m, mx in zip(best_idx.tolist(), best_mean.tolist(), best_max.tolist(), strict=True) if m > 0]


def _keep_best(means: torch.Tensor, maxes: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The k entries with the highest mean (then max, then lowest index), best first."""
    order = sorted(range(means.numel()), key=lambda j: (-means[j].item(), -maxes[j].item(), idx[j].item()))[:k] \
        if means.numel() <= 4 * k else None
    if order is None:  # many candidates: a coarse top-k by mean first, then the exact order
        cut = means.topk(min(4 * k, means.numel())).indices
        return _keep_best(means[cut], maxes[cut], idx[cut], k)
    order_t = torch.tensor(order, dtype=torch.long, device=means.device)
    return means[order_t], maxes[order_t], idx[order_t]


def _weight_block(enc: Encoder, start: int, stop: int) -> torch.Tensor:
    """Encoder weights of features start:stop as [d_model, stop - start]."""
    w = enc.weight
    return w.block(start, stop, 0, w.shape[1]).T if enc.axis == 0 else w.block(0, w.shape[0], start, stop)


# ---------------------------------------------------------------------------
# Each layout's encoder, as its library computes it
# ---------------------------------------------------------------------------


def load_encoder(src: SAESource, sae: SAEFile) -> Encoder:
    """The encoder of one SAE: its tensors located in the file (nothing read yet) and its activation."""
    label = f"{src.name}/{sae.file}"
    t = tensor_index(src.fetch(sae.file), label)
    folder = sae.file.rsplit("/", 1)[0] if "/" in sae.file else ""
    in_folder = (lambda name: f"{folder}/{name}" if folder else name)  # noqa: E731
    dec_name, dec_axis, enc_name = decoder_of(t, sae.format, label)
    if enc_name not in t:
        raise ValueError(f"{label} has no encoder tensor {enc_name!r}: features cannot be found from text with it")
    weight = t[enc_name]
    axis = 1 - dec_axis if sae.format != "sparsify" else 0
    if len(weight.shape) != 2 or weight.shape[axis] != t[dec_name].shape[dec_axis]:
        raise ValueError(f"{label}: {enc_name} has shape {list(weight.shape)}, which does not match {dec_name} {list(t[dec_name].shape)}")
    enc = Encoder(weight, axis)
    if sae.format == "andyrdt":  # dictionary_learning classes
        cfg_rel = sae.file.rsplit("/", 1)[0] + "/config.json"
        trainer = src.read_json(cfg_rel).get("trainer", {}) if cfg_rel in src.files else {}
        dict_class = trainer.get("dict_class") if isinstance(trainer, dict) else None
        if "r_mag" in t or dict_class == "GatedAutoEncoder":
            raise ValueError(f"{label} is a GatedAutoEncoder: finding features from text supports ReLU, TopK, BatchTopK and JumpReLU SAEs")
        jump = dict_class == "JumpReluAutoEncoder" or (dict_class is None and "W_enc" in t and "k" not in t)
        enc = Encoder(weight, axis, t.get("encoder.bias", t.get("b_enc")),
                      None if jump else t.get("b_dec", t.get("bias")),  # JumpReluAutoEncoder does not subtract b_dec
                      threshold=None if dict_class == "AutoEncoderTopK" else t.get("threshold"),
                      topk=int(t["k"].read()) if dict_class == "AutoEncoderTopK" else None)
    elif sae.format == "llamascope":
        hp = src.read_json(sae.file.rsplit("/checkpoints/", 1)[0] + "/hyperparams.json")
        d = weight.shape[1]
        scale: float | str = 1.0
        norm = hp.get("norm_activation", "dataset-wise")
        if norm == "dataset-wise":
            avg = (hp.get("dataset_average_activation_norm") or {}).get("in")
            if not isinstance(avg, int | float) or avg <= 0:
                raise ValueError(f"{label}: hyperparams.json has no dataset_average_activation_norm.in")
            scale = math.sqrt(d) / avg
        elif norm == "token-wise":
            scale = "token"
        act = hp.get("act_fn", "jumprelu")
        enc = Encoder(weight, axis, t.get("encoder.bias"),
                      t.get("decoder.bias") if hp.get("apply_decoder_bias_to_pre_encoder") else None, scale,
                      threshold=float(hp.get("jump_relu_threshold", 0.0)) if act == "jumprelu" else None,
                      topk=int(hp["top_k"]) if act == "topk" else None)
    elif sae.format == "saelens":
        cfg = src.read_json(in_folder("cfg.json"))
        arch = cfg.get("architecture", "standard")
        if arch not in ("standard", "jumprelu", "topk"):
            raise ValueError(f"{label} is a {arch} SAE: finding features from text supports standard, topk and jumprelu (and batchtopk saved for inference) SAELens SAEs")
        if cfg.get("normalize_activations", "none") not in ("none", None, False):
            raise ValueError(f"{label} normalizes its inputs ({cfg['normalize_activations']}): finding features from text does not support that")
        if cfg.get("activation_fn", "relu") not in ("relu", "topk"):
            raise ValueError(f"{label} uses activation {cfg['activation_fn']!r}: only ReLU-based SAEs are supported for finding")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        topk = (cfg.get("k") or kwargs.get("k")) if arch == "topk" or cfg.get("activation_fn") == "topk" else None
        enc = Encoder(weight, axis, t.get("b_enc"), t.get("b_dec") if cfg.get("apply_b_dec_to_input", True) else None,
                      threshold=t.get("threshold") if arch == "jumprelu" else None, topk=int(topk) if topk else None,
                      decoder_norm=(t[dec_name], dec_axis) if topk and cfg.get("rescale_acts_by_decoder_norm") else None)
    elif sae.format == "sparsify":
        cfg = src.read_json(in_folder("cfg.json"))
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{label} uses activation {cfg.get('activation')!r}: only topk sparsify SAEs are supported for finding")
        enc = Encoder(weight, axis, t.get("encoder.bias"), t.get("b_dec"), topk=int(cfg.get("k", 32)))
    else:  # goodfire: relu(encoder_linear(x)), no input bias
        enc = Encoder(weight, axis, t.get("encoder_linear.bias"))
    for name, ref in (("encoder bias", enc.bias), ("input bias", enc.input_bias)):
        if ref is not None and ref.shape != ((enc.d_sae,) if name == "encoder bias" else (enc.d_model,)):
            raise ValueError(f"{label}: the {name} has shape {list(ref.shape)}, which does not fit {enc_name} {list(weight.shape)}")
    return enc
