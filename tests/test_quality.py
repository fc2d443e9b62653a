"""The quality evaluation's tint (benchmarks/tint.py) and the shipped defaults it picked (issue 21)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from llm_steering import steering

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    """A benchmark script as a module, by file (the scripts import each other by name: sweep_vectors,
    eval_quality_report, then tint, each registered before the next one imports it)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tint():
    for name in ("sweep_vectors", "eval_quality_report"):
        _benchmark(name)
    return _benchmark("tint")


UNSTEERED = {"set": "tuning", "concept": None, "variant": None, "fraction": 0.0, "prompt": "How do I train a puppy to sit?",
             "text": "Training a puppy to sit takes patience: hold a treat above its nose, move it back, and reward the puppy "
                     "the moment it sits.", "nll": 1.0, "probe": {}}


def steered(text: str, nll: float = 1.2) -> dict:
    return {**UNSTEERED, "concept": "cats", "variant": "clamp", "fraction": 0.2, "text": text, "nll": nll, "probe": {"cats": 5.0}}


def test_tint_needs_the_concept_the_question_and_fluent_text_at_once(tint):
    """A concept that replaces the answer is not a tint; neither is a fluent answer without it, nor gibberish."""
    flags = [tint.answer_tint(steered(t, nll), UNSTEERED, 1.0, threshold=1.0) for t, nll in [
        ("To train a puppy to sit, hold a treat above its nose, just as you would with a cat, and reward it.", 1.3),
        ("Cats are wonderful creatures with soft fur and whiskers; a cat purrs when it is happy.", 1.3),
        ("To train a puppy to sit, hold a treat above its nose and reward it when it sits.", 1.1),
        ("To train a puppy, cat cat cat puppy puppy cat cat cat puppy puppy cat cat cat puppy puppy.", 1.3),
        ("To train a puppy to sit, hold a treat, said the cat, and purr.", 2.6),
    ]]
    assert [f["tint"] for f in flags] == [True, False, False, False, False]
    assert [f["mention"] for f in flags] == [True, True, False, True, True]
    assert [f["addresses"] for f in flags] == [True, False, True, True, True]
    assert [f["fluent"] for f in flags] == [True, True, True, False, False]  # rep3 >= 0.2; NLL 2.6 > 2.5 x 1.0
    assert flags[0]["addresses_b"] and not flags[1]["addresses_b"]  # the second signal: the unsteered answer's words


def test_both_question_signals_agree_with_the_hand_checked_answers(tint):
    """Signal A (the prompt's words) and B (the unsteered answer's words) each agree with 30 answers read by hand
    (benchmarks/results/addresses_handcheck.jsonl) far more often than chance; the figures are the ones docs/quality.md gives."""
    got = tint.handcheck_agreement()
    assert got["n"] == 30 and 0 < got["hand_yes"] < 30
    assert got["a_vs_hand"] >= 0.8 and got["b_vs_hand"] >= 0.75
    text = " ".join((ROOT / "docs" / "quality.md").read_text().split())
    assert f"A agrees with the judgement on {got['a_vs_hand']:.0%}" in text


def test_no_shipped_default_is_labelled_breaks_the_text(embedded):
    """The app's own strength words (web.views.strength_label on the shipped strength curves) at every
    feature's default and every preset of the embedded model's profile: none says "breaks the text"."""
    from llm_steering.catalog import Catalog
    from llm_steering.web.views import strength_curves, strength_label

    model, tok = embedded
    profile = steering.load_config(ROOT / "demo.yaml").profile("smollm2")
    catalog = Catalog.open(profile, model, tok)
    curves = strength_curves()
    features = {f.key: f for f in catalog.features}
    labels = {f.key: strength_label(f, f.default_fraction) for f in catalog.features}
    for preset in profile.presets:
        for item in preset.features:
            labels[f"{preset.name}: {item.key}"] = strength_label(features[item.key], item.fraction, item.op)
    assert set(curves) >= set(features)  # every shipped feature has a measured curve
    assert len(labels) >= 13 and not [k for k, v in labels.items() if v == "breaks the text"], labels
