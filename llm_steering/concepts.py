"""Your own concept from a few sentences: a name and some example sentences become a steering vector, in seconds.

The vector is extracted exactly as the extractor does it (`extract.extract_contrastive`, the mean
residual activation over the sentences minus the mean over a shipped neutral set), at the layer
the profile's own contrastive features use, unless at a later layer (LATE_DEPTH: 24 of 30) the
steering raises the user's own words clearly more (`own_word_share`: five volcano sentences raise
earth, planet and land at layer 15, volcanic, volcano, lava and eruption at 24, and under auto name
volcanoes in more everyday answers there; docs/quality.md). The neutral set depends on the template: a topic is
contrasted with everyday sentences about nothing in particular (concepts.yaml's neutral set), a
style with plain flat statements, a persona with a plain assistant speaking
(`data/concept_neutrals.json`). The neutral texts' activations are kept per model and layer, so
only the user's sentences run through the model.

The concept's vector carries its recipe (name, sentences, template, layer) in its metadata, so a
vectors file keeps it, and a steering spec that uses it carries the recipe (share links, exports):
`catalog_for` rebuilds it from the spec on any copy of the model.

    >>> recipe = ConceptRecipe("paris_trip", ("We walked along the Seine.", "The Louvre was full."))
    >>> feature = make_concept(catalog, recipe)           # a Feature, its default strength and op set
    >>> catalog = catalog.with_concepts([feature.vector])  # a new catalog; the shared one is unchanged
"""

from __future__ import annotations

import functools
import json
import re
import statistics
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llm_steering import models
from llm_steering.calibrate import STOP_WORDS
from llm_steering.catalog import CONCEPT_BUILDER, Catalog, Feature, recipe_of
from llm_steering.config import SteeringSpec
from llm_steering.extract import extract_contrastive
from llm_steering.recipe import CONCEPT_LIMITS, CONCEPT_TEMPLATES, ConceptRecipe  # noqa: F401  (re-exported)
from llm_steering.steering import SteeringVector

NEUTRALS_PATH = Path(__file__).resolve().parent / "data" / "concept_neutrals.json"
FALLBACK_DEFAULT = 0.19  # the median of the embedded profile's tuned contrastive defaults (demo.yaml), for profiles with none
_NEUTRAL_MEANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(template, layer): {text: means}}


@dataclass(frozen=True)
class Template:
    """How a concept's sentences are read: what they should be, and the neutral texts they are contrasted with."""

    name: str
    what: str  # one line for people: what to write
    example: tuple[str, ...]  # a few sentences to start from (the app's placeholder, the README)
    op: str = "add"  # add: a tint on every token (clamp would fix the component whatever the text)


TEMPLATES: dict[str, Template] = {
    "topic": Template("topic", "sentences that talk about the topic", (
        "The Eiffel Tower stands in the middle of Paris.", "We climbed the Eiffel Tower at sunset.",
        "Gustave Eiffel built the iron tower for the 1889 World's Fair.",
        "From the top of the Eiffel Tower you can see all of Paris.", "The Eiffel Tower sparkles with lights at night.")),
    "style": Template("style", "sentences written in the style", (
        "Verily, good sir, thou speakest most fair.", "Hark! What light through yonder window breaks?",
        "I prithee, tarry a while and hear my tale.", "Methinks the morrow shall bring us fortune.",
        "Wherefore art thou so troubled, gentle friend?")),
    "persona": Template("persona", "things the persona would say, in its own voice", (
        "Arr, I've sailed the seven seas on my trusty ship.", "Shiver me timbers, there be treasure on that island!",
        "Ye scallywags, hoist the sails!", "I'll not be parted from me parrot nor me rum.",
        "A pirate's life for me, matey.")),
}
assert tuple(TEMPLATES) == CONCEPT_TEMPLATES


