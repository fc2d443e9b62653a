"""The catalog both front ends steer with: what a key means, and what the model reads.

One place decides, for the app and the console alike:
* which feature a key names: a name in the vectors file or the profile, or "layer:index"
  of an SAE feature (read from the profile's SAE source on demand, its layer's norm
  measured on the model when the file has none);
* how a fraction of the layer's typical norm becomes a `SteeringComponent`, which op a
  feature uses when none is given (its own), and which fractions are allowed;
* how a `SteeringSpec` becomes components and back, and what a preset means (every
  preset is checked when the catalog is built).

What the model reads (`fit_chat`) is chat_input.py's.

    >>> cat = Catalog.open(profile, model, tok)
    >>> comps = cat.components(cat.spec({"pirate": (0.2, None)}))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_steering import models
from llm_steering.chat_input import fit_chat, message_text  # noqa: F401  (their old import site)
from llm_steering.config import (
    MAX_SPEC_BYTES,
    ActiveFeature,
    ConceptRecipe,
    FeatureConfig,
    GenerationDefaults,
    ModelProfile,
    SteeringSpec,
    load_config,
    parse_yaml_text,
)
from llm_steering.core import human_name, is_finite_number, parse_layer_index, round_fraction, short_repr
from llm_steering.steering import SteeringComponent
from llm_steering.vectors import SAE_HINT, SteeringVector, SteeringVectorSet, measure_layer_norms

CONCEPT_BUILDER: list[Any] = []  # concepts.py registers make_concept here (it sits above the catalog, beside extract.py)
CONCEPT_MEMO = 32  # concepts a catalog keeps built from specs' recipes (by recipe: the same recipe, the same vector)
FRACTION_RANGE = (-1.0, 2.0)  # in units of the layer's typical norm; widened to hold defaults and presets
RAW_DEFAULT = (0.5, "clamp")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "demo.yaml"  # the checkout's (the console's default too)  # fraction and op of an SAE feature the profile does not list


@dataclass(frozen=True)
class Feature:
    """A steerable direction of the catalog: its vector, its layer's norm and its defaults.

    `key` is what a spec stores: the name, or "layer:index" for an SAE feature the
    profile does not list.
    """

    key: str
    vector: SteeringVector
    norm: float
    default_fraction: float
    default_op: str
    description: str = ""
    label: str = ""  # demo.yaml's label; "" = made from the key

    @property
    def name(self) -> str:
        return self.vector.name

    @property
    def title(self) -> str:
        """The name people read: "Eiffel Tower" for the key eiffel_tower."""
        return self.label or human_name(self.key)

    @property
    def layer(self) -> int:
        return self.vector.layer

    def component(self, fraction: float, op: str | None = None) -> SteeringComponent:
        """strength = fraction x the layer's typical norm; op None: the feature's own."""
        return SteeringComponent(
            layer=self.layer, vector=self.vector.vector, strength=fraction * self.norm,
            op=op or self.default_op, name=self.name,
        )


@dataclass(frozen=True)
class FoundFeatureLink:
    """A feature found from text: its key (one /steer or one click away), activations, dashboard link."""

    key: str
    layer: int
    index: int
    mean: float
    max: float
    url: str | None


@dataclass
class Catalog:
    """A profile's features, resolved against its vectors file, its SAE source and the model.

        >>> cat = Catalog.open(profile, model, tok)         # or Catalog(profile, vectors) before the model loads
        >>> cat.resolve("pirate").component(0.2)
    """

    profile: ModelProfile
    vectors: SteeringVectorSet
    model: Any = None
    tokenizer: Any = None
    extracted: dict[tuple[int, int], SteeringVector] = field(default_factory=dict)
    measured_norms: dict[int, float] = field(default_factory=dict)
    built: dict[str, SteeringVector] = field(default_factory=dict)  # concept recipe (JSON) -> its vector, for_spec's memo
    file_only: bool = False  # features come from the vectors file only (the server: no SAE read per request)

    @classmethod
    def open(cls, profile: ModelProfile, model: Any, tokenizer: Any) -> Catalog:
        """The profile's catalog for a loaded model; every feature and preset is checked now.

        Without a vectors file, a profile with an SAE source has its features extracted
        now; a file made for another model is an error.
        """
        catalog = cls(profile, load_profile_vectors(profile, model, tokenizer))
        catalog.attach(model, tokenizer)
        for feat in profile.features:
            catalog.resolve(feat.name if catalog.in_file(feat.name) else feat_key(feat))
        for preset in profile.presets:
            for item in preset.features:
                try:
                    catalog.check_fraction(catalog.resolve(item.key), item.fraction)
                except ValueError as exc:
                    raise ValueError(f"preset {preset.name!r} in {profile.name!r}: {exc}") from None
        return catalog

    def attach(self, model: Any, tokenizer: Any) -> None:
        """Give the catalog the model: vectors must fit it, and it measures missing norms."""
        if self.vectors.model_id != models.model_id_of(model) or self.vectors.hidden_size != models.hidden_size(model):
            raise ValueError(
                f"{self.profile.vectors_path().name} holds vectors for {self.vectors.model_id!r} "
                f"(hidden size {self.vectors.hidden_size}), but profile {self.profile.name!r} runs "
                f"{models.model_id_of(model)!r} (hidden size {models.hidden_size(model)}): extract vectors for this model"
            )
        self.model, self.tokenizer = model, tokenizer

    # -- keys ------------------------------------------------------------------

    @functools.cached_property
    def features(self) -> list[Feature]:
        """The profile's features, in demo.yaml's order, then the user's own concepts (resolved once)."""
        shipped = [self.resolve(f.name if self.in_file(f.name) else feat_key(f)) for f in self.profile.features]
        return shipped + [self.resolve(name) for name in self.concepts]

    # -- the user's own concepts (concepts.py makes them) ---------------------------

    @property
    def concepts(self) -> dict[str, ConceptRecipe]:
        """{name: recipe} of the user's own concepts in this catalog (vectors that carry a recipe)."""
        return {v.name: recipe for v in self.vectors.vectors if (recipe := recipe_of(v)) is not None}

    def with_concepts(self, vectors: Sequence[SteeringVector]) -> Catalog:
        """A catalog with these concept vectors added (same name: replaced), sharing the model, its norms
        and extracted SAE features; this one is left as it was (a session's concepts stay its own)."""
        for vec in vectors:
            if recipe_of(vec) is None:
                raise ValueError(f"{vec.name!r} is not a concept (it has no recipe): make it with concepts.make_concept")
            if self.profile_feature(vec.name) is not None or (self.in_file(vec.name) and vec.name not in self.concepts):
                raise ValueError(f"the name {vec.name!r} is taken by a feature of profile {self.profile.name!r}: "
                                 "give your concept another name")
        added = SteeringVectorSet(self.vectors.model_id, self.vectors.hidden_size, list(vectors))
        return Catalog(self.profile, self.vectors.merged(added), self.model, self.tokenizer, self.extracted,
                       self.measured_norms, self.built, self.file_only)

    def for_spec(self, spec: SteeringSpec) -> Catalog:
        """This catalog, or a new one with the concepts `spec` carries built from their recipes (a share
        link, an imported file, another session's export). Built vectors are kept per recipe
        (CONCEPT_MEMO of them), never listed here: a concept reaches only the answers whose spec carries it."""
        import json

        missing = [r for r in spec.concepts if self.concepts.get(r.name) != r]
        if not missing:
            return self
        if not CONCEPT_BUILDER:
            raise ValueError(f"this steering carries your own concept {missing[0].name!r}, which this program cannot "
                             "build: import llm_steering.concepts")
        vectors = []
        for recipe in missing:
            memo = json.dumps(recipe.to_dict(), sort_keys=True)
            if memo not in self.built:
                while len(self.built) >= CONCEPT_MEMO:
                    self.built.pop(next(iter(self.built)))
                self.built[memo] = CONCEPT_BUILDER[0](self, recipe).vector
            vectors.append(self.built[memo])
        return self.with_concepts(vectors)

    def top_tokens(self, key: str, k: int = 8) -> Any:
        """The logit lens of a feature's direction: the tokens it promotes and suppresses most through the
        model's own final norm and unembedding (lens.top_tokens; cached). The cards show `feature_tokens`."""
        from llm_steering.lens import top_tokens

        if self.model is None:
            raise ValueError("the tokens a feature promotes need the model: load it first")
        return top_tokens(self.model, self.tokenizer, self.resolve(key).vector.vector, k)

    def feature_tokens(self, key: str, k: int = 8) -> Any:
        """What a feature does, as the cards and /features show it (lens.feature_tokens): the tokens its
        steering at its default raises and lowers, measured, or the logit lens where that reads
        (lens.lens_reads); the TokenLens's `.how` says which. Cached."""
        from llm_steering.lens import feature_tokens

        if self.model is None:
            raise ValueError("the tokens a feature promotes need the model: load it first")
        return feature_tokens(self.model, self.tokenizer, self.resolve(key), k)

    def in_file(self, key: str) -> SteeringVector | None:
        try:
            return self.vectors.get(key)
        except ValueError:
            return None

    def check(self, key: str) -> None:
        """Raise ValueError now for a key that can never resolve (no model needed)."""
        if self.in_file(key) is None and self.profile_feature(key) is None:
            self._sae_key(key)

    def resolve(self, key: str) -> Feature:
        """The feature a name or "layer:index" names; a one-line ValueError when there is none."""
        key = key.strip() if isinstance(key, str) else key
        vector = self.in_file(key)
        config = self.profile_feature(key) if vector is None else None
        if vector is None and config is not None and config.index is not None:
            vector = self.in_file(f"{config.layer}:{config.index}")
        layer_index = parse_layer_index(key)
        if vector is None:
            if config is not None and config.index is not None:
                layer_index = (config.layer, config.index)
            else:
                layer_index = self._sae_key(key)
            vector = self._extract(*layer_index)
        config = config or self._config_for(vector)
        norm = self.norm(vector.layer)
        if config is not None:
            if config.layer != vector.layer:
                raise ValueError(f"feature {config.name!r} is at layer {config.layer} in demo.yaml but {vector.layer} in the vector file")
            default_fraction, op, description = config.strength / norm, config.op, config.description
            canonical, label = config.name, config.label
        else:
            meta = vector.metadata  # a concept records its own default (concepts.py says where it comes from)
            default_fraction, op = (float(meta["default_fraction"]), str(meta.get("default_op", "add"))) \
                if is_finite_number(meta.get("default_fraction")) else RAW_DEFAULT
            description = vector.description
            canonical = f"{layer_index[0]}:{layer_index[1]}" if layer_index else vector.name
            label = ""
            target = meta.get("learned_for")  # a direction learned for a feature (auto's candidates): "Ocean (learned)"
            if isinstance(target, str) and target != vector.name and self.in_file(target) is not None:
                base = self.profile_feature(target)
                label = f"{base.label if base is not None and base.label else human_name(target)} (learned)"
        return Feature(canonical, vector, norm, default_fraction, op, description, label)

    def profile_feature(self, key: str) -> FeatureConfig | None:
        for feat in self.profile.features:
            if feat.name == key:
                return feat
        return None

    def norm(self, layer: int) -> float:
        """The typical residual norm after `layer`: from the file, else measured on the model."""
        if layer in self.vectors.layer_norms:
            return self.vectors.layer_norms[layer]
        if layer not in self.measured_norms:
            if self.model is None:
                return self.vectors.norm(layer)  # the file's one-line error
            self.measured_norms.update(measure_layer_norms(self.model, self.tokenizer, [layer]))
        return self.measured_norms[layer]

    # -- fractions, specs, components -----------------------------------------

    def fraction_range(self, feature: Feature) -> tuple[float, float]:
        """Allowed fractions: FRACTION_RANGE widened to hold the default and every preset's value."""
        values = [feature.default_fraction] + [
            f.fraction for p in self.profile.presets for f in p.features if self._same(f.key, feature)
        ]
        lo, hi = FRACTION_RANGE
        return min(lo, math.floor(min(values) * 2) / 2), max(hi, math.ceil(max(values) * 2) / 2)

    def auto_max_multiplier(self, feature: Feature, fraction: float) -> float | None:
        """How many times `fraction` auto may steer `feature` and stay in its strength range (None: no bound)."""
        lo, hi = self.fraction_range(feature)
        bound = hi if fraction > 0 else lo
        return bound / fraction if fraction and bound / fraction > 0 else None

    def check_fraction(self, feature: Feature, fraction: Any) -> float:
        """`fraction` as a float if allowed for `feature`, else a one-line ValueError."""
        lo, hi = self.fraction_range(feature)
        if not is_finite_number(fraction) or not lo <= fraction <= hi:
            raise ValueError(
                f"strength {short_repr(fraction)} for {feature.key} is out of range: use a fraction of the layer's "
                f"typical norm from {lo:g} to {hi:g} (0.5 = half)"
            )
        return float(fraction)

    def spec(self, active: dict[str, tuple[float, str | None]], steer_prompt: bool = True) -> SteeringSpec:
        """A SteeringSpec for this model from {key: (fraction, op or None)}."""
        features = tuple(ActiveFeature(key, round_fraction(frac), op) for key, (frac, op) in active.items())
        recipes = tuple(r for name, r in self.concepts.items() if name in active)  # what rebuilds them elsewhere
        return SteeringSpec(model_id=self.vectors.model_id, features=features, steer_prompt=bool(steer_prompt),
                            concepts=recipes)

    def active(self, spec: SteeringSpec) -> dict[str, tuple[Feature, float, str]]:
        """{feature key: (feature, fraction, op)} for a spec, every part checked; for this model only.
        The concepts the spec carries are built from their recipes (for_spec)."""
        if spec.model_id != self.vectors.model_id:
            raise ValueError(
                f"this steering is for {spec.model_id!r}, but this chat runs {self.vectors.model_id!r}: "
                "choose the profile for that model"
            )
        if (catalog := self.for_spec(spec)) is not self:
            return catalog.active(spec)
        out: dict[str, tuple[Feature, float, str]] = {}
        for item in spec.features:
            feature = self.resolve(item.key)
            out[feature.key] = (feature, self.check_fraction(feature, item.fraction), item.op or feature.default_op)
        return out

    def components(self, spec: SteeringSpec) -> list[SteeringComponent]:
        """The components a spec asks for (ops default to each feature's own)."""
        comps = [feature.component(fraction, op) for feature, fraction, op in self.active(spec).values()]
        if self.model is not None:
            from llm_steering.steering import validate_components

            validate_components(self.model, comps)
        return comps

    def preset_spec(self, name: str) -> SteeringSpec:
        for preset in self.profile.presets:
            if preset.name == name:
                return SteeringSpec(self.vectors.model_id, preset.features, preset.steer_prompt)
        names = ", ".join(p.name for p in self.profile.presets) or "none"
        raise ValueError(f"no preset {short_repr(name)}; presets: {names}")

    def parse_steering(self, text: str) -> SteeringSpec:
        """A preset name, a steering spec as JSON/YAML text (bounded, no aliases), or "" for none."""
        text = (text or "").strip() if isinstance(text, str) else text
        if not isinstance(text, str):
            raise ValueError("steering must be text: a preset name, a steering spec as JSON, or empty")
        if not text or text == "None":
            return SteeringSpec(self.vectors.model_id, ())
        if any(p.name == text for p in self.profile.presets):
            return self.preset_spec(text)
        data = parse_yaml_text(text, "the steering spec", MAX_SPEC_BYTES)  # bounded, no aliases
        if not isinstance(data, dict):
            names = ", ".join(p.name for p in self.profile.presets)
            raise ValueError(f"steering must be a preset name ({names}), a steering spec as JSON, or empty")
        return SteeringSpec.from_dict(data)

    def find(self, text: str, layers: Sequence[int] | None = None, k: int = 10) -> list[FoundFeatureLink]:
        """The SAE features that fire most on `text` (best first, by mean activation), each with
        its Neuronpedia link where one exists; `layers` default to the profile's SAE feature layers."""
        from llm_steering.saes import find_features, neuronpedia_url

        source = self.profile.sae_source
        if not source:
            raise ValueError(f"profile {self.profile.name!r} has no SAE to search: finding features needs an sae_source")
        if self.model is None:
            raise ValueError("finding features needs the model: load it first")
        layers = sorted(set(layers or [f.layer for f in self.profile.features if f.index is not None]))
        if not layers:
            raise ValueError("give a layer to search, e.g. /find 15 <text>")
        found = [f for layer in layers
                 for f in find_features(source, layer, text, self.model, self.tokenizer, k=k, sae_format=self.profile.sae_format)]
        found.sort(key=lambda f: (-f.mean, -f.max))
        return [FoundFeatureLink(f.key, f.layer, f.index, f.mean, f.max, neuronpedia_url(f.layer, f.index, source))
                for f in found[:k]]

    # -- helpers ---------------------------------------------------------------

    def _same(self, key: str, feature: Feature) -> bool:
        try:
            return self.resolve(key).name == feature.name
        except ValueError:
            return False

    def _config_for(self, vector: SteeringVector) -> FeatureConfig | None:
        for feat in self.profile.features:
            if feat.name == vector.name or (vector.index is not None and (feat.layer, feat.index) == (vector.layer, vector.index)):
                return feat
        return None

    def _sae_key(self, key: Any) -> tuple[int, int]:
        layer_index = parse_layer_index(key)
        names = ", ".join(dict.fromkeys([f.name for f in self.profile.features] + self.vectors.names)) or "none"
        if layer_index is None:
            raise ValueError(f"unknown feature {short_repr(key)}: use one of {names}")
        if not self.profile.sae_source:
            raise ValueError(
                f"feature {key} is not in {self.profile.vectors_path().name} and profile {self.profile.name!r} "
                f"has no SAE to extract it from: use one of {names}"
            )
        if self.model is not None and layer_index[0] >= models.num_layers(self.model):
            n = models.num_layers(self.model)
            raise ValueError(f"layer {layer_index[0]} is out of range: this model has {n} layers (0-{n - 1})")
        return layer_index

    def _extract(self, layer: int, index: int) -> SteeringVector:
        if self.file_only:
            raise ValueError(f"feature {layer}:{index} is not in this vectors file ({', '.join(self.vectors.names)}): "
                             "add it to the file with extract_steering_vectors.py")
        if (layer, index) not in self.extracted:
            self._sae_key(f"{layer}:{index}")
            from llm_steering.saes import extract_sae_features

            found = extract_sae_features(self.profile.sae_source, [(layer, index)], self.profile.sae_format)
            if self.model is not None and found[0].vector.numel() != models.hidden_size(self.model):
                raise ValueError(
                    f"SAE feature {layer}:{index} has size {found[0].vector.numel()}, but the model's hidden size is "
                    f"{models.hidden_size(self.model)}: this SAE is for another model"
                )
            self.extracted[(layer, index)] = found[0]
        return self.extracted[(layer, index)]


