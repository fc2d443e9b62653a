"""The Space: a chat with a language model that you steer with SAE features, in the browser.

    python app.py                                   # embedded SmolLM2-135M-Instruct, CPU, offline
    STEERING_PROFILE=llama31_8b python app.py       # Llama-3.1-8B-Instruct with the reference's SAE features
    python app.py --port 7861 --host 0.0.0.0        # another port / listen on every interface

The model profile (a profile of demo.yaml) comes from the STEERING_PROFILE environment
variable, so a Space chooses its model with a Space variable, not by editing code. Other
variables: STEERING_CONFIG (the demo.yaml to read), STEERING_CONCURRENCY (answers generated
at the same time, default 4). Call it from Python (see the README):

    >>> from gradio_client import Client
    >>> Client("http://127.0.0.1:7860/").predict("Hi!", steering_spec="Eiffel Tower", api_name="/chat")
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# isort: off
import gradio as gr
import spaces  # before torch: on a ZeroGPU Space it must come first (a no-op elsewhere)
import steering  # before torch too: it sets PyTorch's OpenMP threads to wait passively
from steering import ActiveFeature, FeatureSpec, SteeringComponent, SteeringSpec, SteeringTrace
import torch
import yaml
from spaces.config import Config
# isort: on

# ---------------------------------------------------------------------------
# Constants and text
# ---------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
CONFIG_PATH = Path(os.environ.get("STEERING_CONFIG") or HERE / "demo.yaml")
PROFILE_NAME = os.environ.get("STEERING_PROFILE") or None  # None = demo.yaml's default_profile
CONCURRENCY = int(os.environ.get("STEERING_CONCURRENCY") or 4)
ON_ZERO_GPU = Config.zero_gpu  # a ZeroGPU Space: CUDA only inside the @spaces.GPU function
FRACTION_RANGE = (-1.0, 2.0)  # slider range, in units of the layer's typical residual norm
MAX_SPEC_BYTES = 64_000  # an imported steering file is a few hundred bytes
NO_PRESET = "None"

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

log = logging.getLogger("app")


# ---------------------------------------------------------------------------
# The model, its steering vectors and the feature catalog: loaded once at start-up
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    """A feature a visitor can switch on: its config, its unit vector and its layer's norm."""

    feature: FeatureSpec
    vector: torch.Tensor
    norm: float

    @property
    def default_fraction(self) -> float:
        return self.feature.strength / self.norm

    @property
    def fraction_range(self) -> tuple[float, float]:
        """The slider's range: FRACTION_RANGE, widened to hold the default and every preset's value."""
        values = [self.default_fraction] + [
            f.fraction for p in PROFILE.presets for f in p.features if entry_for(f.key) is self
        ]
        lo, hi = FRACTION_RANGE
        return min(lo, math.floor(min(values) * 2) / 2), max(hi, math.ceil(max(values) * 2) / 2)

    def component(self, fraction: float, mode: str) -> SteeringComponent:
        return SteeringComponent(
            layer=self.feature.layer, vector=self.vector, strength=fraction * self.norm, op=mode, name=self.feature.name
        )


def load_vectors_for(profile: steering.ModelProfile, model: Any, tokenizer: Any) -> steering.SteeringVectorSet:
    """The profile's vector file; without one, its SAE features extracted now (plus layer norms).

        >>> vectors = load_vectors_for(config.profile("llama31_8b"), model, tok)
    """
    path = profile.vectors_path()
    if path.is_file() or not profile.sae_source:
        vectors = steering.load_vectors(path)  # a clear ValueError naming the command when missing
    else:
        from extract_steering_vectors import extract_sae_features

        wanted = [(f.layer, f.index) for f in profile.features if f.index is not None]
        log.warning("%s not found: extracting %d SAE features from %s", path, len(wanted), profile.sae_source)
        found = extract_sae_features(profile.sae_source, wanted, profile.sae_format)
        norms = steering.measure_layer_norms(model, tokenizer, sorted({v.layer for v in found}))
        vectors = steering.SteeringVectorSet(steering.model_id_of(model), steering.hidden_size(model), found, norms)
    if vectors.model_id != steering.model_id_of(model) or vectors.hidden_size != steering.hidden_size(model):
        raise ValueError(
            f"{path} holds vectors for {vectors.model_id!r}, but profile {profile.name!r} runs "
            f"{steering.model_id_of(model)!r}: extract vectors for this model"
        )
    return vectors


