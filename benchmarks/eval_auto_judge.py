"""Replay auto with a shorter judged prefix (issue 28): the picker reads only each candidate's first J tokens.

Greedy rows are prefix-consistent (a release depends only on the tokens so far), so judging on J tokens and
going on gives the same row's 48-token answer; the tint of what the picker chose is counted as eval_auto.py
counts it. J = 48 reproduces `eval_auto.py report`'s auto row.

    .venv/bin/python benchmarks/eval_auto_judge.py 24
"""

from __future__ import annotations

import sys

from llm_steering import calibrate, steering
from llm_steering.catalog import Catalog
from llm_steering.lens import steering_scores

import eval_auto
import eval_quality

FILES = ["benchmarks/results/auto28_tuning.jsonl", "benchmarks/results/auto28_heldout.jsonl"]


def main() -> None:
    judge = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    rows = eval_auto.load([str(eval_auto.ROOT / f) for f in FILES])
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(eval_auto.ROOT / "demo.yaml").profile(), model, tok)
    scores = {}
    for c in {r["concept"] for r in rows}:
        f = catalog.resolve(c)
        scores[c] = steering_scores(model, tok, [f.component(f.default_fraction)])
    tally: dict[str, list[int]] = {}
    for r in rows:
        chat = eval_quality.chat(r["prompt"])
        prefixes = [c["ids"][:judge] for c in r["candidates"]]
        nlls = calibrate.answer_nll(model, tok, [chat] * len(prefixes), prefixes)
        question = calibrate.content_stems(r["prompt"])
        read = []
        for c, ids, nll in zip(r["candidates"], prefixes, nlls, strict=True):
            text = tok.decode(ids, skip_special_tokens=True)
            cand = calibrate.Candidate(c["label"], (None,) if c["multiplier"] else (), multiplier=c["multiplier"])
            score = max((float(scores[r["concept"]][t]) for t in set(ids)), default=0.0)
            read.append(calibrate.AutoRow(cand, (), text, nll, 1.0 if not c["multiplier"] else nll / nlls[0],
                                          calibrate.rep3(text), bool(calibrate.content_stems(text) & question), 0,
                                          None, score))
        t = tally.setdefault(r["set"], [0, 0])
        t[0] += r["candidates"][calibrate.pick_candidate(read)]["tint"]
        t[1] += 1
    for st, (hit, n) in tally.items():
        print(f"judged on {judge} tokens, {st}: {hit} of {n} answers tint ({hit / n:.0%})")


if __name__ == "__main__":
    main()