def catalog_for_vectors(vectors: SteeringVectorSet, profile: ModelProfile | None = None,
                        file_only: bool = False) -> Catalog:
    """A catalog without the model over a vectors file: `profile`, else demo.yaml's profile for the file's
    model (a bare one when there is none), so a spec means what it means in the app and the console.

        >>> comps = catalog_for_vectors(load_vectors("steering_vectors.pt")).components(spec)
    """
    return Catalog(profile or profile_for_model(vectors.model_id), vectors, file_only=file_only)


def spec_components(spec: SteeringSpec, vectors: SteeringVectorSet, profile: ModelProfile | None = None) -> list[SteeringComponent]:
    """The SteeringComponents a spec describes, resolved as the app and the console resolve it
    (Catalog.components: a feature without an op gets its own, fractions within its range).

        >>> comps = spec_components(load_steering_spec("pirate.json"), load_vectors("steering_vectors.pt"))
    """
    return catalog_for_vectors(vectors, profile).components(spec)


def profile_for_model(model_id: str | None, config_path: str | Path | None = None) -> ModelProfile:
    """demo.yaml's profile for `model_id` (the default profile's when several), else a bare profile."""
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    if path.is_file():
        config = load_config(path)
        names = [config.default_profile, *config.profiles]
        for name in dict.fromkeys(names):
            prof = config.profile(name)
            if (prof.model_id or models.EMBEDDED_MODEL_ID) == model_id:
                return prof
    return ModelProfile(name=str(model_id), model_id=model_id, vectors_file="", sae_source=None, sae_format=None,
                        reduced_strengths=False, features=(), presets=(), generation=GenerationDefaults(),
                        config_dir=path.parent)


