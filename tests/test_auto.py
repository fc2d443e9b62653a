"""calibrate.auto_answer (issue 28): candidates as rows of one batch, each the single request it stands for;
the release lets go at the steering's own words; the chosen answer goes on exactly as it began; the picker."""

from __future__ import annotations

import threading

from llm_steering import calibrate, steering
from llm_steering.calibrate import Candidate
from llm_steering.steering import SteeringComponent

import pytest
import torch
from conftest import build_tiny_llama, unit
from test_calibrate import CHAT, single_answer
from test_calibrate import ToyTokenizer as ChatOnlyTokenizer

OTHER_CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Tips for a job interview, please"}]


class ToyTokenizer(ChatOnlyTokenizer):
    """test_calibrate's toy tokenizer, which also encodes text (auto reads the steering on neutral texts)."""

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 120 for ch in text]


@pytest.fixture
def tiny():
    model = build_tiny_llama(num_layers=4, hidden=32, seed=3)
    model.generation_config.eos_token_id = 2
    return model, ToyTokenizer()


def comp(strength=4.0, op="add", layer=1):
    return SteeringComponent(layer, unit(32, 1), strength=strength, op=op, name="c")


def test_every_candidate_row_is_the_single_request_it_stands_for(tiny):
    """Rows of two chats of different lengths (left padding) and every non-releasing candidate:
    each equals the library's own single-request steering."""
    model, tok = tiny
    cands = [c for c in calibrate.auto_candidates(comp()) if not c.release]
    cands.append(Candidate("answer only", (comp(8.0),), steer_prompt=False, multiplier=2.0))
    jobs = [(chat, c, (), frozenset()) for chat in (CHAT, OTHER_CHAT) for c in cands]
    ids, released = calibrate.generate_many(model, tok, jobs, 10, 1.1)
    assert released == [None] * len(jobs)
    for (chat, c, _, _), got in zip(jobs, ids, strict=True):
        assert got == single_answer(model, tok, chat, list(c.components), max_new_tokens=10, steer_prompt=c.steer_prompt), c.label
    assert any(a != ids[0] for a in ids[1 : len(cands)]), "the steering must change some answer for the check to mean anything"


def test_a_release_row_is_answer_only_steering_until_its_word_then_lets_go(tiny):
    model, tok = tiny
    strong = comp(12.0)
    answer_only = single_answer(model, tok, CHAT, [strong], max_new_tokens=12, steer_prompt=False)
    unsteered = single_answer(model, tok, CHAT, [], max_new_tokens=12)
    k = next(i for i in range(1, 12) if answer_only[: i + 1] != unsteered[: i + 1])  # a token the push decided
    word = answer_only[k]
    release = Candidate("release", (strong,), steer_prompt=False, release=True, multiplier=3.0)
    ids, released = calibrate.generate_many(model, tok, [(CHAT, release, (), frozenset({word}))], 12, 1.1)
    first = answer_only.index(word)
    assert released == [first]
    assert ids[0][: first + 1] == answer_only[: first + 1]
    # a word never written: the release row is answer-only steering to the end
    ids, released = calibrate.generate_many(model, tok, [(CHAT, release, (), frozenset({127}))], 12, 1.1)
    assert released == [None] and ids[0] == answer_only


@pytest.mark.parametrize("judge", [3, 6])
def test_the_chosen_answer_goes_on_exactly_as_it_began(tiny, judge):
    """Judged on `judge` tokens and continued to 14 steered as it was judged (`let_go=False`), each
    candidate's answer (releases that let go before or after the judged part included) is the one the same
    row gives when generated to 14 at once."""
    model, tok = tiny
    strong = comp(12.0)
    answer_only = single_answer(model, tok, CHAT, [strong], max_new_tokens=14, steer_prompt=False)
    words = frozenset({answer_only[2], answer_only[9]})
    cands = [*calibrate.auto_candidates(comp()),
             Candidate("release", (strong,), steer_prompt=False, release=True, multiplier=3.0)]
    whole, released = calibrate.generate_many(model, tok, [(CHAT, c, (), words) for c in cands], 14, 1.1)
    assert released[-1] is not None
    for i in range(len(cands)):
        out = calibrate.auto_answer(model, tok, CHAT, comp(), max_new_tokens=14, judge_tokens=judge, candidates=cands,
                                    picker=lambda rows, i=i: i, concept_words=words, let_go=False)
        assert list(out.token_ids) == whole[i], cands[i].label
        assert out.chosen == cands[i]


