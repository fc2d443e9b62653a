"""What auto costs on the server (issue 28): the candidates as parallel vLLM requests, against one plain answer.

Starts `serve.py` on the embedded model (float32, as the tests run it) unless `--url` names a running one. For
each prompt and feature, alternating so both see the same machine: the answer at the feature's fixed default
(`steering` with its default fraction) and the same request with `"auto": true`, both streamed, greedy,
repetition penalty 1.1, `--tokens` new tokens. Prints, per pair and in all, the seconds to the first words and
to the end, and the ratios (the aim of the issue: the whole answer at most 2.5x a plain one, the first words at
most 5 s after a plain answer's). The first auto request of a feature also measures its steering scores (16
one-token requests, cached after); one warm-up auto request per feature is made first and not counted.

    nice -n 5 .venv/bin/python benchmarks/bench_auto_server.py                 # 3 prompts x 2 features, 256 tokens
    .venv/bin/python benchmarks/bench_auto_server.py --url http://127.0.0.1:8000 --prompts 1 --tokens 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llm_steering import steering
from llm_steering.catalog import catalog_for_vectors

import eval_quality
import httpx

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def server(url: str | None):
    """The server's URL: `url`, or a serve.py started here for the run (ended after it)."""
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open("/tmp/bench_auto_server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--max-model-len", "2048"], cwd=ROOT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise SystemExit(f"serve.py ended: see {log.name}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()


def timed(url: str, body: dict) -> tuple[float, float, str, dict | None]:
    """(seconds to the first words, seconds to the end, the text, steering_auto) of one streamed request."""
    t0 = time.perf_counter()
    first, text, auto = None, "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            auto = auto or chunk.get("steering_auto")
            piece = "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece
    total = time.perf_counter() - t0
    return first if first is not None else total, total, text, auto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running serve.py (default: start one)")
    parser.add_argument("--prompts", type=int, default=3, help="the first N held-out prompts")
    parser.add_argument("--features", nargs="+", default=["ocean", "pirate"])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    catalog = catalog_for_vectors(steering.load_vectors(ROOT / "steering_vectors.pt"), file_only=True)
    prompts = eval_quality.load_prompts("heldout")[: args.prompts]
    with server(args.url) as url:
        plain_first, plain_total, auto_first, auto_total = [], [], [], []
        for key in args.features:
            f = catalog.resolve(key)
            spec = {"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID,
                    "steer_prompt": True, "features": [{"key": key, "fraction": f.default_fraction}]}
            base = {"model": "default", "max_tokens": args.tokens, "temperature": 0, "repetition_penalty": 1.1,
                    "steering": spec}
            timed(url, {**base, "messages": [{"role": "user", "content": "Hello!"}], "auto": True, "max_tokens": 8})
            for prompt in prompts:
                body = {**base, "messages": [{"role": "user", "content": prompt}]}
                p1, pt, _, _ = timed(url, body)
                a1, at, _, auto = timed(url, {**body, "auto": True})
                plain_first.append(p1)
                plain_total.append(pt)
                auto_first.append(a1)
                auto_total.append(at)
                print(f"{key:12} {prompt[:40]!r:44} plain {p1:5.2f} s / {pt:6.2f} s   auto {a1:5.2f} s / {at:6.2f} s   "
                      f"(+{a1 - p1:.2f} s, {at / pt:.2f}x)   {auto['chosen']}", flush=True)
    delays = [a - p for a, p in zip(auto_first, plain_first, strict=True)]
    print(f"\nwhole answer: plain {sum(plain_total):.1f} s, auto {sum(auto_total):.1f} s: "
          f"{sum(auto_total) / sum(plain_total):.2f}x (aim: at most 2.5x)")
    print(f"first words: plain {min(plain_first):.2f}-{max(plain_first):.2f} s; auto +{statistics.median(delays):.2f} s "
          f"median, at most +{max(delays):.2f} s (aim: at most +5 s)")


if __name__ == "__main__":
    main()
