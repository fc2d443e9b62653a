"""vllm_backend.py's engine: per-request isolation in one batch, chunked prefill, TP=2, aborts, start errors.

The cross-backend behaviour (same greedy tokens, traces, cancel, finish reasons, errors) is
checked for every backend by tests/test_backends.py; the HTTP server by tests/test_serve.py.

Skipped when vLLM is not installed (see requirements-vllm.txt); CI installs it. One float32 engine
on the embedded model serves most tests (engine start: 20-40 s). It runs with a small token budget
per step (`max_num_batched_tokens=16`), so every prompt is prefilled in several chunks, mixed with
other requests' decode rows: the exactness tests cover chunked prefill as well.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm.txt)")

from llm_steering import steering
from llm_steering import vllm_backend as steering_vllm
from llm_steering.steering import SteeringComponent, SteeringTrace

from conftest import build_tiny_llama, comps_for, unit

PROMPT = [{"role": "user", "content": "Tell me a short story about a dog."}]
N_TOKENS = 16


@pytest.fixture
def engine(vllm_engine):
    return vllm_engine  # conftest: one engine for the session, shared with tests/test_backends.py


def hf_answer(model, tok, comps, chat=PROMPT, **kw) -> tuple[str, SteeringTrace]:
    trace = SteeringTrace()
    text = "".join(steering.stream_steered_answer_hf(model, tok, chat, comps, max_new_tokens=N_TOKENS, trace=trace, **kw))
    return text, trace


def vllm_answer(engine, comps, chat=PROMPT, **kw) -> tuple[str, SteeringTrace]:
    trace = SteeringTrace()
    text = "".join(engine.stream(chat, comps, max_new_tokens=N_TOKENS, trace=trace, **kw))
    return text, trace


def sixteen_steerings() -> list[list[SteeringComponent]]:
    ops = ["add", "clamp", "cap", "ablate"]
    out = []
    for i in range(16):
        v = unit(576, 200 + i)
        op = ops[i % 4]
        kw = {"add": {"strength": 20.0 + 5 * i}, "clamp": {"strength": 30.0 + 4 * i},
              "cap": {"cap_min": -1.0, "cap_max": 1.0}, "ablate": {"scale": 0.0}}[op]
        comps = [SteeringComponent(layer=(3 * i) % 30, vector=v, op=op, **kw)]
        if i % 3 == 0:  # several layers for some of them
            comps.append(SteeringComponent(layer=29 - i, vector=unit(576, 300 + i), strength=10.0))
        out.append(comps)
    return out


CHATS = [[{"role": "user", "content": text}] for text in (
    "Tell me a short story about a dog.", "How do I boil an egg?", "Explain how a bank loan works.",
    "Give me three tips for keeping a tidy desk.")]


def run_concurrently(engine, jobs: list[tuple[list, list]], **kw) -> list[list[int]]:
    """Run (chat, components) jobs at once, each in its own thread; return their answer token ids."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        start.wait()
        results[i] = vllm_answer(engine, jobs[i][1], chat=jobs[i][0], **kw)[1].token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300  # one bound for all of them, not 300 s each
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert all(r is not None for r in results)
    return results


def test_sixteen_concurrent_steerings_each_equal_their_solo_answer(engine):
    jobs = [(CHATS[i % 4], comps) for i, comps in enumerate(sixteen_steerings())]
    together = run_concurrently(engine, jobs)
    alone = [vllm_answer(engine, comps, chat=chat)[1].token_ids for chat, comps in jobs]
    assert together == alone
    assert len({tuple(ids) for ids in alone}) >= 12  # the steerings really differ


def test_unsteered_requests_equal_plain_vllm_even_beside_steered_ones(engine, monkeypatch):
    import gc

    import vllm.envs as vllm_envs
    from vllm import LLM, SamplingParams

    # The reference: plain vLLM, eager like the steering engine (and 2 minutes less of torch.compile on a CPU), no
    # worker extension, no logits processor. It runs in this process (vLLM's in-process engine core and its
    # one-process executor: the same CPU model runner, without two more processes that each import vLLM, about
    # 30 s); the engine under test keeps its own processes.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    threads = torch.get_num_threads()  # vLLM's worker sets this process's thread count for serving
    plain = LLM(model=str(steering.embedded_model_dir()), dtype="float32", gpu_memory_utilization=0.3,
                max_model_len=1024, seed=0, enforce_eager=True, distributed_executor_backend="uni")
    try:
        ids = [steering.chat_input_ids(engine.tokenizer, chat) for chat in CHATS]
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, stop_token_ids=engine._eos)
        expected = [list(o.outputs[0].token_ids) for o in plain.generate([{"prompt_token_ids": p} for p in ids], params)]
    finally:
        plain.llm_engine.engine_core.shutdown()
        del plain
        # what an engine core started in this process leaves in it: its thread count, vLLM's environment read once
        # and kept (a later engine here would not see VLLM_ENABLE_V1_MULTIPROCESSING come back), a frozen heap
        torch.set_num_threads(threads)
        vllm_envs.disable_envs_cache()
        gc.unfreeze()
    assert not hasattr(vllm_envs.__getattr__, "cache_clear")
    steered = [(CHATS[i], comps_for(case)) for i, case in enumerate(["add", "clamp", "multi", "cap"])]
    got = run_concurrently(engine, [(chat, []) for chat in CHATS] + steered)
    assert [g[len(p):] for g, p in zip(got[:4], ids, strict=True)] == expected


