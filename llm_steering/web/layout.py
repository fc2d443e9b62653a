"""The page: the Blocks layout and its events, every handler bound to the loaded `App`.

Desktop: the chat on the left, the steering on the right. Phone: the steering panel comes first
(presets and what is on, its feature list folded), then the chat. The steering controls are made
and addressed by the app's `ControlPanel` (panel.py); nothing here counts widget positions.
"""

from __future__ import annotations

import functools
import html
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

from llm_steering.web import concept_panel
from llm_steering.web import handlers as h
from llm_steering.web.app import CONCURRENCY, MAX_NEW_TOKENS, NO_PRESET, ON_ZERO_GPU, App
from llm_steering.web.effect_view import EMPTY as NO_EFFECTS
from llm_steering.web.views import EXAMPLES, INTRO, TITLE, how_it_works

import gradio as gr

bind = functools.partial  # a partial, not a lambda: gradio must still see which handlers are generators
HIDDEN = {"api_visibility": "private"}
GENERATING = {"concurrency_id": "generate", "concurrency_limit": CONCURRENCY}  # one limit for UI and API
ANSWERING = {**GENERATING, "show_progress": "hidden"}  # the chat says what happens (reading, auto, writing)


def build_demo(app: App) -> gr.Blocks:
    """The whole page for `app`; `w` collects the widgets the events need, by name."""
    w = SimpleNamespace()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        w.session_key, w.turns = gr.State(""), gr.State([])
        header(app)
        with gr.Row(equal_height=False, elem_id="main"):
            with gr.Column(scale=3, elem_id="chat-col"):
                chat_column(w)
                with gr.Row(elem_id="more-row"):  # beside the chat they act on, not under the feature list
                    share_panel(w)
                    advanced_panel(app, w)
                effects_and_examples(w)
            with gr.Column(scale=2, elem_id="steer-panel"):
                w.preset = gr.Radio([NO_PRESET, *app.presets], value=NO_PRESET, label="Presets", elem_id="preset")
                w.preset_note = gr.Markdown(preset_note(app, NO_PRESET), elem_id="preset-note")
                w.summary = gr.Markdown(elem_id="summary")
                feature_cards(app)
                find_slot(app, w)
        w.url_query = gr.Textbox(visible=False)
        chat_events(app, demo, w)
        steering_events(app, demo, w)
        concept_panel.events(app, w)
        share_events(app, w)
        api(app)
    return demo


def header(app: App) -> None:
    device = "GPU" if app.model.device.type == "cuda" or ON_ZERO_GPU else "CPU"
    model_line = (f"Model: `{app.model_id}` · profile `{app.profile.name}` · {device} · "
                  f"{len(app.features)} features · API: `/chat`")
    with gr.Column(elem_id="header"):
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Accordion("How it works", open=False, elem_id="how"):
            gr.Markdown(f"{how_it_works(app.catalog)}\n<span class='muted'>{model_line}</span>")


CHAT_HEIGHT = "min(56vh, 640px)"  # at 1440x900 the chat, the message box and Share/Advanced fit on one screen


def chat_column(w: SimpleNamespace) -> None:
    with gr.Row(elem_id="chats"):
        w.chatbot = gr.Chatbot(label="Steered", height=CHAT_HEIGHT, elem_id="chat-steered", buttons=["copy"])
        w.unsteered = gr.Chatbot(label="Unsteered", height=CHAT_HEIGHT, visible=False, elem_id="chat-plain",
                                 buttons=["copy"])
    with gr.Row(elem_id="msg-row"):
        w.msg = gr.Textbox(label="Message", placeholder="Type a message and press Enter", show_label=False, scale=5,
                           elem_id="msg", max_lines=8)
        w.send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
        w.stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
    with gr.Row(elem_id="chat-actions"):
        w.retry = gr.Button("Retry", size="sm", elem_id="retry", min_width=60)
        w.clear = gr.Button("New chat", size="sm", elem_id="clear", min_width=60)
        w.compare = gr.Checkbox(label="Compare with the unsteered model", value=False, elem_id="compare")


