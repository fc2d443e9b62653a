"""lens.py: the tokens a feature's direction promotes and suppresses, through the model's own
final norm and unembedding (the logit lens), equal to a direct computation on the embedded model."""

from __future__ import annotations

import time
from pathlib import Path

from llm_steering import concepts, lens, steering
from llm_steering.catalog import Catalog
from llm_steering.recipe import ConceptRecipe

import pytest
import torch
from conftest import build_tiny_llama, unit

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
    rows = [line for line in out if "pushes up (logit lens):" in line]  # SAE features: the lens (lens_reads)
    assert len(rows) == 3
    model, tok = embedded
    for row in rows:
        key = row.split()[0]
        [vec] = extract_sae_features(str(tmp_path / "saes"), [tuple(map(int, key.split(":")))])
        words = ", ".join(lens.token_words(lens.top_tokens(model, tok, vec.vector, k=6).promoted))
        assert f"pushes up (logit lens): {words}" in row


# -- what the cards show: measured, or the logit lens where it reads (lens.lens_reads) ---------------


def test_the_rule_measures_contrastive_directions_at_every_layer_and_reads_the_lens_for_sae_features(shared):
    """One rule (lens.lens_reads): the embedded model's shipped features (layers 12 and 15 of 30) and any
    contrastive direction, late ones too, are measured; an SAE feature reads by the lens. A concept made from
    five volcano sentences goes to layer 24 (concepts.make_concept); there the lens reads noise and the
    measured tokens are its own words."""
    from dataclasses import replace

    from llm_steering.concepts import make_concept
    from llm_steering.recipe import ConceptRecipe
    from llm_steering.vectors import SteeringVector

    assert steering.num_layers(shared.model) == 30
    assert not any(lens.lens_reads(shared.model, f) for f in shared.features)
    pirate = shared.resolve("pirate")
    late = replace(pirate, vector=replace(pirate.vector, layer=26))
    assert not lens.lens_reads(shared.model, late)
    sae = replace(pirate, vector=SteeringVector(name="L15F7", layer=15, vector=pirate.vector.vector, index=7))
    assert lens.lens_reads(shared.model, sae)
    got = lens.feature_tokens(shared.model, shared.tokenizer, sae, k=5)
    assert got == lens.top_tokens(shared.model, shared.tokenizer, pirate.vector.vector, k=5)
    assert got.how == lens.LOGIT_LENS and not got.measured and got.verbs == ("pushes up", "pushes down")

    volcano = make_concept(shared, ConceptRecipe("volcanoes", (
        "Volcanoes erupt when magma rises through the crust.", "Lava flowed down the side of the volcano.",
        "Mount Vesuvius buried Pompeii in ash.", "The volcano's crater glowed red at night.",
        "Iceland has many active volcanoes and hot springs.")))
    assert volcano.layer == 24

    def volcanic(words) -> int:
        return sum(any(s in w.lower() for s in ("volcan", "lava", "magma", "erupt")) for w in words)

    shown = lens.feature_tokens(shared.model, shared.tokenizer, volcano, k=8)
    read = lens.top_tokens(shared.model, shared.tokenizer, volcano.vector.vector, k=8)
    up, lens_up = [t.text for t in shown.promoted], [t.text for t in read.promoted]
    assert shown.measured and volcanic(up) >= 5 and volcanic(lens_up) <= 1, (up, lens_up)


@pytest.mark.parametrize("key,word", [("ocean", "ocean"), ("pirate", "pirate"), ("eiffel_tower", "Paris")])
def test_a_shipped_features_tokens_are_measured_at_its_default(shared, key, word):
    """catalog.feature_tokens (what the card and /features show): lens.steered_tokens at the feature's default
    strength and op, which name the concept (the layer-15 lens of these directions does not)."""
    feature = shared.resolve(key)
    got = shared.feature_tokens(key, k=8)
    assert got is lens.steered_tokens(shared.model, shared.tokenizer, feature.component(feature.default_fraction), 8)
    assert got.how == lens.MEASURED and got.measured and got.verbs == ("raises", "lowers")
    assert word in lens.token_words(got.promoted)
    assert got.promoted[0].logit >= got.promoted[-1].logit > 0 > got.suppressed[-1].logit >= got.suppressed[0].logit


