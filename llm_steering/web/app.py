"""The Space: a chat with a language model that you steer with SAE features, in the browser.

    python app.py                                   # embedded SmolLM2-135M-Instruct, CPU, offline
    STEERING_PROFILE=llama31_8b python app.py       # Llama-3.1-8B-Instruct with the reference's SAE features
    python app.py --port 7861 --host 0.0.0.0        # another port / listen on every interface

The model profile (a profile of demo.yaml) comes from the STEERING_PROFILE environment
variable, so a Space chooses its model with a Space variable, not by editing code. Other
variables: STEERING_CONFIG (the demo.yaml to read), STEERING_CONCURRENCY (answers generated
at the same time, default 4), and STEERING_MODEL / STEERING_SAE_SOURCE / STEERING_VECTORS to
point the profile at local directories. Call it from Python (see the README):

    >>> from gradio_client import Client
    >>> Client("http://127.0.0.1:7860/").predict("Hi!", steering_spec="Eiffel Tower", api_name="/chat")
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import spaces  # before torch: on a ZeroGPU Space it must come first (a no-op elsewhere)
from spaces.config import Config

from llm_steering import (
    chat_history,
    steering,  # before torch too: it sets PyTorch's OpenMP threads to wait passively
)
from llm_steering.backends import Backend, GenerationSettings, Stream, check_backend, get_backend
from llm_steering.catalog import Catalog, Feature, fit_chat, message_text
from llm_steering.config import ModelProfile, SteeringSpec, load_config, load_steering_spec, save_steering_spec
from llm_steering.effects import hit_length_limit
from llm_steering.models import short_repr
from llm_steering.steering import SteeringComponent, SteeringTrace
from llm_steering.vectors import atomic_write
from llm_steering.web.effect_view import EMPTY as NO_EFFECTS
from llm_steering.web.effect_view import effect_html
from llm_steering.web.stop_flags import StopFlags
from llm_steering.web.views import (
    CSS,
    DESCRIPTION,
    EXAMPLES,
    INTRO,
    TITLE,
    FractionSlider,
    strength_label,
    summary_markdown,
    turn_messages,
)

import gradio as gr
import torch

# ---------------------------------------------------------------------------
# Constants (the texts the page shows are in app_views.py)
# ---------------------------------------------------------------------------

HERE = Path(__file__).resolve().parents[2]  # the checkout: demo.yaml beside app.py
CONFIG_PATH = Path(os.environ.get("STEERING_CONFIG") or HERE / "demo.yaml")
PROFILE_NAME = os.environ.get("STEERING_PROFILE") or None  # None = demo.yaml's default_profile
CONCURRENCY = int(os.environ.get("STEERING_CONCURRENCY") or 4)
BACKEND = os.environ.get("STEERING_BACKEND") or "hf"  # hf: forward hooks on the model; vllm: the vLLM engine
ON_ZERO_GPU = Config.zero_gpu  # a ZeroGPU Space: CUDA only inside the @spaces.GPU function
MAX_UPLOAD = "64kb"  # an imported steering file is a few hundred bytes
MAX_NEW_TOKENS = 1024  # the slider's end, and the API's limit
MAX_LINK = 8000  # characters of a shared link's query read at most
LONG_PROMPT = 400  # prompts longer than this many tokens get a "Reading your message" note
NO_PRESET = "None"

log = logging.getLogger("app")


# ---------------------------------------------------------------------------
# The model and its catalog: loaded once, by main()
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """What the handlers need: the profile, the model, its tokenizer and the feature catalog."""

    profile: ModelProfile
    model: Any
    tokenizer: Any
    catalog: Catalog
    backend: Backend | None = None  # STEERING_BACKEND's, from the registry (None: the hooks backend)

    def __post_init__(self) -> None:
        if self.backend is None:
            object.__setattr__(self, "backend", get_backend("hf", self.model, self.tokenizer))

    def stream(self, chat: list[dict], components: list[SteeringComponent], settings: GenerationSettings,
               cancel: threading.Event) -> Stream:
        """One answer from the configured backend: its text pieces, then `.result` (ids, finish, trace)."""
        return self.backend.stream(chat, components, settings, cancel)

    @property
    def model_id(self) -> str:
        return steering.model_id_of(self.model)

    @property
    def features(self) -> list[Feature]:
        return self.catalog.features

    @property
    def presets(self) -> dict[str, Any]:
        return {p.name: p for p in self.profile.presets}


def load_app(config_path: str | os.PathLike = CONFIG_PATH, profile_name: str | None = PROFILE_NAME) -> App:
    """Config, model, tokenizer and catalog (every feature and preset checked); ValueError in one line."""
    profile = load_config(config_path).profile(profile_name)
    if ON_ZERO_GPU:  # no CUDA work outside @spaces.GPU: measure on the CPU, then hand the weights over
        model, tokenizer = steering.load_model(profile.model_id, device="cpu", dtype=torch.bfloat16)
        catalog = Catalog.open(profile, model, tokenizer)
        model.to("cuda")
    else:
        model, tokenizer = steering.load_model(profile.model_id)
        catalog = Catalog.open(profile, model, tokenizer)
    try:
        check_backend(BACKEND)
    except ValueError as exc:
        raise ValueError(f"STEERING_BACKEND={BACKEND}: {exc}") from None
    # the catalog measures norms and effects.py scores answers on the transformers model, whatever the backend
    return App(profile, model, tokenizer, catalog, get_backend(BACKEND, model, tokenizer, profile.model_id))


LOADED: App | None = None  # set once by main() (or a test); the GPU function reads the model from here


STOPS = StopFlags()  # made at import, before ZeroGPU forks a worker: both sides see its folder


# ---------------------------------------------------------------------------
# The one GPU function: streams the steered answer (and the unsteered one in compare mode)
# ---------------------------------------------------------------------------


def gpu_seconds(chat: list[dict], components: list, steer_prompt: bool, temperature: float, repetition_penalty: float,
                max_new_tokens: int, unsteered_chat: list[dict] | None = None, stop_key: str = "", since: float = 0.0) -> int:
    """ZeroGPU time to ask for: about 10 tokens/s per answer at worst, two answers in compare mode."""
    return 20 + (max_new_tokens // 10) * (2 if unsteered_chat is not None else 1)


@spaces.GPU(duration=gpu_seconds)
def generate(
    chat: list[dict],
    components: list[SteeringComponent],
    steer_prompt: bool,
    temperature: float,
    repetition_penalty: float,
    max_new_tokens: int,
    unsteered_chat: list[dict] | None = None,
    stop_key: str = "",
    since: float = 0.0,
) -> Iterator[tuple[str, str | None, SteeringTrace | None, bool, list[float] | None]]:
    """Yield (steered text so far, unsteered text so far or None, None, False, None); last, with
    the trace, whether the answer was stopped, and each answer token's effect (effects.py:
    how much more likely the steering made it; None without steering).

    With `unsteered_chat`, the unsteered answer to it is generated at the same time. A Stop
    for `stop_key` after `since` (StopFlags) or closing this generator ends both generations at
    their next layer. Everything yielded is picklable: on ZeroGPU it crosses a process boundary.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  repetition_penalty=repetition_penalty, steer_prompt=steer_prompt, trace=True)
    cancel, done = threading.Event(), threading.Event()
    threading.Thread(target=STOPS.watch, args=(stop_key, since, cancel, done), daemon=True).start()
    streams = [LOADED.stream(chat, components, settings, cancel)]
    if unsteered_chat is not None:
        streams.append(LOADED.stream(unsteered_chat, [], replace(settings, steer_prompt=True, trace=False), cancel))
    texts = [""] * len(streams)
    running = list(range(len(streams)))
    finished = False
    try:
        while running:  # after a Stop too: every backend then ends within a token, and its last text comes
            for i in list(running):  # both generate in their own threads; take turns reading them
                piece = next(streams[i], None)
                if piece is None:
                    running.remove(i)
                else:
                    texts[i] += piece
            yield texts[0], texts[1] if unsteered_chat is not None else None, None, False, None
        finished = all(stream.result.finish_reason != "cancelled" for stream in streams)
    finally:  # also when Stop closes this generator (then nothing more is yielded)
        done.set()
        for stream in streams:
            stream.close()  # ends the generation thread at its next layer and removes its hooks
        if not finished:
            log.info("generation stopped after %d characters; generation threads ended", len(texts[0]))
    trace = streams[0].result.trace  # prompt and answer ids, also when stopped (every backend keeps them)
    token_effects = None
    if components and len(trace.token_ids) > trace.prompt_len:
        from llm_steering import effects

        token_effects = effects.token_effects(LOADED.model, trace.token_ids, trace.prompt_len, components,
                                              steer_from=0 if steer_prompt else trace.prompt_len)
    yield texts[0], texts[1] if unsteered_chat is not None else None, trace, not finished, token_effects


