"""calibrate.py: per-row steering equals single-request steering; the NLL scoring; the choice of strength."""

from __future__ import annotations

import threading

from llm_steering import calibrate, steering
from llm_steering.steering import SteeringComponent

import pytest
import torch
from conftest import build_tiny_llama, unit
from transformers import GenerationConfig

CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "How do I boil an egg?"}]


class ToyTokenizer:
    """Just enough of a tokenizer for the tiny random Llama: characters to ids, ids to words."""

    pad_token_id = 0
    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [3 + ord(ch) % 120 for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids if not (skip_special_tokens and int(i) in (0, 1, 2)))


def single_answer(model, tok, chat, comps, max_new_tokens=12, steer_prompt=True):
    """The library's single-request steering (steering.steer hooks) on one unpadded prompt, greedy."""
    ids = steering.chat_input_ids(tok, chat)
    eos = steering.eos_ids(model, tok)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                              repetition_penalty=1.1, pad_token_id=0, eos_token_id=eos)
    x = torch.tensor([ids])
    with steering.steer(model, comps, steer_from=0 if steer_prompt else len(ids)), torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return out[:cut]


@pytest.fixture
def tiny():
    model = build_tiny_llama(num_layers=4, hidden=32, seed=3)
    model.generation_config.eos_token_id = 2
    return model, ToyTokenizer()


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_each_row_is_the_single_request_at_its_strength(tiny, steer_prompt):
    model, tok = tiny
    v, w = unit(32, 1), unit(32, 2)
    rows = [
        [],
        [SteeringComponent(1, v, strength=4.0, op="add")],
        [SteeringComponent(1, v, strength=-3.0, op="clamp")],
        [SteeringComponent(2, w, op="cap", cap_min=2.5, cap_max=None)],
        [SteeringComponent(1, v, strength=2.0, op="clamp"), SteeringComponent(3, w, strength=5.0, op="add")],
        [SteeringComponent(1, v, strength=4.0, op="add_keepnorm")],
        [SteeringComponent(2, w, strength=-3.0, op="clamp_keepnorm")],
    ]
    chats = [CHAT, CHAT, [{"role": "user", "content": "Hi"}], CHAT, [{"role": "user", "content": "A longer question here?"}],
             CHAT, [{"role": "user", "content": "Hi"}]]
    batched = calibrate.generate_rows(model, tok, chats, rows, max_new_tokens=12, steer_prompt=steer_prompt)
    single = [single_answer(model, tok, c, r, steer_prompt=steer_prompt) for c, r in zip(chats, rows, strict=True)]
    assert batched == single
    assert len({tuple(a) for a in batched}) > 1  # the steering changed something, or this test shows nothing


def test_row_steering_edits_each_row_like_steer_hidden(tiny):
    model, _ = tiny
    v = unit(32, 5)
    comps = [[SteeringComponent(2, v, strength=s, op="clamp")] for s in (0.0, 1.5, -2.0)]
    x = torch.randint(3, 120, (3, 9))
    seen = {}
    handle = model.model.layers[2].register_forward_hook(lambda m, a, o: seen.setdefault("raw", (o[0] if isinstance(o, tuple) else o).clone()))
    with calibrate.row_steering(model, comps), torch.inference_mode():
        batched_logits = model(input_ids=x).logits
    handle.remove()
    # the layer's own output before the row edit, edited by the library function row by row
    expected = torch.cat([steering.steer_hidden(seen["raw"][b : b + 1], comps[b], [v]) for b in range(3)])
    assert torch.allclose((expected @ v), torch.tensor([0.0, 1.5, -2.0])[:, None].expand(3, 9), atol=1e-5)
    for b in range(3):
        with steering.steer(model, comps[b]), torch.inference_mode():
            alone = model(input_ids=x[b : b + 1]).logits
        assert torch.allclose(batched_logits[b : b + 1], alone, atol=1e-5)


def test_row_steering_leaves_other_threads_alone(tiny):
    model, _ = tiny
    x = torch.randint(3, 120, (1, 7))
    with torch.inference_mode():
        plain = model(input_ids=x).logits
    got = {}
    with calibrate.row_steering(model, [[SteeringComponent(1, unit(32, 6), strength=9.0, op="add")]]), torch.inference_mode():
        steered = model(input_ids=x).logits
        t = threading.Thread(target=lambda: got.setdefault("other", model(input_ids=x).logits))
        t.start()
        t.join()
    assert not torch.allclose(steered, plain)
    assert torch.equal(got["other"], plain)
    assert calibrate_hooks(model) == 0


