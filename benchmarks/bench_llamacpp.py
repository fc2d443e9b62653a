"""Greedy speed of one steered answer: llama.cpp with the exported control vector against the hooks backend.

    .venv/bin/python benchmarks/bench_llamacpp.py                    # Eiffel Tower preset, 64 tokens, 3 rounds
    .venv/bin/python benchmarks/bench_llamacpp.py --tokens 128 --rounds 5 --threads 2

Both run the embedded model from the same GGUF file (llama.cpp on its Q4_1 weights, the hooks
backend on the float32 weights transformers de-quantizes from it), steered the same way: the
preset's `add` exported with control_vector.py for llama.cpp, the same components as forward
hooks. Each round runs both in turn (alternating which goes first); the figure is the median
over rounds of answer tokens / wall time of the whole answer (prompt included, for both).
Needs llama.cpp from the prebuilt `xllamacpp` wheel (requirements-dev.txt; llm_steering/llama_cpp.py).
llama.cpp's OpenMP threads spin while they wait: on a machine shared with other work, run it with
OMP_WAIT_POLICY=PASSIVE or --threads 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from llm_steering import control_vector, steering
from llm_steering.catalog import Catalog
from llm_steering.llama_cpp import LlamaCpp

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a long, detailed essay about the history of bridges in Europe."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="Eiffel Tower", help="a preset of demo.yaml's default profile (add only)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the two backends")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    model, tok = steering.load_model(profile.model_id)
    catalog = Catalog.open(profile, model, tok)
    comps = catalog.components(catalog.preset_spec(args.preset))
    path = Path(tempfile.mkdtemp(prefix="bench-")) / "steering.gguf"
    written = control_vector.export_for_model(model, comps, path)
    llm = LlamaCpp(steering.embedded_gguf_path(), n_ctx=2048, n_threads=args.threads)
    ids = steering.chat_input_ids(tok, CHAT)

    def llama_cpp_answer() -> tuple[int, str]:
        llm.set_control_vector(path)  # also empties the cache: every answer starts cold
        out = llm.generate(ids, max_tokens=args.tokens)
        return len(out), llm.detokenize(out)

    def hooks_answer() -> tuple[int, str]:
        text = steering.generate_steered_answer_hf(model, tok, CHAT, comps, max_new_tokens=args.tokens, temperature=0.0)
        return len(tok.encode(text, add_special_tokens=False)), text

    agreement(model, tok, comps, path.parent, args.threads)
    configs = {"llama.cpp, control vector (Q4_1)": llama_cpp_answer, "hooks backend (float32)": hooks_answer}
    for fn in configs.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in configs}
    texts: dict[str, str] = {}
    names = list(configs)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[: r % 2]:
            t0 = time.perf_counter()
            n, texts[name] = configs[name]()
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{rates[n][-1]:.2f}" for n in names), flush=True)

    print(f"\nembedded model, preset {args.preset!r} ({control_vector.describe(written)}), {args.threads} threads, "
          f"greedy, {args.tokens} new tokens, median of {args.rounds} rounds")
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in med.items():
        print(f"  {name:<36} {v:8.2f} tokens/s")
    fast, hooks = med.values()
    print(f"  llama.cpp vs hooks: {fast / hooks:.2f}x")
    for name, text in texts.items():
        print(f"  {name}: {text[:100]!r}")


def agreement(model, tok, comps: list, folder: Path, threads: int) -> None:
    """How llama.cpp's logit changes (every position of the prompt) correlate with the hooks backend's,
    the file written at the components' layer and one layer off (tests/test_control_vector.py asserts it)."""
    ids = steering.chat_input_ids(tok, CHAT)
    llm = LlamaCpp(steering.embedded_gguf_path(), n_ctx=2048, n_threads=threads)

    def hooks(components: list) -> np.ndarray:
        with torch.no_grad(), steering.steer(model, components):
            return model(torch.tensor([ids])).logits[0].double().numpy()

    def llama(path: Path | None) -> np.ndarray:
        llm.set_control_vector(path)
        return llm.logits(ids).astype(np.float64)

    ours, base = hooks(comps) - hooks([]), llama(None)
    for shift in (-1, 0, 1):
        path = folder / f"shift{shift}.gguf"
        control_vector.export_for_model(model, [c.with_op(c.op, layer=c.layer + shift) for c in comps], path)
        theirs = llama(path) - base
        every, last = (float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in ((ours, theirs), (ours[-1], theirs[-1])))
        print(f"logit changes, file at layer {'+'.join(str(c.layer + shift) for c in comps)} against hooks at "
              f"{'+'.join(str(c.layer) for c in comps)}: correlation {every:.3f} (every position), {last:.3f} (last)")


if __name__ == "__main__":
    main()