def effects_and_examples(w: SimpleNamespace) -> None:
    """The effect view, folded (the chat already shows the answer; opened, it colours it), then examples."""
    with gr.Accordion("Colour the last answer by what the steering changed", open=False, elem_id="effects-acc"):
        w.effects = gr.HTML(NO_EFFECTS, elem_id="effects")
    w.examples = gr.Column(elem_id="examples")


def preset_note(app: App, name: str | None) -> str:
    """The line under the presets: the chosen preset's description (one at a time, not all run together)."""
    preset = app.presets.get(name or "")
    if preset is None:
        return "<span class='muted'>Pick a preset, or switch features on below.</span>"
    return f"<span class='muted'>{html.escape(preset.name)}: {html.escape(preset.description or '')}</span>"


def find_slot(app: App, w: SimpleNamespace) -> None:
    """Under the features: finding features from text. On a profile with SAEs, the SAE finder;
    on one without, the place for making a concept of one's own (web/concept_panel.py)."""
    with gr.Column(elem_id="find-slot"):
        if app.profile.sae_source:  # any feature of the profile's SAEs, by layer:index
            find_panel(app, w)
        concept_panel.render(app, w)


def feature_cards(app: App) -> None:
    """A card per feature of the catalog, then "Another feature" (an SAE feature or another vector)."""
    listed = {f.key for f in app.features}
    vectors = app.catalog.vectors
    # the directions learned for listed features (auto's candidates) are not offered: a link or a file that names
    # one (an auto answer that kept it) switches the card on, and the card shows itself then
    extra_names = [v.name for v in vectors.vectors if v.name not in listed and "learned_for" not in v.metadata] if vectors else []
    with gr.Accordion(f"Features ({len(app.features)})", open=True, elem_id="features-acc"):
        with gr.Column(elem_id="catalog"):
            for feature in app.features:
                app.panel.render_feature(feature, app.catalog)
            app.panel.render_custom(bool(app.profile.sae_source or extra_names), app.profile.sae_source,
                                    app.profile.vectors_file, extra_names)


def find_panel(app: App, w: SimpleNamespace) -> None:
    with gr.Accordion("Find features from text", open=False, elem_id="find"):
        sae_layers = sorted({f.layer for f in app.profile.features if f.index is not None}) or [0]
        with gr.Row():
            w.find_text = gr.Textbox(placeholder="The Eiffel Tower in Paris", show_label=False, scale=4,
                                     elem_id="find-text")
            w.find_layer = gr.Dropdown(sae_layers, value=sae_layers[0], label="layer", scale=1, allow_custom_value=True)
            w.find = gr.Button("Find", size="sm", scale=1, elem_id="find-btn")
        w.found = gr.Radio([], label="Features that fire most", elem_id="found")
        w.found_links = gr.Markdown()


def share_panel(w: SimpleNamespace) -> None:
    with gr.Accordion("Share", open=False, elem_id="share-acc"):
        with gr.Row():
            w.share = gr.Button("Make a share link", size="sm", elem_id="share-link-btn")
            w.with_message = gr.Checkbox(label="with the message", value=True, elem_id="share-message")
        w.share_link = gr.Textbox(label="Link (opens this steering)", interactive=False, buttons=["copy"],
                                  elem_id="share-link")
        with gr.Row():
            w.export_json = gr.Button("Export JSON", size="sm", elem_id="export-json")
            w.export_yaml = gr.Button("Export YAML", size="sm", elem_id="export-yaml")
            w.export_chat = gr.Button("Export chat", size="sm", elem_id="export-chat")
            w.export_gguf = gr.Button("Export llama.cpp GGUF", size="sm", elem_id="export-gguf")
            w.upload = gr.UploadButton("Import file", file_types=[".json", ".yaml", ".yml"], size="sm", elem_id="import")
        w.exported = gr.File(label="Exported file", interactive=False, elem_id="exported")
        w.spec_view = gr.Code(language="json", label="Current steering", interactive=False, elem_id="spec-view")