def calibrate_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_answer_nll_matches_full_logits(tiny):
    model, tok = tiny
    answers = [[5, 9, 11, 40], [7]]
    chats = [CHAT, [{"role": "user", "content": "Hi"}]]
    nlls, projs = calibrate.answer_nll(model, tok, chats, answers, probe={1: unit(32, 4)})
    for chat, ans, nll, proj in zip(chats, answers, nlls, projs, strict=True):
        p = steering.chat_input_ids(tok, chat)
        ids = torch.tensor([p + ans])
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        logp = out.logits[0].log_softmax(-1)
        want = -torch.stack([logp[len(p) - 1 + i, t] for i, t in enumerate(ans)]).mean()
        assert nll == pytest.approx(float(want), abs=1e-5)
        assert proj[1] == pytest.approx(float((out.hidden_states[2][0, len(p):] @ unit(32, 4)).mean()), abs=1e-5)


def test_calibration_picks_the_strongest_row_within_the_bound(tiny):
    model, tok = tiny
    comp = SteeringComponent(1, unit(32, 7), strength=123.0, op="clamp", name="x")
    fractions = (0.5, 1.0, 2.0, 4.0, 8.0)
    cal = calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=fractions, norm=3.0, nll_bound=1.05,
                                       max_rep3=1.1, max_new_tokens=10)
    assert [r.fraction for r in cal.table] == [0.0, *fractions]
    assert [r.strength for r in cal.table] == [0.0, 1.5, 3.0, 6.0, 12.0, 24.0]
    base = cal.table[0]
    assert base.nll_ratio == 1.0 and base.within_bound
    for r in cal.table[1:]:
        assert r.nll_ratio == pytest.approx(r.nll / base.nll)
        assert r.within_bound == (r.nll_ratio <= 1.05)
    best = max((r for r in cal.table if r.within_bound), key=lambda r: r.fraction)
    assert (cal.fraction, cal.strength, cal.answer) == (best.fraction, best.strength, best.answer)
    # the chosen answer is what the single request at that strength answers
    chosen = [] if cal.fraction == 0 else [comp.with_op("clamp", strength=cal.strength)]
    assert cal.answer == tok.decode(single_answer(model, tok, CHAT, chosen, max_new_tokens=10))
    # no bound worth the name: the strongest row wins; the tightest bound: only the unsteered row is left
    loose = calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=fractions, norm=3.0, nll_bound=1e9, max_rep3=1.1,
                                         max_new_tokens=10)
    assert loose.fraction == 8.0 and loose.found
    assert len({r.answer for r in loose.table}) > 1


def test_calibration_with_a_one_sided_clamp_and_other_features(tiny):
    model, tok = tiny
    other = SteeringComponent(3, unit(32, 9), strength=2.0, op="add")
    comp = SteeringComponent(1, unit(32, 8), op="cap", cap_min=0.1, cap_max=None)
    cal = calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=(1.0, 3.0), nll_bound=1e9, max_rep3=1.1,
                                       other_components=[other], max_new_tokens=8)
    assert cal.fraction == 3.0
    want = single_answer(model, tok, CHAT, [other, calibrate.with_strength(comp, 3.0)], max_new_tokens=8)
    assert cal.answer == tok.decode(want)
    assert cal.table[0].answer == tok.decode(single_answer(model, tok, CHAT, [other], max_new_tokens=8))


def test_with_strength_and_errors(tiny):
    model, tok = tiny
    cap = calibrate.with_strength(SteeringComponent(1, unit(32, 1), op="cap", cap_min=-1.0, cap_max=2.0), 5.0)
    assert (cap.cap_min, cap.cap_max) == (5.0, None)
    comp = SteeringComponent(1, unit(32, 1), strength=1.0, op="add")
    with pytest.raises(ValueError, match="fractions is empty"):
        calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=())
    with pytest.raises(ValueError, match="nll_bound"):
        calibrate.calibrate_strength(model, tok, CHAT, comp, nll_bound=0.5)
    with pytest.raises(ValueError, match="ablate"):
        calibrate.with_strength(SteeringComponent(1, unit(32, 1), op="ablate"), 1.0)
    with pytest.raises(ValueError, match="fractions must be positive"):
        calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=(0.1, -0.2))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        calibrate.calibrate_strength(model, tok, CHAT, SteeringComponent(9, unit(32, 1), strength=1.0), fractions=(1.0,))
    with pytest.raises(ValueError, match="hidden size is 32"):
        calibrate.calibrate_strength(model, tok, CHAT, SteeringComponent(1, unit(16, 1), strength=1.0), fractions=(1.0,))