def test_closing_the_stream_aborts_the_request(engine):
    stream = engine.stream(PROMPT, comps_for("add"), max_new_tokens=200, trace=SteeringTrace())
    next(stream)
    assert engine.engine.get_num_unfinished_requests() == 1
    stream.close()
    deadline = time.time() + 10
    while engine.engine.get_num_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.engine.get_num_unfinished_requests() == 0
    assert vllm_answer(engine, comps_for("add"))[1].token_ids  # the engine still serves


def test_a_prompt_longer_than_the_engine_reads_is_refused_in_one_line(engine):
    with pytest.raises(ValueError, match=r"^the prompt is \d+ tokens, but this model reads at most 1024: shorten"):
        engine.stream([{"role": "user", "content": "word " * 1200}], [])
    assert engine.engine.get_num_unfinished_requests() == 0


def test_an_engine_that_cannot_start_says_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match=r"^tensor_parallel_size 2 does not divide this model's 9 attention heads"):
        steering_vllm.VLLMEngine(tensor_parallel_size=2)
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with pytest.raises(ValueError, match=r"^vLLM is not installed: see requirements-vllm.txt"):
        steering_vllm.VLLMEngine()


# ---------------------------------------------------------------------------
# Tensor parallel: a tiny random Llama with 4 heads on two workers
# ---------------------------------------------------------------------------


def save_tiny_llama(path) -> tuple:
    """build_tiny_llama plus a 128-word tokenizer with a chat template, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_tiny_llama(num_layers=4, hidden=256, seed=3)  # head_dim 64: the CPU attention kernels need it
    words = ["<unk>", "<s>", "</s>", "user", "assistant", ":"] + [f"w{i}" for i in range(122)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "<s> {% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_tensor_parallel_2_matches_the_hooks_backend(tmp_path, monkeypatch):
    model, tok = save_tiny_llama(tmp_path)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    chat = [{"role": "user", "content": "w5 w17 w99 w3 w42"}]
    cases = [
        [],
        [SteeringComponent(layer=1, vector=unit(256, 7), strength=3.0)],
        [SteeringComponent(layer=0, vector=unit(256, 8), strength=2.0, op="clamp"),
         SteeringComponent(layer=2, vector=unit(256, 9), op="ablate", scale=0.0),
         SteeringComponent(layer=3, vector=unit(256, 8), op="cap", cap_min=-0.5, cap_max=0.5)],
    ]
    expected = [hf_answer(model, tok, comps, chat=chat) for comps in cases]
    assert len({tuple(e[1].token_ids) for e in expected}) == 3  # each steering changes the answer
    eng = steering_vllm.VLLMEngine(str(tmp_path), dtype="float32", tensor_parallel_size=2, max_model_len=256)
    try:
        for comps, hf in zip(cases, expected, strict=True):
            assert vllm_answer(eng, comps, chat=chat)[1].token_ids == hf[1].token_ids
    finally:
        eng.shutdown()


def test_the_app_and_the_console_stream_from_the_engine(embedded, engine):
    """STEERING_BACKEND=vllm / --backend vllm: the front ends' answers are the engine's, and the hooks'."""
    import io

    from llm_steering.catalog import Catalog
    from llm_steering.console import chat as demo
    from llm_steering.web import app

    model, tok = embedded
    profile = steering.load_config(Path(__file__).resolve().parent.parent / "demo.yaml").profile()
    catalog = Catalog.open(profile, model, tok)
    feature = catalog.resolve("pirate")
    comps = [feature.component(0.2)]
    chat = [{"role": "user", "content": "Tell me about your weekend."}]
    expected = hf_answer(model, tok, comps, chat=chat)[0]

    from llm_steering.backends.vllm import VLLMBackend

    previous = app.LOADED
    app.LOADED = app.App(profile, model, tok, catalog, VLLMBackend(engine))
    try:
        *_, last = app.generate(chat, comps, True, 0.0, 1.0, N_TOKENS)
    finally:
        app.LOADED = previous
    assert last[0] == expected and last[3] is False

    settings = demo.Settings(backend="vllm", temperature=0.0, max_new_tokens=N_TOKENS, repetition_penalty=1.0, system="",
                             max_input_tokens=2048)
    console = demo.Console(model, tok, catalog, settings, out=io.StringIO(), info=io.StringIO(), interactive=False)
    console._backends["vllm"] = VLLMBackend(engine)
    console.steer("pirate", 0.2)
    assert console.ask("Tell me about your weekend.") == expected
