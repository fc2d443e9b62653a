"""Finding SAE features from text: which features fire most on a text's tokens.

    from llm_steering import steering
    from llm_steering.saes import find_features
    model, tok = steering.load_model("meta-llama/Llama-3.1-8B-Instruct")
    for f in find_features("andyrdt/saes-llama-3.1-8b-instruct", 15, "The Eiffel Tower in Paris", model, tok):
        print(f.key, f.mean, f.max)          # "15:21576" 4.1 9.8 ... (best first)

The text runs through the model once; the activations at the SAE's own input hook (the residual
stream before or after a block, the middle of a block, the MLP or attention output, or the
attention heads' z before o_proj; the first token left out: it carries a huge outlier norm) go
through the SAE's encoder as its library computes it, with the encoder read in chunks of
features (about 64 MiB each), on the GPU when there is one. Features are ranked by their mean
activation over the tokens, then by their maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_steering import steering
from llm_steering.saes.base import Encoder, hook_kind
from llm_steering.saes.checks import check_encoder, finite_or_fail
from llm_steering.saes.core import check_model, locate_sae
from llm_steering.saes.registry import get_format
from llm_steering.saes.source import SAESource
from llm_steering.saes.tensors import TensorRef, tensor_index

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


def find_features(source: str, layer: int, text: str, model: Any, tokenizer: Any, k: int = 10,
                  sae_format: str | None = None, hook_point: str | None = None, trainer: int | None = None,
                  chunk_size: int | None = None, allow_other_model: bool = False,
                  model_id: str | None = None) -> list[FoundFeature]:
    """The k features of the layer's SAE that fire most on `text` (best first; only features that fire).

    An SAE whose config names another model than `model_id` (default: the model's own id) is
    refused unless `allow_other_model`.

        >>> found = find_features("andyrdt/saes-llama-3.1-8b-instruct", 15, "The Eiffel Tower", model, tok, k=5)
        >>> found[0].key, round(found[0].mean, 2)
        ('15:21576', 3.97)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    src = SAESource.open(source)
    sae = locate_sae(src, layer, sae_format, hook_point, trainer)
    check_model(sae, model_id or steering.model_id_of(model), allow_other_model)
    enc = load_encoder(src, sae)
    hidden = hook_activations(model, tokenizer, text, sae.hook_point)  # [tokens, d_in]
    if hidden.shape[1] != enc.d_model:
        what = "hidden size is" if sae.residual and sae.hook_out == sae.hook_point else f"{sae.hook_point} has size"
        raise ValueError(f"the SAE reads vectors of size {enc.d_model}, but the model's {what} {hidden.shape[1]}: "
                         "use the model these SAEs were trained for")
    return top_features(enc, hidden, layer, k, chunk_size)


def load_encoder(src: SAESource, sae: Any) -> Encoder:
    """The encoder of one SAE, as its format reads it, with every parameter checked."""
    return check_encoder(get_format(sae.format).encoder(src, sae, tensor_index(src.fetch(sae.file), sae.label)))


def hook_activations(model: Any, tokenizer: Any, text: str, hook: str) -> torch.Tensor:
    """The activations at hook point `hook` at each token of `text`, the first left out: [tokens - 1, d]."""
    where = hook_kind(hook)
    if where is None:
        raise ValueError(f"cannot read the activations at {hook} from text: finding supports SAEs on resid_pre, "
                         "resid_mid, resid_post, mlp_out, attn_out and attn.hook_z")
    kind, block = where
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to find features for is empty")
    inner, layers = steering.decoder_layers(model)
    if not 0 <= block < len(layers):
        raise ValueError(f"layer {block} is out of range: this model has {len(layers)} layers (0-{len(layers) - 1})")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        raise ValueError(f"the text is {ids.shape[1]} tokens long; this model reads at most {limit}: shorten it")
    if ids.shape[1] < 2:
        raise ValueError("the text is too short: give at least two tokens (the first one is left out)")
    got: dict[str, torch.Tensor] = {}

    def keep(value: Any) -> None:
        got["h"] = (value[0] if isinstance(value, tuple) else value)[0, 1:].detach()

    if kind == "resid_pre" and block == 0:
        module, pre = inner.embed_tokens, False
    elif kind in ("resid_post", "resid_pre"):
        module, pre = layers[block - (kind == "resid_pre")], False
    else:
        module, pre = {"resid_mid": (layers[block].post_attention_layernorm, True), "mlp_out": (layers[block].mlp, False),
                       "attn_out": (layers[block].self_attn, False), "z": (layers[block].self_attn.o_proj, True)}[kind]
    handle = (module.register_forward_pre_hook(lambda m, args: keep(args[0])) if pre
              else module.register_forward_hook(lambda m, args, out: keep(steering.layer_hidden(out) if not pre else out)))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return got["h"].float()


def _prepare_input(enc: Encoder, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The SAE's input: normalised, scaled and with its input bias taken off, as its library does."""
    x = hidden.to(device, torch.float32)  # [tokens, d_model]
    if enc.input_norm == "token":
        x = x * (enc.d_model**0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    elif enc.input_norm == "layer_norm":  # SAELens run_time_activation_ln_in
        x = x - x.mean(dim=-1, keepdim=True)
        x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
    x = x * float(enc.input_scale)
    if enc.input_bias is not None:
        x = x - enc.input_bias.read().to(device)
    return x


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
    x = _prepare_input(enc, hidden, device)
    if not torch.isfinite(x).all():
        raise ValueError("the model's activations at the SAE's hook hold NaN or infinite values: check the model")
    bias = enc.bias.read().to(device) if enc.bias is not None else None
    thr = enc.threshold.read().to(device) if isinstance(enc.threshold, TensorRef) else enc.threshold
    best = (torch.empty(0, device=device), torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device))
    top_val = torch.empty(n_tok, 0, device=device)  # per token: the k largest pre-activations so far (TopK SAEs)
    top_idx = torch.empty(n_tok, 0, dtype=torch.long, device=device)
    for start in range(0, enc.d_sae, chunk):
        stop = min(start + chunk, enc.d_sae)
        pre = x @ _weight_block(enc, start, stop).to(device)  # [tokens, chunk]; the block is freed at once
        # x is finite, so a NaN or infinite weight makes its feature's column non-finite (checking the
        # block itself would cost temporaries the size of the block)
        finite_or_fail(pre, f"the encoder {enc.weight.name}", enc.label, start)
        if bias is not None:
            pre = pre + bias[start:stop]
        if enc.decoder_norm is not None:
            d = enc.decoder_norm.tensor
            rows = d.block(start, stop, 0, d.shape[1]) if enc.decoder_norm.axis == 0 else d.block(0, d.shape[0], start, stop).T
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
        best = _keep_best(torch.cat([best[0], acts.mean(0)]), torch.cat([best[1], acts.max(0).values]),
                          torch.cat([best[2], torch.arange(start, stop, device=device)]), k)
    if enc.topk:  # the per-token top-k, made dense only over the features that appear in it
        feats, inverse = top_idx.unique(return_inverse=True)
        dense = torch.zeros(n_tok, feats.numel(), device=device).scatter_(1, inverse, top_val.relu())
        best = _keep_best(dense.mean(0), dense.max(0).values, feats, k)
    return [FoundFeature(layer, int(i), float(m), float(mx))
            for i, m, mx in zip(best[2].tolist(), best[0].tolist(), best[1].tolist(), strict=True) if m > 0]


def _keep_best(means: torch.Tensor, maxes: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The k entries with the highest mean (then max, then lowest index), best first."""
    if means.numel() > 4 * k:  # many candidates: a coarse top-k by mean first, then the exact order
        cut = means.topk(4 * k).indices
        return _keep_best(means[cut], maxes[cut], idx[cut], k)
    order = sorted(range(means.numel()), key=lambda j: (-means[j].item(), -maxes[j].item(), idx[j].item()))[:k]
    order_t = torch.tensor(order, dtype=torch.long, device=means.device)
    return means[order_t], maxes[order_t], idx[order_t]


def _weight_block(enc: Encoder, start: int, stop: int) -> torch.Tensor:
    """Encoder weights of features start:stop as [d_model, stop - start]."""
    w = enc.weight
    return w.block(start, stop, 0, w.shape[1]).T if enc.axis == 0 else w.block(0, w.shape[0], start, stop)
