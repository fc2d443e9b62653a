"""What auto costs (issue 28): the whole answer and the delay of its first words, against one plain answer.

For each prompt and feature, in one run and alternating (so both see the same machine): the answer at the
feature's fixed default through the hooks backend (stream_steered_answer_hf), and the same answer with auto
(calibrate.stream_auto_answer: the candidates as rows of one batch on the first 48 greedy tokens, then the
chosen one goes on). Both greedy, repetition penalty 1.1, `--tokens` new tokens (the app's 256 by default).
Prints, per pair and in all, the seconds to the first words and to the end, and the ratios
(aim: the whole answer at most 2.5x a plain one; the first words at most 5 s after a plain answer's).

    nice -n 5 .venv/bin/python benchmarks/bench_auto.py                    # 3 prompts x 2 features, 256 tokens
    .venv/bin/python benchmarks/bench_auto.py --prompts 1 --features ocean --tokens 64
    nice -n 5 .venv/bin/python benchmarks/bench_auto.py --nine    # also the nine candidates of a feature without a learned direction
    .venv/bin/python benchmarks/bench_auto.py --floor     # only: where the first words' delay comes from (below)

`--floor` times what the first words wait for, apart: the bare model's greedy batch of 48 tokens (one row and
ten, the candidates' number), in float32 (what ships) and bfloat16 (not shipped: it changes the answers), and
the read-back of ten rows (calibrate.read_candidates), alternating, twice each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering.catalog import Catalog

import eval_quality
import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(pieces) -> tuple[float, float, str]:
    """(seconds to the first non-empty piece, seconds to the end, the text)."""
    t0 = time.perf_counter()
    first, text = None, ""
    for piece in pieces:
        if piece and first is None:
            first = time.perf_counter() - t0
        text += piece
    total = time.perf_counter() - t0
    return first if first is not None else total, total, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="the first N held-out prompts")
    parser.add_argument("--features", nargs="+", default=["ocean", "pirate"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--nine", action="store_true",
                        help="also time auto with the nine candidates of a feature without a learned direction, each time")
    parser.add_argument("--floor", action="store_true", help="only: the batch and the read-back timed apart, float32 and bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = steering.load_model()
    if args.floor:
        floor(model, tok)
        return
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    prompts = eval_quality.load_prompts("heldout")[: args.prompts]
    # the steering scores and words are measured once per feature (cached, as in the app after its start)
    comps = {}
    for key in args.features:
        f = catalog.resolve(key)
        comps[key] = f.component(f.default_fraction)
        calibrate.auto_choose(model, tok, eval_quality.chat("Hi"), comps[key], judge_tokens=2)
    rows, nines = [], []
    for p in prompts:
        chat = eval_quality.chat(p)
        for key, comp in comps.items():
            plain = timed(steering.stream_steered_answer_hf(model, tok, chat, [comp], max_new_tokens=args.tokens,
                                                            repetition_penalty=eval_quality.REPETITION_PENALTY))
            auto_stream = calibrate.stream_auto_answer(model, tok, chat, comp, (), args.tokens,
                                                       eval_quality.REPETITION_PENALTY)
            auto = timed(auto_stream)
            n_plain, n_auto = len(tok.encode(plain[2])), len(auto_stream.result.token_ids)
            rows.append((plain, auto))
            if args.nine:
                nine = timed(calibrate.stream_auto_answer(model, tok, chat, comp, (), args.tokens, eval_quality.REPETITION_PENALTY,
                                                          candidates=calibrate.auto_candidates(comp)))
                nines.append(nine)
                print(f"  nine candidates: first {nine[0]:5.2f} s, all {nine[1]:6.2f} s", flush=True)
            print(f"{key:12s} {p[:40]!r:44s} plain: first {plain[0]:5.2f} s, all {plain[1]:6.2f} s ({n_plain} tokens) | "
                  f"auto ({auto_stream.choice.chosen.label}): first {auto[0]:5.2f} s, all {auto[1]:6.2f} s ({n_auto} tokens) | "
                  f"x{auto[1] / plain[1]:.2f}, first words +{auto[0] - plain[0]:.2f} s", flush=True)
    ratio = sum(a[1] for _, a in rows) / sum(p[1] for p, _ in rows)
    delay = statistics.median(a[0] - p[0] for p, a in rows)
    worst = max(a[0] - p[0] for p, a in rows)
    print(f"\nin all ({len(rows)} answers each, {args.tokens} new tokens, {args.threads} threads): auto's answers took "
          f"{ratio:.2f}x the plain ones' time; its first words came {delay:.2f} s later (median; at most {worst:.2f} s)")
    if nines:
        print(f"with the nine candidates instead: {sum(n[1] for n in nines) / sum(p[1] for p, _ in rows):.2f}x; first words "
              f"{statistics.median(n[0] - p[0] for (p, _), n in zip(rows, nines, strict=True)):.2f} s later (median; at most "
              f"{max(n[0] - p[0] for (p, _), n in zip(rows, nines, strict=True)):.2f} s)")


def floor(model, tok) -> None:
    """The first words' floor on this machine: the batch of 48 greedy tokens (1 and 10 rows, float32 and
    bfloat16, the bare model, no EOS) and the read-back of ten candidates, on the first held-out prompt."""
    import copy

    chat = eval_quality.chat(eval_quality.load_prompts("heldout")[0])
    prompt = steering.chat_input_ids(tok, chat)
    config = calibrate._config(model, tok, 48, eval_quality.REPETITION_PENALTY)
    config.eos_token_id, config.min_new_tokens = None, 48
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    ids = torch.tensor([prompt] * 10)
    rows = [list(range(1000, 1048))] * 10  # ten answers of 48 tokens to read back
    cands = [calibrate.Candidate("unsteered")] * 10
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for dtype, m in models.items():
            for n in (1, 10):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    m.generate(input_ids=ids[:n], attention_mask=torch.ones_like(ids[:n]), generation_config=config)
                times.setdefault(f"{dtype}: {n} row{'s' * (n > 1)} of 48 tokens", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            calibrate.read_candidates(m, tok, chat, cands, rows, [None] * 10, frozenset())
            times.setdefault(f"{dtype}: reading 10 rows back", []).append(time.perf_counter() - t0)
    print(f"prompt of {len(prompt)} tokens, {torch.get_num_threads()} threads:")
    for what, ts in times.items():
        print(f"  {what:34s} {' '.join(f'{t:.2f}' for t in ts)} s")


if __name__ == "__main__":
    main()
