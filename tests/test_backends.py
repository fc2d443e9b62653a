"""The conformance suite: every registered backend behaves the same (llm_steering/backends/base.py).

Each test runs on every name in the registry, on the embedded model: the same greedy tokens as
plain transformers generate() under `steering.steer` for every op, on one and several layers,
with steer_prompt on and off; cancel ends generation within a second and keeps the answer so far;
stop and length reported as such; the same one-line errors for the same bad input; traces of the
same shape and values. A backend that cannot run here (vLLM not installed) is skipped with the
registry's one-line reason; CI installs vLLM, so all three run there. The vLLM engine starts once
for the module in the dtype policy's default (float32 on the CPU), with a small token budget per
step so prompts are prefilled in chunks beside other rows.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

from llm_steering import steering
from llm_steering.backends import Backend, GenerationSettings, backend_names, get_backend
from llm_steering.backends.base import _REGISTRY
from llm_steering.steering import SteeringComponent

import pytest
import torch
from conftest import ROOT, comps_for, unit

PROMPT = [{"role": "user", "content": "Tell me a short story about a dog."}]
N_TOKENS = 16
CASES = ["add", "clamp", "cap", "ablate", "add_keepnorm", "clamp_keepnorm", "multi"]
_made: dict[str, object] = {}
_reference: dict[tuple, list[int]] = {}


_requests: list = []


@pytest.fixture(scope="module", autouse=True)
def close_backends(request):
    _requests[:] = [request]
    yield
    for name, backend in _made.items():
        if name != "vllm":  # the session's engine (conftest.vllm_engine) is shut down by its fixture
            backend.close()
    _made.clear()


def backend(name: str, embedded):
    """The backend `name` on the embedded model, made once per module (skipped where it cannot run); vLLM's
    wraps the session's engine (conftest.vllm_engine)."""
    reason = _REGISTRY[name].unavailable()
    if reason:
        pytest.skip(f"backend {name}: {reason}")
    if name not in _made:
        model, tok = embedded
        options = {"engine": _requests[0].getfixturevalue("vllm_engine")} if name == "vllm" else {}
        _made[name] = get_backend(name, model, tok, None, **options)
        assert isinstance(_made[name], Backend) and _made[name].name == name
    return _made[name]


def reference_ids(embedded, case, steer_prompt=True, chat=PROMPT, max_new_tokens=N_TOKENS) -> list[int]:
    """Greedy answer ids from transformers' own generate() under steering.steer, no backend involved
    (`case`: a conftest.comps_for case, or None for no steering)."""
    key = (case, steer_prompt, str(chat), max_new_tokens)
    if key not in _reference:
        model, tok = embedded
        comps = comps_for(case) if case else []
        ids = steering.chat_input_ids(tok, chat)
        x = torch.tensor([ids])
        kwargs = steering.generation_kwargs(model, tok, max_new_tokens, 0.0, 1.0)
        with steering.steer(model, comps, steer_from=0 if steer_prompt else len(ids)), torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        _reference[key] = out[0, len(ids):].tolist()
    return _reference[key]


def decoded(embedded, ids: list[int]) -> str:
    model, tok = embedded
    eos = set(steering.eos_ids(model, tok))
    return tok.decode([t for t in ids if t not in eos], skip_special_tokens=True)


def test_the_registry_holds_the_three_backends_and_the_console_offers_them():
    from llm_steering.console.cli import BACKENDS

    assert backend_names() == ["hf", "nnsight", "vllm"]
    assert list(BACKENDS) == backend_names()
    with pytest.raises(ValueError, match=r"^unknown backend 'nope': use one of hf, nnsight, vllm$"):
        get_backend("nope", None, None)


def test_every_backend_loads_in_load_models_dtype_and_an_option_overrides_it(embedded, monkeypatch):
    """vLLM's own default loaded the float32 embedded model as bfloat16: greedy answers differed per backend."""
    model, _ = embedded
    path = steering.embedded_model_dir()
    assert steering.default_dtype(path, "cpu") == model.dtype == torch.float32
    assert steering.default_dtype(path, "cuda") == torch.bfloat16  # a float32 checkpoint on a GPU
    monkeypatch.setenv(steering.DTYPE_ENV, "bfloat16")  # the documented override, for every backend
    assert steering.default_dtype(path, "cpu") == torch.bfloat16
    monkeypatch.setenv(steering.DTYPE_ENV, "float64")
    with pytest.raises(ValueError, match=r"^STEERING_DTYPE='float64' is not a dtype: use one of float32, bfloat16, float16$"):
        steering.default_dtype(path, "cpu")


@pytest.mark.parametrize("name", backend_names())
@pytest.mark.parametrize("case", CASES)
def test_same_greedy_tokens_for_every_op(embedded, name, case):
    comps = comps_for(case)
    result = backend(name, embedded).generate(PROMPT, comps, GenerationSettings(max_new_tokens=N_TOKENS))
    expected = reference_ids(embedded, case)
    assert result.token_ids == expected
    assert result.text == decoded(embedded, expected)
    assert result.prompt_ids == steering.chat_input_ids(embedded[1], PROMPT)
    if case in ("add", "clamp", "multi"):
        assert expected != reference_ids(embedded, None)  # the steering did something


