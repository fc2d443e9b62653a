"""The app's event handlers: each takes the loaded `App` first (layout.py binds it) and the steering
controls' values last, read by name through the app's `ControlPanel` (panel.py).

    >>> values = app.panel.pack({("pirate", "on"): True})
    >>> spec_from_controls(app, app.panel.read(values)).features
"""

from __future__ import annotations

import contextlib
import html
import json
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_steering import chat_history, control_vector, steering
from llm_steering.calibrate import setting_text
from llm_steering.chat_input import fit_chat, message_text
from llm_steering.config import SteeringSpec, load_steering_spec, save_steering_spec
from llm_steering.core import atomic_write, format_fraction, one_line, round_fraction
from llm_steering.effects import hit_length_limit
from llm_steering.steering import SteeringComponent
from llm_steering.web.app import (
    MAX_LINK,
    MAX_NEW_TOKENS,
    NO_PRESET,
    App,
    auto_generate,
    generate,
    user_errors,
)
from llm_steering.web.concept_panel import as_value as concepts_value
from llm_steering.web.concept_panel import session_catalog
from llm_steering.web.effect_view import effect_html
from llm_steering.web.panel import CUSTOM, GLOBAL, KEEPNORM, PanelValues
from llm_steering.web.views import break_warning, summary_markdown, turn_messages

import gradio as gr

LONG_PROMPT = 400  # prompts longer than this many tokens get a "Reading your message" note
HISTORY_MODES = {"only earlier turns with this steering": "same", "all earlier turns": "all"}


def chat_messages(history: list | None) -> list[dict]:
    """Chatbot history as [{"role", "content": str}], user and assistant turns only."""
    return [
        {"role": m["role"], "content": message_text(m.get("content"))}
        for m in (history or []) if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]


def auto_key(values: PanelValues) -> str | None:
    """The first switched-on feature whose "auto" box is ticked (the custom row's last)."""
    key = next((key for key in values.enabled() if values[key, "auto"]), None)
    return key or (values.custom_key() if values[CUSTOM, "auto"] else None)


def model_chat(app: App, system_prompt: str, history: list[dict], message: str) -> tuple[list[dict], str]:
    """The chat the model reads (catalog.fit_chat), each cut shown to the visitor as a warning."""
    fitted = fit_chat(app.tokenizer, system_prompt, history, message, app.profile.generation.max_input_tokens)
    for notice in fitted.notices:
        gr.Warning(notice)
    return fitted.chat, fitted.message


def spec_from_controls(app: App, values: PanelValues) -> SteeringSpec:
    """The switched-on features (the catalog's and the custom one), each strength checked."""
    catalog = session_catalog(app, values)  # with the session's own concept (concept_panel.py): the spec carries it
    active = {
        f.key: (catalog.check_fraction(f, values[f.key, "fraction"]), values.op(f.key))
        for f in app.features if values[f.key, "on"]
    }
    custom = values.custom_key()
    if custom:
        feature = catalog.resolve(custom)
        active[feature.key] = (catalog.check_fraction(feature, values[CUSTOM, "fraction"]), values[CUSTOM, "op"])
    return catalog.spec(active, values.steer_prompt)




# ---------------------------------------------------------------------------
# Event handlers (each takes the App first; build_demo binds it)
# ---------------------------------------------------------------------------


