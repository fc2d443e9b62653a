"""What the effect view costs: effects.token_effects (two teacher-forced passes) beside generating the
answer it explains, in one run, on the embedded model by default.

    .venv/bin/python benchmarks/bench_effects.py                        # 100-token prompt, 256-token answer, 3 rounds
    .venv/bin/python benchmarks/bench_effects.py --prompt-tokens 400 --tokens 128 --rounds 5
    .venv/bin/python benchmarks/bench_effects.py --steer-prompt         # the prompt steered too

Each round generates the steered answer (hooks backend, greedy; the model's end-of-text token is
suppressed so the answer has exactly --tokens tokens), then times token_effects on it, then
effect_html; the figures are medians over rounds. Steering: cats, add 0.35 x the layer norm
(the case issue 11 reported).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llm_steering import effects, steering
from llm_steering.vectors import SteeringVectorSet
from llm_steering.web import effect_view

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("Bridges have shaped the towns of Europe for two thousand years, from Roman stone arches to the long "
        "steel spans of the industrial age and the cable-stayed crossings of today. ")


def prompt_of(tok, n: int) -> tuple[list[dict], list[int]]:
    """A one-message chat whose templated prompt is exactly `n` tokens (or as close as the template allows)."""
    words = (TEXT * 50).split()

    def chat_of(k: int) -> list[dict]:
        return [{"role": "user", "content": " ".join(words[:k]) + " Write a long essay on this."}]

    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose prompt fits in n tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(steering.chat_input_ids(tok, chat_of(mid))) <= n else (lo, mid - 1)
    return chat_of(lo), steering.chat_input_ids(tok, chat_of(lo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local dir (default: the embedded model)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens (chat template included)")
    parser.add_argument("--tokens", type=int, default=256, help="answer length in tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steer-prompt", action="store_true", help="steer the prompt positions too")
    args = parser.parse_args()

    model, tok = steering.load_model(args.model)
    comp = SteeringVectorSet.load(ROOT / "steering_vectors.pt").component("cats", 0.35, op="add")
    chat, prompt_ids = prompt_of(tok, args.prompt_tokens)
    P = len(prompt_ids)
    steer_from = 0 if args.steer_prompt else P
    eos = steering.eos_ids(model, tok)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)

    def generate() -> list[int]:
        with torch.inference_mode(), steering.steer(model, [comp], steer_from=steer_from):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return out[0].tolist()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The streaming backend the app uses, once: the same tokens as the timed generate() above
    # when the model ends on its own at or after --tokens (a check that the benchmark measures the real thing).
    streamed = steering.SteeringTrace()
    "".join(steering.stream_steered_answer_hf(model, tok, chat, [comp], max_new_tokens=args.tokens,
                                              steer_prompt=args.steer_prompt, trace=streamed))
    times: dict[str, list[float]] = {"generate": [], "token_effects": [], "effect_html": []}
    token_ids: list[int] = []
    for _ in range(args.rounds):
        sync()
        t = time.perf_counter()
        token_ids = generate()
        sync()
        times["generate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        effs = effects.token_effects(model, token_ids, P, [comp], steer_from)
        sync()
        times["token_effects"].append(time.perf_counter() - t)
        t = time.perf_counter()
        effect_view.effect_html(tok, token_ids, P, effs, [("Cats", "add", 0.35)])
        times["effect_html"].append(time.perf_counter() - t)
    n = len(token_ids) - P
    ref = [t for t in streamed.token_ids[P:] if t not in eos]  # where it ended, min_new_tokens picked another token
    same = prompt_ids == streamed.token_ids[:P] and token_ids[P : P + len(ref)] == ref
    print(f"model {steering.model_id_of(model)} on {device}, {torch.get_num_threads()} threads; "
          f"prompt {P} tokens, answer {n} tokens, cats add 0.35 at layer {comp.layer}, "
          f"{'prompt steered' if args.steer_prompt else 'answer steered only'}; medians of {args.rounds} rounds")
    print(f"the app's streaming backend gave the same tokens ({len(ref)} before it ended): {same}")
    gen = statistics.median(times["generate"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:14s} {med:7.3f} s   {med / gen:6.1%} of generating   (rounds: {', '.join(f'{v:.3f}' for v in values)})")
    big = sorted(zip(effs, token_ids[P:], strict=True), reverse=True)[:5]
    print("  most pushed:", ", ".join(f"{tok.decode([t])!r} {effect_view.effect_words(e)}" for e, t in big))


if __name__ == "__main__":
    main()
