"""What the steering changed in an answer, token by token: how much more (or less) likely the
steered model made each token than the same model without the steering, given the same words before it.

    effect[t] = log p_steered(token t | prompt, answer[:t]) - log p_unsteered(token t | prompt, answer[:t])

Two teacher-forced forward passes over prompt + answer (one inside `steering.steer`, one
without) give every answer token's effect at once; the steered pass sees exactly the
log-probabilities greedy generation saw when it chose those tokens. The numbers only: the
web UI's view of them is `llm_steering.web.effect_view.effect_html`.

    >>> trace = SteeringTrace()
    >>> text = "".join(stream_steered_answer_hf(model, tok, chat, comps, steer_prompt=False, trace=trace))
    >>> effects = token_effects(model, trace.token_ids, trace.prompt_len, comps,
    ...                         steer_from=trace.prompt_len)          # 0 when the prompt was steered
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from llm_steering import steering  # noqa: F401  (before torch: it sets PyTorch's OpenMP wait policy)
from llm_steering.steering import SteeringComponent

import torch

MAX_TOKENS = 4096  # prompt + answer tokens read at most; answer tokens past it get no effect
CHUNK = 1024  # tokens per forward pass (a KV cache carries the rest): bounds attention memory

# ---------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------


def token_effects(
    model: Any,
    token_ids: Sequence[int],
    prompt_len: int,
    components: Sequence[SteeringComponent],
    steer_from: int,
    *,
    max_tokens: int = MAX_TOKENS,
    chunk: int = CHUNK,
) -> list[float]:
    """For each answer token, log p_steered - log p_unsteered of it given everything before it
    (natural log: exp(effect) is how many times more likely the steering made it).

    `token_ids` is the prompt then the answer (a SteeringTrace's `token_ids`), `prompt_len`
    how many of them are prompt. `components` and `steer_from` must be what the answer was
    generated with: `steer_from` is 0 when the prompt was steered (the default of
    `stream_steered_answer_hf`), `prompt_len` with `steer_prompt=False`; pass the components
    through `steering.resolve_components` first if the answer used `clamp_intensity`.

    Returns one float per answer token, except that at most `max_tokens` tokens (prompt
    included) are read: the answer tokens past that get no entry, so the list can be shorter
    than the answer (empty when the prompt alone reaches the cap). No components: all zeros,
    without running the model. The model runs in `chunk`-token forward passes with a KV cache,
    so memory stays bounded; the steering hooks are gone when this returns or raises.
    """
    answer = _check(model, token_ids, prompt_len, max_tokens, chunk)
    comps = list(components)
    if not comps:
        steering.validate_components(model, comps)
        return [0.0] * len(answer)
    steered = answer_logprobs(model, token_ids, prompt_len, comps, steer_from, max_tokens=max_tokens, chunk=chunk)
    plain = answer_logprobs(model, token_ids, prompt_len, [], 0, max_tokens=max_tokens, chunk=chunk)
    return (steered - plain).tolist()


def answer_logprobs(
    model: Any,
    token_ids: Sequence[int],
    prompt_len: int,
    components: Sequence[SteeringComponent],
    steer_from: int = 0,
    *,
    max_tokens: int = MAX_TOKENS,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """log p(answer token | everything before it) for each answer token (float32, on the CPU),
    under `components` from position `steer_from` on (none: the plain model). One
    teacher-forced pass in `chunk`-token pieces; see `token_effects` for the arguments."""
    answer = _check(model, token_ids, prompt_len, max_tokens, chunk)
    if not answer:
        return torch.zeros(0)
    ids = [int(t) for t in token_ids[: prompt_len + len(answer)]]
    inputs = ids[:-1]  # the last token is only predicted, never read
    first = prompt_len - 1  # the position whose logits predict the first answer token
    device = next(model.parameters()).device
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[torch.Tensor] = []
    cache = None
    steered = steering.steer(model, components, steer_from=steer_from) if components else nullcontext()
    with torch.no_grad(), steered:
        for start in range(0, len(inputs), chunk):
            piece = inputs[start : start + chunk]
            keep = len(piece) - max(0, first - start)  # this piece's positions that predict answer tokens
            kwargs: dict[str, Any] = {"use_cache": len(inputs) > chunk}
            if cache is not None:
                kwargs["past_key_values"] = cache
            if takes_keep:
                kwargs["logits_to_keep"] = max(keep, 1)  # 0 would mean "all"
            result = model(input_ids=torch.tensor([piece], device=device), **kwargs)
            cache = getattr(result, "past_key_values", None) if kwargs["use_cache"] else None
            if keep <= 0:
                continue
            logits = result.logits[0, -keep:].float()
            lo = start + len(piece) - keep  # the first of these positions
            targets = torch.tensor(ids[lo + 1 : lo + 1 + keep], device=logits.device)
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            out.append(logp.cpu())
            del result, logits
    return torch.cat(out)


def _check(model: Any, token_ids: Sequence[int], prompt_len: int, max_tokens: int, chunk: int) -> list[int]:
    """The answer tokens that will be scored (ValueError on nonsense)."""
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len <= len(token_ids):
        raise ValueError(f"prompt_len must be between 1 and the {len(token_ids)} tokens given, got {prompt_len!r}")
    for name, value in (("max_tokens", max_tokens), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    cap = min(max_tokens, limit) if limit else max_tokens
    return [int(t) for t in token_ids[prompt_len:cap]]


def hit_length_limit(answer_ids: Sequence[int], max_new_tokens: int, eos: Sequence[int]) -> bool:
    """Whether an answer was cut at `max_new_tokens` rather than ended by the model
    (`eos`: steering.eos_ids(model, tokenizer)); for `effect_html`'s `capped`."""
    return len(answer_ids) >= max_new_tokens and (not answer_ids or answer_ids[-1] not in set(eos))


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally so multi-byte characters come out whole."""
    out, prev = [], ""
    for j in range(len(ids)):
        cur = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
        out.append(cur[len(prev) :] if cur.startswith(prev) else tokenizer.decode([ids[j]], skip_special_tokens=True))
        prev = cur
    return out