@spaces.GPU(duration=60)
def auto_strength(chat: list[dict], component: SteeringComponent, others: list[SteeringComponent],
                  fractions: list[float], norm: float, steer_prompt: bool, repetition_penalty: float,
                  max_new_tokens: int) -> tuple[float, bool, float]:
    """"Auto": (chosen fraction, whether it stayed within the NLL bound, seconds), from one batched
    generation over `fractions` (calibrate.py); the weakest candidate when none stayed within."""
    from llm_steering import calibrate

    cal = calibrate.calibrate_strength(
        LOADED.model, LOADED.tokenizer, chat, component, fractions=fractions, norm=norm, other_components=others,
        max_new_tokens=min(max_new_tokens, 48), repetition_penalty=repetition_penalty, steer_prompt=steer_prompt,
    )
    return (cal.fraction if cal.found else min(fractions)), cal.found, cal.seconds


# ---------------------------------------------------------------------------
# Errors: one place turns them into what the visitor sees
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def user_errors(what: str = "Generation failed") -> Iterator[None]:
    """ValueError (bad input) -> gr.Error with its one line; anything else -> logged, one short line."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as exc:
        raise gr.Error(one_line(exc), print_exception=False) from None
    except Exception as exc:
        log.exception(what.lower())
        raise gr.Error(f"{what}: {one_line(exc) if str(exc) else type(exc).__name__}", print_exception=False) from None


def one_line(exc: BaseException, limit: int = 280) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# Helpers: chat messages, steering controls, the concept-intensity view
# ---------------------------------------------------------------------------


def chat_messages(history: list | None) -> list[dict]:
    """Chatbot history as [{"role", "content": str}], user and assistant turns only."""
    return [
        {"role": m["role"], "content": message_text(m.get("content"))}
        for m in (history or []) if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]


def auto_key(app: App, controls: tuple) -> str | None:
    """The first switched-on feature whose "auto" box is ticked (the auto boxes come last)."""
    n = len(app.features)
    autos = controls[3 * n + N_CUSTOM : 4 * n + N_CUSTOM]
    return next((f.key for f, on, auto in zip(app.features, controls[:n], autos, strict=False) if on and auto), None)


def model_chat(app: App, system_prompt: str, history: list[dict], message: str) -> tuple[list[dict], str]:
    """The chat the model reads (catalog.fit_chat), each cut shown to the visitor as a warning."""
    fitted = fit_chat(app.tokenizer, system_prompt, history, message, app.profile.generation.max_input_tokens)
    for notice in fitted.notices:
        gr.Warning(notice)
    return fitted.chat, fitted.message


def spec_from_controls(app: App, steer_prompt: bool, controls: tuple) -> SteeringSpec:
    """The switched-on features (N checkboxes, N sliders, N op radios; then the custom feature's
    checkbox, key, slider and op), each strength checked."""
    n = len(app.features)
    enabled, fractions, ops = controls[:n], controls[n : 2 * n], controls[2 * n : 3 * n]
    active = {
        f.key: (app.catalog.check_fraction(f, frac), op)
        for f, on, frac, op in zip(app.features, enabled, fractions, ops, strict=True) if on
    }
    if len(controls) > 3 * n and controls[3 * n] and str(controls[3 * n + 1] or "").strip():
        feature = app.catalog.resolve(str(controls[3 * n + 1]).strip())
        active[feature.key] = (app.catalog.check_fraction(feature, controls[3 * n + 2]), controls[3 * n + 3])
    return app.catalog.spec(active, steer_prompt)


N_CUSTOM = 4  # the custom feature's controls: checkbox, key, slider, op
HISTORY_MODES = {"only earlier turns with this steering": "same", "all earlier turns": "all"}


# ---------------------------------------------------------------------------
# Event handlers (each takes the App first; build_demo binds it)
# ---------------------------------------------------------------------------


def respond(app: App, message: str, turns: list | None, system_prompt: str, temperature: float,
            repetition_penalty: float, max_new_tokens: float, steer_prompt: bool, compare: bool, history_mode: str,
            session_key: str, *controls: Any) -> Iterator[tuple]:
    """Stream the answer into the chat (and the unsteered one beside it in compare mode).

    `turns` (a gr.State) is the conversation: each turn what was typed, the answer, the steering
    it was made with, and the unsteered answer in compare mode; both chats are drawn from it.
    Yields (message box, turns, steered chat, unsteered chat, effect view).
    """
    turns = [dict(t) for t in (turns or [])]
    if not (message or "").strip():
        gr.Warning("Type a message first.")
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    since = time.time()
    with user_errors():
        spec = spec_from_controls(app, steer_prompt, controls)
        components = app.catalog.components(spec)
        seen = chat_history.visible_chat(turns, spec, HISTORY_MODES.get(history_mode, "same"))
        left_out = seen.left_out
        if left_out:
            gr.Info(f"The model does not see {left_out} earlier {'answer' if left_out == 1 else 'answers'} made with "
                    "other steering (Advanced > Earlier turns).")
        chat, _ = model_chat(app, system_prompt or "", seen.messages, message.strip())
        unsteered_chat = None
        if compare:
            unsteered_chat, _ = model_chat(app, system_prompt or "", chat_history.unsteered_chat(turns).messages,
                                           message.strip())
        key = auto_key(app, controls)
        if key is not None:
            spec, components = auto_steering(app, chat, spec, components, key, float(repetition_penalty), int(max_new_tokens))
        turn = {"user": message, "answer": "", "steering": spec.to_dict(), "unsteered": "" if compare else None,
                "stopped": False, "capped_at": None, "auto": key, "done": False}
        turns.append(turn)
        prompt_tokens = len(steering.chat_input_ids(app.tokenizer, chat))
        pending = f"*Reading your message ({prompt_tokens:,} tokens)…*" if prompt_tokens > LONG_PROMPT else None
        waiting = "<p class='muted'>Writing the answer…</p>" if components else gr.skip()
        yield "", turns, *draw(app, turns, pending), waiting
        stream = generate(chat, components, spec.steer_prompt, float(temperature), float(repetition_penalty),
                          int(max_new_tokens), unsteered_chat, session_key, since)
        with contextlib.closing(stream):  # Clear cancels this handler, which closes the stream
            for steered, plain, trace, stopped, token_effects in stream:
                turn["answer"] = steered
                if compare:
                    turn["unsteered"] = plain
                if trace is None:
                    yield gr.skip(), gr.skip(), *draw(app, turns, pending if not steered else None), gr.skip()
                    continue
                answer_ids = trace.token_ids[trace.prompt_len :]
                capped = not stopped and hit_length_limit(answer_ids, int(max_new_tokens), steering.eos_ids(app.model, app.tokenizer))
                turn.update(done=True, stopped=stopped, capped_at=int(max_new_tokens) if capped else None)
                view = effect_html(app.tokenizer, trace.token_ids, trace.prompt_len, token_effects,
                                   [(f, op, frac) for f, frac, op in app.catalog.active(spec).values()], stopped, capped)
                yield gr.skip(), turns, *draw(app, turns), view
        if not turn["done"]:  # the stream ended without its last yield (closed): keep what was written
            turn.update(done=True, stopped=True)
            yield gr.skip(), turns, *draw(app, turns), gr.skip()


def draw(app: App, turns: list[dict], pending: str | None = None) -> tuple[list[dict], list[dict]]:
    """Both chats, drawn from the turns (app_views.turn_messages)."""
    return (turn_messages(app.catalog, turns, pending=pending),
            turn_messages(app.catalog, turns, unsteered=True, pending=pending))


def auto_steering(app: App, chat: list[dict], spec: SteeringSpec, components: list[SteeringComponent], key: str,
                  repetition_penalty: float, max_new_tokens: int) -> tuple[SteeringSpec, list[SteeringComponent]]:
    """"Auto" for `key`: one batched calibration picks its strength; the spec and components at it."""
    from llm_steering import calibrate

    active = app.catalog.active(spec)
    i = list(active).index(key)
    feature, _, op = active[key]
    tried = calibrate.candidate_fractions(feature.default_fraction)
    fraction, found, seconds = auto_strength(
        chat, feature.component(1.0, op), components[:i] + components[i + 1 :], tried, feature.norm,
        spec.steer_prompt, repetition_penalty, max_new_tokens,
    )
    components = [*components[:i], feature.component(fraction, op), *components[i + 1 :]]
    gr.Info(f"Auto: {feature.title} at {fraction:.2f} (tried {', '.join(f'{f:g}' for f in tried)}; "
            f"{seconds:.1f} s){'' if found else ', the weakest: none stayed fluent enough'}.")
    spec = app.catalog.spec({k: (fraction if k == key else frac, o) for k, (_, frac, o) in active.items()}, spec.steer_prompt)
    return spec, components


def retry(app: App, turns: list | None, *args: Any) -> Iterator[tuple]:
    """Retry: the last message asked again, in place of its answer."""
    turns = list(turns or [])
    if not turns:
        gr.Warning("Nothing to retry yet: send a message first.")
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    yield from respond(app, turns[-1]["user"], turns[:-1], *args)


def request_stop(session_key: str) -> None:
    """The Stop button: ends this session's generation wherever it runs (StopFlags); the answer
    so far stays, marked as stopped."""
    STOPS.request(session_key)


def controls_update(app: App, spec: SteeringSpec) -> list:
    """Every catalog control (the custom feature's too; then steer-prompt) set to show `spec`."""
    active = {f.key: (frac, op) for f, frac, op in app.catalog.active(spec).values()}
    keys = {f.key for f in app.features}
    custom = [k for k in active if k not in keys]
    if len(custom) > 1:
        raise ValueError(f"feature {custom[-1]!r} has no control in this app (one custom feature at a time); "
                         f"available: {', '.join(sorted(keys))}")
    updates = [
        *[f.key in active for f in app.features],
        *[active[f.key][0] if f.key in active else gr.skip() for f in app.features],
        *[active[f.key][1] if f.key in active else gr.skip() for f in app.features],
    ]
    updates += [True, custom[0], *active[custom[0]]] if custom else [False, gr.skip(), gr.skip(), gr.skip()]
    return [*updates, *[False] * len(app.features), spec.steer_prompt]  # auto off: the spec's strengths hold


def matching_preset(app: App, spec: SteeringSpec) -> str | None:
    """The preset `spec` is ("None" for no steering), or None when it is none of them."""
    def settings(s: SteeringSpec) -> tuple:
        return s.steer_prompt, sorted((f.key, round(frac, 4), op) for f, frac, op in app.catalog.active(s).values())

    if not spec.features:
        return NO_PRESET
    mine = settings(spec)
    return next((name for name in app.presets if settings(app.catalog.preset_spec(name)) == mine), None)


def find_features(app: App, text: str, layer: Any) -> tuple[Any, str]:
    """The "Find features" panel: the features that fire most on `text`, each one click from being steered."""
    with user_errors("Finding features failed"):
        if not (text or "").strip():
            raise ValueError("type a text to find the features that fire on it")
        found = app.catalog.find(text[:2000], [int(layer)])
    if not found:
        return gr.update(choices=[], value=None), "No feature fires on that text."
    choices = [(f"{f.key} · mean {f.mean:.2f} · max {f.max:.2f}", f.key) for f in found]
    links = " · ".join(f"[{f.key}]({f.url})" for f in found if f.url)
    note = "Click a feature to steer it (it goes into the custom feature row)."
    return gr.update(choices=choices, value=None), f"{note}\n\nDashboards: {links}" if links else note


def steer_found(app: App, key: str | None) -> list:
    """A found feature into the custom row, switched on at the default strength of raw SAE features."""
    if not key:
        return [gr.skip()] * 4
    with user_errors("Steering that feature failed"):
        feature = app.catalog.resolve(key)
    return [True, feature.key, round(feature.default_fraction, 2), feature.default_op]


def apply_preset(app: App, name: str | None) -> list:
    """Set every catalog control from a preset; "None" switches everything off."""
    if name is None or (name != NO_PRESET and name not in app.presets):
        return [gr.skip()] * (4 * len(app.features) + N_CUSTOM + 1)
    spec = SteeringSpec(app.model_id, ()) if name == NO_PRESET else app.catalog.preset_spec(name)
    return controls_update(app, spec)


def describe(app: App, steer_prompt: bool, *controls: Any) -> tuple[str, str]:
    """The summary under the catalog and the spec shown in the Share box (a bad strength: a note;
    `check_strength` warns and sets it back)."""
    try:
        spec = spec_from_controls(app, steer_prompt, controls)
    except ValueError as exc:
        return f"**Steering for the next answer:** ⚠ {html.escape(one_line(exc))}", gr.skip()
    return summary_markdown(app.catalog, spec), json.dumps(spec.to_dict(), indent=2)


def check_strength(app: App, index: int, value: Any) -> Any:
    """A strength typed out of range into feature `index`'s box: a readable warning, and the box set
    back to the feature's default (never silently used, never the slider's end)."""
    feature = app.features[index]
    try:
        app.catalog.check_fraction(feature, value)
        return gr.skip()
    except ValueError:
        lo, hi = app.catalog.fraction_range(feature)
        default = round(feature.default_fraction, 2)
        gr.Warning(f"Strength {short_repr(value)} for {feature.title} is outside {lo:g} to {hi:g}: "
                   f"set back to {default:.2f}, its default.")
        return default


def export_spec(app: App, fmt: str, steer_prompt: bool, *controls: Any) -> str:
    """Write the current steering to a new temporary file and hand it to the browser."""
    with user_errors("Export failed"):
        spec = spec_from_controls(app, steer_prompt, controls)
        if not spec.features:
            gr.Warning("No feature is switched on: the file will say 'no steering'.")
        path = Path(tempfile.mkdtemp(prefix="steering-")) / f"steering.{fmt}"
        save_steering_spec(spec, path)
        return str(path)


def export_chat(app: App, turns: list | None) -> str | None:
    """The conversation as JSON: each turn what was typed, the answer, the steering that made it
    (the export format of a steering file), the unsteered answer when compared, and whether it was
    stopped or cut."""
    turns = [t for t in (turns or []) if t.get("done", True)]
    if not turns:
        gr.Warning("Nothing to export yet: send a message first.")
        return None
    keep = ("user", "answer", "steering", "unsteered", "stopped", "capped_at", "auto")
    data = {"format": "llm-steering/chat", "version": 1, "model_id": app.model_id,
            "turns": [{k: t.get(k) for k in keep} for t in turns]}
    path = Path(tempfile.mkdtemp(prefix="steering-")) / "chat.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))
    return str(path)


def import_spec(app: App, upload: str | None) -> list:
    """Set the controls (and the preset radio) from an uploaded steering file (only gradio's upload,
    never a typed path)."""
    skip = [gr.skip()] * (4 * len(app.features) + N_CUSTOM + 3)
    if not upload:
        return skip
    name = Path(upload).name
    try:
        spec = load_steering_spec(upload)
        updates = controls_update(app, spec)
    except ValueError as exc:
        reason = one_line(exc).replace(f"steering spec {name} ", "it ").replace(f"{name}: ", "").rstrip(".")
        gr.Warning(f"Could not import {name}: {reason}. Export a steering file from this app to see the format.")
        return skip
    gr.Info(f"Imported steering: {', '.join(app.catalog.resolve(f.key).title for f in spec.features) or 'none'}.")
    return [*updates, matching_preset(app, spec), None]


def restore_from_link(app: App, query: str) -> list:
    """A shared link (?steering=...&message=...) opened: its steering on the controls, its message
    in the box. The steering is the export format (JSON) or a preset's name."""
    skip = [gr.skip()] * (4 * len(app.features) + N_CUSTOM + 3)
    params = urllib.parse.parse_qs((query or "").lstrip("?")[:MAX_LINK], max_num_fields=8)
    text, message = (params.get("steering") or [""])[0], (params.get("message") or [""])[0]
    if not text and not message:
        return skip
    updates, preset = skip[:-2], gr.skip()
    if text:
        try:
            spec = app.catalog.parse_steering(text)
            updates, preset = controls_update(app, spec), matching_preset(app, spec)
        except ValueError as exc:
            gr.Warning(f"The link's steering could not be used: {one_line(exc)}")
    return [*updates, preset, message[:MAX_LINK] if message else gr.skip()]


def chat_api(app: App, message: str, history: list[dict] | None = None, steering_spec: str = "",
             system_prompt: str | None = None, temperature: float | None = None,
             repetition_penalty: float | None = None, max_new_tokens: int | None = None) -> Iterator[str]:
    """Stream the steered answer to `message` (the text so far, growing); see build_demo's `chat`."""
    gen = app.profile.generation
    with user_errors():
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message is empty: give the text to answer")
        spec = app.catalog.parse_steering(steering_spec)
        max_new_tokens = gen.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        if history is not None and not isinstance(history, list):
            raise ValueError("history must be a list of {'role', 'content'} messages")
        system = gen.system_prompt if system_prompt is None else str(system_prompt)[:10_000]
        chat, _ = model_chat(app, system, chat_messages(history), message.strip())
        stream = generate(
            chat, app.catalog.components(spec), spec.steer_prompt,
            gen.temperature if temperature is None else float(temperature),
            gen.repetition_penalty if repetition_penalty is None else float(repetition_penalty), max_new_tokens,
        )
        with contextlib.closing(stream):
            for steered, *_ in stream:
                yield steered


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


def build_demo(app: App) -> gr.Blocks:
    """The Blocks layout and its events, every handler bound to `app`.

    Desktop: the chat on the left, the steering on the right. Phone: the steering panel comes
    first (presets and what is on, its feature list folded), then the chat.
    """
    features, presets, gen = app.features, app.presets, app.profile.generation
    model_line = (f"Model: `{app.model_id}` · profile `{app.profile.name}` · "
                  f"{'GPU' if app.model.device.type == 'cuda' or ON_ZERO_GPU else 'CPU'} · {len(features)} features · API: `/chat`")
    listed = {f.key for f in features}
    extra_names = [v.name for v in app.catalog.vectors.vectors if v.name not in listed] if app.catalog.vectors else []

    bind = functools.partial  # a partial, not a lambda: gradio must still see which handlers are generators

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        session_key = gr.State("")
        turns = gr.State([])
        with gr.Column(elem_id="header"):
            gr.Markdown(f"# {TITLE}\n{INTRO}")
            with gr.Accordion("How it works", open=False, elem_id="how"):
                gr.Markdown(f"{DESCRIPTION}\n<span class='muted'>{model_line}</span>")
        with gr.Row(equal_height=False, elem_id="main"):
            with gr.Column(scale=3, elem_id="chat-col"):
                with gr.Row(elem_id="chats"):
                    chatbot = gr.Chatbot(label="Steered", height=420, elem_id="chat-steered", buttons=["copy"])
                    unsteered_chatbot = gr.Chatbot(label="Unsteered", height=420, visible=False, elem_id="chat-plain",
                                                   buttons=["copy"])
                with gr.Row(elem_id="msg-row"):
                    msg = gr.Textbox(label="Message", placeholder="Type a message and press Enter", show_label=False,
                                     scale=5, elem_id="msg", max_lines=8)
                    send_btn = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                with gr.Row(elem_id="chat-actions"):
                    retry_btn = gr.Button("Retry", size="sm", elem_id="retry", min_width=60)
                    clear_btn = gr.Button("New chat", size="sm", elem_id="clear", min_width=60)
                    compare = gr.Checkbox(label="Compare with the unsteered model", value=False, elem_id="compare")
                with gr.Accordion("What the steering changed in the last answer", open=True, elem_id="effects-acc"):
                    effects_view = gr.HTML(NO_EFFECTS, elem_id="effects")
                examples_slot = gr.Column(elem_id="examples")
            with gr.Column(scale=2, elem_id="steer-panel"):
                preset = gr.Radio([NO_PRESET, *presets], value=NO_PRESET, label="Presets", elem_id="preset",
                                  info=" · ".join(f"{p.name}: {p.description}" for p in app.profile.presets) or None)
                summary = gr.Markdown(elem_id="summary")
                enabled_boxes, fraction_sliders, op_radios, auto_boxes, details = [], [], [], [], []
                with gr.Accordion(f"Features ({len(features)})", open=True, elem_id="features-acc"):
                    with gr.Column(elem_id="catalog"):
                        for feature in features:
                            with gr.Group(elem_classes="feature"):
                                enabled_boxes.append(gr.Checkbox(label=feature.title, info=feature.description,
                                                                 value=False, elem_classes="feature-on"))
                                with gr.Column(elem_classes="feature-details", visible=False) as row:
                                    fraction_sliders.append(FractionSlider(
                                        *app.catalog.fraction_range(feature), value=round(feature.default_fraction, 2),
                                        step=0.01, label="strength",
                                        info=f"default {feature.default_fraction:.2f} ({strength_label(feature, feature.default_fraction)})",
                                    ))
                                    with gr.Row(elem_classes="feature-row"):
                                        op_radios.append(gr.Radio(["clamp", "add"], value=feature.default_op,
                                                                  show_label=False, scale=2, min_width=150))
                                        auto_boxes.append(gr.Checkbox(label="auto strength", value=False, scale=1,
                                                                      min_width=130))
                                details.append(row)
                        can_add = bool(app.profile.sae_source or extra_names)
                        with gr.Group(elem_classes="feature", visible=can_add, elem_id="custom"):
                            custom_on = gr.Checkbox(label="Another feature", value=False, elem_id="custom-on",
                                                    info="an SAE feature by layer:index" if app.profile.sae_source
                                                    else f"a vector of {app.profile.vectors_file} by name")
                            with gr.Row(elem_classes="feature-row"):
                                custom_key = gr.Dropdown(extra_names, value=None, allow_custom_value=True,
                                                         label="layer:index (e.g. 15:21576)" if app.profile.sae_source
                                                         else "name", elem_id="custom-key", scale=2, min_width=140)
                                custom_op = gr.Radio(["clamp", "add"], value="clamp", label="how", scale=1, min_width=110)
                            custom_slider = FractionSlider(-1.0, 2.0, value=0.5, step=0.01, label="strength",
                                                           elem_id="custom-strength")
                custom = [custom_on, custom_key, custom_slider, custom_op]
                if app.profile.sae_source:  # any feature of the profile's SAEs, by layer:index
                    with gr.Accordion("Find features from text", open=False, elem_id="find"):
                        sae_layers = sorted({f.layer for f in app.profile.features if f.index is not None}) or [0]
                        with gr.Row():
                            find_text = gr.Textbox(placeholder="The Eiffel Tower in Paris", show_label=False, scale=4,
                                                   elem_id="find-text")
                            find_layer = gr.Dropdown(sae_layers, value=sae_layers[0], label="layer", scale=1,
                                                     allow_custom_value=True)
                            find_btn = gr.Button("Find", size="sm", scale=1, elem_id="find-btn")
                        found = gr.Radio([], label="Features that fire most", elem_id="found")
                        found_links = gr.Markdown()
                with gr.Accordion("Share", open=False, elem_id="share-acc"):
                    with gr.Row():
                        share_btn = gr.Button("Make a share link", size="sm", elem_id="share-link-btn")
                        with_message = gr.Checkbox(label="with the message", value=True, elem_id="share-message")
                    share_link = gr.Textbox(label="Link (opens this steering)", interactive=False, buttons=["copy"],
                                            elem_id="share-link")
                    with gr.Row():
                        export_json = gr.Button("Export JSON", size="sm", elem_id="export-json")
                        export_yaml = gr.Button("Export YAML", size="sm", elem_id="export-yaml")
                        export_chat_btn = gr.Button("Export chat", size="sm", elem_id="export-chat")
                        upload = gr.UploadButton("Import file", file_types=[".json", ".yaml", ".yml"], size="sm",
                                                 elem_id="import")
                    exported = gr.File(label="Exported file", interactive=False, elem_id="exported")
                    spec_view = gr.Code(language="json", label="Current steering", interactive=False, elem_id="spec-view")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    steer_prompt = gr.Checkbox(label="Steer the prompt too (not only the answer)", value=True)
                    history_mode = gr.Radio(list(HISTORY_MODES), value=next(iter(HISTORY_MODES)), elem_id="history-mode",
                                            label="Earlier turns the model sees when the steering changes")
                    system_prompt = gr.Textbox(gen.system_prompt, label="System prompt", lines=2)
                    temperature = gr.Slider(0.0, 1.5, value=gen.temperature, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=gen.repetition_penalty, step=0.05,
                                                   label="Repetition penalty")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=gen.max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="max-new-tokens")
        url_query = gr.Textbox(visible=False)
        controls = [*enabled_boxes, *fraction_sliders, *op_radios, *custom, *auto_boxes]
        gen_inputs = [msg, turns, system_prompt, temperature, repetition_penalty, max_new_tokens,
                      steer_prompt, compare, history_mode, session_key, *controls]
        gen_outputs = [msg, turns, chatbot, unsteered_chatbot, effects_view]
        hidden = {"api_visibility": "private"}
        generating = {"concurrency_id": "generate", "concurrency_limit": CONCURRENCY}  # one limit for UI and API

        demo.load(lambda: uuid.uuid4().hex, None, session_key, queue=False, **hidden)
        send_evt = send_btn.click(bind(respond, app), gen_inputs, gen_outputs, **hidden, **generating)
        submit_evt = msg.submit(bind(respond, app), gen_inputs, gen_outputs, **hidden, **generating)
        retry_evt = retry_btn.click(bind(retry, app), gen_inputs[1:], gen_outputs, **hidden, **generating)
        running = [send_evt, submit_evt, retry_evt]
        stop_btn.click(request_stop, session_key, None, queue=False, **hidden)  # the answer so far stays, marked
        clear_btn.click(lambda: ([], [], [], NO_EFFECTS, ""), None, [turns, chatbot, unsteered_chatbot, effects_view, msg],
                        cancels=running, queue=False, **hidden)
        chatbot.clear(lambda: ([], [], NO_EFFECTS), None, [turns, unsteered_chatbot, effects_view], cancels=running,
                      **hidden)
        compare.change(lambda on: gr.update(visible=on), compare, unsteered_chatbot, queue=False, **hidden)
        with examples_slot:  # here: the preset radio must exist first
            gr.Examples([[text, name] for text, name in zip(EXAMPLES, [*presets, NO_PRESET, NO_PRESET, NO_PRESET],
                                                            strict=False)],
                        inputs=[msg, preset], label="Try a message (with a preset)")

        preset.change(bind(apply_preset, app), preset, [*controls, steer_prompt], queue=False, **hidden)
        for control in [*controls, steer_prompt]:
            control.input(lambda: None, None, preset, queue=False, **hidden)  # a manual change leaves the preset
            control.change(bind(describe, app), [steer_prompt, *controls], [summary, spec_view], queue=False,
                           trigger_mode="always_last", **hidden)  # an import changes ~45 controls at once
        for box, row in zip([*enabled_boxes], details, strict=True):
            box.change(lambda on: gr.update(visible=on), box, row, queue=False, **hidden)
        for i, slider in enumerate(fraction_sliders):
            slider.change(bind(check_strength, app, i), slider, slider, **hidden)  # queued: warnings show
        demo.load(bind(describe, app), [steer_prompt, *controls], [summary, spec_view], **hidden)
        demo.load(bind(restore_from_link, app), url_query, [*controls, steer_prompt, preset, msg], **hidden,
                  js="() => window.location.search")
        # On a phone the feature list starts folded, so the chat is one screen down, not five.
        demo.load(None, None, None, js=FOLD_ON_PHONE, **hidden)
        export_json.click(bind(export_spec, app, "json"), [steer_prompt, *controls], exported, **hidden)
        export_yaml.click(bind(export_spec, app, "yaml"), [steer_prompt, *controls], exported, **hidden)
        export_chat_btn.click(bind(export_chat, app), turns, exported, **hidden)
        upload.upload(bind(import_spec, app), upload, [*controls, steer_prompt, preset, exported], **hidden)
        share_btn.click(None, [spec_view, msg, with_message], share_link, js=SHARE_LINK, **hidden)
        if app.profile.sae_source:
            find_btn.click(bind(find_features, app), [find_text, find_layer], [found, found_links], **hidden)
            found.input(bind(steer_found, app), found, custom, **hidden)

        def chat(message: str, history: list[dict] | None = None, steering_spec: str = "",
                 system_prompt: str | None = None, temperature: float | None = None,
                 repetition_penalty: float | None = None, max_new_tokens: int | None = None) -> Iterator[str]:
            """Stream the steered answer to `message` (the text so far, growing).

            steering_spec: a preset name (e.g. "Eiffel Tower"), a steering spec as JSON (the app's
            export format), or "" for none. history: earlier turns as [{"role", "content"}].
            Unset generation settings take the app's defaults.
            """
            yield from chat_api(app, message, history, steering_spec, system_prompt, temperature,
                                repetition_penalty, max_new_tokens)

        gr.api(chat, api_name="chat", **generating)
    return demo