def build_catalog(profile: steering.ModelProfile, vectors: steering.SteeringVectorSet) -> list[CatalogEntry]:
    """One entry per feature of the profile, with its vector found by name or by layer:index."""
    catalog = []
    for feat in profile.features:
        try:
            vec = vectors.get(feat.name)
        except ValueError:
            if feat.index is None:
                raise
            vec = vectors.get(f"{feat.layer}:{feat.index}")
        if vec.layer != feat.layer:
            raise ValueError(f"feature {feat.name!r} is at layer {feat.layer} in demo.yaml but {vec.layer} in the vector file")
        catalog.append(CatalogEntry(feature=feat, vector=vec.vector, norm=vectors.norm(vec.layer)))
    return catalog


def load_everything() -> tuple[steering.ModelProfile, Any, Any, list[CatalogEntry]]:
    """Config, model, tokenizer and catalog; exits with a one-line message when something is wrong."""
    try:
        profile = steering.load_config(CONFIG_PATH).profile(PROFILE_NAME)
        if ON_ZERO_GPU:  # no CUDA work outside @spaces.GPU: measure on the CPU, then hand the weights over
            model, tokenizer = steering.load_model(profile.model_id, device="cpu", dtype=torch.bfloat16)
            catalog = build_catalog(profile, load_vectors_for(profile, model, tokenizer))
            model.to("cuda")
        else:
            model, tokenizer = steering.load_model(profile.model_id)
            catalog = build_catalog(profile, load_vectors_for(profile, model, tokenizer))
    except ValueError as exc:
        sys.exit(f"app.py: {exc}")
    return profile, model, tokenizer, catalog


logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
log.setLevel(logging.INFO)
PROFILE, MODEL, TOKENIZER, CATALOG = load_everything()
MODEL_ID = steering.model_id_of(MODEL)
GEN = PROFILE.generation
PRESETS = {p.name: p for p in PROFILE.presets}
MAX_NEW_TOKENS = max(1024, GEN.max_new_tokens)  # the slider's end, and the API's limit
N = len(CATALOG)


# ---------------------------------------------------------------------------
# The one GPU function: streams the steered answer (and the unsteered one in compare mode)
# ---------------------------------------------------------------------------


def gpu_seconds(chat: list[dict], components: list, steer_prompt: bool, temperature: float,
                repetition_penalty: float, max_new_tokens: int, plain_chat: list[dict] | None = None) -> int:
    """ZeroGPU time to ask for: about 10 tokens/s per answer at worst, two answers in compare mode."""
    return 20 + (max_new_tokens // 10) * (2 if plain_chat is not None else 1)


@spaces.GPU(duration=gpu_seconds)
def generate(
    chat: list[dict],
    components: list[SteeringComponent],
    steer_prompt: bool,
    temperature: float,
    repetition_penalty: float,
    max_new_tokens: int,
    plain_chat: list[dict] | None = None,
) -> Iterator[tuple[str, str | None, SteeringTrace | None]]:
    """Yield (steered text so far, unsteered text so far or None, None); last, the same with the trace.

    With `plain_chat`, the unsteered answer to it is generated at the same time, in its own
    thread. Closing this generator (the Stop button) closes the module's streams, which ends
    their generation threads and removes their hooks. The trace is yielded rather than
    filled in place because on ZeroGPU this function runs in another process.
    """
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, repetition_penalty=repetition_penalty)
    trace = SteeringTrace()
    streams = [
        steering.stream_steered_answer_hf(
            MODEL, TOKENIZER, chat, components, steer_prompt=steer_prompt, trace=trace, **kwargs
        )
    ]
    if plain_chat is not None:
        streams.append(steering.stream_steered_answer_hf(MODEL, TOKENIZER, plain_chat, [], **kwargs))
    texts = [""] * len(streams)
    running = list(range(len(streams)))
    finished = False
    try:
        while running:
            for i in list(running):  # both generate in their own threads; take turns reading them
                piece = next(streams[i], None)
                if piece is None:
                    running.remove(i)
                else:
                    texts[i] += piece
            yield texts[0], texts[1] if plain_chat is not None else None, None
        finished = True
    finally:
        for stream in streams:
            stream.close()  # ends the generation thread at its next layer and removes its hooks
        if not finished:
            log.info("generation stopped after %d characters; generation threads ended", len(texts[0]))
    yield texts[0], texts[1] if plain_chat is not None else None, trace


