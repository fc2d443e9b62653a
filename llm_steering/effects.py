"""What the steering changed in an answer, token by token: how much more (or less) likely the
steered model made each token than the same model without the steering, given the same words before it.

    effect[t] = log p_steered(token t | prompt, answer[:t]) - log p_unsteered(token t | prompt, answer[:t])

Two teacher-forced forward passes over prompt + answer (one inside `steering.steer`, one
without) give every answer token's effect at once; the steered pass sees exactly the
log-probabilities greedy generation saw when it chose those tokens. Front-end neutral: the
numbers (`token_effects`) and an HTML view for a newcomer (`effect_html`).

    >>> trace = SteeringTrace()
    >>> text = "".join(stream_steered_answer_hf(model, tok, chat, comps, steer_prompt=False, trace=trace))
    >>> effects = token_effects(model, trace.token_ids, trace.prompt_len, comps,
    ...                         steer_from=trace.prompt_len)          # 0 when the prompt was steered
    >>> effect_html(tok, trace.token_ids, trace.prompt_len, effects, [("Eiffel Tower", "add", 0.35)])
"""

from __future__ import annotations

import html
import inspect
import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from llm_steering import steering  # noqa: F401  (before torch: it sets PyTorch's OpenMP wait policy)
from llm_steering.steering import SteeringComponent

import torch

MAX_TOKENS = 4096  # prompt + answer tokens read at most; answer tokens past it get no effect
CHUNK = 1024  # tokens per forward pass (a KV cache carries the rest): bounds attention memory

# The view's scale, the same for every answer so a colour means the same thing everywhere.
NEUTRAL = math.log(1.5)  # under 1.5x either way: "the model would have written this anyway"
FULL = math.log(100.0)  # 100x or more: the strongest colour
ORANGE = "234,88,12"
BLUE = "37,99,235"


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


# ---------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------

EMPTY = ("<p class='muted'>Switch a feature on and send a message: each word of the answer will be coloured here "
         "by what the steering did to it: <b>orange</b> if the steering made it more likely, <b>blue</b> if less "
         "likely, no colour if the model would have written it anyway.</p>")
UNSTEERED = "<p class='muted'>No steering was on for this answer, so there is nothing to colour.</p>"

OP_WORDS = {"add": "added", "clamp": "held", "cap": "capped", "ablate": "removed"}


def effect_html(
    tokenizer: Any,
    token_ids: Sequence[int] | None,
    prompt_len: int,
    effects: Sequence[float] | None,
    features: Sequence[tuple[Any, str, float | None]],
    stopped: bool = False,
    capped: bool = False,
) -> str:
    """The answer's tokens coloured by the steering's effect (`token_effects`), for a newcomer.

    Orange: the steering made the token more likely, blue: less likely, the stronger the colour
    the bigger the change (full at 100x); no colour: under 1.5x either way, the model would
    have written it anyway. Hovering a token says it in words ("12x more likely with the
    steering"). Above the tokens, one line names the `features` - each (name, op, fraction),
    name a catalog.Feature (its `title` is shown: "Eiffel Tower" for eiffel_tower) or a string
    shown as it is; fraction None leaves the strength out - and says what the colours mean. `stopped` (the user pressed Stop) and `capped` (cut at the length limit,
    see `hit_length_limit`) add a short note. Answer tokens without an effect (past
    `token_effects`' cap) stay uncoloured, with a note. No answer or no `effects`: an empty state
    saying what will appear here. Every token and name is HTML-escaped.
    """
    answer = [int(t) for t in (token_ids or [])[prompt_len:]]
    if not answer or effects is None:
        if stopped:
            return "<p class='muted'>Stopped by you before the first word.</p>"
        return EMPTY
    if not features:
        return UNSTEERED
    from llm_steering.web.views import token_texts  # here, not at import: app_views brings gradio

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = token_texts(tokenizer, answer)
    spans = []
    for i, (tid, text) in enumerate(zip(answer, texts, strict=True)):
        if tid in special or not text:
            continue
        effect = effects[i] if i < len(effects) else None
        spans.append(_token_span(text, effect))
    notes = []
    if len(effects) < len(answer):
        measured = len("".join(texts[: len(effects)]).split())
        notes.append(f"Only the first {measured} words are coloured: the rest of this long answer was not measured.")
    if stopped:
        notes.append(f"Stopped by you after {_count(len(''.join(texts).split()), 'word')}.")
    if capped:
        notes.append("Cut at the length limit: raise Max new tokens under Advanced.")
    note = f"<div class='muted effect-note'>{' '.join(notes)}</div>" if notes else ""
    return (f"<div class='intensity effects'><div class='muted'>{_legend(features)}</div>"
            f"<div class='toks' style='white-space:pre-wrap'>{''.join(spans)}</div>{note}</div>")


def _legend(features: Sequence[tuple[Any, str, float | None]]) -> str:
    names = []
    for feature, op, fraction in features:
        title = feature if isinstance(feature, str) else getattr(feature, "title", feature)
        base = str(op).removesuffix("_keepnorm")  # keeping the norm is a detail a newcomer does not need
        how = OP_WORDS.get(base, base)
        if fraction is not None and base in ("add", "clamp"):
            how += f" at {fraction:g}"
        names.append(f"<b>{html.escape(str(title))}</b> ({html.escape(how)})")
    swatch = "<span class='tok' style='background:rgba({},0.6)'>&nbsp;{}&nbsp;</span>"
    return (f"Steering: {', '.join(names)}. " + swatch.format(ORANGE, "orange") + " the steering made the word more "
            "likely, " + swatch.format(BLUE, "blue") + " less likely, darker = more; no colour: the model would have "
            "written it anyway. Hover a word for how much.")


def _token_span(text: str, effect: float | None) -> str:
    words = effect_words(effect)
    body = html.escape(text)
    if effect is None or abs(effect) < NEUTRAL or not math.isfinite(effect):
        return f'<span class="tok" title="{html.escape(words)}">{body}</span>'
    strength = min((abs(effect) - NEUTRAL) / (FULL - NEUTRAL), 1.0)
    color = ORANGE if effect > 0 else BLUE
    return (f'<span class="tok" style="background:rgba({color},{0.15 + 0.7 * strength:.2f})" '
            f'title="{html.escape(words)}">{body}</span>')


def effect_words(effect: float | None) -> str:
    """A token's effect in words: "12× more likely with the steering", "3× less likely ...",
    or "the model would have written this anyway" under 1.5x either way."""
    if effect is None or not math.isfinite(effect):
        return "not measured" if effect is None else "the steering made this word impossible or certain"
    if abs(effect) < NEUTRAL:
        return f"about as likely without the steering ({_times(math.exp(abs(effect)))}): the model would have written this anyway"
    side = "more" if effect > 0 else "less"
    return f"{_times(math.exp(abs(effect)))} {side} likely with the steering"


def _times(ratio: float) -> str:
    if ratio >= 10_000:
        return "over 10,000×"
    return f"{ratio:.1f}×" if ratio < 10 else f"{ratio:,.0f}×"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
