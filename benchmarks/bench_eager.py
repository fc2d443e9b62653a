"""What eager mode costs: unsteered vLLM decode speed, compiled (vLLM's default) vs eager, in one run.

    python benchmarks/bench_eager.py                       # embedded model, float32, 1 and 8 concurrent
    python benchmarks/bench_eager.py --tokens 64 --concurrency 1 8 32

The steering needs `enforce_eager=True` (Python forward hooks run on every step; vLLM's
torch.compile graphs and CUDA graphs would skip them). This measures what that choice costs
without any steering: the same greedy requests on a plain `vllm.LLM` started twice, once with
vLLM's default compilation and once eager, one after the other in this process. Prints a Markdown
table of total generated tokens/s and the start time of each engine (compilation happens there).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from llm_steering import models


def measure(eager: bool, prompts: list[list[int]], tokens: int, concurrency: list[int], dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(models.embedded_model_dir()), dtype=dtype, gpu_memory_utilization=0.3, max_model_len=1024,
              seed=0, enforce_eager=eager)
    started = time.perf_counter() - start
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params)  # warm-up
    out = {"start_s": started}
    try:
        for n in concurrency:
            batch = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(n)]
            t = time.perf_counter()
            done = llm.generate(batch, params)
            elapsed = time.perf_counter() - t
            out[n] = sum(len(o.outputs[0].token_ids) for o in done) / elapsed
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (ignore_eos: exactly this many)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests at once")
    parser.add_argument("--dtype", default="float32", help="model dtype")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.embedded_model_dir()))
    texts = ["Tell me about your weekend.", "How do I boil an egg?", "Explain how a bank loan works.",
             "Describe the ocean to a child."]
    prompts = [models.chat_input_ids(tok, [{"role": "user", "content": t}]) for t in texts]
    results = {mode: measure(mode == "eager", prompts, args.tokens, args.concurrency, args.dtype)
               for mode in ("compiled", "eager")}
    print("| mode | engine start s | " + " | ".join(f"{n} concurrent tok/s" for n in args.concurrency) + " |")
    print("|---|---:|" + "---:|" * len(args.concurrency))
    for mode, r in results.items():
        print(f"| {mode} | {r['start_s']:.0f} | " + " | ".join(f"{r[n]:.1f}" for n in args.concurrency) + " |")
    for n in args.concurrency:
        print(f"eager / compiled at {n}: {results['eager'][n] / results['compiled'][n]:.2f}")


if __name__ == "__main__":
    main()