# ---------------------------------------------------------------------------
# Helpers: chat messages, input length, steering controls, the concept-intensity view
# ---------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """The text of a message's content: gradio 6 gives a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def plain_messages(history: list | None) -> list[dict]:
    """Chatbot history as [{"role", "content": str}], user and assistant turns only."""
    out = []
    for msg in history or []:
        if isinstance(msg, dict) and msg.get("role") in ("user", "assistant"):
            out.append({"role": msg["role"], "content": message_text(msg.get("content"))})
    return out


def model_chat(system_prompt: str, history: list[dict], message: str) -> tuple[list[dict], str]:
    """The chat the model reads, cut to GEN.max_input_tokens (message first, then oldest turns), with warnings."""
    limit = GEN.max_input_tokens
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    budget = max(1, limit - len(steering.chat_input_ids(TOKENIZER, system + [{"role": "user", "content": ""}])))
    ids = TOKENIZER(message, add_special_tokens=False)["input_ids"]
    if len(ids) > budget:
        message = TOKENIZER.decode(ids[:budget], skip_special_tokens=True)
        gr.Warning(f"Your message was {len(ids)} tokens long; it was cut to its first {budget} tokens "
                   f"(the model reads at most {limit} here).")
    history = list(history)
    dropped = 0
    while history and len(steering.chat_input_ids(TOKENIZER, system + history + [{"role": "user", "content": message}])) > limit:
        history = history[2:]
        dropped += 2
    if dropped:
        gr.Warning(f"The chat is longer than {limit} tokens: the oldest {dropped} messages were left out of the model's input.")
    return system + history + [{"role": "user", "content": message}], message


def split_controls(controls: tuple) -> list[tuple[CatalogEntry, float, str]]:
    """The switched-on features from the catalog controls (N checkboxes, N sliders, N modes)."""
    enabled, fractions, modes = controls[:N], controls[N : 2 * N], controls[2 * N : 3 * N]
    return [(entry, float(f), m) for entry, on, f, m in zip(CATALOG, enabled, fractions, modes, strict=True) if on]


def spec_from_controls(steer_prompt: bool, *controls: Any) -> SteeringSpec:
    features = tuple(ActiveFeature(e.feature.name, round(f, 4), m) for e, f, m in split_controls(controls))
    return SteeringSpec(model_id=MODEL_ID, features=features, steer_prompt=bool(steer_prompt))


def components_of(spec: SteeringSpec) -> list[SteeringComponent]:
    """The spec's components; keys are catalog names or "layer:index" of a catalog feature."""
    if spec.model_id != MODEL_ID:
        raise ValueError(f"this steering is for {spec.model_id!r}, but this app runs {MODEL_ID!r}")
    return [entry_for(f.key).component(f.fraction, f.mode) for f in spec.features]


def entry_for(key: str) -> CatalogEntry:
    for entry in CATALOG:
        feat = entry.feature
        if key == feat.name or (feat.index is not None and key.replace(" ", "") == f"{feat.layer}:{feat.index}"):
            return entry
    names = ", ".join(e.feature.name for e in CATALOG)
    raise ValueError(f"no feature {key!r} in this app's catalog; available: {names}")


def parse_steering(text: str) -> SteeringSpec:
    """A preset name, a steering spec as JSON/YAML text, or "" (no steering)."""
    text = (text or "").strip()
    if not text or text == NO_PRESET:
        return SteeringSpec(model_id=MODEL_ID, features=())
    if text in PRESETS:
        preset = PRESETS[text]
        return SteeringSpec(model_id=MODEL_ID, features=preset.features, steer_prompt=preset.steer_prompt)
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"steering must be a preset name ({', '.join(PRESETS)}), a steering spec as JSON, or empty")
    return SteeringSpec.from_dict(data)


def summary_markdown(spec: SteeringSpec) -> str:
    """What the next answer will be steered with, absolute strengths included."""
    if not spec.features:
        return "**Steering for the next answer:** none (the plain model)."
    lines = ["**Steering for the next answer:**"]
    for f in spec.features:
        e = entry_for(f.key)
        lines.append(
            f"- `{e.feature.name}` · {f.mode} · {f.fraction:.2f} × norm {e.norm:.0f} = "
            f"**{f.fraction * e.norm:.1f}** at layer {e.feature.layer}"
        )
    if not spec.steer_prompt:
        lines.append("- answer tokens only (the prompt is not steered)")
    return "\n".join(lines)