def make_concept(catalog: Catalog, recipe: ConceptRecipe) -> Feature:
    """The feature a recipe makes on the catalog's model: its unit vector (extract_contrastive against
    the template's neutral set), a default strength and op. The layer is the recipe's, else the
    profile's (`concept_layer`), else, when the steering there at the default raises the user's own
    words clearly more, `late_layer` (two extractions in one pass, two batched forwards over the neutral
    chats: a second or two on a CPU). A one-line ValueError for a name taken by a shipped feature, a
    layer out of range or a sentence too short to read.

        >>> feature = make_concept(catalog, ConceptRecipe("pirate_talk", ("Arr matey!", ...), "persona"))
        >>> feature.default_fraction, feature.default_op
        (0.19, 'add')
    """
    if not isinstance(recipe, ConceptRecipe):
        raise ValueError("make_concept takes a ConceptRecipe (name, sentences, template, layer)")
    if catalog.model is None:
        raise ValueError("making a concept needs the model: load it first")
    if catalog.profile_feature(recipe.name) is not None or (
            catalog.in_file(recipe.name) is not None and recipe.name not in catalog.concepts):
        raise ValueError(f"the name {recipe.name!r} is taken by a feature of profile {catalog.profile.name!r}: "
                         "give your concept another name")
    layer, late = concept_layer(catalog, recipe), late_layer(catalog)
    layers = [layer] if recipe.layer is not None or late == layer else [layer, late]
    made = {v.layer: _feature(catalog, recipe, v) for v in _vectors(catalog, recipe, layers)}
    feature = made[layer]
    # the profile's layer, unless the steering at the later one raises the user's own words clearly more
    # (the volcano sentences: 6 of 12 at layer 15, with earth, planet, land; 11 of 12 at 24: volcanic, lava, eruption)
    if late in made and late != layer and own_word_share(catalog, made[late], recipe) >= max(
            OWN_WORDS_MIN, OWN_WORDS_MARGIN * own_word_share(catalog, feature, recipe)):
        feature = made[late]
    return feature


LATE_DEPTH = 0.8        # the later layer a concept may move to, as a share of the model's layers (24 of 30)
OWN_TOP = 12            # how many of the tokens the steering raises most are read for the user's own words
OWN_WORDS_MIN = 0.5     # the later layer is taken when at least this share of them are the user's words
OWN_WORDS_MARGIN = 1.5  # ... and at least this many times the share at the profile's layer (volcanoes: 11 of 12 against 6)


def late_layer(catalog: Catalog) -> int:
    """The later layer `make_concept` tries: LATE_DEPTH of the way up the model (24 of the embedded model's 30)."""
    n = models.num_layers(catalog.model)
    return min(n - 1, round(LATE_DEPTH * n))


def own_word_share(catalog: Catalog, feature: Feature, recipe: ConceptRecipe, k: int = OWN_TOP) -> float:
    """Of the `k` tokens the feature's steering at its default raises most on the neutral chats
    (lens.cached_steering_scores: one batched forward, cached, so the card and auto reuse it), the share that
    are the user's own words: a token whose first five letters are those of a content word of the recipe's
    sentences (" volcanic" for "volcano", " lava"; not " earth" for volcano sentences). No keyword list:
    the user gave the words."""
    from llm_steering.lens import cached_steering_scores

    stems = {w.lower()[:5] for s in recipe.sentences for w in re.findall(r"[A-Za-z]+", s)
             if len(w) >= 3 and w.lower() not in STOP_WORDS}
    scores = cached_steering_scores(catalog.model, catalog.tokenizer, feature.component(feature.default_fraction))
    top = scores.topk(k).indices.tolist()
    words = ["".join(ch for ch in catalog.tokenizer.decode([i]).lower() if ch.isalpha()) for i in top]
    return sum(len(w) >= 3 and w[:5] in stems for w in words) / k