def advanced_panel(app: App, w: SimpleNamespace) -> None:
    gen = app.profile.generation
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        app.panel.render_steer_prompt()
        w.history_mode = gr.Radio(list(h.HISTORY_MODES), value=next(iter(h.HISTORY_MODES)), elem_id="history-mode",
                                  label="Earlier turns the model sees when the steering changes")
        w.system_prompt = gr.Textbox(gen.system_prompt, label="System prompt", lines=2)
        w.temperature = gr.Slider(0.0, 1.5, value=gen.temperature, step=0.05, label="Temperature (0 = greedy)",
                                  elem_id="temperature")
        w.repetition_penalty = gr.Slider(1.0, 2.0, value=gen.repetition_penalty, step=0.05, label="Repetition penalty")
        w.max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=gen.max_new_tokens, step=1, label="Max new tokens",
                                     elem_id="max-new-tokens")


def chat_events(app: App, demo: gr.Blocks, w: SimpleNamespace) -> None:
    """Send, Retry, Stop, New chat and compare."""
    inputs = [w.msg, w.turns, w.system_prompt, w.temperature, w.repetition_penalty, w.max_new_tokens, w.compare,
              w.history_mode, w.session_key, *app.panel.inputs()]
    outputs = [w.msg, w.turns, w.chatbot, w.unsteered, w.effects]
    demo.load(lambda: uuid.uuid4().hex, None, w.session_key, queue=False, **HIDDEN)
    running = [w.send.click(bind(h.respond, app), inputs, outputs, **HIDDEN, **ANSWERING),
               w.msg.submit(bind(h.respond, app), inputs, outputs, **HIDDEN, **ANSWERING),
               w.retry.click(bind(h.retry, app), inputs[1:], outputs, **HIDDEN, **ANSWERING)]
    w.stop.click(h.request_stop, w.session_key, None, queue=False, **HIDDEN)  # the answer so far stays, marked
    w.clear.click(lambda: ([], [], [], NO_EFFECTS, ""), None, [w.turns, w.chatbot, w.unsteered, w.effects, w.msg],
                  cancels=running, queue=False, **HIDDEN)
    w.chatbot.clear(lambda: ([], [], NO_EFFECTS), None, [w.turns, w.unsteered, w.effects], cancels=running, **HIDDEN)
    w.compare.change(lambda on: gr.update(visible=on), w.compare, w.unsteered, queue=False, **HIDDEN)
    with w.examples:  # here: the preset radio must exist first
        examples = [[text, name] for text, name in zip(EXAMPLES, [*app.presets, NO_PRESET, NO_PRESET, NO_PRESET],
                                                       strict=False)]
        gr.Examples(examples, inputs=[w.msg, w.preset], label="Try a message (with a preset)")


def steering_events(app: App, demo: gr.Blocks, w: SimpleNamespace) -> None:
    """Presets, the summary and the Share box's spec, strength checks, a shared link, finding features."""
    controls = app.panel.inputs()
    w.preset.change(bind(h.apply_preset, app), w.preset, controls, queue=False, **HIDDEN)
    w.preset.change(bind(preset_note, app), w.preset, w.preset_note, queue=False, **HIDDEN)
    for control in controls:
        control.input(lambda: None, None, w.preset, queue=False, **HIDDEN)  # a manual change leaves the preset
    # The summary follows the newest state of the controls, whatever order the answers come back in:
    # an import changes ~45 controls at once and "Make it and switch it on" five, whose change events
    # fire one by one, the first before the hidden concepts control has its new value. Each request
    # carries the page's clock when it was sent (STAMP), and the handler answers only the newest.
    clock = gr.Number(visible=False)
    gr.on([control.change for control in controls], bind(h.describe_newest, app), [w.session_key, clock, *controls],
          [w.summary, w.spec_view], js=STAMP, queue=False, **HIDDEN)
    for i, feature in enumerate(app.features):
        slider, in_force = app.panel.widget(feature.key, "fraction"), gr.State(None)
        slider.change(bind(h.check_strength, app, i), [slider, in_force], [slider, in_force],
                      **HIDDEN)  # queued: warnings show
    demo.load(None, None, None, js=COMMIT_STRENGTH, **HIDDEN)  # a typed strength counts when the editing ends
    demo.load(None, None, None, js=TAP_WORDS, **HIDDEN)
    demo.load(bind(h.describe, app), controls, [w.summary, w.spec_view], **HIDDEN)
    demo.load(bind(h.restore_from_link, app), w.url_query, [*controls, w.preset, w.msg], **HIDDEN,
              js="() => window.location.search")
    demo.load(None, None, None, js=FOLD_ON_PHONE, **HIDDEN)  # on a phone the chat is one screen down, not five
    if app.profile.sae_source:
        w.find.click(bind(h.find_features, app), [w.find_text, w.find_layer], [w.found, w.found_links], **HIDDEN)
        w.found.input(bind(h.steer_found, app), w.found, controls, **HIDDEN)