@pytest.mark.parametrize("name", backend_names())
@pytest.mark.parametrize("case", ["clamp", "multi"])
def test_same_greedy_tokens_with_the_prompt_unsteered(embedded, name, case):
    comps = comps_for(case)
    settings = GenerationSettings(max_new_tokens=N_TOKENS, steer_prompt=False, trace=True)
    result = backend(name, embedded).generate(PROMPT, comps, settings)
    assert result.token_ids == reference_ids(embedded, case, steer_prompt=False)
    assert result.token_ids != reference_ids(embedded, case)
    n = len(result.prompt_ids)
    for comp in result.trace.components:  # prompt positions untouched
        assert comp.before[:n] == comp.after[:n]
    clamp = result.trace.components[0]
    assert clamp.op == "clamp" and all(abs(a - comps[0].strength) < 1e-3 for a in clamp.after[n:])


@pytest.mark.parametrize("name", backend_names())
def test_traces_have_the_same_shape_and_values(embedded, name):
    comps = comps_for("multi")
    settings = GenerationSettings(max_new_tokens=N_TOKENS, trace=True)
    got = backend(name, embedded).generate(PROMPT, comps, settings).trace
    ref = backend("hf", embedded).generate(PROMPT, comps, settings).trace
    assert got.prompt_len == ref.prompt_len and got.token_ids == ref.token_ids
    for a, b in zip(ref.components, got.components, strict=True):
        assert (a.layer, a.op, a.name) == (b.layer, b.op, b.name)
        assert len(b.before) == len(b.after) == len(ref.token_ids) - 1
        torch.testing.assert_close(torch.tensor(b.before), torch.tensor(a.before), atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(b.after), torch.tensor(a.after), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("name", backend_names())
def test_cancel_ends_generation_within_a_second_and_keeps_the_answer_so_far(embedded, name):
    be = backend(name, embedded)
    cancel = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, trace=True)
    stream = be.stream(PROMPT, comps_for("add"), settings, cancel)
    started = time.monotonic()
    timer = threading.Timer(2.0, cancel.set)
    timer.start()
    try:
        text = "".join(stream)
    finally:
        timer.cancel()
    ended = time.monotonic()
    assert cancel.is_set() and ended - (started + 2.0) < 1.0
    result = stream.result
    assert result.finish_reason == "cancelled"
    assert 0 < len(result.token_ids) < 400
    assert text == result.text == decoded(embedded, result.token_ids)
    assert result.token_ids == reference_ids(embedded, "add", max_new_tokens=len(result.token_ids))
    trace = result.trace
    assert trace.token_ids == result.prompt_ids + result.token_ids
    assert all(len(c.before) == len(c.after) == len(trace.token_ids) - 1 for c in trace.components)


@pytest.mark.parametrize("name", backend_names())
def test_stop_and_length_are_reported_as_such(embedded, name):
    be = backend(name, embedded)
    model, tok = embedded
    eos = steering.eos_ids(model, tok)
    cut = be.generate(PROMPT, [], GenerationSettings(max_new_tokens=5))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5 and cut.token_ids[-1] not in eos
    short = [{"role": "user", "content": "Say hello."}]
    done = be.generate(short, [], GenerationSettings(max_new_tokens=64))
    assert done.finish_reason == "stop" and done.token_ids[-1] in eos and len(done.token_ids) < 64
    assert done.token_ids == reference_ids(embedded, None, chat=short, max_new_tokens=64)


@pytest.mark.parametrize("name", backend_names())
def test_the_same_one_line_errors_for_the_same_bad_input(embedded, name):
    be, hooks = backend(name, embedded), backend("hf", embedded)
    v = unit(576, 1)
    bad_calls = [
        ([SteeringComponent(layer=30, vector=v, strength=1.0)], PROMPT, {}),
        ([SteeringComponent(layer=3, vector=torch.ones(7), strength=1.0)], PROMPT, {}),
        ([], [], {}),
        ([], [{"role": "user", "content": "  "}], {}),
        ([], PROMPT, {"temperature": -1.0}),
        ([], PROMPT, {"max_new_tokens": 0}),
        ([], PROMPT, {"repetition_penalty": 0.0}),
        ([], PROMPT, {"top_p": 0.0}),
        ([], PROMPT, {"seed": -1}),
    ]
    for comps, chat, kw in bad_calls:
        with pytest.raises(ValueError) as want:
            hooks.stream(chat, comps, GenerationSettings(**kw))
        with pytest.raises(ValueError) as got:
            be.stream(chat, comps, GenerationSettings(**kw))  # at call time, before any piece
        assert str(got.value) == str(want.value)
        assert "\n" not in str(got.value)