# The share link: this page's address with the steering (the export format, compact JSON) and,
# if asked, the message in its query; opening it restores both (restore_from_link).
SHARE_LINK = """(spec, message, withMessage) => {
  const url = new URL(window.location.href);
  url.search = ''; url.hash = '';
  if (spec && spec.trim()) url.searchParams.set('steering', JSON.stringify(JSON.parse(spec)));
  if (withMessage && message && message.trim()) url.searchParams.set('message', message);
  return url.toString();
}"""

FOLD_ON_PHONE = """() => {
  if (!window.matchMedia('(max-width: 700px)').matches) return;
  const fold = () => {
    const button = document.querySelector('#features-acc > button, #features-acc .label-wrap');
    if (!button) return setTimeout(fold, 100);
    if (button.classList.contains('open')) button.click();
    window.scrollTo(0, 0);
  };
  fold();
}"""


def main() -> None:
    global LOADED
    parser = argparse.ArgumentParser(description="Serve the steering chat (model profile: $STEERING_PROFILE).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to listen on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        LOADED = load_app()
    except ValueError as exc:
        sys.exit(f"app.py: {one_line(exc)}")
    build_demo(LOADED).queue(default_concurrency_limit=CONCURRENCY).launch(
        server_name=args.host, server_port=args.port, theme=gr.themes.Soft(primary_hue="orange"), css=CSS,
        footer_links=["api"], max_file_size=MAX_UPLOAD,
    )

