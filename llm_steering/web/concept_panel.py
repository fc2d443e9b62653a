"""The app's "Make your own concept" panel, and the session's own concepts.

A visitor gives a name and a few example sentences (a topic, a style or a persona); the concept's
vector is made in-process in a second or two (concepts.make_concept, the extractor's code) and
switched on in the custom card at its default. The session's concepts live in one hidden control of
the steering panel (GLOBAL "concepts": their recipes as JSON), so every handler that reads the
controls builds them through `session_catalog`, and every spec made from the controls carries the
recipe (export, import, share links rebuild it). Nothing is added to the shared catalog: another
visitor's answers never see a concept unless their own steering carries it.

    >>> render(app, w); events(app, w)     # inside build_demo
    >>> session_catalog(app, values).resolve("my_tower")
"""

from __future__ import annotations

import functools
import html
import json
import time
from types import SimpleNamespace
from typing import Any

from llm_steering.catalog import Catalog
from llm_steering.concepts import TEMPLATES
from llm_steering.config import MAX_SPEC_BYTES, SteeringSpec, parse_yaml_text
from llm_steering.core import format_fraction, round_fraction
from llm_steering.recipe import CONCEPT_LIMITS, ConceptRecipe
from llm_steering.web.app import ON_ZERO_GPU, App, concept_on_gpu, user_errors
from llm_steering.web.panel import CUSTOM, GLOBAL, PanelValues, lens_line

import gradio as gr

CONCEPTS = "concepts"  # the GLOBAL control that holds this session's recipes (panel.GLOBAL_DEFAULTS)
HIDDEN = {"api_visibility": "private"}


def stored(values: PanelValues) -> list[ConceptRecipe]:
    """The session's recipes from its hidden control (bounded, checked: it comes from the browser)."""
    text = values.get((GLOBAL, CONCEPTS)) or ""
    if not text:
        return []
    data = parse_yaml_text(text, "your concepts", MAX_SPEC_BYTES)
    if not isinstance(data, list) or len(data) > CONCEPT_LIMITS["per_spec"]:
        raise ValueError(f"your concepts must be a list of at most {CONCEPT_LIMITS['per_spec']}: make them again")
    return [ConceptRecipe.from_dict(item) for item in data]


def session_catalog(app: App, values: PanelValues) -> Catalog:
    """The shared catalog with the session's concept in the custom card built in (memoised per recipe)."""
    key = values.custom_key()
    wanted = tuple(r for r in stored(values) if r.name == key)
    return app.catalog.for_spec(SteeringSpec(app.model_id, (), concepts=wanted)) if wanted else app.catalog


def as_value(recipes: list[ConceptRecipe] | tuple[ConceptRecipe, ...]) -> str:
    """The hidden control's value for these recipes."""
    return json.dumps([r.to_dict() for r in recipes], ensure_ascii=False)


def render(app: App, w: SimpleNamespace) -> None:
    """The panel (in the find slot, closed so that the page stays one screen tall) and the session's hidden store."""
    app.panel.widgets[GLOBAL, CONCEPTS] = gr.Textbox(visible=False, elem_id="concepts-store")
    example = TEMPLATES["topic"].example
    with gr.Accordion("Make your own concept", open=False, elem_id="concept"):
        gr.Markdown("<span class='muted'>A name and a few example sentences (one a line): the concept is "
                    "made in seconds and switched on below, in the last card.</span>")
        with gr.Row():
            w.concept_name = gr.Textbox(label="Name", placeholder="my_tower", scale=2, min_width=120,
                                        elem_id="concept-name")
            w.concept_template = gr.Radio(list(TEMPLATES), value="topic", label="It is a", scale=3, min_width=200,
                                          elem_id="concept-template")
        w.concept_text = gr.Textbox(label="Example sentences", lines=5, max_lines=20, placeholder="\n".join(example),
                                    elem_id="concept-text")
        w.concept_make = gr.Button("Make it and switch it on", size="sm", variant="primary", elem_id="concept-make")
        w.concept_note = gr.Markdown(elem_id="concept-note")


def events(app: App, w: SimpleNamespace) -> None:
    """The button, the template's placeholder, and the custom card shown whenever it is switched on."""
    controls = app.panel.inputs()
    w.concept_make.click(functools.partial(make, app), [w.concept_name, w.concept_template, w.concept_text, *controls],
                         [*controls, w.concept_note], **HIDDEN)
    w.concept_template.change(lambda t: gr.update(placeholder="\n".join(TEMPLATES[t].example)), w.concept_template,
                              w.concept_text, queue=False, **HIDDEN)
    on = app.panel.widget(CUSTOM, "on")
    on.change(lambda checked: gr.update(visible=True) if checked else gr.skip(), on, app.panel.custom_group,
              queue=False, **HIDDEN)


def make(app: App, name: str, template: str, text: str, *controls: Any) -> list:
    """The button: the concept made from the sentences, switched on in the custom card at its default."""
    started = time.monotonic()
    with user_errors("Making the concept failed"):
        values = app.panel.read(controls)
        recipe = ConceptRecipe(str(name or "").strip(), tuple(str(text or "")[:20_000].splitlines()),
                               template or "topic")
        kept = [r for r in stored(values) if r.name != recipe.name][-(CONCEPT_LIMITS["per_spec"] - 1):] + [recipe]
        # on a ZeroGPU Space the model runs only in the GPU function's worker (the loaded catalog there)
        feature, lens = concept_on_gpu(recipe) if ON_ZERO_GPU else concept_on_gpu(recipe, app.catalog)
        tokens = lens_line(lens)
    fraction = round_fraction(feature.default_fraction)
    note = (f"**{html.escape(feature.title)}** is on below at {format_fraction(fraction)} ({feature.default_op}, "
            f"layer {feature.layer}), made from {len(recipe.sentences)} sentences in "
            f"{time.monotonic() - started:.1f} s. {tokens}")
    updates = app.panel.updates({(CUSTOM, "on"): True, (CUSTOM, "key"): feature.key, (CUSTOM, "fraction"): fraction,
                                 (CUSTOM, "op"): feature.default_op, (GLOBAL, CONCEPTS): as_value(kept)})
    return [*updates, note]