def share_events(app: App, w: SimpleNamespace) -> None:
    controls = app.panel.inputs()
    w.export_json.click(bind(h.export_spec, app, "json"), controls, w.exported, **HIDDEN)
    w.export_yaml.click(bind(h.export_spec, app, "yaml"), controls, w.exported, **HIDDEN)
    w.export_chat.click(bind(h.export_chat, app), [w.turns, w.system_prompt, w.history_mode], w.exported, **HIDDEN)
    w.export_gguf.click(bind(h.export_gguf, app), controls, w.exported, **HIDDEN)
    w.upload.upload(bind(h.import_spec, app), w.upload, [*controls, w.preset, w.exported], **HIDDEN)
    w.share.click(None, [w.spec_view, w.msg, w.with_message], w.share_link, js=SHARE_LINK, **HIDDEN)


def api(app: App) -> None:
    def chat(message: str, history: list[dict] | None = None, steering_spec: str = "",
             system_prompt: str | None = None, temperature: float | None = None,
             repetition_penalty: float | None = None, max_new_tokens: int | None = None) -> Iterator[str]:
        """Stream the steered answer to `message` (the text so far, growing).

        steering_spec: a preset name (e.g. "Eiffel Tower"), a steering spec as JSON (the app's
        export format), or "" for none. history: earlier turns as [{"role", "content"}].
        Unset generation settings take the app's defaults.
        """
        yield from h.chat_api(app, message, history, steering_spec, system_prompt, temperature,
                              repetition_penalty, max_new_tokens)

    gr.api(chat, api_name="chat", **GENERATING)


# The share link: this page's address with the steering (the export format, compact JSON) and,
# if asked, the message in its query; opening it restores both (restore_from_link).
SHARE_LINK = """(spec, message, withMessage) => {
  const url = new URL(window.location.href);
  url.search = ''; url.hash = '';
  if (spec && spec.trim()) url.searchParams.set('steering', JSON.stringify(JSON.parse(spec)));
  if (withMessage && message && message.trim()) url.searchParams.set('message', message);
  return url.toString();
}"""

# The page's clock (ms since it loaded) as the second input of a summary request (describe_newest).
STAMP = "(session, clock, ...controls) => [session, performance.now(), ...controls]"

# A tap on a word of the effect view says what a mouse pointer's tooltip says (touch screens have none).
TAP_WORDS = """() => document.addEventListener('click', e => {
  const tok = e.target.closest && e.target.closest('#effects .tok[title]');
  const note = tok && document.querySelector('#effects .tap-note');
  if (note) note.textContent = '"' + tok.textContent.trim() + '": ' + tok.title;
})"""

# gradio sends a slider's number box at every keystroke ("999" arrives as 9, 99, 999) and clamps it
# when it loses focus. This holds a typed strength back until Enter or leaving the box, then sends
# it as it is, so check_strength sees what was typed and answers once.
COMMIT_STRENGTH = """() => {
  const box = e => e.target instanceof HTMLInputElement && e.target.type === 'number' && e.target.closest('.strength');
  let passing = false;
  const send = input => { passing = true; input.dispatchEvent(new Event('input', {bubbles: true})); passing = false; };
  document.addEventListener('input', e => { if (box(e) && !passing) e.stopImmediatePropagation(); }, true);
  document.addEventListener('blur', e => { if (box(e)) e.stopImmediatePropagation(); }, true);
  document.addEventListener('change', e => { if (box(e)) send(e.target); }, true);
  document.addEventListener('keydown', e => { if (box(e) && e.key === 'Enter') send(e.target); }, true);
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
