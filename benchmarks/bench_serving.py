"""Tokens/s of steered and unsteered answers, side by side in one run: the server through HTTP,
the hooks and the NNsight backends in process.

    python benchmarks/bench_serving.py                            # starts python serve.py itself
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --concurrency 1 4 16 64
    python benchmarks/bench_serving.py --backends server --tokens 32

For each concurrency N, N answers run at once: on the server as N concurrent requests of the
official `openai` client (the real HTTP path: vLLM's OpenAI server, the steering middleware, the
worker extension), on the in-process backends as N threads sharing one float32 model. Every
steered request has its own steering (a feature of steering_vectors.pt, alternating add and
clamp); unsteered ones none. Greedy, up to --tokens new tokens (an answer may end earlier at
its end-of-sequence token): the server's token counts come from `usage`, the in-process ones
from re-tokenizing the answer. Prints a Markdown table: total tokens/s, and the cost of steering
(1 - steered / unsteered) per backend and N.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from llm_steering import steering

import torch
from bench_vllm import run_together

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Tell me about your weekend.", "How do I boil an egg?", "Explain how a bank loan works.",
           "Give me three tips for keeping a tidy desk.", "What should I check before buying a used bicycle?",
           "Write a short email asking my manager for a day off.", "Describe the ocean to a child.",
           "What is a good name for a cat?"]


def spec_for(i: int, keys: list[str], model_id: str) -> dict:
    """Request i's own steering: one feature of the vectors file, add or clamp, a moderate strength."""
    return {"format": "llm-steering/spec", "version": 1, "model_id": model_id, "steer_prompt": True,
            "features": [{"key": keys[i % len(keys)], "fraction": 0.3, "op": ("add", "clamp")[i % 2]}]}


def chat_for(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


async def server_batch(url: str, n: int, tokens: int, specs: list[dict] | None) -> tuple[int, float]:
    """N concurrent chat requests to the server; (completion tokens, seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    async def one(i: int) -> int:
        extra = {"steering": specs[i]} if specs else None
        out = await client.chat.completions.create(model="default", messages=chat_for(i), max_tokens=tokens,
                                                   temperature=0, extra_body=extra)
        return out.usage.completion_tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(counts), elapsed


def local_batch(answer, tok, n: int, tokens: int, comps: list[list] | None) -> tuple[int, float]:
    """N threads each running `answer(chat, comps, tokens)` on one model; (tokens, seconds)."""
    counts = [0] * n

    def work(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        text = answer(chat_for(i), comps[i] if comps else [], tokens)
        counts[i] = len(tok(text, add_special_tokens=False)["input_ids"])

    seconds = run_together(n, work)
    return sum(counts), seconds


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "serve.py"), "--port", str(args.port), "--vectors", str(args.vectors),
           "--max-model-len", "2048", "--max-num-seqs", str(max(64, *args.concurrency))]
    cmd += (["--dtype", args.dtype] if args.dtype else []) + (["--model", args.model] if args.model else [])
    cmd += ["--gpu-memory-utilization", "0.5"] if torch.cuda.is_available() else []
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise SystemExit(f"bench_serving.py: serve.py did not start (run {' '.join(cmd[1:])} by hand to see why)")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


def measure(args: argparse.Namespace, rows: dict) -> None:
    """Fill rows[(label, backend, n)] = (unsteered tok/s, steered tok/s)."""
    vectors = steering.load_vectors(args.vectors)
    keys = [v.name for v in vectors.vectors]
    specs = [spec_for(i, keys, vectors.model_id) for i in range(max(args.concurrency))]
    local = [b for b in args.backends if b != "server"]
    if local:
        model, tok = steering.load_model(args.model)
        comps = [steering.spec_components(steering.SteeringSpec.from_dict(s), vectors) for s in specs]
        for backend in local:
            answer, close = local_backend(backend, args, model, tok)
            try:
                local_batch(answer, tok, 1, 4, None)  # warm-up
                for n in [n for n in args.concurrency if n <= args.local_max or backend == "vllm"]:
                    u = local_batch(answer, tok, n, args.tokens, None)
                    s = local_batch(answer, tok, n, args.tokens, comps)
                    record(rows, args.label, backend, n, u, s)
            finally:
                close()
        del model, answer, close
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # room for the server's engine
    if "server" in args.backends:
        proc = None if args.url else start_server(args)
        url = args.url or f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(server_batch(url, 2, 8, specs[:2]))  # warm-up (also installs the steering hooks)
            for n in args.concurrency:
                u = asyncio.run(server_batch(url, n, args.tokens, None))
                s = asyncio.run(server_batch(url, n, args.tokens, specs[:n]))
                record(rows, args.label, "server (HTTP)", n, u, s)
        finally:
            if proc is not None:
                stop_server(proc)


def local_backend(backend: str, args: argparse.Namespace, model, tok):
    """(answer(chat, comps, tokens) -> text, close()) for an in-process backend."""
    if backend == "hooks":
        return (lambda chat, c, t: "".join(steering.stream_steered_answer_hf(model, tok, chat, c, max_new_tokens=t))), (lambda: None)
    if backend == "nnsight":
        return (lambda chat, c, t: steering.generate_steered_answer(model, tok, chat, c, max_new_tokens=t)), (lambda: None)
    from llm_steering.vllm_backend import VLLMEngine

    engine = VLLMEngine(args.model, dtype=args.dtype or str(model.dtype).removeprefix("torch."),
                        max_model_len=2048, max_num_seqs=max(64, *args.concurrency),
                        **({"gpu_memory_utilization": 0.5} if torch.cuda.is_available() else {}))
    return (lambda chat, c, t: engine.generate(chat, c, max_new_tokens=t)), engine.shutdown


def record(rows: dict, label: str, backend: str, n: int, u: tuple[int, float], s: tuple[int, float]) -> None:
    rows[label, backend, n] = (u[0] / u[1], s[0] / s[1])
    print(f"{label} {backend} {n}: {rows[label, backend, n][0]:.1f} / {rows[label, backend, n][1]:.1f} tok/s",
          file=sys.stderr, flush=True)


def table(rows: dict) -> str:
    lines = ["| model | backend | concurrent | unsteered tok/s | steered tok/s | steering cost |",
             "|---|---|---:|---:|---:|---:|"]
    for (label, backend, n), (u, s) in rows.items():
        lines.append(f"| {label} | {backend} | {n} | {u:.1f} | {s:.1f} | {100 * (1 - s / u):+.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows: dict = {}
    measure(args, rows)
    print(f"\n`python benchmarks/bench_serving.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print(table(rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", nargs="+", default=["server", "vllm", "hooks", "nnsight"],
                        choices=["server", "vllm", "hooks", "nnsight"], help="vllm: the engine in process, no HTTP")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent requests to measure")
    parser.add_argument("--local-max", type=int, default=16, help="highest concurrency for the in-process backends")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer (at most)")
    parser.add_argument("--url", default=None, help="a running serve.py (default: start one on --port)")
    parser.add_argument("--port", type=int, default=8011, help="port of the server this script starts")
    parser.add_argument("--dtype", default=None, help="vLLM's dtype (default: the library's, float32 on a CPU)")
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded model)")
    parser.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"), help="the steering vectors of --model")
    parser.add_argument("--label", default="SmolLM2-135M", help="the model's name in the table")


if __name__ == "__main__":
    main()