def _vectors(catalog: Catalog, recipe: ConceptRecipe, layers: list[int]) -> list[SteeringVector]:
    """The recipe's unit vectors at `layers` (extract_contrastive against the template's neutral set, one pass)."""
    neutral = neutral_texts(recipe.template)
    kept = _NEUTRAL_MEANS.setdefault(catalog.model, {}).setdefault((recipe.template, tuple(layers)), {})
    cache = dict(kept)  # the user's sentences are not kept: only the neutral texts' means
    concept = {recipe.name: {"positive": list(recipe.sentences), "negative": neutral}}
    vectors = extract_contrastive(catalog.model, catalog.tokenizer, concept, layers, cache=cache)
    kept.update({t: cache[t] for t in neutral})
    return vectors


def _feature(catalog: Catalog, recipe: ConceptRecipe, vector: SteeringVector) -> Feature:
    """The recipe's feature for one extracted vector: its default strength and op, the recipe in its metadata."""
    template = TEMPLATES[recipe.template]
    fraction = default_fraction(catalog)
    description = f"your {recipe.template}: " + recipe.sentences[0][:80] + ("..." if len(recipe.sentences[0]) > 80 else "")
    vec = SteeringVector(
        name=recipe.name, layer=vector.layer, vector=vector.vector, concept=recipe.name, source="your concept",
        description=description,
        metadata={"recipe": json.dumps(recipe.to_dict(), ensure_ascii=False), "default_fraction": fraction,
                  "default_op": template.op, "template": recipe.template},
    )
    return catalog.with_concepts([vec]).resolve(recipe.name)


def catalog_for(catalog: Catalog, spec: SteeringSpec) -> Catalog:
    """The catalog with every concept a spec carries (a share link, an imported file) built on its model;
    a concept already there, or built before from the same recipe, is reused (Catalog.for_spec)."""
    return catalog.for_spec(spec)


CONCEPT_BUILDER[:] = [make_concept]  # Catalog.active builds the concepts a spec carries with it


def concept_layer(catalog: Catalog, recipe: ConceptRecipe) -> int:
    """The recipe's layer, else the layer most of the profile's contrastive features use, else the middle one."""
    n = models.num_layers(catalog.model)
    if recipe.layer is not None:
        if recipe.layer >= n:
            raise ValueError(f"layer {recipe.layer} is out of range: this model has {n} layers (0-{n - 1})")
        return recipe.layer
    layers = Counter(f.layer for f in catalog.profile.features if f.index is None)
    return layers.most_common(1)[0][0] if layers else n // 2


def default_fraction(catalog: Catalog) -> float:
    """A concept's default strength: the median of the tuned defaults of the profile's contrastive
    features (the shipped profile: 0.19, between dragons' 0.18 and pirate's and space's 0.2), so it follows
    when those are re-tuned; FALLBACK_DEFAULT for a profile without any."""
    shipped = [f.default_fraction for f in catalog.features if f.vector.index is None and f.key not in catalog.concepts]
    return round(statistics.median(shipped), 3) if shipped else FALLBACK_DEFAULT


@functools.cache
def _neutrals() -> dict[str, tuple[str, ...]]:
    data = json.loads(NEUTRALS_PATH.read_text(encoding="utf-8"))
    return {name: tuple(data[name]) for name in CONCEPT_TEMPLATES}


def neutral_texts(template: str) -> list[str]:
    """The neutral texts a concept of this template is contrasted with (package data)."""
    return list(_neutrals()[template])


def parse_concept_line(text: str) -> ConceptRecipe:
    """`NAME [template]: sentence | sentence | ...` (the console's /concept) as a recipe; one-line errors."""
    head, sep, body = (text or "").partition(":")
    words = head.split()
    if not sep or not 1 <= len(words) <= 2:
        raise ValueError("usage: /concept NAME [topic|style|persona]: sentence | sentence | ... "
                         "(e.g. /concept paris: We walked along the Seine. | The Louvre was full.)")
    template = words[1].lower() if len(words) == 2 else "topic"
    return ConceptRecipe(words[0], tuple(body.split("|")), template)


__all__ = ["TEMPLATES", "ConceptRecipe", "Template", "catalog_for", "concept_layer", "default_fraction",
           "late_layer", "make_concept", "neutral_texts", "own_word_share", "parse_concept_line", "recipe_of"]
