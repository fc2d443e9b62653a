"""What the Space shows besides the chat: its texts, the strength slider, the steering summary,
the concept-intensity view, the CSS.

Plain functions of their inputs (no model loaded at import), so they are testable alone.

    >>> turn_messages(catalog, turns)             # the chat, each answer tagged with its steering
    >>> summary_markdown(catalog, spec)           # what the next answer will be steered with
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Any

from llm_steering.catalog import Catalog, Feature, recipe_of
from llm_steering.config import SteeringSpec
from llm_steering.core import cut_at_sentence, format_fraction, format_strength

import gradio as gr

EXAMPLES = [
    "Tell me about your perfect weekend.",
    "Write a short poem about the sea.",
    "What should I cook for dinner tonight?",
    "Give me three tips for a job interview.",
]

TITLE = "SAE steering chat"
INTRO = ("Make the model think about a concept while it chats: pick a preset or switch a feature on, send a "
         "message, and compare with the unsteered model.")
DESCRIPTION = """\
**Steering** changes what a language model "thinks about" without changing its prompt or its weights.
A feature is a direction in the model's hidden state (from a sparse autoencoder, or from contrasting
texts about a concept with neutral ones). While the model writes, the app pushes its hidden state
along that direction after one layer: **clamp** sets the hidden state's component along the
direction to the strength, **add** adds the direction times the strength. Strengths are fractions of
the layer's typical hidden-state size.
"""


def how_it_works(catalog: Catalog, curves: dict[str, list[dict]] | None = None) -> str:
    """The "How it works" text: DESCRIPTION, then the strength ranges of the model in use, from its
    profile's defaults and, where there are ones, its measured strength curves (never another model's
    figures); last, what the strength words mean."""
    curves = strength_curves() if curves is None else curves
    shipped = [f for f in catalog.features if recipe_of(f.vector) is None]
    lines = []
    if shipped:
        low, high = min(f.default_fraction for f in shipped), max(f.default_fraction for f in shipped)
        span = f"{low:.2f}" if abs(high - low) < 0.005 else f"{low:.2f} to {high:.2f}"
        lines.append(f"On this model ({catalog.profile.name}) the features' defaults are {span}.")
    measured = {f.key: curve for f in shipped if (curve := measured_curve(f, f.default_op, curves))}
    breaks = [b for curve in measured.values() if (b := measured_break(curve)) is not None]
    if breaks:
        n = next(iter(measured.values()))[0].get("n_prompts")
        span = f"{min(breaks):.2f}" if max(breaks) - min(breaks) < 0.005 else f"{min(breaks):.2f} to {max(breaks):.2f}"
        lines.append(f"For {len(breaks)} of its {len(shipped)} features the text stops reading fluently from about {span}"
                     + (f" (measured on {n} prompts)" if isinstance(n, int) else "") + ".")
        fluent = [curve[-1]["fraction"] for curve in measured.values() if measured_break(curve) is None]
        if fluent:
            lines.append(f"The other {len(fluent)} stayed fluent as far as they were measured (up to "
                         f"{max(fluent):.2f}).")
        lines.append("The words beside a strength say what was measured: whether the text stays fluent and in how "
                     "many answers the concept is named, not whether the answer still answers the question"
                     + (" unless they say so." if any("addresses" in p or "tint" in p for c in measured.values() for p in c)
                        else "."))
    else:
        lines.append("Far above a feature's default the text falls apart. No strength curve was measured for this "
                     "model: the words beside a strength only compare it with the feature's default.")
    lines.append("Pick a preset or switch features on, chat, and compare with the unsteered model.")
    return DESCRIPTION + "\n" + " ".join(lines) + "\n"


class FractionSlider(gr.Slider):
    """A strength slider whose typed values reach the catalog's check (a readable warning),
    instead of gradio's bare out-of-range error."""

    @classmethod
    def get_block_name(cls) -> str:
        return "slider"

    def preprocess(self, payload: Any) -> float | str | None:
        """The number typed; None for an empty box, the text itself when it is not a number
        (the handlers' check turns both into a readable warning, never a crash)."""
        if payload is None or isinstance(payload, bool):
            return None
        try:
            return float(payload)
        except (TypeError, ValueError):
            return str(payload)[:40]