def test_embedded_model_calibration_answer_is_the_library_answer(embedded):
    """Embedded SmolLM2-135M-Instruct (slow: about 20 s): the chosen answer is steering's own at that strength."""
    model, tok = embedded
    vectors = steering.load_vectors(steering_vectors_path())
    key = "pirate"
    layer = vectors.get(key).layer
    comp = vectors.component(key, 1.0, op="clamp")
    cal = calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=(0.1, 0.2, 0.3), norm=vectors.norm(layer),
                                       nll_bound=1e9, max_new_tokens=24)
    assert len(cal.table) == 4
    for row in cal.table[1:]:
        lib = steering.generate_steered_answer_hf(model, tok, CHAT, [vectors.component(key, row.fraction, op="clamp")],
                                                  max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)
        assert row.answer.strip() == lib.strip()
    unsteered = steering.generate_steered_answer_hf(model, tok, CHAT, [], max_new_tokens=24, temperature=0.0,
                                                    repetition_penalty=1.1)
    assert cal.table[0].answer.strip() == unsteered.strip()
    assert cal.table[-1].answer != cal.table[0].answer


def steering_vectors_path():
    from conftest import ROOT

    return ROOT / "steering_vectors.pt"


def test_candidate_fractions_scale_the_default():
    assert calibrate.candidate_fractions(0.2) == [0.12, 0.17, 0.22]
    assert calibrate.candidate_fractions(0.1, (1.0, 2.0)) == [0.1, 0.2]


def tiny_other(arch: str):
    """A tiny random GPT-2, GPT-NeoX or OPT: architectures decoder_layers accepts besides Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(5)
    model = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=256)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             max_position_embeddings=256)),
        "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256)),
    }[arch]().eval().requires_grad_(False)
    model.generation_config.eos_token_id = 2
    return model


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt"])
def test_calibration_runs_on_every_architecture_decoder_layers_accepts(arch):
    """It read model.model.layers and model.lm_head: AttributeError on GPT-2, GPT-NeoX and OPT."""
    model, tok = tiny_other(arch), ToyTokenizer()
    comp = SteeringComponent(1, unit(32, 7), strength=1.0, op="clamp")
    cal = calibrate.calibrate_strength(model, tok, CHAT, comp, fractions=(0.5, 2.0), norm=3.0, nll_bound=1e9,
                                       max_rep3=1.1, max_new_tokens=6)
    assert cal.fraction == 2.0
    assert cal.answer == tok.decode(single_answer(model, tok, CHAT, [comp.with_op("clamp", strength=6.0)], max_new_tokens=6))
    answers = [[5, 9, 11]]
    (nll,) = calibrate.answer_nll(model, tok, [CHAT], answers)
    p = steering.chat_input_ids(tok, CHAT)
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([p + answers[0]])).logits[0].log_softmax(-1)
    assert nll == pytest.approx(float(-torch.stack([logp[len(p) - 1 + i, t] for i, t in enumerate(answers[0])]).mean()), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_the_structure_helpers_find_layers_norm_and_unembedding(arch):
    model = build_tiny_llama() if arch == "llama" else tiny_other(arch)
    _, layers = steering.decoder_layers(model)
    norm, head = steering.final_norm(model), steering.unembedding(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = {}
    hooks = [(layers[-1], lambda m, a, out: seen.__setitem__("last", steering.layer_hidden(out))),
             (norm, lambda m, a, out: seen.__setitem__("normed", out))]
    with steering.forward_hooks(hooks), torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # removed on exit
    torch.testing.assert_close(norm(seen["last"]), seen["normed"])
    if arch != "opt":  # OPT projects out after its norm (an identity at these sizes, but a separate module)
        torch.testing.assert_close(head(seen["normed"]), logits)
    torch.testing.assert_close(head(steering.base_model(model)(input_ids=ids).last_hidden_state), logits)
