"""The effect view: an answer's words coloured by what the steering did to each (the numbers come
from `llm_steering.effects.token_effects`).

    >>> effect_html(tok, trace.token_ids, trace.prompt_len, effects, [("Eiffel Tower", "add", 0.35)])
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

from llm_steering.core import format_fraction
from llm_steering.effects import token_texts

# The view's scale, the same for every answer so a colour means the same thing everywhere.
NEUTRAL = math.log(1.5)  # under 1.5x either way: "the model would have written this anyway"
FULL = math.log(100.0)  # 100x or more: the strongest colour
ORANGE = "234,88,12"
BLUE = "37,99,235"

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
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = token_texts(tokenizer, answer)
    shown = [i for i, tid in enumerate(answer) if tid not in special and texts[i]]
    marks = markdown_marks("".join(texts[i] for i in shown))
    spans, at = [], 0
    for i in shown:
        effect = effects[i] if i < len(effects) else None
        body = _styled(marks[at : at + len(texts[i])])
        at += len(texts[i])
        if body:
            spans.append(_token_span(body, texts[i], effect))
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
            how += f" at {format_fraction(fraction)}"
        names.append(f"<b>{html.escape(str(title))}</b> ({html.escape(how)})")
    swatch = "<span class='tok' style='background:rgba({},0.6)'>&nbsp;{}&nbsp;</span>"
    return (f"Steering: {', '.join(names)}. " + swatch.format(ORANGE, "orange") + " the steering made the word more "
            "likely, " + swatch.format(BLUE, "blue") + " less likely, darker = more; no colour: the model would have "
            "written it anyway. <span class='hover-hint'>Hover a word for how much.</span>"
            "<span class='tap-hint'>Tap a word for how much.</span> <span class='tap-note'></span>")


def _token_span(body: str, text: str, effect: float | None) -> str:
    """One token: `body` its HTML (markdown rendered), `text` its raw text."""
    words = effect_words(effect)
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


# -- markdown, as the chat renders it: each character of the answer with its style, markers hidden --

MARK_RULES = [  # (pattern, style of group 1); what lies outside group 1 is markup, hidden
    (re.compile(r"`([^`\n]+)`"), "code"),
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__"), "b"),
    (re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?!\*)|(?<![_\w])_(?=\S)(.+?)(?<=\S)_(?!\w)"), "i"),
    (re.compile(r"^(?:#{1,6}) (.*)$", re.M), "b"),
]
FENCE = re.compile(r"^ {0,3}(```|~~~).*(?:\n|$)", re.M)
BULLET = re.compile(r"^(\s*)[-*+] (?=\S)", re.M)
TAGS = {"code": "code", "b": "b", "i": "i"}


def markdown_marks(text: str) -> list[tuple[str, frozenset]]:
    """Each character of `text` as (what is shown, its styles): code fences, `code`, **bold**,
    *italic*, # headings and list bullets rendered as the chat does, their markers shown as ""."""
    shown, styles = list(text), [set() for _ in text]
    plain, start, in_code = [], 0, False  # the stretches outside fenced code blocks
    for fence in FENCE.finditer(text):  # a fence line is hidden; what lies between two is code
        if in_code:
            for k in range(start, fence.start()):
                styles[k].add("code")
        else:
            plain.append((start, fence.start()))
        for k in range(fence.start(), fence.end()):
            shown[k] = ""
        in_code, start = not in_code, fence.end()
    if in_code:  # an unclosed block runs to the end, as in the chat
        for k in range(start, len(text)):
            styles[k].add("code")
    else:
        plain.append((start, len(text)))
    for lo, hi in plain:
        for m in BULLET.finditer(text, lo, hi):
            shown[m.end() - 2] = "•"
        for pattern, style in MARK_RULES:
            for m in pattern.finditer(text, lo, hi):
                group = next(g for g in range(1, (m.lastindex or 0) + 1) if m.group(g) is not None)
                if any("code" in styles[k] for k in range(m.start(), m.end())) and style != "code":
                    continue
                for k in range(m.start(), m.end()):
                    if m.start(group) <= k < m.end(group):
                        styles[k].add(style)
                    else:
                        shown[k] = ""
    return [(c, frozenset(s)) for c, s in zip(shown, styles, strict=True)]


def _styled(marks: list[tuple[str, frozenset]]) -> str:
    """HTML for a token's characters: runs of one style escaped and wrapped in <b>, <i>, <code>."""
    out, k = [], 0
    while k < len(marks):
        style, run = marks[k][1], []
        while k < len(marks) and marks[k][1] == style:
            run.append(marks[k][0])
            k += 1
        text = html.escape("".join(run))
        for name in sorted(style):
            text = f"<{TAGS[name]}>{text}</{TAGS[name]}>" if text else text
        out.append(text)
    return "".join(out)
