"""steering.py: the math on tiny random Llamas, both backends on the embedded model, errors, isolation."""

from __future__ import annotations

import math
import threading
import time

from llm_steering import steering
from llm_steering.steering import SteeringComponent, SteeringTrace

import pytest
import torch
from conftest import build_tiny_llama, comps_for, hooks_on, unit

# ---------------------------------------------------------------------------
# Exact math on tiny random Llama models
# ---------------------------------------------------------------------------


def layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state after every decoder layer, captured by hooks registered last."""
    outs: list[torch.Tensor] = []
    _, layers = steering.decoder_layers(model)
    handles = [
        layer.register_forward_hook(lambda m, a, o: outs.append(steering.layer_hidden(o).clone())) for layer in layers
    ]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return outs


IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])


def test_add_changes_only_the_steered_layer_by_exactly_s_v(tiny_llama):
    s, L = 3.5, 2
    comp = SteeringComponent(layer=L, vector=unit(32, 1) * 7.0, strength=s)
    v = comp.vector  # the stored unit vector
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, [comp]):
        steered = layer_outputs(tiny_llama, IDS)
    for i in range(L):
        assert torch.equal(steered[i], plain[i])
    assert torch.equal(steered[L], plain[L] + s * v)
    assert not torch.allclose(steered[L + 1], plain[L + 1])


def test_clamp_sets_the_component_exactly_and_keeps_the_rest(tiny_llama):
    v, s, L = unit(32, 2), -4.0, 1
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, [SteeringComponent(layer=L, vector=v, strength=s, op="clamp")]):
        steered = layer_outputs(tiny_llama, IDS)
    proj = steered[L] @ v
    torch.testing.assert_close(proj, torch.full_like(proj, s), atol=1e-5, rtol=0)
    # the part orthogonal to v is untouched
    ortho = lambda h: h - (h @ v).unsqueeze(-1) * v  # noqa: E731
    torch.testing.assert_close(ortho(steered[L]), ortho(plain[L]), atol=1e-5, rtol=0)


def test_cap_limits_the_component_and_leaves_values_inside_alone(tiny_llama):
    v, L = unit(32, 3), 2
    plain = layer_outputs(tiny_llama, IDS)
    p0 = plain[L] @ v
    lo, hi = float(p0.quantile(0.25)), float(p0.quantile(0.75))
    comp = SteeringComponent(layer=L, vector=v, op="cap", cap_min=lo, cap_max=hi)
    with steering.steer(tiny_llama, [comp]):
        steered = layer_outputs(tiny_llama, IDS)
    p1 = steered[L] @ v
    torch.testing.assert_close(p1, p0.clamp(lo, hi), atol=1e-5, rtol=0)
    inside = (p0 >= lo) & (p0 <= hi)
    assert inside.any() and (~inside).any()
    assert torch.equal(steered[L][inside], plain[L][inside])


@pytest.mark.parametrize("op", ["add_keepnorm", "clamp_keepnorm"])
def test_keepnorm_ops_edit_like_the_plain_op_then_restore_each_positions_norm(tiny_llama, op):
    v, s, L = unit(32, 9), 6.0, 2
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, [SteeringComponent(layer=L, vector=v, strength=s, op=op.removesuffix("_keepnorm"))]):
        edited = layer_outputs(tiny_llama, IDS)[L]
    with steering.steer(tiny_llama, [SteeringComponent(layer=L, vector=v, strength=s, op=op)]):
        steered = layer_outputs(tiny_llama, IDS)
    kept, norm = steered[L], plain[L].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(kept, edited * norm / edited.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.norm(dim=-1), norm.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert (kept - edited).norm(dim=-1).min() > 0.1  # the rescale changed every position
    assert not torch.allclose(steered[L + 1], plain[L + 1])


def test_keepnorm_leaves_a_zero_state_zero_and_respects_steer_from():
    v, g = unit(32, 10), torch.Generator().manual_seed(0)
    h = torch.stack([torch.randn(32, generator=g), torch.zeros(32), torch.randn(32, generator=g)])[None]
    out = steering.steer_hidden(h, [SteeringComponent(layer=0, vector=v, strength=5.0, op="add_keepnorm")], [v], steer_from=1)
    assert torch.equal(out[0, 0], h[0, 0])  # before steer_from: untouched
    assert torch.equal(out[0, 1], torch.zeros(32))  # norm 0 before: 0 after, not NaN
    torch.testing.assert_close(out[0, 2].norm(), h[0, 2].norm())
    assert (out[0, 2] @ v) > (h[0, 2] @ v)


def test_clamp_intensity_turns_add_keepnorm_into_clamp_keepnorm():
    comps = [SteeringComponent(layer=1, vector=unit(32, 1), strength=2.0, op="add_keepnorm")]
    assert [c.op for c in steering.resolve_components(comps, clamp_intensity=True)] == ["clamp_keepnorm"]


@pytest.mark.parametrize("scale", [0.0, 0.5, -1.0])
def test_ablate_scales_the_component(tiny_llama, scale):
    v, L = unit(32, 4), 1
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, [SteeringComponent(layer=L, vector=v, op="ablate", scale=scale)]):
        steered = layer_outputs(tiny_llama, IDS)
    torch.testing.assert_close(steered[L] @ v, scale * (plain[L] @ v), atol=1e-5, rtol=0)


def test_components_on_one_layer_compose_in_order(tiny_llama):
    v, L = unit(32, 5), 1
    add = SteeringComponent(layer=L, vector=v, strength=2.0)
    clamp = SteeringComponent(layer=L, vector=v, strength=5.0, op="clamp")
    with steering.steer(tiny_llama, [add, clamp]):
        p_add_then_clamp = layer_outputs(tiny_llama, IDS)[L] @ v
    with steering.steer(tiny_llama, [clamp, add]):
        p_clamp_then_add = layer_outputs(tiny_llama, IDS)[L] @ v
    torch.testing.assert_close(p_add_then_clamp, torch.full_like(p_add_then_clamp, 5.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(p_clamp_then_add, torch.full_like(p_clamp_then_add, 7.0), atol=1e-5, rtol=0)


def test_two_adds_on_one_layer_stack(tiny_llama):
    L = 3
    comps = [SteeringComponent(layer=L, vector=unit(32, 6), strength=1.5), SteeringComponent(layer=L, vector=unit(32, 7), strength=-2.0)]
    v, w = comps[0].vector, comps[1].vector
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, comps):
        steered = layer_outputs(tiny_llama, IDS)
    assert torch.equal(steered[L], plain[L] + 1.5 * v + -2.0 * w)


def test_steer_from_leaves_earlier_positions_alone(tiny_llama):
    L = 1
    comp = SteeringComponent(layer=L, vector=unit(32, 8), strength=3.0)
    v = comp.vector
    plain = layer_outputs(tiny_llama, IDS)
    with steering.steer(tiny_llama, [comp], steer_from=5):
        steered = layer_outputs(tiny_llama, IDS)
    assert torch.equal(steered[L][:, :5], plain[L][:, :5])
    assert torch.equal(steered[L][:, 5:], plain[L][:, 5:] + 3.0 * v)


def test_removing_the_steering_restores_the_logits_bit_for_bit(tiny_llama):
    before = tiny_llama(IDS).logits
    comps = [
        SteeringComponent(layer=0, vector=unit(32, 9), strength=8.0, op="clamp"),
        SteeringComponent(layer=2, vector=unit(32, 10), strength=5.0),
    ]
    with steering.steer(tiny_llama, comps):
        during = tiny_llama(IDS).logits
    after = tiny_llama(IDS).logits
    assert not torch.allclose(during, before)
    assert torch.equal(after, before)
    assert hooks_on(tiny_llama) == 0


def test_tuple_and_tensor_layer_outputs_are_both_handled():
    h = torch.randn(1, 3, 8)
    extra = torch.zeros(1)
    assert steering.layer_hidden(h) is h
    assert steering.layer_hidden((h, extra)) is h
    h2 = h + 1
    assert steering.with_hidden(h, h2) is h2
    out = steering.with_hidden((h, extra), h2)
    assert isinstance(out, tuple) and out[0] is h2 and out[1] is extra


def test_steer_acts_only_in_its_own_thread(tiny_llama):
    plain = tiny_llama(IDS).logits
    result: dict[str, torch.Tensor] = {}
    entered, done = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(5)
        result["other"] = tiny_llama(IDS).logits
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with steering.steer(tiny_llama, [SteeringComponent(layer=1, vector=unit(32, 11), strength=9.0)]):
        entered.set()
        done.wait(5)
        mine = tiny_llama(IDS).logits
    t.join()
    assert torch.equal(result["other"], plain)
    assert not torch.allclose(mine, plain)


def test_hooks_go_when_the_block_raises(tiny_llama):
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(tiny_llama, [SteeringComponent(layer=1, vector=unit(32, 12), strength=1.0)]):
            assert hooks_on(tiny_llama) == 1
            raise RuntimeError("boom")
    assert hooks_on(tiny_llama) == 0


# ---------------------------------------------------------------------------
# Errors: one line, says what is wrong and what is allowed
# ---------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Hello"}]


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"vector": torch.full((32,), float("nan"))}, "NaN"),
        ({"vector": torch.zeros(32)}, "zero norm"),
        ({"vector": torch.ones(4, 8)}, "1-D"),
        ({"strength": float("nan")}, "strength must be a finite number"),
        ({"strength": float("inf")}, "strength must be a finite number"),
        ({"op": "multiply"}, "unknown op 'multiply'; use one of add, clamp, cap, ablate"),
        ({"op": "cap"}, "needs cap_min, cap_max or both"),
        ({"op": "cap", "cap_min": 2.0, "cap_max": 1.0}, "above cap_max"),
        ({"layer": -1}, "non-negative integer"),
    ],
)
def test_bad_components_are_refused_in_one_line(kwargs, pattern):
    args = {"layer": 1, "vector": unit(32, 0), "strength": 1.0} | kwargs
    with pytest.raises(ValueError) as excinfo:
        SteeringComponent(**args)
    assert pattern in one_line_error(excinfo)


def test_layer_out_of_range_and_wrong_size_are_refused(tiny_llama):
    with pytest.raises(ValueError) as excinfo:
        steering.validate_components(tiny_llama, [SteeringComponent(layer=4, vector=unit(32, 0))])
    assert "layer 4 is out of range: this model has 4 layers (0-3)" in one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        steering.validate_components(tiny_llama, [SteeringComponent(layer=1, vector=unit(33, 0))])
    assert "vector has size 33, but this model's hidden size is 32" in one_line_error(excinfo)


def test_errors_from_both_backends_at_call_time(embedded):
    model, tok = embedded
    bad_layer = [SteeringComponent(layer=30, vector=unit(576, 0), strength=1.0)]
    bad_size = [SteeringComponent(layer=3, vector=unit(64, 0), strength=1.0)]
    for fn in (steering.stream_steered_answer_hf, steering.generate_steered_answer):
        with pytest.raises(ValueError, match=r"layer 30 is out of range: this model has 30 layers \(0-29\)"):
            fn(model, tok, CHAT, bad_layer)
        with pytest.raises(ValueError, match="hidden size is 576"):
            fn(model, tok, CHAT, bad_size)
        for chat in ([], [{"role": "user", "content": "   "}]):
            with pytest.raises(ValueError) as excinfo:
                fn(model, tok, chat, [])
            assert "chat" in one_line_error(excinfo)
        with pytest.raises(ValueError, match="temperature"):
            fn(model, tok, CHAT, [], temperature=float("nan"))
        with pytest.raises(ValueError, match="max_new_tokens"):
            fn(model, tok, CHAT, [], max_new_tokens=0)
    assert hooks_on(model) == 0


def test_an_over_long_prompt_is_refused(embedded):
    model, tok = embedded
    limit = model.config.max_position_embeddings
    chat = [{"role": "user", "content": "word " * (limit + 10)}]
    with pytest.raises(ValueError, match=f"reads at most {limit}"):
        steering.stream_steered_answer_hf(model, tok, chat, [])


# ---------------------------------------------------------------------------
# The embedded model: traces, isolation, cancellation (the cross-backend suite: tests/test_backends.py)
# ---------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Tell me a short story about a dog."}]
N_TOKENS = 16


def hf_answer(model, tok, comps, **kw) -> tuple[str, SteeringTrace]:
    trace = SteeringTrace()
    text = "".join(steering.stream_steered_answer_hf(model, tok, PROMPT, comps, max_new_tokens=N_TOKENS, trace=trace, **kw))
    return text, trace


@pytest.fixture(scope="module")
def unsteered(embedded):
    model, tok = embedded
    return hf_answer(model, tok, [])


def test_trace_shows_the_clamp_at_every_prompt_and_answer_position(embedded):
    model, tok = embedded
    _, trace = hf_answer(model, tok, comps_for("clamp"))
    comp = trace.components[0]
    assert trace.prompt_len > 5 and len(trace.token_ids) > trace.prompt_len
    assert all(abs(x - 60.0) < 1e-3 for x in comp.after)
    assert not all(abs(x - 60.0) < 1e-3 for x in comp.before)


def test_clamp_intensity_turns_adds_into_clamps(embedded):
    model, tok = embedded
    add = [SteeringComponent(layer=12, vector=unit(576, 100), strength=60.0)]
    text_a, trace_a = hf_answer(model, tok, add, clamp_intensity=True)
    text_b, trace_b = hf_answer(model, tok, comps_for("clamp"))
    assert trace_a.token_ids == trace_b.token_ids
    assert trace_a.components[0].op == "clamp"


def test_steer_prompt_false_leaves_the_prompt_alone(embedded):
    model, tok = embedded
    comps = comps_for("clamp")
    _, trace = hf_answer(model, tok, comps, steer_prompt=False)
    comp = trace.components[0]
    P = trace.prompt_len
    assert comp.before[:P] == comp.after[:P]
    assert all(abs(x - 60.0) < 1e-3 for x in comp.after[P:])


def test_concurrent_requests_each_get_their_own_answer(embedded, unsteered):
    model, tok = embedded
    cases = ["add", "clamp", "multi", None]
    alone = {c: (hf_answer(model, tok, comps_for(c))[0] if c else unsteered[0]) for c in cases}
    results: dict[str | None, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases) + 1)

    def worker(case: str | None) -> None:
        try:
            start.wait(10)
            if case == "multi":  # one of them through the NNsight backend, at the same time
                results[case] = steering.generate_steered_answer(model, tok, PROMPT, comps_for(case), max_new_tokens=N_TOKENS)
            else:
                results[case] = hf_answer(model, tok, comps_for(case) if case else [])[0]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    start.wait(10)
    for t in threads:
        t.join(120)
    assert not errors
    assert results == alone
    assert len(set(alone.values())) == len(cases)
    assert hooks_on(model) == 0


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "steered-generation"]


def test_a_consumer_that_stops_reading_ends_the_generation(embedded):
    model, tok = embedded
    stream = steering.stream_steered_answer_hf(model, tok, PROMPT, comps_for("multi"), max_new_tokens=200)
    first = next(stream)
    assert first and hooks_on(model) == 3  # one hook each on layers 3, 10 and 20
    t0 = time.monotonic()
    stream.close()
    assert time.monotonic() - t0 < 5
    assert hooks_on(model) == 0
    assert generation_threads() == []


def test_an_error_during_generation_reaches_the_caller_and_leaves_no_hook(embedded):
    model, tok = embedded
    _, layers = steering.decoder_layers(model)
    calls = {"n": 0}

    def failing(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure in layer 25")

    handle = layers[25].register_forward_hook(failing)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            "".join(steering.stream_steered_answer_hf(model, tok, PROMPT, comps_for("clamp"), max_new_tokens=10))
        assert hooks_on(model) == 1  # only the test's own hook is left
    finally:
        handle.remove()
    assert generation_threads() == []


def test_nnsight_leaves_the_users_model_untouched(embedded, unsteered):
    model, tok = embedded
    steering.generate_steered_answer(model, tok, PROMPT, comps_for("add"), max_new_tokens=4)
    _, layers = steering.decoder_layers(model)
    assert "forward" not in vars(layers[10])  # NNsight wraps a weight-sharing copy, not this model
    assert hf_answer(model, tok, [])[0] == unsteered[0]


def test_sampling_runs_with_temperature_and_repetition_penalty(embedded):
    model, tok = embedded
    torch.manual_seed(0)
    text = "".join(
        steering.stream_steered_answer_hf(
            model, tok, PROMPT, comps_for("add"), max_new_tokens=8, temperature=0.7, repetition_penalty=1.1
        )
    )
    assert text.strip()


# ---------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------


def test_load_model_from_a_local_directory_laid_out_like_the_hub(tmp_path, embedded):
    _, tok = embedded
    model = build_tiny_llama(num_layers=3, hidden=32)
    model.config.vocab_size = len(tok)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = steering.load_model(str(tmp_path))
    assert steering.num_layers(loaded) == 3 and steering.hidden_size(loaded) == 32
    assert loaded.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    comps = [SteeringComponent(layer=1, vector=unit(32, 1), strength=2.0, op="clamp")]
    text = "".join(steering.stream_steered_answer_hf(loaded, loaded_tok, CHAT, comps, max_new_tokens=4))
    nn_text = steering.generate_steered_answer(loaded, loaded_tok, CHAT, comps, max_new_tokens=4)
    assert text == nn_text


def test_load_model_names_a_missing_model_in_one_line(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        steering.load_model(str(tmp_path / "nope"))
    assert "could not load model" in one_line_error(excinfo)


def test_embedded_model_is_cached_where_the_user_says(monkeypatch, tmp_path, embedded):
    model, _ = embedded
    assert steering.model_id_of(model) == steering.EMBEDDED_MODEL_ID
    assert steering.num_layers(model) == 30 and steering.hidden_size(model) == 576
    monkeypatch.setenv(steering.CACHE_ENV, str(tmp_path / "cache"))
    assert steering.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(steering.CACHE_ENV)
    cached = steering.embedded_model_dir()  # already converted by the session fixture: no new conversion
    assert (cached / "model.safetensors").is_file() and cached.parent == steering.cache_dir()


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = steering.embedded_gguf_path()
    assert path.name == steering.EMBEDDED_GGUF and path.stat().st_size > 50e6
    assert steering.EMBEDDED_PACKAGE not in sys.modules


def test_components_are_stored_as_unit_float32():
    comp = SteeringComponent(layer=2, vector=torch.tensor([3.0, 4.0], dtype=torch.float64), strength=1)
    assert comp.vector.dtype == torch.float32
    assert math.isclose(float(comp.vector.norm()), 1.0, rel_tol=1e-6)
    assert comp.strength == 1.0 and isinstance(comp.strength, float)


def test_importing_steering_first_makes_openmp_threads_wait_passively():
    import os
    import subprocess
    import sys

    code = "import os, steering; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=__import__("pathlib").Path(steering.__file__).parents[1],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # an explicit setting wins
    out = subprocess.run([sys.executable, "-c", code], cwd=__import__("pathlib").Path(steering.__file__).parents[1],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_vectors_follow_the_hidden_states_dtype_and_device(tiny_llama):
    """A bfloat16 model steered with float32 vectors: the edit happens in the hidden state's dtype."""
    model = tiny_llama.to(torch.bfloat16)
    v = unit(32, 3)
    h = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    out = steering.steer_hidden(h, [SteeringComponent(layer=1, vector=v, strength=2.0, op="clamp")], [v])
    assert out.dtype == torch.bfloat16
    assert torch.allclose((out.float() @ v), torch.full((1, 5), 2.0), atol=0.05)
    with steering.steer(model, [SteeringComponent(layer=1, vector=v, strength=3.0)]):
        steered = model(IDS).logits
    assert steered.dtype == torch.bfloat16 and not torch.equal(steered, model(IDS).logits)


