"""What the Space shows besides the chat: its texts, the strength slider, the steering summary,
the concept-intensity view, the CSS.

Plain functions of their inputs (no model loaded at import), so they are testable alone.

    >>> intensity_html(tokenizer, trace)          # the answer's tokens shaded by the trace
    >>> summary_markdown(catalog, spec)           # what the next answer will be steered with
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from catalog import Catalog
from config import SteeringSpec
from steering import SteeringTrace

EXAMPLES = [
    "Tell me about your perfect weekend.",
    "Write a short poem about the sea.",
    "What should I cook for dinner tonight?",
    "Give me three tips for a job interview.",
]

TITLE = "SAE steering chat"
DESCRIPTION = """\
**Steering** changes what a language model "thinks about" without changing its prompt or its weights.
A feature is a direction in the model's hidden state (from a sparse autoencoder, or from contrasting
texts about a concept with neutral ones). While the model writes, the app pushes its hidden state
along that direction after one layer: **clamp** sets the hidden state's component along the
direction to the strength, **add** adds the direction times the strength. Strengths are fractions of
the layer's typical hidden-state size: around 0.5 the concept creeps into everything; well above 1 the
text falls apart. Pick a preset or switch features on, chat, and compare with the unsteered model.
"""


class FractionSlider(gr.Slider):
    """A strength slider whose typed values reach the catalog's check (a readable warning),
    instead of gradio's bare out-of-range error."""

    @classmethod
    def get_block_name(cls) -> str:
        return "slider"

    def preprocess(self, payload: float) -> float:
        return float(payload)


def summary_markdown(catalog: Catalog, spec: SteeringSpec) -> str:
    """What the next answer will be steered with, absolute strengths included."""
    if not spec.features:
        return "**Steering for the next answer:** none (the plain model)."
    lines = ["**Steering for the next answer:**"]
    for feature, fraction, op in catalog.active(spec).values():
        lines.append(
            f"- `{feature.key}` · {op} · {fraction:.2f} × norm {feature.norm:.0f} = "
            f"**{fraction * feature.norm:.1f}** at layer {feature.layer}"
        )
    if not spec.steer_prompt:
        lines.append("- answer tokens only (the prompt is not steered)")
    return "\n".join(lines)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally so multi-byte characters come out whole."""
    out, prev = [], ""
    for j in range(len(ids)):
        cur = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
        out.append(cur[len(prev) :] if cur.startswith(prev) else tokenizer.decode([ids[j]], skip_special_tokens=True))
        prev = cur
    return out


def intensity_html(tokenizer: Any, trace: SteeringTrace | None) -> str:
    """The answer's tokens, shaded by the projection on each steered direction.

    A token is shaded by the state that chose it: the hidden state after the steered layer,
    before the edit, at the position just before the token. Hover a token for its value.
    """
    if trace is None or not trace.components or len(trace.token_ids) <= trace.prompt_len:
        return ("<p class='muted'>Switch a feature on and send a message: the answer's tokens will be shaded here "
                "by how strongly each steered direction is present.</p>")
    ids = trace.token_ids[trace.prompt_len :]
    special = set(tokenizer.all_special_ids)
    texts = token_texts(tokenizer, ids)
    blocks = []
    for comp in trace.components:
        values = comp.before[trace.prompt_len - 1 : trace.prompt_len - 1 + len(ids)]
        scale = max((abs(v) for v in values), default=0.0) or 1.0
        spans = []
        for tid, text, value in zip(ids, texts, values, strict=False):
            if tid in special or not text:
                continue
            alpha = min(abs(value) / scale, 1.0) * 0.85
            color = f"rgba(234,88,12,{alpha:.2f})" if value >= 0 else f"rgba(37,99,235,{alpha:.2f})"
            spans.append(f"<span class='tok' style='background:{color}' title='{value:.1f}'>{html.escape(text)}</span>")
        blocks.append(
            f"<div class='intensity'><div class='muted'><b>{html.escape(comp.name)}</b> · layer {comp.layer} · {comp.op} · "
            f"projection before the edit, max |{scale:.1f}| (orange: along the direction, blue: against)</div>"
            f"<div class='toks'>{''.join(spans)}</div></div>"
        )
    return "".join(blocks)


CSS = """
.gradio-container { max-width: 1400px !important; }
#header h1 { margin-bottom: 0.2em; }
#header p { font-size: 0.92em; margin: 0.2em 0; }
#catalog { max-height: 430px; overflow-y: auto; flex-wrap: nowrap; }
#catalog > * { flex-shrink: 0; }
.feature-row { align-items: center; gap: 6px; }
.muted { color: var(--body-text-color-subdued); font-size: 0.85em; }
.intensity { margin-bottom: 0.6em; }
.toks { line-height: 1.9; white-space: pre-wrap; }
.tok { border-radius: 3px; padding: 1px 0; }
"""
