"""effects.py: the steering's effect on each answer token (log p steered - log p unsteered) and its view."""

from __future__ import annotations

import math
import re

from llm_steering import effects, steering  # noqa: F401
from llm_steering.catalog import Feature
from llm_steering.core import human_name
from llm_steering.steering import SteeringComponent, SteeringTrace
from llm_steering.vectors import SteeringVector
from llm_steering.web import effect_view

import pytest
import torch
from conftest import build_tiny_llama, comps_for, hooks_on, unit

PROMPT = [{"role": "user", "content": "Tell me about your perfect weekend."}]
N_TOKENS = 24


def hf_answer(model, tok, comps, **kw) -> SteeringTrace:
    trace = SteeringTrace()
    "".join(steering.stream_steered_answer_hf(model, tok, PROMPT, comps, max_new_tokens=N_TOKENS, trace=trace, **kw))
    return trace


class ForceTokens:
    """A logits processor that makes generate() pick `tokens`, one per step after `start` prompt tokens."""

    def __init__(self, tokens: list[int], start: int) -> None:
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.tokens[input_ids.shape[1] - self.start]] = 0.0
        return forced


def generated_logprobs(model, prompt: list[int], answer: list[int], comps, steer_from: int, force: bool):
    """The log-probs transformers' generate() saw for each answer token (its raw logits), greedy
    under `comps`; `force` makes it pick `answer` whatever it prefers (teacher forcing)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    kwargs = {}
    if force:
        kwargs["logits_processor"] = LogitsProcessorList([ForceTokens(answer, len(prompt))])
    with torch.no_grad(), steering.steer(model, comps, steer_from=steer_from):
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer), min_new_tokens=len(answer),
            do_sample=False, temperature=None, top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, eos_token_id=None, **kwargs,
        )
    chosen = out.sequences[0, len(prompt) :].tolist()
    logps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, answer, strict=True)]
    return chosen, torch.tensor(logps)


# ---------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_effects_are_the_log_probs_generation_saw(embedded, steer_prompt):
    model, tok = embedded
    comps = comps_for("multi")  # every op, on four layers
    trace = hf_answer(model, tok, comps, steer_prompt=steer_prompt)
    P, ids = trace.prompt_len, trace.token_ids
    prompt, answer = ids[:P], ids[P:]
    steer_from = 0 if steer_prompt else P
    assert len(answer) == N_TOKENS

    # Greedy generate() under the same steering picks the same tokens, and its logits give the steered log-probs.
    chosen, gen_steered = generated_logprobs(model, prompt, answer, comps, steer_from, force=False)
    assert chosen == answer
    steered = effects.answer_logprobs(model, ids, P, comps, steer_from)
    torch.testing.assert_close(steered, gen_steered, atol=2e-4, rtol=0)
    # The plain model's log-probs of the same tokens, from generate() forced to pick them.
    chosen, gen_plain = generated_logprobs(model, prompt, answer, [], 0, force=True)
    assert chosen == answer
    got = torch.tensor(effects.token_effects(model, ids, P, comps, steer_from))
    torch.testing.assert_close(got, gen_steered - gen_plain, atol=4e-4, rtol=0)
    assert got.abs().max() > 0.5  # the steering did something to these tokens
    # steer_from matters: steering the prompt when generation did not (or the reverse) gives other numbers.
    wrong = torch.tensor(effects.token_effects(model, ids, P, comps, P if steer_prompt else 0))
    assert (wrong - got).abs().max() > 1e-2
    if not steer_prompt:
        assert got[0] == 0.0  # the first token comes from the unsteered prompt
    assert hooks_on(model) == 0


def test_adding_a_tokens_direction_makes_that_token_much_more_likely(embedded):
    model, tok = embedded
    paris = tok.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    direction = model.get_input_embeddings().weight[paris[0]].detach().clone()  # tied with the output head
    comp = SteeringComponent(layer=29, vector=direction, strength=40.0)
    trace = hf_answer(model, tok, [comp])
    P, answer = trace.prompt_len, trace.token_ids[trace.prompt_len :]
    assert paris[0] in answer
    assert paris[0] not in hf_answer(model, tok, []).token_ids[P:]  # the plain model does not say it here
    got = effects.token_effects(model, trace.token_ids, P, [comp], 0)
    at = answer.index(paris[0])
    assert got[at] > math.log(10)  # over 10x more likely with the steering
    assert got[at] == max(got)  # and the token the steering pushed most
    html = effect_view.effect_html(tok, trace.token_ids, P, got, [("Paris", "add", 0.3)])
    span = re.search(r'<span class="tok" style="background:rgba\(([\d,]+),([\d.]+)\)" title="([^"]+)"> Paris</span>', html)
    assert span and span.group(1) == effect_view.ORANGE and float(span.group(2)) > 0.4
    assert re.fullmatch(r"\d+× more likely with the steering", span.group(3))


def test_no_components_means_zero_effects_without_running_the_model():
    model = build_tiny_llama()
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    assert effects.token_effects(model, ids, 15, [], 0) == [0.0] * 25
    assert calls == []


@pytest.mark.parametrize("comp", [
    SteeringComponent(layer=2, vector=unit(32, 3), strength=0.0),  # add nothing
    SteeringComponent(layer=1, vector=unit(32, 4), op="ablate", scale=1.0),  # keep all of it
])
def test_a_steering_that_changes_nothing_has_exactly_zero_effect(tiny_llama, comp):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    assert effects.token_effects(tiny_llama, ids, 15, [comp], 0) == [0.0] * 25
    strong = SteeringComponent(layer=2, vector=unit(32, 3), strength=5.0)
    assert any(abs(e) > 1e-3 for e in effects.token_effects(tiny_llama, ids, 15, [strong], 0))


def test_chunks_give_the_same_numbers_and_the_cap_limits_what_is_read(tiny_llama):
    ids = torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    comps = [SteeringComponent(layer=1, vector=unit(32, 5), strength=4.0),
             SteeringComponent(layer=3, vector=unit(32, 6), strength=2.0, op="clamp")]
    whole = effects.token_effects(tiny_llama, ids, 30, comps, 30)
    for chunk in (1, 7, 31, 64):
        torch.testing.assert_close(torch.tensor(effects.token_effects(tiny_llama, ids, 30, comps, 30, chunk=chunk)),
                                   torch.tensor(whole), atol=1e-5, rtol=0)
    capped = effects.token_effects(tiny_llama, ids, 30, comps, 30, max_tokens=50)
    assert capped == pytest.approx(whole[:20], abs=1e-5)
    assert effects.token_effects(tiny_llama, ids, 30, comps, 30, max_tokens=30) == []
    # the model's own context (max_position_embeddings 256) caps too
    long = ids * 3
    assert len(effects.token_effects(tiny_llama, long, 30, comps, 30)) == 256 - 30


def test_no_hook_stays_when_the_forward_pass_raises(tiny_llama):
    def boom(*args):
        raise RuntimeError("boom")

    handle = tiny_llama.model.layers[3].register_forward_hook(boom)
    ids = list(range(20))
    with pytest.raises(RuntimeError, match="boom"):
        effects.token_effects(tiny_llama, ids, 5, [SteeringComponent(layer=1, vector=unit(32, 7), strength=3.0)], 0)
    assert hooks_on(tiny_llama) == 1  # only the test's own
    handle.remove()
    before = tiny_llama(torch.tensor([ids])).logits
    assert torch.equal(build_tiny_llama()(torch.tensor([ids])).logits, before)  # the model is as new


@pytest.mark.parametrize("kwargs, pattern", [
    ({"prompt_len": 0}, "prompt_len"),
    ({"prompt_len": 21}, "prompt_len"),
    ({"chunk": 0}, "chunk"),
    ({"max_tokens": -1}, "max_tokens"),
])
def test_bad_arguments_are_refused_in_one_line(tiny_llama, kwargs, pattern):
    args = {"prompt_len": 5, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        effects.token_effects(tiny_llama, list(range(20)), components=[], steer_from=0, **args)


def test_hit_length_limit():
    assert effects.hit_length_limit([5, 6, 7], 3, [2])
    assert not effects.hit_length_limit([5, 6, 2], 3, [2])  # ended by the model on its last allowed token
    assert not effects.hit_length_limit([5, 6], 3, [2])


# ---------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------


class FakeTokenizer:
    """Token id i decodes to PIECES[i]; 0 is a special token."""

    PIECES = ["</s>", "Hello", " world", "<script>alert('x')</script>", " & more", " end", "\n"]
    all_special_ids = [0]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i == 0))


TOK = FakeTokenizer()
PROMPT_IDS = [1, 1, 1]


def view(answer, effs, features=(("Eiffel Tower", "add", 0.35),), **kw):
    return effect_view.effect_html(TOK, PROMPT_IDS + answer, len(PROMPT_IDS), effs, list(features), **kw)


def spans(html: str) -> list[tuple[str | None, str, str]]:
    """(colour or None, title, text) of each token span."""
    out = []
    for m in re.finditer(r'<span class="tok"(?: style="background:rgba\(([\d,]+),[\d.]+\)")? title="([^"]*)">(.*?)</span>', html, re.S):
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


def test_colours_and_hover_say_what_the_steering_did():
    html = view([1, 2, 5, 6, 0], [math.log(12), -math.log(3), 0.1, -0.2, 0.0])
    (c1, t1, x1), (c2, t2, x2), (c3, t3, x3), (c4, _, x4) = spans(html)
    assert (x1, c1, t1) == ("Hello", effect_view.ORANGE, "12× more likely with the steering")
    assert (x2, c2, t2) == (" world", effect_view.BLUE, "3.0× less likely with the steering")
    assert (x3, c3) == (" end", None) and "would have written this anyway" in t3
    assert (x4, c4) == ("\n", None)
    assert "</s>" not in html  # the special token is left out


def test_stronger_effects_get_stronger_colour():
    html = view([1, 2, 5], [math.log(2), math.log(20), math.log(5000)])
    alphas = [float(a) for a in re.findall(r"rgba\(234,88,12,([\d.]+)\)\" title", html)]
    assert len(alphas) == 3 and alphas[0] < alphas[1] < alphas[2] == 0.85


def test_tokens_and_names_are_escaped():
    html = view([3, 4], [2.0, -2.0], features=[("<img src=x onerror=alert(1)>", "add", 0.3)])
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x" in html
    assert " &amp; more" in html


def test_the_legend_names_features_as_people_read_them():
    vector = SteeringVector(name="eiffel_tower", layer=9, vector=unit(576, 1), concept="eiffel_tower")
    feature = Feature(key="eiffel_tower", vector=vector, norm=172.0, default_fraction=0.35, default_op="add")
    html = view([1, 2], [1.0, 1.0], features=[(feature, "add", 0.35), (human_name("pirate_talk"), "clamp", 0.5),
                                          ("Ocean", "add_keepnorm", 0.25), ("Dragons", "ablate", None)])
    legend = html.split("<div class='toks'")[0]
    assert "<b>Eiffel Tower</b> (added at 0.35)" in legend
    assert "<b>Pirate Talk</b> (held at 0.50)" in legend  # one rounding rule: core.format_fraction
    assert "<b>Ocean</b> (added at 0.25)" in legend and "<b>Dragons</b> (removed)" in legend
    assert "eiffel_tower" not in html and "norm" not in html and "172" not in html
    assert "more likely" in legend and "would have written it anyway" in legend


def test_stopped_and_cut_answers_say_so():
    plain = view([1, 2, 5], [0.0, 0.0, 0.0])
    assert "Stopped" not in plain and "length limit" not in plain
    stopped = view([1, 2, 5], [0.0, 0.0, 0.0], stopped=True)
    assert "Stopped by you after 3 words." in stopped
    cut = view([1, 2, 5], [0.0, 0.0, 0.0], capped=True)
    assert "Cut at the length limit: raise Max new tokens under Advanced." in cut
    assert "Stopped by you before the first word." in view([], None, stopped=True)


def test_tokens_past_the_measured_ones_stay_plain_with_a_note():
    html = view([1, 2, 5], [3.0])
    colours = [c for c, _, _ in spans(html)]
    assert colours == [effect_view.ORANGE, None, None]
    assert "Only the first 1 words are coloured" in html


def test_empty_states_say_what_will_appear():
    for html in (effect_view.effect_html(TOK, None, 0, None, []), view([], []), view([1, 2], None)):
        assert "orange" in html and "send a message" in html
    assert "No steering was on" in view([1, 2], [0.0, 0.0], features=[])