@pytest.mark.parametrize("name", backend_names())
def test_a_seed_repeats_a_sampled_answer(embedded, name):
    be = backend(name, embedded)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    first, second = (be.generate(PROMPT, comps_for("add"), settings).token_ids for _ in range(2))
    assert first == second and len(first) == 8


@pytest.mark.parametrize("name", backend_names())
def test_stop_in_the_app_keeps_the_answer_tagged_with_its_effect_view(embedded, name):
    """On vLLM, Stop replaced the chats with errors: its trace had no prompt (effects.py: "prompt_len
    must be between 1 and the 19 tokens given, got 0"), while the hooks backend kept the answer."""
    from llm_steering.catalog import Catalog
    from llm_steering.web import app

    model, tok = embedded
    be = backend(name, embedded)
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    catalog = Catalog.open(profile, model, tok)
    comps = [catalog.resolve("pirate").component(0.2)]
    previous, app.LOADED = app.LOADED, app.App(profile, model, tok, catalog, be)
    key, since = uuid.uuid4().hex, time.time()
    timer = threading.Timer(2.0, app.STOPS.request, args=(key,))  # what the Stop button does
    try:
        timer.start()
        *_, last = app.generate(PROMPT, comps, True, 0.0, 1.0, 300, None, key, since)
    finally:
        timer.cancel()
        app.LOADED = previous
    text, _, trace, stopped, effects = last
    assert stopped and text
    answer = trace.token_ids[trace.prompt_len:]
    assert trace.prompt_len == len(steering.chat_input_ids(tok, PROMPT)) and 0 < len(answer) < 300
    assert text == decoded(embedded, answer)
    assert len(effects) == len(answer)


# ---------------------------------------------------------------------------
# Choosing a backend that cannot run: one line, at once
# ---------------------------------------------------------------------------


def test_a_backend_that_is_not_installed_is_refused_at_once_in_one_line(embedded, monkeypatch):
    import io

    from llm_steering.catalog import Catalog
    from llm_steering.console import chat as demo

    model, tok = embedded
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    settings = demo.Settings(backend="hf", temperature=0.0, max_new_tokens=4, repetition_penalty=1.0, system="",
                             max_input_tokens=2048)
    info = io.StringIO()
    console = demo.Console(model, tok, Catalog.open(profile, model, tok), settings, out=io.StringIO(), info=info,
                           interactive=True)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^backend vllm cannot run here: vLLM is not installed: see requirements-vllm") as err:
        console.command("/backend vllm")
    assert time.monotonic() - t0 < 1.0 and "\n" not in str(err.value)
    assert console.settings.backend == "hf"


def fake_broken_torchvision(tmp_path):
    """A torchvision that fails on import the way a wheel built for another torch does."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    return tmp_path


def test_a_torchvision_that_breaks_vllm_is_named_with_what_to_uninstall(tmp_path, monkeypatch):
    from llm_steering.backends.vllm import vllm_unavailable

    pytest.importorskip("vllm", reason="vLLM is not installed")
    monkeypatch.syspath_prepend(str(fake_broken_torchvision(tmp_path)))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    reason = vllm_unavailable()
    assert reason and "torchvision::nms does not exist" in reason
    assert reason.endswith("run `pip uninstall torchvision torchaudio torchcodec`") and "\n" not in reason
    from llm_steering.vllm_backend import VLLMEngine

    with pytest.raises(ValueError, match=r"^the installed torchvision does not work with this torch"):
        VLLMEngine()
    # the console says so before loading anything, and exits 2
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "demo.py", "--backend", "vllm", "--prompt", "Hi"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: backend vllm cannot run here: {reason}"]


# ---------------------------------------------------------------------------
# Same request, same answer: the console's one-shot form on two backends
# ---------------------------------------------------------------------------


def test_one_shot_console_gives_the_same_answer_on_vllm_and_hf_and_prints_only_it():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    args = ["--prompt", "Tell me about your weekend.", "--steer", "pirate", "0.3", "--temperature", "0",
            "--max-new-tokens", "24"]
    procs = {name: subprocess.Popen([sys.executable, "demo.py", "--backend", name, *args], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("vllm", "hf")}
    runs = {}  # the two at once: the hf one is done while vLLM's engine starts
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=900)
        finally:
            proc.kill()
        runs[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr[-500:]}"
    assert runs["vllm"].stdout == runs["hf"].stdout
    lines = runs["vllm"].stdout.splitlines()
    assert len(lines) == 1 and len(lines[0].split()) > 5  # the answer alone: no vLLM log line
    assert "INFO" not in runs["vllm"].stderr  # vLLM's info logs only with --verbose
    # nor a traceback at exit: vLLM kept the engine's frames alive (an optional import's kept ImportError), and
    # the engine's __del__ failed as the interpreter shut down ("Exception ignored in: AsyncLLM.__del__")
    assert "Traceback" not in runs["vllm"].stderr, runs["vllm"].stderr[-600:]