def token_texts(ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally so multi-byte characters come out whole."""
    out, prev = [], ""
    for j in range(len(ids)):
        cur = TOKENIZER.decode(ids[: j + 1], skip_special_tokens=True)
        out.append(cur[len(prev) :] if cur.startswith(prev) else TOKENIZER.decode([ids[j]], skip_special_tokens=True))
        prev = cur
    return out


def intensity_html(trace: SteeringTrace | None) -> str:
    """The answer's tokens, shaded by the projection on each steered direction.

    A token is shaded by the state that chose it: the hidden state after the steered layer,
    before the edit, at the position just before the token. Hover a token for its value.
    """
    if trace is None or not trace.components or len(trace.token_ids) <= trace.prompt_len:
        return "<p class='muted'>Switch a feature on and send a message: the answer's tokens will be shaded here by how strongly each steered direction is present.</p>"
    ids = trace.token_ids[trace.prompt_len :]
    special = set(TOKENIZER.all_special_ids)
    texts = token_texts(ids)
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


# ---------------------------------------------------------------------------
# Event handlers
# ---------------------------------------------------------------------------


def respond(
    message: str,
    history: list | None,
    plain_history: list | None,
    system_prompt: str,
    temperature: float,
    repetition_penalty: float,
    max_new_tokens: float,
    steer_prompt: bool,
    compare: bool,
    *controls: Any,
) -> Iterator[tuple]:
    """Stream the answer into the chat (and the unsteered one beside it in compare mode)."""
    history = plain_messages(history)
    message = (message or "").strip()
    if not message:
        gr.Warning("Type a message first.")
        yield gr.skip(), history, gr.skip(), gr.skip()
        return
    try:
        spec = spec_from_controls(steer_prompt, *controls)
        components = components_of(spec)
        chat, message = model_chat(system_prompt or "", history, message)
        plain, plain_chat = [], None
        if compare:
            plain = plain_messages(plain_history)
            if [m["content"] for m in plain if m["role"] == "user"] != [m["content"] for m in history if m["role"] == "user"]:
                plain = list(history)  # compare just switched on, or the chats diverged: start from this chat
            plain_chat, _ = model_chat(system_prompt or "", plain, message)
        user = {"role": "user", "content": message}
        waiting = "<p class='muted'>The shading appears here when the answer is complete.</p>"
        yield "", history + [user, {"role": "assistant", "content": ""}], gr.skip(), waiting if components else gr.skip()
        stream = generate(
            chat, components, spec.steer_prompt, float(temperature), float(repetition_penalty),
            int(max_new_tokens), plain_chat,
        )
        with contextlib.closing(stream):  # Stop closes this handler, which closes the stream now
            for steered, unsteered, trace in stream:
                new = history + [user, {"role": "assistant", "content": steered}]
                plain_out = plain + [user, {"role": "assistant", "content": unsteered}] if compare else gr.skip()
                yield gr.skip(), new, plain_out, intensity_html(trace) if trace is not None else gr.skip()
    except ValueError as exc:  # bad settings: say what is wrong, keep the app up
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def pop_last_turn(history: list | None, plain_history: list | None) -> tuple[str, list[dict], list[dict]]:
    """For Retry: the last user message back in the box, the chats without the last turn."""
    history, plain = plain_messages(history), plain_messages(plain_history)
    last = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
    if last is None:
        gr.Warning("Nothing to retry yet.")
        return "", history, plain
    plain_last = max((i for i, m in enumerate(plain) if m["role"] == "user"), default=len(plain))
    return history[last]["content"], history[:last], plain[:plain_last]


def apply_preset(name: str | None) -> list:
    """Set every catalog control (and steer-prompt) from a preset; "None" switches everything off."""
    if name is None or (name != NO_PRESET and name not in PRESETS):
        return [gr.skip()] * (3 * N + 1)
    features = {} if name == NO_PRESET else {entry_for(f.key).feature.name: f for f in PRESETS[name].features}
    steer_prompt = True if name == NO_PRESET else PRESETS[name].steer_prompt
    return controls_update(features, steer_prompt)


def controls_update(active: dict[str, ActiveFeature], steer_prompt: bool) -> list:
    enabled = [e.feature.name in active for e in CATALOG]
    fractions = [active[e.feature.name].fraction if e.feature.name in active else gr.skip() for e in CATALOG]
    modes = [active[e.feature.name].mode if e.feature.name in active else gr.skip() for e in CATALOG]
    return [*enabled, *fractions, *modes, steer_prompt]


def describe(steer_prompt: bool, *controls: Any) -> tuple[str, str]:
    """The summary under the catalog and the spec shown in the Share box."""
    spec = spec_from_controls(steer_prompt, *controls)
    return summary_markdown(spec), json.dumps(spec.to_dict(), indent=2)


def export_spec(fmt: str, steer_prompt: bool, *controls: Any) -> str:
    """Write the current steering to a new temporary file and hand it to the browser."""
    spec = spec_from_controls(steer_prompt, *controls)
    if not spec.features:
        gr.Warning("No feature is switched on: the file will say 'no steering'.")
    path = Path(tempfile.mkdtemp(prefix="steering-")) / f"steering.{fmt}"
    steering.save_steering_spec(spec, path)
    return str(path)


def import_spec(upload: str | None) -> list:
    """Set the controls from an uploaded steering file (only gradio's upload, never a typed path)."""
    if not upload:
        return [gr.skip()] * (3 * N + 2)
    try:
        if Path(upload).stat().st_size > MAX_SPEC_BYTES:
            raise ValueError(f"that file is larger than {MAX_SPEC_BYTES // 1000} kB: a steering file is a few lines")
        spec = steering.load_steering_spec(upload)
        components_of(spec)  # every key must be in the catalog, for this model
        active = {entry_for(f.key).feature.name: f for f in spec.features}
        for f in spec.features:
            lo, hi = entry_for(f.key).fraction_range
            if not lo <= f.fraction <= hi:
                raise ValueError(f"feature {f.key!r}: fraction {f.fraction} is outside the app's range [{lo}, {hi}]")
    except ValueError as exc:
        gr.Warning(f"Could not import that file: {str(exc).replace(str(upload), 'the file')}")
        return [gr.skip()] * (3 * N + 2)
    gr.Info(f"Imported steering: {', '.join(active) or 'none'}.")
    return [*controls_update(active, spec.steer_prompt), None]


def chat_api(
    message: str,
    history: list[dict] | None = None,
    steering_spec: str = "",
    system_prompt: str | None = None,
    temperature: float | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
) -> Iterator[str]:
    """Stream the steered answer to `message` (the text so far, growing).

    steering_spec: a preset name (e.g. "Eiffel Tower"), a steering spec as JSON (the app's
    export format), or "" for none. history: earlier turns as [{"role", "content"}].
    Unset generation settings take the app's defaults.
    """
    message = (message or "").strip()
    try:
        if not message:
            raise ValueError("message is empty: give the text to answer")
        spec = parse_steering(steering_spec)
        max_new_tokens = GEN.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        chat, _ = model_chat(GEN.system_prompt if system_prompt is None else system_prompt, plain_messages(history), message)
        stream = generate(
            chat, components_of(spec), spec.steer_prompt,
            GEN.temperature if temperature is None else float(temperature),
            GEN.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
            max_new_tokens,
        )
        with contextlib.closing(stream):
            for steered, _, _ in stream:
                yield steered
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

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

model_line = (
    f"Model: `{MODEL_ID}` · profile `{PROFILE.name}` · {'GPU' if MODEL.device.type == 'cuda' else 'CPU'} · "
    f"{N} features · API: `/chat`"
)

with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
    preset = gr.Radio(
        [NO_PRESET, *PRESETS], value=NO_PRESET, label="Presets", render=False, elem_id="preset",
        info=" · ".join(f"{p.name}: {p.description}" for p in PROFILE.presets) or None,
    )
    with gr.Column(elem_id="header"):
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}\n<span class='muted'>{model_line}</span>")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                chatbot = gr.Chatbot(label="Steered", height=400, elem_id="chat-steered", buttons=["copy"])
                plain_chatbot = gr.Chatbot(label="Unsteered", height=400, visible=False, elem_id="chat-plain", buttons=["copy"])
            with gr.Row():
                msg = gr.Textbox(
                    label="Message", placeholder="Type a message and press Enter", show_label=False, scale=5, autofocus=True,
                    elem_id="msg",
                )
                send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
            with gr.Row():
                retry_btn = gr.Button("Retry", size="sm", elem_id="retry")
                clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                compare = gr.Checkbox(label="Compare with the unsteered model", value=False, elem_id="compare")
            with gr.Accordion("Concept intensity in the last answer", open=True):
                intensity = gr.HTML(intensity_html(None), elem_id="intensity")
            gr.Examples(
                [[text, name] for text, name in zip(EXAMPLES, [*PRESETS, NO_PRESET, NO_PRESET, NO_PRESET], strict=False)],
                inputs=[msg, preset], label="Examples (message and preset)",
            )
        with gr.Column(scale=2):
            preset.render()
            enabled_boxes, fraction_sliders, mode_radios = [], [], []
            with gr.Column(elem_id="catalog"):
                for entry in CATALOG:
                    feat = entry.feature
                    with gr.Group():
                        with gr.Row(elem_classes="feature-row"):
                            enabled_boxes.append(gr.Checkbox(label=feat.name, info=feat.description, value=False, scale=3, min_width=140))
                            mode_radios.append(gr.Radio(["clamp", "add"], value=feat.mode, show_label=False, scale=2, min_width=120))
                        fraction_sliders.append(gr.Slider(
                            *entry.fraction_range, value=round(entry.default_fraction, 2), step=0.01,
                            label=f"strength (× norm {entry.norm:.0f} at layer {feat.layer})",
                        ))
            steer_prompt = gr.Checkbox(label="Steer the prompt too (not only the answer)", value=True)
            summary = gr.Markdown(elem_id="summary")
            with gr.Accordion("Advanced", open=False):
                system_prompt = gr.Textbox(GEN.system_prompt, label="System prompt", lines=2)
                temperature = gr.Slider(0.0, 1.5, value=GEN.temperature, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
                repetition_penalty = gr.Slider(1.0, 2.0, value=GEN.repetition_penalty, step=0.05, label="Repetition penalty")
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=GEN.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens")
            with gr.Accordion("Share steering (JSON / YAML)", open=False):
                with gr.Row():
                    export_json = gr.Button("Export JSON", size="sm")
                    export_yaml = gr.Button("Export YAML", size="sm")
                    upload = gr.UploadButton("Import file", file_types=[".json", ".yaml", ".yml"], size="sm", elem_id="import")
                exported = gr.File(label="Exported steering", interactive=False, elem_id="exported")
                spec_view = gr.Code(language="json", label="Current steering", interactive=False, elem_id="spec-view")
    controls = [*enabled_boxes, *fraction_sliders, *mode_radios]
    gen_inputs = [msg, chatbot, plain_chatbot, system_prompt, temperature, repetition_penalty, max_new_tokens,
                  steer_prompt, compare, *controls]
    gen_outputs = [msg, chatbot, plain_chatbot, intensity]
    hidden = {"api_visibility": "private"}
    generating = {"concurrency_id": "generate", "concurrency_limit": CONCURRENCY}  # one limit for UI and API

    send_evt = send_btn.click(respond, gen_inputs, gen_outputs, **hidden, **generating)
    submit_evt = msg.submit(respond, gen_inputs, gen_outputs, **hidden, **generating)
    retry_evt = retry_btn.click(pop_last_turn, [chatbot, plain_chatbot], [msg, chatbot, plain_chatbot], queue=False, **hidden).then(
        respond, gen_inputs, gen_outputs, **hidden, **generating
    )
    running = [send_evt, submit_evt, retry_evt]
    stop_btn.click(None, cancels=running, **hidden)
    clear_btn.click(lambda: ([], [], intensity_html(None), ""), None, [chatbot, plain_chatbot, intensity, msg], cancels=running, queue=False, **hidden)
    compare.change(lambda on: gr.update(visible=on), compare, plain_chatbot, queue=False, **hidden)
    chatbot.clear(lambda: ([], intensity_html(None)), None, [plain_chatbot, intensity], cancels=running, **hidden)

    preset.change(apply_preset, preset, [*controls, steer_prompt], queue=False, **hidden)
    for control in [*controls, steer_prompt]:
        control.input(lambda: None, None, preset, queue=False, **hidden)  # a manual change leaves the preset
        control.change(describe, [steer_prompt, *controls], [summary, spec_view], queue=False, **hidden)
    demo.load(describe, [steer_prompt, *controls], [summary, spec_view], queue=False, **hidden)
    export_json.click(lambda *a: export_spec("json", *a), [steer_prompt, *controls], exported, **hidden)
    export_yaml.click(lambda *a: export_spec("yaml", *a), [steer_prompt, *controls], exported, **hidden)
    upload.upload(import_spec, upload, [*controls, steer_prompt, exported], **hidden)

    gr.api(chat_api, api_name="chat", **generating)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the steering chat (model profile: $STEERING_PROFILE).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to listen on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    args = parser.parse_args()
    demo.queue(default_concurrency_limit=CONCURRENCY).launch(
        server_name=args.host, server_port=args.port, theme=gr.themes.Soft(primary_hue="orange"), css=CSS,
        footer_links=["api"],
    )


if __name__ == "__main__":
    main()