def respond(app: App, message: str, turns: list | None, system_prompt: str, temperature: float,
            repetition_penalty: float, max_new_tokens: float, compare: bool, history_mode: str,
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
        values = app.panel.read(controls)
        spec = spec_from_controls(app, values)
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
        warning = break_warning(app.catalog, spec)
        if warning:
            gr.Warning(warning)
        key = auto_key(values)
        turn = {"user": message, "answer": "", "steering": spec.to_dict(), "unsteered": "" if compare else None,
                "stopped": False, "capped_at": None, "auto": key, "done": False}
        turns.append(turn)
        prompt_tokens = len(steering.chat_input_ids(app.tokenizer, chat))
        pending = f"*Reading your message ({prompt_tokens:,} tokens)…*" if prompt_tokens > LONG_PROMPT else None
        waiting = "<p class='muted'>Writing the answer…</p>" if components else gr.skip()
        if key is not None:  # auto compares candidates for seconds first: the chat says so meanwhile
            title = next(f.title for k, (f, _, _) in app.catalog.for_spec(spec).active(spec).items()
                         if key in (k, f.name))
            pending = (f"*Auto: trying {title} several ways on the first words of this answer (strengths, answer only, "
                       "letting go once it names the concept) and keeping one that still answers…*")
            stream = auto_answer_stream(app, chat, spec, components, key, turn, float(temperature),
                                        float(repetition_penalty), int(max_new_tokens), unsteered_chat, session_key, since)
        else:
            stream = generate(chat, components, spec.steer_prompt, float(temperature), float(repetition_penalty),
                              int(max_new_tokens), unsteered_chat, session_key, since)
        yield "", turns, *draw(app, turns, pending), waiting
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
                shown = app.catalog.active(SteeringSpec.from_dict(turn["steering"]))
                view = effect_html(app.tokenizer, trace.token_ids, trace.prompt_len, token_effects,
                                   [(f, op, frac) for f, frac, op in shown.values()], stopped, capped)
                yield gr.skip(), turns, *draw(app, turns), view
        if not turn["done"]:  # the stream ended without its last yield (closed): keep what was written
            turn.update(done=True, stopped=True)
            yield gr.skip(), turns, *draw(app, turns), gr.skip()


def draw(app: App, turns: list[dict], pending: str | None = None) -> tuple[list[dict], list[dict]]:
    """Both chats, drawn from the turns (app_views.turn_messages)."""
    return (turn_messages(app.catalog, turns, pending=pending),
            turn_messages(app.catalog, turns, unsteered=True, pending=pending))


def auto_answer_stream(app: App, chat: list[dict], spec: SteeringSpec, components: list[SteeringComponent], key: str,
                       turn: dict, temperature: float, repetition_penalty: float, max_new_tokens: int,
                       unsteered_chat: list[dict] | None, session_key: str, since: float) -> Iterator[tuple]:
    """"Auto" for `key` (app.auto_generate): once the candidates are compared, the turn's steering
    becomes the one chosen (its strength, op, answer only or not; `auto_setting` says how, for the
    tag), a note says it, and the answer streams as `generate`'s does."""
    catalog = app.catalog.for_spec(spec)  # with the spec's own concepts
    active = catalog.active(spec)
    key = next(k for k in active if k == key or active[k][0].name == key)  # the custom row names it its own way
    i = list(active).index(key)
    feature, fraction, op = active[key]
    stream = auto_generate(chat, feature.component(fraction, op), components[:i] + components[i + 1 :], temperature,
                           repetition_penalty, max_new_tokens, unsteered_chat, session_key, since,
                           catalog.auto_max_multiplier(feature, fraction))
    with contextlib.closing(stream):
        chosen = next(stream)
        if chosen["op"] is None:
            turn["steering"] = catalog.spec({k: (f, o) for k, (_, f, o) in active.items() if k != key},
                                                chosen["steer_prompt"]).to_dict()  # how the other features were applied
            setting = setting_text(None, 0.0)
        else:
            chosen_fraction = round_fraction(fraction * chosen["multiplier"])
            learned = chosen.get("vector")  # a direction learned for the feature: the turn's spec names it, so a link,
            chosen_key = key                # an export or the server steers what made this answer
            if learned:
                chosen_key = turn["auto"] = catalog.resolve(learned).key
            turn["steering"] = catalog.spec(
                {(chosen_key if k == key else k): ((chosen_fraction, chosen["op"]) if k == key else (f, o))
                 for k, (_, f, o) in active.items()},
                chosen["steer_prompt"]).to_dict()
            setting = setting_text(chosen["op"], chosen["multiplier"], chosen["steer_prompt"], chosen["release"],
                                   bool(learned), chosen.get("let_go_at"))
        turn["auto_setting"] = setting
        gr.Info(f"Auto: {feature.title} {setting} (compared {chosen['tried']} ways in {chosen['seconds']:.1f} s).")
        yield from stream


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
    from llm_steering.web.app import STOPS

    STOPS.request(session_key)


def controls_update(app: App, spec: SteeringSpec, auto: bool = False) -> list:
    """Every steering control set to show `spec`; `auto` ticks the switched-on features' auto boxes (a
    preset, on a profile whose generation.auto is true), else the spec's strengths hold (a file, a link)."""
    active = {f.key: (frac, op) for f, frac, op in app.catalog.active(spec).values()}
    keys = {f.key for f in app.features}
    custom = [k for k in active if k not in keys]
    if len(custom) > 1:
        raise ValueError(f"feature {custom[-1]!r} has no control in this app (one custom feature at a time); "
                         f"available: {', '.join(sorted(keys))}")
    values: dict[tuple[str, str], Any] = {(GLOBAL, "steer_prompt"): spec.steer_prompt, (CUSTOM, "on"): bool(custom)}
    if spec.concepts:  # a file's or a link's own concepts become this session's
        values[GLOBAL, "concepts"] = concepts_value(spec.concepts)
    for f in app.features:
        values[f.key, "on"], values[f.key, "auto"] = f.key in active, auto and f.key in active
        if f.key in active:
            fraction, op = active[f.key]
            values[f.key, "fraction"], values[f.key, "op"] = round_fraction(fraction), op.removesuffix(KEEPNORM)
            values[f.key, "keepnorm"] = op.endswith(KEEPNORM)
    if custom:
        if active[custom[0]][1].endswith(KEEPNORM):
            raise ValueError(f"feature {custom[0]!r} keeps the norm, which this app offers for its listed features only")
        values[CUSTOM, "key"] = custom[0]
        values[CUSTOM, "fraction"], values[CUSTOM, "op"] = active[custom[0]]
    return app.panel.updates(values)


def matching_preset(app: App, spec: SteeringSpec) -> str | None:
    """The preset `spec` is ("None" for no steering), or None when it is none of them."""
    def settings(s: SteeringSpec) -> tuple:
        return s.steer_prompt, sorted((f.key, round_fraction(frac), op) for f, frac, op in app.catalog.active(s).values())

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
        return app.panel.skip()
    with user_errors("Steering that feature failed"):
        feature = app.catalog.resolve(key)
    return app.panel.updates({(CUSTOM, "on"): True, (CUSTOM, "key"): feature.key,
                              (CUSTOM, "fraction"): round_fraction(feature.default_fraction),
                              (CUSTOM, "op"): feature.default_op})


def apply_preset(app: App, name: str | None) -> list:
    """Set every catalog control from a preset; "None" switches everything off."""
    if name is None or (name != NO_PRESET and name not in app.presets):
        return app.panel.skip()
    spec = SteeringSpec(app.model_id, ()) if name == NO_PRESET else app.catalog.preset_spec(name)
    return controls_update(app, spec, auto=app.profile.generation.auto)


def describe(app: App, *controls: Any) -> tuple[str, str]:
    """The summary under the catalog and the spec shown in the Share box (a bad strength: a note;
    `check_strength` warns and sets it back)."""
    try:
        values = app.panel.read(controls)
        spec = spec_from_controls(app, values)
    except ValueError as exc:
        return f"**Steering for the next answer:** ⚠ {html.escape(one_line(exc))}", gr.skip()
    auto = {key for key in values.enabled() if values[key, "auto"]}
    return summary_markdown(app.catalog, spec, auto), json.dumps(spec.to_dict(), indent=2)


_NEWEST: dict[str, float] = {}  # session key -> the page clock of its newest summary request
_NEWEST_LOCK = threading.Lock()
_NEWEST_KEPT = 10_000  # sessions remembered at most (the oldest are forgotten first)


def describe_newest(app: App, session_key: str, sent_at: float | None, *controls: Any) -> tuple[Any, Any]:
    """`describe` for a change of the controls sent at page time `sent_at`; the summary of a request
    older than one already answered for this session is skipped: it read the controls mid-update."""
    if not isinstance(sent_at, (int, float)) or not session_key:  # not stamped (an API call): answer it
        return describe(app, *controls)
    key, stamp = str(session_key), float(sent_at)
    with _NEWEST_LOCK:
        if stamp < _NEWEST.get(key, float("-inf")):
            return gr.skip(), gr.skip()
        _NEWEST[key] = stamp
        while len(_NEWEST) > _NEWEST_KEPT:
            _NEWEST.pop(next(iter(_NEWEST)))
    out = describe(app, *controls)
    with _NEWEST_LOCK:  # a newer request answered meanwhile: its summary stands
        return (gr.skip(), gr.skip()) if stamp < _NEWEST.get(key, stamp) else out


def check_strength(app: App, index: int, value: Any, in_force: float | None) -> tuple[Any, float]:
    """A strength typed into feature `index`'s box, checked when the editing ends (layout.py's
    COMMIT_STRENGTH): a valid one is the value in force; an empty, non-numeric or out-of-range one
    gets a readable warning and the box shows the value in force again (never silently used,
    never the slider's end). Returns (the box, the value in force)."""
    feature = app.features[index]
    in_force = round_fraction(feature.default_fraction if in_force is None else in_force)
    try:
        return gr.skip(), round_fraction(app.catalog.check_fraction(feature, value))
    except ValueError:
        lo, hi = app.catalog.fraction_range(feature)
        what = (f"The strength box for {feature.title} is empty or not a number"
                if not isinstance(value, float) or value != value
                else f"Strength {value:g} for {feature.title} is outside {lo:g} to {hi:g}")
        gr.Warning(f"{what}: type a number from {lo:g} to {hi:g}. It stays at {format_fraction(in_force)}.")
        return in_force, in_force


def export_spec(app: App, fmt: str, *controls: Any) -> str:
    """Write the current steering to a new temporary file and hand it to the browser."""
    with user_errors("Export failed"):
        spec = spec_from_controls(app, app.panel.read(controls))
        if not spec.features:
            gr.Warning("No feature is switched on: the file will say 'no steering'.")
        path = Path(tempfile.mkdtemp(prefix="steering-")) / f"steering.{fmt}"
        save_steering_spec(spec, path)
        return str(path)


def export_gguf(app: App, *controls: Any) -> str:
    """The current steering as a llama.cpp control vector (add only), a new temporary file for the browser."""
    with user_errors("Export failed"):
        values = app.panel.read(controls)
        spec = spec_from_controls(app, values)
        if auto_key(values):  # a file holds one strength: the one each slider shows (the feature's default)
            gr.Info("Auto chooses the steering per answer; the file holds the strengths the sliders show.")
        path = Path(tempfile.mkdtemp(prefix="steering-")) / "steering.gguf"
        control_vector.export_for_model(app.model, app.catalog.components(spec), path, steer_prompt=spec.steer_prompt)
        return str(path)


def export_chat(app: App, turns: list | None, system_prompt: str = "", history_mode: str = "") -> str | None:
    """The conversation as JSON (chat_history.chat_export, as the console's /save-chat writes it)."""
    turns = [t for t in (turns or []) if t.get("done", True)]
    if not turns:
        gr.Warning("Nothing to export yet: send a message first.")
        return None
    data = chat_history.chat_export(turns, app.model_id, system_prompt or "", HISTORY_MODES.get(history_mode, "same"))
    path = Path(tempfile.mkdtemp(prefix="steering-")) / "chat.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))
    return str(path)


def import_spec(app: App, upload: str | None) -> list:
    """Set the controls (and the preset radio) from an uploaded steering file (only gradio's upload,
    never a typed path)."""
    skip = [*app.panel.skip(), gr.skip(), gr.skip()]  # the controls, the preset, the file box
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
    gr.Info(f"Imported steering: {', '.join(app.catalog.for_spec(spec).resolve(f.key).title for f in spec.features) or 'none'}.")
    return [*updates, matching_preset(app, spec), None]


def restore_from_link(app: App, query: str) -> list:
    """A shared link (?steering=...&message=...) opened: its steering on the controls, its message
    in the box. The steering is the export format (JSON) or a preset's name."""
    skip = [*app.panel.skip(), gr.skip(), gr.skip()]  # the controls, the preset, the message box
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
