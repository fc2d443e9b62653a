"""Throughput and agreement of steered answers on several backends, side by side (the protocol only).

    python benchmarks/bench_vllm.py                                   # hooks and vLLM; 1, 4, 16 concurrent
    python benchmarks/bench_vllm.py --backends hf nnsight vllm --concurrency 1 4 --tokens 32
    STEERING_DTYPE=bfloat16 python benchmarks/bench_vllm.py          # 16-bit: answers change with the batch

Every request has its own steering (a different direction, op and layer). For each concurrency N,
N answers run at once (one thread each) on each backend (`backends.get_backend`). Prints total
tokens/s per backend, the speed ratio of each against the first, and the agreement rate: the
fraction of answers whose token ids equal the first backend's answer to the same request. At the
default dtype (float32 on a CPU) it is 100%; in bfloat16 a greedy answer depends on the batch it
ran in (docs/speed.md), so the rate drops. Then the last backend unsteered at the highest N, for
the cost of steering. Greedy; answers stop at --tokens or at the end-of-sequence token.
"""

from __future__ import annotations

import argparse
import threading
import time

from llm_steering import steering
from llm_steering.backends import Backend, GenerationSettings, backend_names, get_backend
from llm_steering.steering import SteeringComponent

import torch

PROMPTS = ["Tell me about your weekend.", "How do I boil an egg?", "Explain how a bank loan works.",
           "Give me three tips for keeping a tidy desk.", "What should I check before buying a used bicycle?",
           "Write a short email asking my manager for a day off.", "Describe the ocean to a child.",
           "What is a good name for a cat?"]


def steering_for(i: int, d_model: int, n_layers: int, steered: bool) -> list[SteeringComponent]:
    """Request i's own steering: a random direction, one of the four ops, its own layer."""
    if not steered:
        return []
    g = torch.Generator().manual_seed(1000 + i)
    v = torch.randn(d_model, generator=g)
    op = ("add", "clamp", "cap", "ablate")[i % 4]
    kw = {"add": {"strength": 8.0}, "clamp": {"strength": 12.0}, "cap": {"cap_min": -2.0, "cap_max": 2.0},
          "ablate": {"scale": 0.0}}[op]
    return [SteeringComponent(layer=(5 + 3 * i) % n_layers, vector=v, op=op, **kw)]


def run_batch(backend: Backend, n: int, tokens: int, d_model: int, n_layers: int,
              steered: bool = True) -> tuple[list[list[int]], float]:
    """N concurrent answers on `backend`; (each answer's token ids, seconds)."""
    answers: list[list[int]] = [[] for _ in range(n)]
    settings = GenerationSettings(max_new_tokens=tokens)

    def work(i: int, barrier: threading.Barrier) -> None:
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        comps = steering_for(i, d_model, n_layers, steered)
        barrier.wait()
        answers[i] = backend.generate(chat, comps, settings).token_ids

    return answers, run_together(n, work)


def run_together(n: int, work) -> float:
    """Seconds for `work(i, barrier)` in n threads at once, timed from when all n reach `barrier.wait()`."""
    barrier = threading.Barrier(n + 1)
    threads = [threading.Thread(target=work, args=(i, barrier)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=backend_names(),
                        help="backends to compare; the first is the reference for speed and agreement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent requests to measure")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    args = parser.parse_args()

    model, tok = steering.load_model()  # in models.default_dtype; $STEERING_DTYPE overrides it for every backend
    d_model, n_layers = steering.hidden_size(model), steering.num_layers(model)
    backends = [get_backend(name, model, tok) for name in args.backends]
    names = args.backends
    try:
        for backend in backends:
            run_batch(backend, 2, 4, d_model, n_layers)  # warm-up
        print(f"{'concurrent':>10} " + " ".join(f"{n + ' tok/s':>14}" for n in names)
              + "".join(f" {n + '/' + names[0]:>14} {'agree':>6}" for n in names[1:]))
        for n in args.concurrency:
            runs = [run_batch(backend, n, args.tokens, d_model, n_layers) for backend in backends]
            speeds = [sum(map(len, ids)) / secs for ids, secs in runs]
            ref = runs[0][0]
            agree = [sum(a == b for a, b in zip(ids, ref, strict=True)) / n for ids, _ in runs[1:]]
            print(f"{n:>10} " + " ".join(f"{s:>14.1f}" for s in speeds)
                  + "".join(f" {s / speeds[0]:>13.1f}x {a:>6.0%}" for s, a in zip(speeds[1:], agree, strict=True)),
                  flush=True)
        top, last = max(args.concurrency), backends[-1]
        u_ids, u_s = run_batch(last, top, args.tokens, d_model, n_layers, steered=False)
        s_ids, s_s = run_batch(last, top, args.tokens, d_model, n_layers)
        unsteered, steered = sum(map(len, u_ids)) / u_s, sum(map(len, s_ids)) / s_s
        print(f"{names[-1]} at {top} concurrent: unsteered {unsteered:.1f} tok/s, steered {steered:.1f} tok/s, "
              f"steering costs {100 * (1 - steered / unsteered):.1f}%")
    finally:
        for backend in backends:
            backend.close()


if __name__ == "__main__":
    main()
