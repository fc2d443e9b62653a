"""lens.py: the tokens a feature's direction promotes and suppresses, through the model's own
final norm and unembedding (the logit lens), equal to a direct computation on the embedded model."""

from __future__ import annotations

from pathlib import Path

from llm_steering import concepts, lens, steering
from llm_steering.catalog import Catalog
from llm_steering.recipe import ConceptRecipe

import pytest
import torch
from conftest import unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shared(embedded):
    model, tok = embedded
    return Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)


def direct(model, vector: torch.Tensor, k: int) -> tuple[list[int], list[int], torch.Tensor]:
    """lm_head(norm(v)) written out for the embedded Llama: RMSNorm, then the tied embedding matrix."""
    norm = model.model.norm
    v = vector.float()
    normed = v * torch.rsqrt(v.pow(2).mean() + norm.variance_epsilon) * norm.weight
    logits = model.lm_head.weight @ normed  # [vocab]
    return logits.topk(k).indices.tolist(), (-logits).topk(k).indices.tolist(), logits


@pytest.mark.parametrize("key", ["eiffel_tower", "pirate", "my_eiffel"])
def test_top_tokens_equal_a_direct_computation(shared, key):
    cat = shared
    if key == "my_eiffel":
        feature = concepts.make_concept(shared, ConceptRecipe("my_eiffel", concepts.TEMPLATES["topic"].example))
        cat = shared.with_concepts([feature.vector])
    got = cat.top_tokens(key, k=8)
    up, down, logits = direct(cat.model, cat.resolve(key).vector.vector, 8)
    assert [t.id for t in got.promoted] == up and [t.id for t in got.suppressed] == down
    for t in got.promoted + got.suppressed:
        assert t.logit == pytest.approx(float(logits[t.id]), abs=1e-4)
        assert t.text == cat.tokenizer.decode([t.id])
    assert got.promoted[0].logit >= got.promoted[-1].logit > got.suppressed[-1].logit >= got.suppressed[0].logit


def test_results_are_cached_per_model_and_vector(shared, monkeypatch):
    v = unit(576, 7)
    first = lens.top_tokens(shared.model, shared.tokenizer, v, k=5)
    monkeypatch.setattr(lens, "direction_logits", lambda *a: pytest.fail("computed again"))
    assert lens.top_tokens(shared.model, shared.tokenizer, v.clone(), k=5) is first


def test_the_lens_works_on_a_tiny_model_and_refuses_bad_k(tiny_llama):
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    got = lens.top_tokens(tiny_llama, Tok(), unit(32, 1), k=3)
    assert len(got.promoted) == 3 and got.promoted[0].text.startswith("<")
    assert lens.describe(got).startswith("promotes <")
    for k in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match="k must be a whole number"):
            lens.top_tokens(tiny_llama, Tok(), unit(32, 1), k=k)


def test_extract_find_prints_each_features_promoted_tokens(embedded, tmp_path, capsys):
    """`extract_steering_vectors.py --find`: beside each found feature, the tokens its direction pushes up,
    equal to lens.top_tokens of the feature's decoder direction on the model."""
    from llm_steering import extract
    from llm_steering.saes import extract_sae_features

    from conftest import write_small_saelens_sae

    write_small_saelens_sae(tmp_path / "saes", layer=3, d_model=576, d_sae=16, seed=3)
    text = "The Eiffel Tower in Paris is tall."
    code = extract.main(["--sae-source", str(tmp_path / "saes"), "--layers", "3", "--find", text, "--top-k", "3"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    rows = [line for line in out if "pushes up:" in line]
    assert len(rows) == 3
    model, tok = embedded
    for row in rows:
        key = row.split()[0]
        [vec] = extract_sae_features(str(tmp_path / "saes"), [tuple(map(int, key.split(":")))])
        words = ", ".join(lens.token_words(lens.top_tokens(model, tok, vec.vector, k=6).promoted))
        assert f"pushes up: {words}" in row