def test_trace_projections_stay_on_the_device_until_flushed():
    v = unit(32, 4)
    comp = SteeringComponent(layer=0, vector=v, strength=1.0, op="clamp")
    trace = steering.SteeringTrace(components=[steering.ComponentTrace(layer=0, name="", op="clamp")])
    for _ in range(3):  # three forwards: no list grows (no .tolist() per layer and token)
        steering.steer_hidden(torch.randn(1, 4, 32), [comp], [v], record=trace.components)
    assert trace.components[0].before == [] and len(trace.components[0].pending) == 3
    trace.flush()
    assert len(trace.components[0].before) == 12 and trace.components[0].pending == []
    assert all(abs(x - 1.0) < 1e-5 for x in trace.components[0].after)


def test_an_nnsight_answer_leaves_no_save_on_every_object(embedded):
    """NNsight 0.8 mounts `.save` on `object`; anyio classes defined afterwards (gradio's MCP
    server) then refuse to exist, so importing gradio after an NNsight answer failed."""
    import subprocess
    import sys

    code = ("import steering, torch; m, t = steering.load_model(); "
            "steering.generate_steered_answer(m, t, [{'role': 'user', 'content': 'hi'}], "
            "[steering.SteeringComponent(layer=3, vector=torch.ones(576), strength=1.0)], max_new_tokens=2); "
            "assert not hasattr(object, 'save'); import gradio; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=__import__("pathlib").Path(steering.__file__).parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-600:]
