"""concepts.py and recipe.py: your own concept from a few sentences, on the embedded model.

The vector is the extractor's (extract_contrastive against the template's shipped neutral set),
the concept lives only in the catalog it was added to, and a steering spec that uses it carries
its recipe, from which a fresh catalog rebuilds the same vector.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_steering import concepts, steering
from llm_steering.catalog import Catalog
from llm_steering.config import SteeringSpec
from llm_steering.extract import extract_contrastive
from llm_steering.recipe import ConceptRecipe

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIVE = concepts.TEMPLATES["topic"].example  # five Eiffel Tower sentences


@pytest.fixture(scope="module")
def shared(embedded):
    """The shared catalog of the shipped default profile on the embedded model."""
    model, tok = embedded
    return Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)


def test_a_concept_is_the_extractors_vector_against_the_neutral_set(shared):
    feature = concepts.make_concept(shared, ConceptRecipe("my_eiffel", FIVE))
    direct = extract_contrastive(shared.model, shared.tokenizer,
                                 {"x": {"positive": list(FIVE), "negative": concepts.neutral_texts("topic")}}, [15])[0]
    assert feature.layer == 15  # the layer of the profile's contrastive features: at 24 its words rise no more
    torch.testing.assert_close(feature.vector.vector, direct.vector, atol=1e-6, rtol=0)
    # the default: the median of the profile's tuned contrastive defaults, added
    tuned = sorted(f.default_fraction for f in shared.features if f.vector.index is None)
    assert feature.default_fraction == round((tuned[4] + tuned[5]) / 2, 3) and feature.default_op == "add"
    # it steers: the answer changes
    chat = [{"role": "user", "content": "Tell me about your weekend."}]
    plain = steering.generate_steered_answer_hf(shared.model, shared.tokenizer, chat, [], max_new_tokens=12, temperature=0.0)
    steered = steering.generate_steered_answer_hf(shared.model, shared.tokenizer, chat,
                                                  [feature.component(feature.default_fraction)], max_new_tokens=12,
                                                  temperature=0.0)
    assert steered != plain


VOLCANO = ("Volcanoes erupt when magma rises through the crust.", "Lava flowed down the side of the volcano.",
           "Mount Vesuvius buried Pompeii in ash.", "The volcano's crater glowed red at night.",
           "Iceland has many active volcanoes and hot springs.")


def test_a_concept_moves_to_the_later_layer_where_its_steering_raises_its_own_words(shared):
    """Five volcano sentences at layer 15 raise earth, planet and land beside volcanic (6 of the top 12 are
    the sentences' words); at layer 24 volcanic, volcano, lava, eruption (11 of 12), and auto then names
    volcanoes in everyday answers that still answer (docs/quality.md, benchmarks/eval_concept.py)."""
    recipe = ConceptRecipe("volcanoes", VOLCANO)
    feature = concepts.make_concept(shared, recipe)
    assert concepts.late_layer(shared) == 24 and feature.layer == 24
    direct = extract_contrastive(shared.model, shared.tokenizer,
                                 {"x": {"positive": list(VOLCANO), "negative": concepts.neutral_texts("topic")}}, [24])[0]
    torch.testing.assert_close(feature.vector.vector, direct.vector, atol=1e-6, rtol=0)
    assert concepts.own_word_share(shared, feature, recipe) >= concepts.OWN_WORDS_MIN
    # a layer the recipe names is kept, and the vector there is the extractor's
    pinned = concepts.make_concept(shared, ConceptRecipe("volcanoes", VOLCANO, layer=15))
    assert pinned.layer == 15
    assert concepts.own_word_share(shared, feature, recipe) >= concepts.OWN_WORDS_MARGIN * concepts.own_word_share(
        shared, pinned, recipe)


def test_a_concept_lives_only_in_the_catalog_it_was_added_to(shared):
    before = [f.key for f in shared.features]
    feature = concepts.make_concept(shared, ConceptRecipe("only_mine", FIVE[:3]))
    mine = shared.with_concepts([feature.vector])
    assert [f.key for f in mine.features] == before + ["only_mine"]
    assert [f.key for f in shared.features] == before and "only_mine" not in shared.vectors.names
    with pytest.raises(ValueError, match="unknown feature 'only_mine'"):
        shared.resolve("only_mine")


def test_the_neutral_means_are_kept_so_only_the_users_sentences_run(shared, monkeypatch):
    concepts.make_concept(shared, ConceptRecipe("warm_up", FIVE[:2]))
    seen = []
    real = concepts.extract_contrastive

    def counting(model, tok, wanted, layers, cache=None, **kw):
        seen.append(sum(t not in cache for c in wanted.values() for t in c["positive"] + c["negative"]))
        return real(model, tok, wanted, layers, cache=cache, **kw)

    monkeypatch.setattr(concepts, "extract_contrastive", counting)
    concepts.make_concept(shared, ConceptRecipe("second", FIVE[2:]))
    assert seen == [3]  # the three new sentences; the 20 neutral texts come from the cache


def test_a_spec_carries_the_recipe_and_a_fresh_catalog_rebuilds_the_same_vector(shared):
    recipe = ConceptRecipe("pirate_voice", tuple(concepts.TEMPLATES["persona"].example), "persona")
    feature = concepts.make_concept(shared, recipe)
    mine = shared.with_concepts([feature.vector])
    spec = mine.spec({"pirate_voice": (0.3, None), "cats": (0.2, None)})
    assert spec.concepts == (recipe,)
    assert mine.spec({"cats": (0.2, None)}).concepts == ()  # only the concepts switched on travel
    text = json.dumps(spec.to_dict())
    again = SteeringSpec.from_dict(json.loads(text))
    assert again == spec
    rebuilt = concepts.catalog_for(shared, again)  # as a fresh browser or another console would
    assert rebuilt is not shared and "pirate_voice" not in shared.vectors.names
    [a, b], [c, d] = mine.components(spec), rebuilt.components(again)
    assert (b.name, b.strength) == (d.name, d.strength)
    assert (a.layer, a.op, a.strength) == (c.layer, c.op, c.strength)
    torch.testing.assert_close(a.vector, c.vector, atol=1e-6, rtol=0)
    assert concepts.catalog_for(rebuilt, again) is rebuilt  # same recipe: nothing rebuilt


@pytest.mark.parametrize("recipe, message", [
    ({"name": "eiffel_tower", "sentences": ["a b c"]}, "taken by a feature"),
    ({"name": "Bad Name", "sentences": ["a b c"]}, "snake_case"),
    ({"name": "x", "sentences": []}, "1 to 20 example sentences"),
    ({"name": "x", "sentences": ["  ", ""]}, "1 to 20 example sentences"),
    ({"name": "x", "sentences": "one string"}, "as a list of texts"),
    ({"name": "x", "sentences": ["a"] * 21}, "1 to 20"),
    ({"name": "x", "sentences": ["a"] * 10**6}, "at most 20 sentences"),
    ({"name": "x", "sentences": ["word " * 1000]}, "at most 300 characters"),
    ({"name": "x", "sentences": ["x" * 290] * 6}, "keep them under 1500"),
    ({"name": "x", "sentences": [float("nan")]}, "must be text"),
    ({"name": "x", "sentences": ["a b"], "template": "poem"}, "template 'poem' is unknown"),
    ({"name": "x", "sentences": ["a b"], "layer": 99}, "layer 99 is out of range"),
    ({"name": "x", "sentences": ["a b"], "layer": float("nan")}, "layer must be a layer number"),
    ({"name": "x", "sentences": ["a b"], "exec": "rm -rf /"}, "unknown field 'exec'"),
    ({"name": "x", "sentences": ["!"]}, "too short"),
])
def test_bad_recipes_are_one_line_errors(shared, recipe, message):
    with pytest.raises(ValueError, match=message) as info:
        concepts.make_concept(shared, ConceptRecipe.from_dict(recipe))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_spec_with_too_many_or_bad_concepts_is_refused_in_one_line():
    base = {"format": "llm-steering/spec", "version": 1, "model_id": "m", "features": []}
    for concepts_field, message in [([{"name": f"c{i}", "sentences": ["a b"]} for i in range(5)], "at most 4"),
                                    ("not a list", "must be a list"),
                                    ([{"name": "a", "sentences": ["x y"]}] * 2, "each name once")]:
        with pytest.raises(ValueError, match=message):
            SteeringSpec.from_dict({**base, "concepts": concepts_field})


def test_the_console_line_reads_a_name_a_template_and_sentences():
    recipe = concepts.parse_concept_line("paris style: We walked along the Seine. | The Louvre was full. | ")
    assert recipe == ConceptRecipe("paris", ("We walked along the Seine.", "The Louvre was full."), "style")
    with pytest.raises(ValueError, match="usage: /concept NAME"):
        concepts.parse_concept_line("no colon here")


def test_the_shared_catalog_steers_with_a_specs_concept_without_listing_it(shared, monkeypatch):
    """A share link's spec carries the recipe: the shared catalog builds it for that spec only (kept per
    recipe, so the next answer does not build it again) and lists nothing new."""
    from llm_steering import catalog as catalog_module
    from llm_steering.config import ActiveFeature

    before = [f.key for f in shared.features]
    recipe = ConceptRecipe("visitor_tower", FIVE)
    spec = SteeringSpec(shared.vectors.model_id, (ActiveFeature("visitor_tower", 0.3),), concepts=(recipe,))
    [comp] = shared.components(spec)
    assert comp.name == "visitor_tower" and comp.strength == pytest.approx(0.3 * shared.norm(15))
    assert [f.key for f in shared.features] == before and "visitor_tower" not in shared.vectors.names
    clash = SteeringSpec(shared.vectors.model_id, (ActiveFeature("pirate", 0.3),), concepts=(ConceptRecipe("pirate", FIVE),))
    with pytest.raises(ValueError, match="the name 'pirate' is taken"):
        shared.components(clash)
    monkeypatch.setattr(catalog_module, "CONCEPT_BUILDER", [lambda *a: pytest.fail("built again")])
    [again] = shared.components(spec)
    torch.testing.assert_close(again.vector, comp.vector, atol=0, rtol=0)