# Strength words: from each feature's measured curve where one exists (benchmarks/results/
# strength_curves.json: mention rate and NLL ratio on the tuning prompts), else from the fraction
# relative to the feature's default.
CURVES_PATH = Path(__file__).resolve().parents[1] / "data" / "strength_curves.json"  # package data, written by benchmarks/eval_quality.py curves-json
BREAKS_NLL, BREAKS_REP3 = 2.5, 0.2  # the quality evaluation's bar: past it the text falls apart


@functools.lru_cache(maxsize=4)
def strength_curves(path: Path = CURVES_PATH) -> dict[str, list[dict]]:
    """{concept: [{fraction, mention_rate, nll_ratio, rep3}, ...] sorted by fraction}; {} without a file."""
    try:
        data = json.loads(path.read_text())
        return {k: sorted(v, key=lambda p: p["fraction"]) for k, v in data.get("concepts", data).items()
                if isinstance(v, list) and all(isinstance(p, dict) and "fraction" in p for p in v)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _interpolate(points: list[dict], fraction: float, field: str) -> float | None:
    points = [p for p in points if isinstance(p.get(field), (int, float))]
    if not points:
        return None
    if fraction <= points[0]["fraction"]:
        return points[0][field] * (fraction / points[0]["fraction"] if points[0]["fraction"] > 0 else 1.0)
    for a, b in zip(points, points[1:], strict=False):
        if a["fraction"] <= fraction <= b["fraction"]:
            t = (fraction - a["fraction"]) / ((b["fraction"] - a["fraction"]) or 1.0)
            return a[field] + t * (b[field] - a[field])
    return points[-1][field]


def measured_curve(feature: Feature, op: str, curves: dict[str, list[dict]]) -> list[dict] | None:
    """`feature`'s measured curve for `op`, or None: a user's own concept has none (a curve under its
    name was measured for a shipped feature), nor does an op other than the one measured."""
    points = curves.get(feature.key)
    if not points or recipe_of(feature.vector) is not None:
        return None
    return points if points[0].get("op", feature.default_op) == op else None


def _breaks(point: dict) -> bool:
    nll, rep3 = point.get("nll_ratio"), point.get("rep3")
    return (isinstance(nll, (int, float)) and nll > BREAKS_NLL) or (isinstance(rep3, (int, float)) and rep3 >= BREAKS_REP3)


def measured_break(points: list[dict] | None) -> float | None:
    """The strength where a measured curve first crosses the quality bar (NLL ratio, else rep3),
    interpolated; None when nothing measured broke the text."""
    prev = None
    for p in points or []:
        if _breaks(p) and p["fraction"] > 0:
            nll = p.get("nll_ratio")
            if prev is None or not isinstance(nll, (int, float)) or not isinstance(prev.get("nll_ratio"), (int, float)):
                return p["fraction"]
            t = (BREAKS_NLL - prev["nll_ratio"]) / ((nll - prev["nll_ratio"]) or 1.0)
            return prev["fraction"] + min(max(t, 0.0), 1.0) * (p["fraction"] - prev["fraction"])
        prev = p
    return None


def _share(rate: float) -> str:
    return "few" if rate < 0.3 else "about half of the" if rate < 0.6 else "most"


def strength_label(feature: Feature, fraction: float, op: str | None = None,
                   curves: dict[str, list[dict]] | None = None) -> str:
    """Words for a strength that say only what was measured: "off", "away from it" below zero; within
    the feature's measured curve (strength_curves.json, this op), whether the text stays fluent and
    in how many answers the concept is named ("fluent; named in about half of the answers", "breaks the
    text"), and, only where the curve records them, how many answers still answer the question
    (`addresses`) or do both (`tint`). Without a curve, only how the strength compares with the
    feature's default (and "likely breaks the text" from twice it on, break_fraction's rule)."""
    op = op or feature.default_op
    if abs(fraction) < 1e-9:
        return "off"
    if fraction < 0:
        return "away from it"
    curves = strength_curves() if curves is None else curves
    points = measured_curve(feature, op, curves)
    if points and fraction <= points[-1]["fraction"] * 1.1:  # within what was measured
        nll, rep3 = _interpolate(points, fraction, "nll_ratio"), _interpolate(points, fraction, "rep3")
        if (nll is not None and nll > BREAKS_NLL) or (rep3 is not None and rep3 >= BREAKS_REP3):
            return "breaks the text"
        words = [f"fluent; named in {_share(_interpolate(points, fraction, 'mention_rate') or 0.0)} answers"]
        addresses, tint = _interpolate(points, fraction, "addresses"), _interpolate(points, fraction, "tint")
        if addresses is not None:
            words.append(f"{_share(addresses)} answers still answer the question")
        elif tint is not None:
            words.append(f"{_share(tint)} answers name it and still answer the question")
        return "; ".join(words)
    ratio = fraction / feature.default_fraction if feature.default_fraction > 0 else fraction / 0.5
    return ("weaker than its default" if ratio < 0.8 else "about its default" if ratio <= 1.25
            else "stronger than its default" if ratio < 2.0 else "likely breaks the text")


def summary_markdown(catalog: Catalog, spec: SteeringSpec, auto: set[str] | frozenset = frozenset()) -> str:
    """What the next answer will be steered with: names, strengths in words, absolute strengths;
    `auto`: the keys whose strength is picked for each answer; last, a warning when the features
    together likely break the text (`break_warning`)."""
    if not spec.features:
        return "**Steering for the next answer:** none (the unsteered model)."
    lines = ["**Steering for the next answer:**"]
    for feature, fraction, op in catalog.active(spec).values():
        if feature.key in auto:
            lines.append(f"- **{html.escape(feature.title)}** · {op} · auto — *how it steers is chosen for each "
                         "answer: several ways tried on its first words first (seconds; about ten on a CPU)*")
            continue
        lines.append(
            f"- **{html.escape(feature.title)}** · {op} · {format_fraction(fraction)} — "
            f"*{strength_label(feature, fraction, op)}* "
            f"<span class='muted'>({format_strength(fraction, feature.norm)} at layer {feature.layer})</span>"
        )
    if not spec.steer_prompt:
        lines.append("- answer tokens only (the prompt is not steered)")
    warning = break_warning(catalog, spec, skip=auto)
    if warning:
        lines.append(f"\n⚠ {html.escape(warning)}")
    return "\n".join(lines)


def break_fraction(feature: Feature, op: str, curves: dict[str, list[dict]] | None = None) -> float:
    """The strength at which `feature` alone starts to break the text: where its measured curve
    (strength_curves.json) first crosses the quality bar (NLL ratio or rep3), interpolated; without
    a curve, or when nothing measured broke, twice its default (strength_label's rule)."""
    curves = strength_curves() if curves is None else curves
    fallback = 2 * feature.default_fraction if feature.default_fraction > 0 else 1.0
    measured = measured_break(measured_curve(feature, op, curves))
    return fallback if measured is None else measured


def break_warning(catalog: Catalog, spec: SteeringSpec, curves: dict[str, list[dict]] | None = None,
                  skip: set[str] | frozenset = frozenset()) -> str | None:
    """A one-line warning when the switched-on features together likely break the text, naming
    which to lower; None when they likely do not. Each feature uses up strength / its
    `break_fraction` of what the text takes; past 1 in all, it likely breaks (a rough rule: the
    curves were measured one feature at a time). `skip`: keys whose strength is not known yet (auto)."""
    shares = {feature.title: abs(fraction) / break_fraction(feature, op, curves)
              for feature, fraction, op in catalog.active(spec).values() if feature.key not in skip}
    total = sum(shares.values())
    if total < 1.0:
        return None
    lower, left = [], total
    for title, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        if left < 1.0:
            break
        lower.append(title)
        left -= share
    together = "Together these features" if len(shares) > 1 else "This strength"
    return (f"{together} will likely break the text ({total:.0%} of what the measured curves allow): "
            f"lower {', '.join(lower)}.")


def steering_tag(catalog: Catalog, steering: dict | None, stopped: bool = False, capped_at: int | None = None,
                 auto: str | None = None, auto_setting: str | None = None) -> str:
    """The line under an answer saying which steering made it (and whether it was stopped or cut);
    `auto`: the feature auto chose the steering of, `auto_setting` how (said after "auto:")."""
    parts = []
    try:
        spec = SteeringSpec.from_dict(steering) if steering else None
        active = catalog.active(spec) if spec is not None else {}
    except ValueError:
        active = {}
    if active:
        words = []
        for feature, fraction, op in active.values():
            note = f" (auto: {auto_setting})" if auto_setting else " (auto)"
            words.append(f"{feature.title} · {op} {format_fraction(fraction)}" + (note if auto == feature.key else ""))
        parts.append(", ".join(words) + ("" if spec.steer_prompt else " · answer only"))
    else:
        parts.append("no steering" + (f" (auto: {auto_setting})" if auto and auto_setting else ""))
    if stopped:
        parts.append("stopped")
    elif capped_at is not None:
        parts.append(f"cut at {capped_at} tokens")
    return " · ".join(parts)


def turn_messages(catalog: Catalog, turns: list[dict], unsteered: bool = False,
                  pending: str | None = None) -> list[dict]:
    """Chatbot messages for `turns` (each: user, answer, steering, unsteered, stopped, capped_at, auto):
    what was typed, each answer with its steering tag; `unsteered` shows the compare side (only the
    turns that have an unsteered answer), each tag a plain-text message after its answer. `pending`: the text shown while the last answer is
    being read or written."""
    out: list[dict] = []
    for i, turn in enumerate(turns):
        text = turn.get("unsteered") if unsteered else turn.get("answer")
        if unsteered and text is None:
            continue
        last = i == len(turns) - 1
        out.append({"role": "user", "content": turn["user"]})
        body = text or ""
        if last and turn.get("done") is False:
            out.append({"role": "assistant", "content": body or (pending or "")})
            continue
        tag = ("no steering (compared)" if unsteered else
               steering_tag(catalog, turn.get("steering"), turn.get("stopped", False), turn.get("capped_at"), turn.get("auto"),
                            turn.get("auto_setting")))
        if turn.get("capped_at") and not unsteered:  # cut by the cap: shown to a sentence's end where one is
            body = cut_at_sentence(body)          # near (the turn keeps all of it: export, what the model reads)
        # The tag is a message of its own, plain text: never inside the answer's code block, and
        # Copy and screen readers get words, not markup. The chat shows it under the answer (TAG_CSS).
        out.append({"role": "assistant", "content": body})
        out.append({"role": "assistant", "content": tag})
    return out


def theme() -> gr.themes.Base:
    """gradio's Soft theme in orange, with every text colour at WCAG AA contrast (4.5:1) on its
    background: its own orange labels (2.45:1 on light orange), white on its orange buttons (2.8:1)
    and its pale grey secondary text (2.5:1) were all below."""
    return gr.themes.Soft(primary_hue="orange").set(
        body_text_color_subdued="*neutral_600",  # gray-600: 7.6:1 on white, 6.3:1 on gray-200
        input_placeholder_color="*neutral_500",  # 4.8:1 on white
        block_label_text_color="*primary_800",  # orange-800 on orange-100: 6.5:1
        block_title_text_color="*primary_800",
        button_primary_background_fill="*primary_700",  # white on orange-700: 5.2:1
        button_primary_background_fill_hover="*primary_800",
        checkbox_label_background_fill_selected="*primary_700",
        slider_color="*primary_700",
    )


CSS = """
.gradio-container { max-width: 1480px !important; }
.gradio-container > .main.fillable { max-width: 1480px !important; padding-left: 16px !important; padding-right: 16px !important; }
#header h1 { margin-bottom: 0.1em; }
#header p { font-size: 0.95em; margin: 0.2em 0; }
#chats .wrapper > label[data-testid='block-label'] { position: static; margin: 4px 0 2px 4px; }
#chats .message.thought .prose { display: inline-block; font-size: 0.78em; color: var(--body-text-color-subdued);
  border: 1px solid var(--border-color-primary); border-radius: 9px; padding: 0 7px; margin-top: 2px; }
#chats .message.thought .prose p { margin: 0; }
#main:has(#chat-plain) > #steer-panel { flex: 0 0 360px !important; min-width: 360px !important; }  /* comparing */
#main:has(#chat-plain) > #chat-col { flex: 1 1 0 !important; }
#chats > * { flex: 1 1 0 !important; }
#preset-note p { margin: 0 0 0 4px; }
#catalog { gap: 4px; }
#catalog .feature { border: 1px solid var(--border-color-primary); border-radius: 8px; box-shadow: none; padding: 0; }
#catalog .feature .styler { --block-border-width: 0px; }
#catalog .feature-on { display: flex; align-items: baseline; gap: 10px; padding: 5px 10px !important; min-height: 0; }
#catalog .feature-on .checkbox-container { flex: 0 0 auto; }
#catalog .feature-on .info-text { margin: 0; font-size: 0.8em; color: var(--body-text-color-subdued); min-width: 0;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#catalog label span { white-space: normal; overflow-wrap: break-word; }
.feature-details { padding: 0 8px 6px 8px; }
.feature-row { align-items: end; gap: 6px; flex-wrap: wrap !important; }
/* A narrow card (compare mode, a phone) moves a whole control to the next line: clamp and add stay
   side by side, "auto strength" and "keep the norm" each on one line, never clipped. */
.feature-row > .block, .feature-row .form > .block { min-width: max-content !important; }
.feature-row .form { min-width: 0 !important; flex-wrap: wrap !important; }
.feature-row fieldset .wrap { flex-wrap: nowrap; }
.feature-row label span { white-space: nowrap !important; }
.muted { color: var(--body-text-color-subdued); font-size: 0.9em; }
/* Share and Advanced side by side while folded; an unfolded one takes the row's width under the
   folded one, so that no tall empty column stands beside it. */
#more-row { align-items: flex-start; flex-wrap: wrap; }
#more-row > .block:has(> .label-wrap.open) { order: 1; flex: 1 1 100% !important; min-width: 100% !important; }
#spec-view .cm-content span { color: var(--body-text-color) !important; }  /* the code theme's pale colours */
#spec-view .cm-gutters, #spec-view .cm-foldGutter span { color: var(--body-text-color-subdued) !important; }
.intensity { margin-bottom: 0.6em; }
.toks { line-height: 1.9; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 1px 0; }
.toks code { font-size: 0.92em; }
.effect-note { margin-top: 0.4em; }
.tap-hint { display: none; }
.tap-note { font-weight: 600; }
@media (hover: none) { .hover-hint { display: none; } .tap-hint { display: inline; } }
#chat-actions button, #msg-row button { white-space: nowrap; }
@media (max-width: 700px) {
  #main { flex-direction: column; }
  #steer-panel { order: -1; }
  #chats { flex-wrap: wrap; }
  #chats > * { min-width: 100% !important; flex: 1 1 100% !important; }
  #chat-actions { flex-wrap: wrap; }
  #msg-row { flex-wrap: nowrap !important; gap: 6px; }
  #msg-row > #msg { min-width: 0 !important; flex: 1 1 auto !important; }
  #msg-row > button { min-width: 58px !important; flex: 0 0 auto !important; }
  #more-row { flex-wrap: wrap; }
  #more-row > * { min-width: 100% !important; }
}
"""
