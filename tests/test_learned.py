"""learned.py (issue 28, item 6): a direction trained through the frozen model; the loss falls, the model is
left as it was, the result repeats for a seed, the dose is the one asked for, bad inputs give one line."""

from __future__ import annotations

from llm_steering import calibrate, learned, steering
from llm_steering.steering import SteeringComponent

import pytest
import torch
from conftest import build_tiny_llama, unit
from test_calibrate import ToyTokenizer

PROMPTS = ["How do I boil an egg?", "Tips for a job interview", "A pancake recipe, please"]


@pytest.fixture
def tiny():
    model = build_tiny_llama(num_layers=4, hidden=32, seed=3)
    model.generation_config.eos_token_id = 2
    return model, ToyTokenizer()


def targets(model, tok, layer=1, strength=6.0, op="add", direction=None):
    """Teacher answers that a known direction gives: what the model says steered by it."""
    chats = [learned.plain_chat(p) for p in PROMPTS]
    comp = SteeringComponent(layer, unit(32, 5) if direction is None else direction, strength=strength, op=op)
    return chats, calibrate.generate_rows(model, tok, chats, [[comp]] * len(chats), 8, 1.1)


@pytest.mark.parametrize("op", ["add", "clamp"])
def test_the_loss_falls_and_the_model_is_left_as_it_was(tiny, op):
    model, tok = tiny
    chats, answers = targets(model, tok, op=op)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = [len(layer._forward_hooks) for layer in steering.decoder_layers(model)[1]]
    seen = []
    res = learned.train_direction(model, tok, chats, answers, 1, op=op, strength=6.0, init=unit(32, 9), steps=30, lr=0.1,
                                  batch_size=2, progress=lambda s, n, loss: seen.append((s, n, loss)))
    assert res.end_loss < res.start_loss - 0.05, (res.start_loss, res.end_loss)
    assert [s for s, _, _ in seen] == list(range(1, 31)) and all(n == 30 for _, n, _ in seen)
    assert abs(float(res.vector.norm()) - 1.0) < 1e-5 and res.vector.shape == (32,)
    assert res.layer == 1 and res.op == op and res.strength == 6.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model's weights must not change"
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert [len(layer._forward_hooks) for layer in steering.decoder_layers(model)[1]] == hooks_before


def test_the_trained_direction_moves_towards_the_one_that_made_the_answers(tiny):
    model, tok = tiny
    target = unit(32, 5)
    chats, answers = targets(model, tok, direction=target)
    init = unit(32, 9)
    res = learned.train_direction(model, tok, chats, answers, 1, strength=6.0, init=init, steps=40, lr=0.1, batch_size=3)
    assert float(res.vector @ target) > float(init @ target) + 0.1
    assert res.cosine_to_init < 0.999


def test_same_seed_same_direction_and_flags_restored(tiny):
    model, tok = tiny
    chats, answers = targets(model, tok)
    model.requires_grad_(True)  # a caller's own flags come back as they were
    a = learned.train_direction(model, tok, chats, answers, 2, strength=4.0, steps=5, batch_size=2, seed=7)
    b = learned.train_direction(model, tok, chats, answers, 2, strength=4.0, steps=5, batch_size=2, seed=7)
    assert torch.equal(a.vector, b.vector) and a.losses == b.losses
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_learn_direction_trains_on_the_teacher_answers_it_keeps(tiny):
    model, tok = tiny
    calls = []

    def first_only(text):
        calls.append(text)
        return len(calls) == 1

    res = learned.learn_direction(model, tok, PROMPTS, "Mention the sea.", 1, strength=3.0, steps=2, batch_size=2,
                                  max_new_tokens=6, keep=first_only, min_kept=1)
    assert len(calls) == 3 and res.teacher == calls[:1] and len(res.losses) == 2
    none = learned.learn_direction(model, tok, PROMPTS, "Mention the sea.", 1, strength=3.0, steps=1, batch_size=2,
                                   max_new_tokens=6, keep=lambda text: False, min_kept=1)
    assert none.teacher == calls, "fewer kept than min_kept: every teacher answer is used"


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 9}, "out of range"),
    ({"op": "cap"}, "unknown op"),
    ({"strength": float("nan")}, "strength"),
    ({"strength": 0.0}, "strength"),
    ({"steps": 0}, "steps"),
    ({"lr": -1.0}, "lr"),
    ({"init": torch.zeros(32)}, "init"),
    ({"init": torch.ones(7)}, "init"),
])
def test_bad_inputs_give_one_line(tiny, kwargs, message):
    model, tok = tiny
    chats, answers = targets(model, tok)
    args = {"layer": 1, "op": "add", "strength": 3.0} | kwargs
    with pytest.raises(ValueError, match=message) as err:
        learned.train_direction(model, tok, chats, answers, args.pop("layer"), **args)
    assert "\n" not in str(err.value)


def test_mismatched_or_empty_inputs_give_one_line(tiny):
    model, tok = tiny
    chats, answers = targets(model, tok)
    with pytest.raises(ValueError, match="one answer per chat"):
        learned.train_direction(model, tok, chats, answers[:1], 1, strength=3.0)
    with pytest.raises(ValueError, match="empty"):
        learned.train_direction(model, tok, chats, [[] for _ in chats], 1, strength=3.0)
    with pytest.raises(ValueError, match="no prompts"):
        learned.train_direction(model, tok, [], [], 1, strength=3.0)
    with pytest.raises(ValueError, match="instruction"):
        learned.teacher_answers(model, tok, PROMPTS, "  ")


class EggTokenizer(ToyTokenizer):
    """Every answer reads as being about boiling an egg (so it shares a word with that prompt only)."""

    def decode(self, ids, skip_special_tokens=True):
        return "boil the egg " + super().decode(ids, skip_special_tokens)


def test_steered_teachers_keep_only_answers_that_name_it_and_answer(tiny):
    model, _ = tiny
    tok = EggTokenizer()
    prompts = ["How do I boil an egg?", "Tips for a job interview"]
    got = learned.steered_teachers(model, tok, prompts, 1, "add", 3.0, unit(32, 5), keep=lambda t: True,
                                   multipliers=(1.0, 2.0), nll_bound=100.0, max_new_tokens=6)
    assert {i for i, _, _ in got} <= {0}, "the interview prompt shares no word with any answer"
    chat = [learned.plain_chat(prompts[0])]
    made = [calibrate.generate_rows(model, tok, chat, [[SteeringComponent(1, unit(32, 5), strength=m * 3.0)]], 6)[0]
            for m in (1.0, 2.0)]
    assert all(ids in made for _, ids, _ in got)
    assert learned.steered_teachers(model, tok, prompts, 1, "add", 3.0, unit(32, 5), keep=lambda t: False,
                                    multipliers=(1.0,), max_new_tokens=4) == []
    with pytest.raises(ValueError, match="steered teachers need keep"):
        learned.learn_direction(model, tok, prompts, "Mention eggs.", 1, strength=3.0, steered=(1.0,), init=unit(32, 5))
