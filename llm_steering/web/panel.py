"""The steering controls of the app as one object: which widgets there are, in which order gradio
passes their values, and what each value means, by name.

Gradio hands a handler its inputs as a flat list and takes its outputs as one. Nothing outside this
module counts positions: a handler reads `panel.read(values)["pirate", "fraction"]`, and answers
with `panel.updates({("pirate", "on"): True, ...})`, every control it does not name left as it is.

    >>> panel = ControlPanel(catalog.features)
    >>> values = panel.read(panel.pack({("pirate", "on"): True}))    # every other control at its default
    >>> values.enabled()
    ['pirate']

Adding a per-feature control is one entry in FEATURE_CONTROLS (its name, its default, and the
widget `render` makes for it) plus the code that uses its value.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llm_steering.catalog import Feature
from llm_steering.core import format_fraction, round_fraction
from llm_steering.lens import token_words
from llm_steering.web.views import FractionSlider, strength_label

import gradio as gr

CUSTOM = "+custom"  # the owner of the custom feature's controls (not a valid feature key)
GLOBAL = "+global"  # the owner of the controls that belong to no feature
OPS = ["clamp", "add"]


@dataclass(frozen=True)
class Control:
    """One kind of control: its field name, its default for a feature, and the widget that shows it."""

    field: str
    default: Callable[[Any], Any]
    widget: Callable[[Any], Any]


def _slider(feature: Feature, catalog: Any) -> Any:
    default = feature.default_fraction
    return FractionSlider(*catalog.fraction_range(feature), value=round_fraction(default), step=0.001,
                          label="strength", elem_classes="strength", interactive=not auto_by_default(catalog),
                          info=f"default {format_fraction(default)} ({strength_label(feature, default)})")


def auto_by_default(catalog: Any) -> bool:
    """Whether a switched-on feature starts with "auto" ticked: the profile's generation.auto."""
    profile = getattr(catalog, "profile", None)
    return bool(profile is not None and profile.generation.auto)


# The per-feature controls, in the order they are listed to gradio. `on` is drawn as the card's
# title by `render`; the others go into the card's details, shown while the feature is on.
FEATURE_CONTROLS = (
    Control("on", lambda f: False, lambda f, c: gr.Checkbox(label=f.title, info=f.description, value=False,
                                                           elem_classes="feature-on")),
    Control("fraction", lambda f: f.default_fraction, _slider),
    Control("op", lambda f: f.default_op, lambda f, c: gr.Radio(OPS, value=f.default_op, show_label=False, scale=2,
                                                                min_width=150)),
    Control("auto", lambda f: False, lambda f, c: gr.Checkbox(
        label="auto strength", value=auto_by_default(c), scale=1, min_width=130,
        info="chosen per answer: several ways tried on its first words, one that still answers kept")),
    Control("keepnorm", lambda f: False, lambda f, c: gr.Checkbox(label="keep the norm", value=False, scale=1,
                                                                  min_width=130)),
)
def feature_tokens(feature: Feature, catalog: Any, n: int = 8) -> str:
    """A card's line of what the feature does (catalog.feature_tokens: measured at its default, or the
    logit lens where that reads)."""
    return lens_line(catalog.feature_tokens(feature.key, n))


def lens_line(lens: Any) -> str:
    """The tokens a lens.TokenLens lists, as a card's line that says where they come from: "raises: ... ·
    lowers: ... (measured at the default)" or "pushes up: ... · down: ... (logit lens)"."""
    up, down = (html.escape(", ".join(token_words(t))) for t in (lens.promoted, lens.suppressed))
    if getattr(lens, "measured", False):
        return (f"<span class='muted'>raises: <b>{up}</b> · lowers: {down} "
                "<i>(measured at its default)</i></span>")
    return f"<span class='muted'>pushes up: <b>{up}</b> · down: {down} <i>(logit lens)</i></span>"


KEEPNORM = "_keepnorm"  # the op suffix the "keep the norm" box adds (add_keepnorm, clamp_keepnorm)
CUSTOM_DEFAULTS = {"on": False, "key": None, "fraction": 0.5, "op": "clamp", "auto": False}
GLOBAL_DEFAULTS = {"steer_prompt": True, "concepts": ""}  # concepts: the session's own (concept_panel.py)


class PanelValues(dict):
    """The controls' values by (owner, field): owner a feature key, CUSTOM or GLOBAL."""

    def __init__(self, features: Sequence[Feature], items: Iterable[tuple[tuple[str, str], Any]]) -> None:
        super().__init__(items)
        self.features = list(features)

    def enabled(self) -> list[str]:
        """The keys of the switched-on features, in the catalog's order."""
        return [f.key for f in self.features if self[f.key, "on"]]

    def custom_key(self) -> str | None:
        """The custom feature's key when it is switched on and named, else None."""
        key = str(self[CUSTOM, "key"] or "").strip()
        return key if self[CUSTOM, "on"] and key else None

    def op(self, key: str) -> str:
        """A feature's op as its controls say: its op radio, with "_keepnorm" when its norm box is ticked."""
        return self[key, "op"] + (KEEPNORM if self[key, "keepnorm"] else "")

    @property
    def steer_prompt(self) -> bool:
        return bool(self[GLOBAL, "steer_prompt"])