def recipe_of(vector: SteeringVector) -> ConceptRecipe | None:
    """The recipe a concept's vector carries in its metadata (None: not a user's concept)."""
    import json

    text = vector.metadata.get("recipe")
    if not isinstance(text, str):
        return None
    try:
        return ConceptRecipe.from_dict(json.loads(text))
    except ValueError:  # json.JSONDecodeError is a ValueError too
        return None


def feat_key(feat: FeatureConfig) -> str:
    """The key a profile feature is found by in a vectors file: its name, or its layer:index."""
    return f"{feat.layer}:{feat.index}" if feat.index is not None else feat.name


def vectors_hint(profile: ModelProfile) -> str:
    """The command that creates a profile's vectors file."""
    path = profile.vectors_path()
    if profile.sae_source:
        wanted = " ".join(feat_key(f) for f in profile.features if f.index is not None) or "LAYER:INDEX"
        model = f" --model {profile.model_id}" if profile.model_id else ""
        return SAE_HINT.format(source=profile.sae_source, features=wanted, path=path) + model
    return f"python extract_steering_vectors.py --contrastive concepts.yaml --output {path}"


def load_profile_vectors(profile: ModelProfile, model: Any, tokenizer: Any) -> SteeringVectorSet:
    """The profile's vectors file; without one, its SAE features extracted now (with layer norms)."""
    path = profile.vectors_path()
    if path.is_file() or not profile.sae_source:
        return SteeringVectorSet.load(path, create_hint=vectors_hint(profile))
    from llm_steering.saes import extract_sae_features

    wanted = [(f.layer, f.index) for f in profile.features if f.index is not None]
    found = extract_sae_features(profile.sae_source, wanted, profile.sae_format)
    norms = measure_layer_norms(model, tokenizer, sorted({v.layer for v in found}))
    return SteeringVectorSet(models.model_id_of(model), models.hidden_size(model), found, norms)
