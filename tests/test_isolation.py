"""Request isolation under web-paced load: many threads, slow consumers, one model.

A web front end reads each stream slowly (it yields to the browser between pieces) and
comes back late for the end of the stream. The first version keyed hooks on the
generation thread's id; Linux hands a finished thread's id to the next new thread, so
a request whose consumer had not yet drained its stream still had hooks on the model
that acted in another request's generation thread (37 of 96 answers carried another
request's steering). Every answer here must equal the same request run alone.

`STEERING_STRESS_REQUESTS=240 STEERING_STRESS_THREADS=16` runs a bigger version.
"""

from __future__ import annotations

import os
import random
import threading
import time

from llm_steering import steering
from llm_steering.steering import SteeringComponent

import pytest
import torch
from conftest import hooks_on, unit

THREADS = int(os.environ.get("STEERING_STRESS_THREADS", "8"))
REQUESTS = int(os.environ.get("STEERING_STRESS_REQUESTS", "112"))
MAX_PAUSE = float(os.environ.get("STEERING_STRESS_PAUSE", "0.05"))
N_TOKENS = 6
PROMPT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tiny_chat_llama(embedded):
    """A 4-layer random Llama with the embedded model's vocabulary, and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = embedded
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False), tok


def request_steering(i: int) -> list[SteeringComponent]:
    """Request i's own steering: add or clamp, on one of layers 1-3, a direction of its own."""
    rng = random.Random(i)
    op = rng.choice(["add", "clamp"])
    return [SteeringComponent(layer=rng.randint(1, 3), vector=unit(64, 1000 + i), strength=rng.uniform(6, 12), op=op)]


def solo(model, tok, comps) -> str:
    return "".join(steering.stream_steered_answer_hf(model, tok, PROMPT, comps, max_new_tokens=N_TOKENS))


def test_slow_consumers_never_see_each_others_steering(tiny_chat_llama):
    model, tok = tiny_chat_llama
    steerings = [request_steering(i) for i in range(REQUESTS)]
    alone = [solo(model, tok, comps) for comps in steerings]
    assert len(set(alone)) > REQUESTS // 2  # the steerings really differ from one another

    got: dict[int, str] = {}
    errors: list[BaseException] = []
    queue = list(range(REQUESTS))
    lock = threading.Lock()

    def web_worker(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            try:
                pieces = []
                stream = steering.stream_steered_answer_hf(model, tok, PROMPT, steerings[i], max_new_tokens=N_TOKENS)
                for piece in stream:
                    pieces.append(piece)
                    time.sleep(rng.uniform(0, MAX_PAUSE))  # the front end yields to the browser
                got[i] = "".join(pieces)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=web_worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors
    differ = [i for i in range(REQUESTS) if got.get(i) != alone[i]]
    assert differ == [], f"{len(differ)} of {REQUESTS} answers differ from the same request run alone"
    assert hooks_on(model) == 0


def test_hooks_leave_when_generation_ends_not_when_the_consumer_returns(tiny_chat_llama):
    model, tok = tiny_chat_llama
    stream = steering.stream_steered_answer_hf(model, tok, PROMPT, request_steering(1), max_new_tokens=N_TOKENS)
    next(stream)
    deadline = time.monotonic() + 10
    while steering_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # the consumer is away; the generation finishes on its own
    assert hooks_on(model) == 0
    assert "".join(stream) is not None
    assert hooks_on(model) == 0


def steering_threads_alive() -> bool:
    return any(t.name == "steered-generation" for t in threading.enumerate())


def test_a_thread_that_reuses_an_old_thread_id_gets_no_steering(tiny_chat_llama):
    """A hook of a request that is still open must not act in a new thread with the same id."""
    model, tok = tiny_chat_llama
    plain = solo(model, tok, [])
    stream = steering.stream_steered_answer_hf(model, tok, PROMPT, request_steering(2), max_new_tokens=N_TOKENS)
    next(stream)  # request open, consumer away
    for _ in range(20):  # fresh threads, many of which get the finished generation thread's id
        out: list[str] = []
        t = threading.Thread(target=lambda out=out: out.append(solo(model, tok, [])))
        t.start()
        t.join(60)
        assert out == [plain]
    stream.close()
    assert hooks_on(model) == 0