class ControlPanel:
    """The app's steering controls for a catalog's features: their names, order, defaults and widgets."""

    def __init__(self, features: Sequence[Feature], auto: bool = False) -> None:
        self.features = list(features)
        self.auto = auto  # the "auto" boxes start ticked (the profile's generation.auto)
        self.names: list[tuple[str, str]] = [(f.key, c.field) for f in self.features for c in FEATURE_CONTROLS]
        self.names += [(CUSTOM, field) for field in CUSTOM_DEFAULTS] + [(GLOBAL, field) for field in GLOBAL_DEFAULTS]
        self.widgets: dict[tuple[str, str], Any] = {}

    def __len__(self) -> int:
        return len(self.names)

    def defaults(self) -> dict[tuple[str, str], Any]:
        out = {(f.key, c.field): c.default(f) for f in self.features for c in FEATURE_CONTROLS}
        out.update({(f.key, "auto"): self.auto for f in self.features})
        out.update({(CUSTOM, k): v for k, v in CUSTOM_DEFAULTS.items()})
        out[CUSTOM, "auto"] = self.auto
        out.update({(GLOBAL, k): v for k, v in GLOBAL_DEFAULTS.items()})
        return out

    def read(self, values: Sequence[Any]) -> PanelValues:
        """The values gradio passed (in `inputs()` order), by name."""
        if len(values) != len(self.names):
            raise ValueError(f"the steering controls sent {len(values)} values, expected {len(self.names)}")
        return PanelValues(self.features, zip(self.names, values, strict=True))

    def pack(self, values: dict[tuple[str, str], Any]) -> list[Any]:
        """The inputs a handler would get: `values` by name, every other control at its default."""
        self._check(values)
        merged = {**self.defaults(), **values}
        return [merged[name] for name in self.names]

    def updates(self, values: dict[tuple[str, str], Any]) -> list[Any]:
        """A handler's outputs for every control (in `inputs()` order): `values` by name, the rest unchanged."""
        self._check(values)
        return [values.get(name, gr.skip()) for name in self.names]

    def skip(self) -> list[Any]:
        return [gr.skip()] * len(self.names)

    def inputs(self) -> list[Any]:
        """The widgets, in the order gradio passes their values (after `render`)."""
        return [self.widgets[name] for name in self.names]

    def widget(self, owner: str, field: str) -> Any:
        return self.widgets[owner, field]

    def _check(self, values: dict[tuple[str, str], Any]) -> None:
        unknown = [name for name in values if name not in set(self.names)]
        if unknown:
            raise KeyError(f"no steering control {unknown[0]!r}")

    # -- the widgets (inside a gr.Blocks) ---------------------------------------------------------

    def render_feature(self, feature: Feature, catalog: Any) -> Any:
        """One feature's card: its on-box as the title, the other controls folded until it is on."""
        first, *rest = FEATURE_CONTROLS
        with gr.Group(elem_classes="feature"):
            on = self.widgets[feature.key, first.field] = first.widget(feature, catalog)
            with gr.Column(elem_classes="feature-details", visible=False) as details:
                slider, *row = rest
                self.widgets[feature.key, slider.field] = slider.widget(feature, catalog)
                with gr.Row(elem_classes="feature-row"):
                    for control in row:
                        self.widgets[feature.key, control.field] = control.widget(feature, catalog)
                gr.Markdown(feature_tokens(feature, catalog), elem_classes="feature-tokens")  # what it does (lens.py)
        on.change(lambda checked: gr.update(visible=checked), on, details, queue=False, api_visibility="private")
        auto, slider = self.widgets[feature.key, "auto"], self.widgets[feature.key, "fraction"]
        auto.change(lambda ticked: gr.update(interactive=not ticked), auto, slider, queue=False,
                    api_visibility="private")  # auto picks the strength: the slider is not used
        return on

    def render_custom(self, visible: bool, sae_source: str | None, vectors_file: str, extra_names: list[str]) -> None:
        """The "Another feature" card: an SAE feature by layer:index, or another vector of the file by name."""
        with gr.Group(elem_classes="feature", visible=visible, elem_id="custom") as self.custom_group:
            self.widgets[CUSTOM, "on"] = gr.Checkbox(
                label="Another feature", value=False, elem_id="custom-on",
                info="an SAE feature by layer:index" if sae_source else f"a vector of {vectors_file} by name")
            with gr.Column(elem_classes="feature-details", visible=False) as details:  # unfolded when ticked
                with gr.Row(elem_classes="feature-row"):
                    self.widgets[CUSTOM, "key"] = gr.Dropdown(
                        extra_names, value=None, allow_custom_value=True, elem_id="custom-key", scale=2, min_width=140,
                        label="layer:index (e.g. 15:21576)" if sae_source else "name")
                    self.widgets[CUSTOM, "op"] = gr.Radio(OPS, value="clamp", label="how", scale=1, min_width=110)
                    self.widgets[CUSTOM, "auto"] = gr.Checkbox(label="auto strength", value=self.auto, scale=1,
                                                               min_width=130, elem_id="custom-auto")
                self.widgets[CUSTOM, "fraction"] = FractionSlider(-1.0, 2.0, value=0.5, step=0.001, label="strength",
                                                                  elem_id="custom-strength", elem_classes="strength")
        self.widgets[CUSTOM, "on"].change(lambda checked: gr.update(visible=checked), self.widgets[CUSTOM, "on"],
                                          details, queue=False, api_visibility="private")

    def render_steer_prompt(self) -> Any:
        self.widgets[GLOBAL, "steer_prompt"] = gr.Checkbox(label="Steer the prompt too (not only the answer)",
                                                           value=True)
        return self.widgets[GLOBAL, "steer_prompt"]