def test_other_features_stay_on_in_every_row(tiny):
    model, tok = tiny
    other = SteeringComponent(2, unit(32, 5), strength=6.0, op="add", name="other")
    out = calibrate.auto_answer(model, tok, CHAT, comp(), max_new_tokens=8, other_components=[other],
                                concept_words=frozenset())
    assert list(out.table[0].token_ids) == single_answer(model, tok, CHAT, [other], max_new_tokens=8)
    c1 = next(r for r in out.table if r.candidate.label == "add x1")
    assert list(c1.token_ids) == single_answer(model, tok, CHAT, [other, comp()], max_new_tokens=8)
    # an answer-only row steers the other features from the answer on too: the turn's one steer_prompt then
    # says what made it (no concept words here, so a release row is answer-only throughout)
    rel = next(r for r in out.table if r.candidate.release and r.candidate.multiplier == 2.0)
    assert list(rel.token_ids) == single_answer(model, tok, CHAT, [other, *rel.candidate.components], max_new_tokens=8,
                                                steer_prompt=False)


def row(label="x", nll_ratio=1.5, rep3=0.0, on_question=True, score=1.0, multiplier=1.0):
    comps = (comp(),) if multiplier else ()
    return calibrate.AutoRow(Candidate(label, comps, multiplier=multiplier), (), label, 1.0, nll_ratio, rep3, on_question,
                             0, None, score)


def test_the_picker_keeps_the_answer_that_names_the_concept_most_among_those_that_still_answer():
    base = row("unsteered", 1.0, score=0.0, multiplier=0)
    broken, off_topic = row("broken", nll_ratio=calibrate.AUTO_NLL_BOUND + 0.5, score=5), row("off", on_question=False, score=4)
    loops, leaning = row("loops", rep3=0.5, score=4), row("leaning", score=1.2)
    named = row("named", nll_ratio=2.8, score=3.1)
    rows = [base, broken, off_topic, loops, leaning, named]
    assert calibrate.pick_candidate(rows) == 5
    assert calibrate.pick_candidate(rows[:5]) == 4  # nothing names it outright: the one that leans most
    # nothing still answers: the unsteered answer
    assert calibrate.pick_candidate(rows[:4]) == 0


def test_auto_leaves_no_hook_and_steers_no_other_thread(tiny):
    model, tok = tiny
    _, layers = steering.decoder_layers(model)
    before = [len(layer._forward_hooks) for layer in layers]
    seen = {}

    def other_request():
        seen["ids"] = single_answer(model, tok, CHAT, [], max_new_tokens=8)

    started = threading.Event()

    def picker(rows):
        t = threading.Thread(target=other_request)
        t.start()
        t.join()
        started.set()
        return 1

    calibrate.auto_answer(model, tok, CHAT, comp(), max_new_tokens=8, judge_tokens=4, picker=picker, concept_words=frozenset())
    assert started.is_set() and seen["ids"] == single_answer(model, tok, CHAT, [], max_new_tokens=8)
    assert [len(layer._forward_hooks) for layer in layers] == before
    assert not steering.base_model(model).embed_tokens._forward_pre_hooks


@pytest.mark.parametrize("bad, message", [
    (SteeringComponent(1, unit(32, 1), op="ablate", scale=0.0), "ablate"),
    (SteeringComponent(1, unit(32, 1), strength=0.0, op="add"), "nonzero"),
    (SteeringComponent(9, unit(32, 1), strength=1.0, op="add"), "out of range"),
])
def test_bad_components_are_one_line_errors(tiny, bad, message):
    model, tok = tiny
    with pytest.raises(ValueError, match=message) as err:
        calibrate.auto_answer(model, tok, CHAT, bad, concept_words=frozenset())
    assert "\n" not in str(err.value)


