"""Throughput of steered answers: the vLLM backend against the hooks backend, side by side.

    python benchmarks/bench_vllm.py                       # 1, 4, 16 concurrent, 64 tokens each
    python benchmarks/bench_vllm.py --concurrency 1 16 --tokens 32 --vllm-dtype float32

Every request has its own steering (a different direction, op and layer). For each concurrency N,
N answers run at once (one thread each) on the hooks backend (`steering.stream_steered_answer_hf`,
float32, one model) and on the vLLM backend (`steering_vllm.VLLMEngine`, continuous batching);
then vLLM unsteered at the highest N, for the cost of steering in the engine. Prints total tokens/s
and the ratios against the issue's targets (vLLM >= 8x hooks at 16 concurrent; steering <= 10%).
Greedy; answers stop at --tokens or at the end-of-sequence token. Tokens are counted by
re-tokenizing each answer's text (the same count for both backends; no trace is recorded).
"""

from __future__ import annotations

import argparse
import threading
import time

from llm_steering import steering
from llm_steering import vllm_backend as steering_vllm
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


def run_batch(stream_fn, tok, n: int, tokens: int, d_model: int, n_layers: int, steered: bool = True) -> tuple[int, float]:
    """N concurrent answers through `stream_fn(chat, comps, max_new_tokens)`; (tokens, seconds)."""
    counts = [0] * n
    barrier = threading.Barrier(n + 1)

    def work(i: int) -> None:
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        comps = steering_for(i, d_model, n_layers, steered)
        barrier.wait()
        text = "".join(stream_fn(chat, comps, tokens))
        counts[i] = len(tok(text, add_special_tokens=False)["input_ids"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent requests to measure")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="vLLM model dtype (the hooks backend runs float32)")
    args = parser.parse_args()

    model, tok = steering.load_model()
    d_model, n_layers = steering.hidden_size(model), steering.num_layers(model)

    def hooks(chat, comps, n):
        return steering.stream_steered_answer_hf(model, tok, chat, comps, max_new_tokens=n)

    engine = steering_vllm.VLLMEngine(dtype=args.vllm_dtype, max_num_seqs=max(args.concurrency))

    def vllm(chat, comps, n):
        return engine.stream(chat, comps, max_new_tokens=n)

    try:
        run_batch(vllm, tok, 2, 8, d_model, n_layers)  # warm-up
        run_batch(hooks, tok, 1, 4, d_model, n_layers)
        print(f"{'concurrent':>10} {'hooks tok/s':>12} {'vLLM tok/s':>11} {'vLLM/hooks':>11}")
        rows = {}
        for n in args.concurrency:
            h_tok, h_s = run_batch(hooks, tok, n, args.tokens, d_model, n_layers)
            v_tok, v_s = run_batch(vllm, tok, n, args.tokens, d_model, n_layers)
            rows[n] = (h_tok / h_s, v_tok / v_s)
            print(f"{n:>10} {h_tok / h_s:>12.1f} {v_tok / v_s:>11.1f} {v_tok / v_s / (h_tok / h_s):>10.1f}x", flush=True)
        top = max(args.concurrency)
        u_tok, u_s = run_batch(vllm, tok, top, args.tokens, d_model, n_layers, steered=False)
        s_tok, s_s = run_batch(vllm, tok, top, args.tokens, d_model, n_layers)
        unsteered, steered = u_tok / u_s, s_tok / s_s
        print(f"vLLM at {top} concurrent: unsteered {unsteered:.1f} tok/s, steered {steered:.1f} tok/s, "
              f"steering costs {100 * (1 - steered / unsteered):.1f}% (target <= 10%)")
        ratio = rows[top][1] / rows[top][0]
        print(f"vLLM/hooks at {top} concurrent: {ratio:.1f}x (target >= 8x): {'met' if ratio >= 8 else 'NOT met'}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
