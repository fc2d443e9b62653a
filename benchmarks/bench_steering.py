"""Greedy decoding speed: unsteered, steered with hooks, steered with NNsight, side by side in one run.

    .venv/bin/python benchmarks/bench_steering.py                  # embedded model, 64 tokens, 3 rounds
    .venv/bin/python benchmarks/bench_steering.py --tokens 128 --rounds 5
    .venv/bin/python benchmarks/bench_steering.py --model /path/to/llama --layers 11 15 19

Each round runs the three configurations one after another, in a rotating order (so
machine noise hits all of them alike); the figure per configuration is the median over rounds of tokens/s.
Steering: a clamp on each of --layers. Targets: hooks cost at most 3% against
unsteered, NNsight at most 15% against hooks.
"""

from __future__ import annotations

import argparse
import statistics
import time

from llm_steering import steering
from llm_steering.backends import Backend, GenerationSettings, get_backend

import torch

CHAT = [{"role": "user", "content": "Write a long, detailed essay about the history of bridges in Europe."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local dir (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three configurations")
    parser.add_argument("--verbose", action="store_true", help="print each run's token count and time")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 14, 20], help="layers to clamp")
    args = parser.parse_args()

    model, tok = steering.load_model(args.model)
    d = steering.hidden_size(model)
    gen = torch.Generator().manual_seed(0)
    comps = [
        steering.SteeringComponent(layer=L, vector=torch.randn(d, generator=gen), strength=20.0, op="clamp")
        for L in args.layers
    ]

    hooks_backend, nnsight_backend = get_backend("hf", model, tok), get_backend("nnsight", model, tok)
    settings = GenerationSettings(max_new_tokens=args.tokens)

    def answer(backend: Backend, components: list[steering.SteeringComponent]) -> int:
        return len(backend.generate(CHAT, components, settings).token_ids)

    configs = {"unsteered (hooks path, no component)": lambda: answer(hooks_backend, []),
               f"hooks, clamp on {len(comps)} layers": lambda: answer(hooks_backend, comps),
               f"nnsight, clamp on {len(comps)} layers": lambda: answer(nnsight_backend, comps)}
    for fn in configs.values():  # warm-up: first calls pay for allocation and NNsight's wrapping
        fn()
    rates: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order, so no configuration always goes first
            fn = configs[name]
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            rates[name].append(n / dt)
            if args.verbose:
                print(f"  {name}: {n} tokens in {dt:.2f} s", flush=True)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{rates[n][-1]:.2f}" for n in names), flush=True)

    device = next(model.parameters()).device
    print(f"\nmodel {steering.model_id_of(model)} on {device}, {torch.get_num_threads()} threads, "
          f"greedy, {args.tokens} new tokens, median of {args.rounds} rounds")
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in med.items():
        print(f"  {name:<40} {v:8.2f} tokens/s")
    unsteered, hooked, nn = med.values()
    print(f"  hooks vs unsteered:   {hooked / unsteered:.3f}x speed ({(1 - hooked / unsteered) * 100:+.1f}% cost, target <= 3%)")
    print(f"  nnsight vs hooks:     {nn / hooked:.3f}x speed ({(1 - nn / hooked) * 100:+.1f}% cost, target <= 15%)")


if __name__ == "__main__":
    main()