def test_the_steerings_own_words_are_measured_and_read_without_keywords(embedded):
    """On the embedded model, the ocean feature's own words (lens.concept_token_ids) are ocean words."""
    from llm_steering.catalog import Catalog

    model, tok = embedded
    catalog = Catalog.open(steering.load_config("demo.yaml").profile(), model, tok)
    feature = catalog.resolve("ocean")
    words = {tok.decode([i]).strip().lower() for i in
             calibrate_words(model, tok, feature.component(feature.default_fraction))}
    assert {"ocean", "sea", "marine"} <= words
    assert not words & {"the", "and", "a", ","}


def calibrate_words(model, tok, component):
    from llm_steering.lens import concept_token_ids

    return concept_token_ids(model, tok, component, calibrate.AUTO_CONCEPT_WORDS)


def test_candidates_past_a_bound_are_left_out_and_the_catalog_gives_the_bound():
    """auto_candidates(component, max_multiplier): none past that many times the strength (the unsteered answer
    always stays); Catalog.auto_max_multiplier is the slider's range over the strength set, either sign."""
    from types import SimpleNamespace

    from llm_steering.catalog import Catalog

    comp = SteeringComponent(layer=1, vector=unit(32, seed=1), strength=4.0, op="add")
    every = calibrate.auto_candidates(comp)
    assert max(c.multiplier for c in every) == 4
    kept = calibrate.auto_candidates(comp, max_multiplier=1.5)
    assert [c.label for c in kept] == [c.label for c in every if c.multiplier <= 1.5]
    assert kept[0].label == "unsteered" and {c.multiplier for c in kept} == {0.0, 0.6, 1.0, 1.4}
    range_of = SimpleNamespace(fraction_range=lambda feature: (-1.0, 2.0))
    assert Catalog.auto_max_multiplier(range_of, None, 0.5) == 4.0
    assert Catalog.auto_max_multiplier(range_of, None, -0.5) == 2.0
    assert Catalog.auto_max_multiplier(range_of, None, 0.0) is None


def test_a_shipped_concept_gets_its_learned_direction_among_the_candidates_and_nothing_else_does():
    """calibrate.learned_direction finds the direction learned for a feature by the feature's very vector (the
    issue's check passes only the component); the ten rows then replace the nine, the learned ones steering
    the learned vector at the feature's op, prompt steered, each naming it for the turn's spec."""
    from llm_steering.vectors import SteeringVector, SteeringVectorSet

    vs = steering.load_vectors()
    concepts = [n for n in vs.names if not n.endswith(calibrate.LEARNED_SUFFIX)]
    assert len(concepts) == 10
    for name in concepts:
        found = calibrate.learned_direction(vs.component(name, 0.1, op="clamp"))
        assert found is not None and found.name == name + calibrate.LEARNED_SUFFIX and found.layer == vs.get(name).layer
    ocean = vs.component("ocean", 0.085, op="clamp")
    learned = calibrate.learned_direction(ocean)
    assert calibrate.learned_direction(vs.component("ocean_learned", 0.085)) is None  # the learned one has no partner
    assert calibrate.learned_direction(SteeringComponent(ocean.layer, unit(576, 5), strength=3.0)) is None  # a made concept
    assert calibrate.learned_direction(SteeringComponent(ocean.layer + 1, ocean.vector, strength=3.0)) is None  # another layer
    plain = SteeringVectorSet(vs.model_id, vs.hidden_size, [vs.get(n) for n in concepts], vs.layer_norms)
    assert calibrate.learned_direction(ocean, plain) is None  # a file without learned directions: the nine rows
    renamed = SteeringComponent(ocean.layer, ocean.vector, strength=ocean.strength, op="clamp", name="my_sea")
    assert calibrate.learned_direction(renamed).name == "ocean_learned"  # found by the vector, not the name

    cands = calibrate.auto_candidates(ocean, learned=learned)
    assert [c.label for c in cands] == [
        "unsteered", "clamp x1", "clamp x2, answer only until it names the concept",
        "clamp x3, answer only until it names the concept", "clamp x1, learned direction",
        "clamp x0.6, learned direction", "clamp x1.4, learned direction", "clamp x1.1, learned direction",
        "clamp x1.2, learned direction", "clamp x1.1"]
    for c in cands[4:9]:
        (lc,) = c.components
        assert c.vector == "ocean_learned" and c.steer_prompt and not c.release and lc.op == "clamp"
        assert torch.equal(lc.vector, learned.vector) and lc.layer == ocean.layer
        assert abs(lc.strength - c.multiplier * ocean.strength) < 1e-9
    assert all(c.vector is None and (not c.components or torch.equal(c.components[0].vector, ocean.vector))
               for c in [*cands[:4], cands[9]])
    assert abs(cands[9].components[0].strength - 1.1 * ocean.strength) < 1e-9 and cands[9].steer_prompt
    assert [c.label for c in calibrate.auto_candidates(ocean, 1.15, learned)] == [
        "unsteered", "clamp x1", "clamp x1, learned direction", "clamp x0.6, learned direction",
        "clamp x1.1, learned direction", "clamp x1.1"]
    capped = SteeringComponent(ocean.layer, ocean.vector, op="cap", cap_min=10.0)
    assert [c.label for c in calibrate.auto_candidates(capped, learned=learned)] == [c.label for c in calibrate.auto_candidates(capped)]
    wrong = SteeringVector(name="x_learned", layer=ocean.layer + 1, vector=learned.vector)
    with pytest.raises(ValueError, match="layer"):
        calibrate.auto_candidates(ocean, learned=wrong)


