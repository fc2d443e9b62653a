"""Decoding defaults against loops and cut answers (issue 31 point 3): each setting's answers on a few
tuning prompts, every concept at its shipped default, scored for fluency and tint.

    nice -n 10 .venv/bin/python benchmarks/eval_decoding.py --every 7 --concepts eiffel_tower pirate cats \
        --settings rp=1.1,t=0.5 rp=1.2,t=0.5 rp=1.3,t=0.5 rp=1.1,t=0.5,freq=0.3 rp=1.1,t=0.5,freq=0.6 \
        rp=1.1,t=0.5,ngram=4 --max-new-tokens 160 --out benchmarks/results/decoding_tuning_160.jsonl
    nice -n 10 .venv/bin/python benchmarks/eval_decoding.py --every 7 --concepts eiffel_tower pirate cats \
        --settings rp=1.1,t=0.5 rp=1.1,t=0.5,freq=0.6 rp=1.2,t=0.5 --max-new-tokens 256 \
        --out benchmarks/results/decoding_tuning_256.jsonl

A setting is `rp` (transformers' repetition penalty), `t` (temperature, 0 greedy), `freq` (an OpenAI-style
frequency penalty: each token's logit minus freq x how often the answer already has it, as Neuronpedia's
chat uses) and `ngram` (transformers' no_repeat_ngram_size). Each setting's answers are one sampled batch
(seed 0): every prompt with every concept, and unsteered. Per setting it prints:
- loops: share of steered answers whose rep3 (repeated word 3-grams, calibrate.rep3) is at least 0.2;
  rep3: its mean over the steered answers;
- ended: share the model ended itself (EOS before the cap); the rest were cut by the cap;
- NLL ratio: mean NLL per token under the unsteered model (fluency), steered over unsteered at `rp=1.1,t=0.5`;
- mention and tint (benchmarks/tint.py: mentions the concept AND addresses the question AND fluent).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering.console.cli import features_with_fractions
from llm_steering.core import round_fraction

import torch
from eval_quality_report import stems
from sweep_vectors import mentions
from tint import FLUENT_NLL, MAX_REP3

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant."
BASELINE = "rp=1.1,t=0.5"


def parse_setting(text: str) -> dict[str, float]:
    out = {"rp": 1.1, "t": 0.5, "freq": 0.0, "ngram": 0}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"unknown setting {key!r} in {text!r}: use rp, t, freq, ngram")
        out[key] = float(value)
    return out


class FrequencyPenalty:
    """logits[b, v] -= penalty x (times v already occurs in row b's answer), as OpenAI's frequency_penalty."""

    def __init__(self, penalty: float, prompt_width: int) -> None:
        self.penalty, self.width = penalty, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        answer = input_ids[:, self.width :]  # [batch, answer so far]
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.penalty * counts


def generate(model, tok, chats, rows, s: dict[str, float], max_new_tokens: int, seed: int) -> tuple[list[list[int]], list[bool]]:
    """Sampled answers (token ids, cut at EOS) of chats[b] steered by rows[b]; and whether each ended itself."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = steering.eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    sample = s["t"] > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=s["t"] if sample else None,
                              top_p=None, top_k=None, repetition_penalty=s["rp"],
                              no_repeat_ngram_size=int(s["ngram"]) or None, pad_token_id=pad, eos_token_id=eos)
    ids = [steering.chat_input_ids(tok, c) for c in chats]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in ids])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ids])
    processors = LogitsProcessorList([FrequencyPenalty(s["freq"], width)] if s["freq"] else [])
    torch.manual_seed(seed)
    with calibrate.row_steering(model, rows), torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             logits_processor=processors)
    answers, ended = [], []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row[:cut] if cut is not None else row)
        ended.append(cut is not None)
    return answers, ended


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=[BASELINE], help="e.g. rp=1.1,t=0.5 rp=1.3,t=0.5,freq=0.3")
    p.add_argument("--concepts", nargs="+", default=["eiffel_tower", "pirate", "cats"])
    p.add_argument("--every", type=int, default=7, help="take every n-th tuning prompt")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSONL to append every answer to")
    args = p.parse_args()

    prompts = [line.strip() for line in (ROOT / "benchmarks" / "prompts_tuning.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")][:: args.every]
    profile = steering.load_config(ROOT / "demo.yaml").profile()
    vectors = steering.load_vectors(profile.vectors_path())
    defaults = {f.name: (round_fraction(fraction), f.op) for f, fraction in features_with_fractions(profile)}  # as the app applies them
    model, tok = steering.load_model()
    cells = [(prompt, None) for prompt in prompts] + [(prompt, c) for c in args.concepts for prompt in prompts]
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}] for prompt, _ in cells]
    rows = [[] if c is None else [vectors.component(c, defaults[c][0], op=defaults[c][1])] for _, c in cells]
    base_nll = None
    print(f"{len(prompts)} tuning prompts x ({len(args.concepts)} concepts at their defaults + unsteered), "
          f"{args.max_new_tokens} new tokens, seed {args.seed}")
    print(f"{'setting':<28} {'loops':>6} {'rep3':>5} {'ended':>6} {'NLL ratio':>9} {'mention':>8} {'tint':>6} {'s':>5}")
    for text in args.settings:
        s = parse_setting(text)
        started = time.monotonic()
        answers, ended = generate(model, tok, chats, rows, s, args.max_new_tokens, args.seed)
        nlls = calibrate.answer_nll(model, tok, chats, answers)
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        plain = [i for i, (_, c) in enumerate(cells) if c is None]
        if base_nll is None or text == BASELINE:  # the unsteered mean at the first (baseline) setting
            base_nll = sum(nlls[i] for i in plain) / len(plain)
        steered = [i for i, (_, c) in enumerate(cells) if c is not None]
        flags = []
        for i in steered:
            prompt, concept = cells[i]
            fluent = nlls[i] <= FLUENT_NLL * base_nll and calibrate.rep3(texts[i]) < MAX_REP3
            flags.append((calibrate.rep3(texts[i]) >= MAX_REP3, ended[i], mentions(texts[i], concept),
                          mentions(texts[i], concept) and bool(stems(prompt) & stems(texts[i])) and fluent))
        n = len(steered)
        share = [sum(f[k] for f in flags) / n for k in range(4)]
        ratio = sum(nlls[i] for i in steered) / n / base_nll
        rep3 = sum(calibrate.rep3(texts[i]) for i in steered) / n
        print(f"{text:<28} {share[0]:>6.0%} {rep3:>5.3f} {share[1]:>6.0%} {ratio:>9.2f} {share[2]:>8.0%} {share[3]:>6.0%} "
              f"{time.monotonic() - started:>5.0f}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                for i, (prompt, concept) in enumerate(cells):
                    f.write(json.dumps({"setting": text, "prompt": prompt, "concept": concept, "text": texts[i],
                                        "ended": ended[i], "nll": nlls[i], "rep3": calibrate.rep3(texts[i])}) + "\n")


if __name__ == "__main__":
    main()