def test_the_unsteered_side_is_read_once_and_gives_the_same_scores(shared):
    """steering_scores keeps the unsteered mean log-probabilities per model: the scores equal the mean of the
    per-position differences computed from two fresh forwards."""
    from llm_steering import calibrate

    comp = shared.resolve("cats").component(0.2)
    got = lens.steering_scores(shared.model, shared.tokenizer, [comp])
    assert lens._PLAIN[shared.model]
    system = {"role": "system", "content": "You are a helpful assistant."}
    texts = lens.neutral_texts()
    prompts = [steering.chat_input_ids(shared.tokenizer, [system, {"role": "user", "content": lens.NEUTRAL_QUESTIONS[i % 4]}])
               for i in range(len(texts))]
    rows = []
    for p, text in zip(prompts, texts, strict=True):  # one chat at a time: no padding
        ids = torch.tensor([p + shared.tokenizer.encode(" " + text, add_special_tokens=False)])
        per = []
        for comps in ([comp], []):
            with calibrate.row_steering(shared.model, [comps]), torch.inference_mode():
                per.append((shared.model(input_ids=ids).logits[0, len(p) - 1 : -1].float().softmax(-1) + lens.EPS).log())
        rows.append(per[0] - per[1])
    direct = torch.cat(rows).mean(0)
    assert torch.allclose(got, direct, atol=2e-3), (got - direct).abs().max()


def test_scores_are_kept_on_disk_read_back_by_a_fresh_start_and_a_damaged_file_is_measured_again(
        tiny_llama, monkeypatch, tmp_path):
    """cached_steering_scores keeps each component's scores under the cache folder: a fresh process (the
    memory cache emptied) reads them back instead of measuring; a truncated or foreign file is measured again
    and replaced whole; another model, op or strength has its own file."""
    from llm_steering.components import SteeringComponent

    class Tok:  # what steering_scores reads of a tokenizer: a chat template's ids and plain encoding
        pad_token_id, chat_template = 0, "tiny"

        def __len__(self):
            return 128

        def encode(self, text, add_special_tokens=False):
            return [3 + ord(ch) % 120 for ch in text[:12]]

        def apply_chat_template(self, chat, **kw):
            return [1] + [3 + ord(ch) % 120 for m in chat for ch in m["content"][:6]] + [2]

    monkeypatch.setenv("STEERING_CACHE_DIR", str(tmp_path))
    tok, model = Tok(), tiny_llama
    comp = SteeringComponent(layer=1, vector=unit(32, seed=3), strength=4.0, op="add")
    measured = []
    real = lens.steering_scores
    monkeypatch.setattr(lens, "steering_scores", lambda *a: measured.append(1) or real(*a))

    first = lens.cached_steering_scores(model, tok, comp)
    path = lens.disk_cache_path(model, tok, comp)
    assert measured == [1] and path.is_file() and path.parent == tmp_path / "steering-scores"
    assert not list(path.parent.glob("*.tmp"))
    lens._SCORES.pop(model)  # a fresh start
    assert torch.equal(lens.cached_steering_scores(model, tok, comp), first) and measured == [1]

    path.write_bytes(path.read_bytes()[:40])  # cut short, as by a killed process
    lens._SCORES.pop(model)
    assert torch.equal(lens.cached_steering_scores(model, tok, comp), first) and measured == [1, 1]
    torch.save(torch.zeros(7), path)  # a tensor of another shape
    lens._SCORES.pop(model)
    assert torch.equal(lens.cached_steering_scores(model, tok, comp), first) and measured == [1, 1, 1]

    other = [SteeringComponent(layer=1, vector=unit(32, seed=3), strength=4.0, op="clamp"),
             SteeringComponent(layer=1, vector=unit(32, seed=3), strength=2.0, op="add")]
    paths = {path, *(lens.disk_cache_path(model, tok, c) for c in other),
             lens.disk_cache_path(build_tiny_llama(seed=1), tok, comp)}

    class OtherTok(Tok):  # the same model read through another tokenizer: other ids, other scores
        def encode(self, text, add_special_tokens=False):
            return [4 + ord(ch) % 110 for ch in text[:12]]

    paths.add(lens.disk_cache_path(model, OtherTok(), comp))
    assert len(paths) == 5

    monkeypatch.setattr(lens, "MAX_SCORE_FILES", 2)  # the oldest files go once there are more
    for c in other:
        time.sleep(0.01)
        lens.cached_steering_scores(model, tok, c)
    assert sorted(path.parent.glob("*.pt")) == sorted(lens.disk_cache_path(model, tok, c) for c in other)