def test_learned_rows_are_the_single_requests_they_stand_for(tiny):
    """The ten rows with a learned direction, as rows of one batch: each non-releasing one equals the library's
    single-request steering with its own vector."""
    from llm_steering.vectors import SteeringVector

    model, tok = tiny
    learned = SteeringVector(name="c_learned", layer=1, vector=unit(32, 2))
    cands = calibrate.auto_candidates(comp(), learned=learned)
    assert len(cands) == 10 and sum(c.vector is not None for c in cands) == 5
    jobs = [(CHAT, c, (), frozenset()) for c in cands if not c.release]
    ids, _ = calibrate.generate_many(model, tok, jobs, 10, 1.1)
    for (chat, c, _, _), got in zip(jobs, ids, strict=True):
        assert got == single_answer(model, tok, chat, list(c.components), max_new_tokens=10), c.label
    learned_rows = [got for (_, c, _, _), got in zip(jobs, ids, strict=True) if c.vector]
    assert any(a != ids[1] for a in learned_rows), "the learned direction must change the answer for the check to mean anything"


def test_an_answer_that_ends_by_itself_is_not_marked_stopped(tiny, monkeypatch):
    """An answer whose continuation ends at its EOS before max_new_tokens is one that ended, not one that
    was stopped, even while the continuation's thread is still finishing when its last words have been read
    (held here 0.3 s after it generated): the browser once tagged "stopped" a three-tips answer nobody
    stopped. A cancel that comes while it writes still stops it."""
    import time

    model, tok = tiny
    strong = comp(8.0)
    ids = single_answer(model, tok, CHAT, [strong], max_new_tokens=12)  # 47, 54, then 115 over and over
    model.generation_config.eos_token_id = ids[2]  # so the answer ends there by itself, after two tokens
    cands = [Candidate("unsteered"), Candidate("add x1", (strong,), multiplier=1.0)]
    original = calibrate.continue_candidate

    def finishing_slowly(*args, **kwargs):
        out = original(*args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(calibrate, "continue_candidate", finishing_slowly)

    def auto(cancel):
        return calibrate.stream_auto_answer(model, tok, CHAT, strong, max_new_tokens=12, cancel=cancel, judge_tokens=1,
                                            candidates=cands, picker=lambda rows: 1, concept_words=frozenset(),
                                            let_go=False)

    stream = auto(threading.Event())
    "".join(stream)
    assert list(stream.result.token_ids) == ids[:2]
    assert not stream.stopped

    cancel = threading.Event()
    stream = auto(cancel)
    pieces = iter(stream)
    next(pieces)  # the judged word
    cancel.set()  # Stop, while the rest is written
    list(pieces)
    assert stream.stopped


def test_after_the_judged_words_the_chosen_steering_lets_go():
    """By default the chosen steering lets go from the first token after the judged ones (read by hand, long
    answers steered on drift off the question: docs/quality.md). Checked against a reference built from
    public pieces only: the prompt and the judged words read with `steering.steer`, the next token from
    those logits, then plain generation from that cache. `let_go=False` keeps the steering to the end."""
    from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor

    model = build_tiny_llama(num_layers=4, hidden=32, seed=2)  # a model whose answer changes when let go
    model.generation_config.eos_token_id = 2
    tok = ToyTokenizer()
    strong = comp(8.0)
    cands = [Candidate("unsteered"), Candidate("add x1", (strong,), multiplier=1.0)]

    def auto(**kwargs):
        return calibrate.auto_answer(model, tok, CHAT, strong, max_new_tokens=12, judge_tokens=4, candidates=cands,
                                     picker=lambda rows: 1, concept_words=frozenset(), **kwargs)

    out = auto()
    steered = single_answer(model, tok, CHAT, [strong], max_new_tokens=12)
    assert list(out.token_ids[:4]) == steered[:4] and out.let_go_at == 4
    ids = steering.chat_input_ids(tok, CHAT) + steered[:4]
    with steering.steer(model, [strong], steer_from=0), torch.inference_mode():
        first = model(input_ids=torch.tensor([ids]), use_cache=True)
    penalty = RepetitionPenaltyLogitsProcessor(1.1)
    nxt = int(penalty(torch.tensor([ids]), first.logits[:, -1].clone()).argmax())
    config = GenerationConfig(max_new_tokens=7, do_sample=False, temperature=None, top_p=None, top_k=None,
                              repetition_penalty=1.1, pad_token_id=0, eos_token_id=steering.eos_ids(model, tok))
    whole = torch.tensor([ids + [nxt]])
    with torch.inference_mode():
        rest = model.generate(input_ids=whole, attention_mask=torch.ones_like(whole), past_key_values=first.past_key_values,
                              generation_config=config)[0, whole.shape[1]:].tolist()
    assert list(out.token_ids) == steered[:4] + [nxt] + rest
    assert list(out.token_ids) != steered  # letting go changed the answer here

    kept = auto(let_go=False)
    assert list(kept.token_ids) == steered and kept.let_go_at is None


def test_stop_while_the_candidates_are_generated_ends_their_batch_at_its_next_token(tiny):
    """The app's Stop (its `cancel`) pressed while auto's candidates are being generated ends their batch at
    the next token, not after every judged token: the choice is made on the words so far, they are the
    answer, it is marked stopped and nothing goes on; no hook stays on the model."""
    from llm_steering import lens

    model, tok = tiny
    lens.cached_steering_scores(model, tok, comp())  # measured before: only the candidates' forwards count below
    cancel, forwards = threading.Event(), []

    def count(module, args):
        forwards.append(1)
        if len(forwards) == 3:  # the prompt and two more tokens: Stop
            cancel.set()

    handle = model.register_forward_pre_hook(count)
    try:
        stream = calibrate.stream_auto_answer(model, tok, CHAT, comp(), max_new_tokens=24, cancel=cancel, judge_tokens=12,
                                              concept_words=frozenset(), let_go=False)
        text = "".join(stream)
    finally:
        handle.remove()
    assert len(forwards) == 3, "the batch went on after Stop"
    assert all(len(r.token_ids) <= 3 for r in stream.choice.table)
    assert stream.stopped and list(stream.result.token_ids) == list(stream.choice.prefix)
    assert text == tok.decode(list(stream.choice.prefix), skip_special_tokens=True)
    _, layers = steering.decoder_layers(model)
    assert not any(layer._forward_hooks for layer in layers) and not model.model.embed_tokens._forward_pre_hooks
