"""What auto's steering does after the judged words (issue 28): keep it, halve it, or let go.

Auto judges its candidates on the first 48 greedy tokens; in the app the chosen one then goes on to 256
tokens with the same steering, and read by hand in the browser many answers drift off the question after
the judged part (docs/quality.md, "In the browser, at the app's settings"). For each prompt of a set and
each shipped concept at its default: `calibrate.auto_choose` as the app calls it (the seven or nine rows,
48 tokens), then the chosen answer goes on to `--tokens` in three ways, as rows of one batch:

- keep: the same steering (what ships; a release that has not let go yet still lets go at its word),
- half: the same steering at half its strength from the first token after the judged ones,
- let go: unsteered from the first token after the judged ones (the judged words stay as they were steered),
- let go once named: as let go when the judged words hold one of the steering's own words (calibrate's
  keyword-free "names the concept"), else steered on until the answer feeds one, then let go (the release's
  rule after the judged words).

Greedy, repetition penalty 1.1. Writes one JSON line per prompt and concept: the chosen candidate, the
judged words, each way's whole answer, and tint.py's judgement of the whole answer and of the part after
the judged words (a keyword of the concept, a word of the question, fluent: NLL under the unsteered model
within FLUENT_NLL x the set's mean unsteered NLL of the whole answer, rep3). The keep rows are checked
against `calibrate.continue_candidate` (the library's own continuation) on the first pair.

    nice -n 5 .venv/bin/python benchmarks/eval_auto_after.py run --set tuning --out benchmarks/results/auto28_after_tuning.jsonl
    .venv/bin/python benchmarks/eval_auto_after.py report benchmarks/results/auto28_after_tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering.catalog import Catalog

import eval_quality
import torch
from sweep_vectors import KEYWORDS, mentions
from tint import FLUENT_NLL, MAX_REP3, addresses_prompt

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("keep", "half", "let go", "let go once named")


def prompts_of(set_: str) -> list[str]:
    """The prompts eval_auto.py judged for the set (results/auto28_<set>.jsonl), in order."""
    path = ROOT / "benchmarks" / "results" / f"auto28_{set_}.jsonl"
    return list(dict.fromkeys(json.loads(line)["prompt"] for line in open(path)))


def rows_for(model, prompt: list[int], prefix: list[int], cand: calibrate.Candidate, words: frozenset[int]) -> list:
    """The four ways to go on, as scheduled_steering rows over prompt + prefix (no padding)."""
    p, end = len(prompt), len(prompt) + len(prefix)
    released_at = next((i for i, t in enumerate(prefix) if t in words), None) if cand.release else None
    keep = calibrate._row(model, cand, (), 0, p, None if released_at is None else p + released_at)
    if not cand.components:
        return [keep, *(calibrate._row(model, cand, (), 0, p) for _ in range(3))]
    stop = end if released_at is None else p + released_at
    start = 0 if cand.steer_prompt else p
    comps = list(cand.components)
    vecs = calibrate._vectors(model, comps)
    halves = [calibrate.with_strength(c, c.strength / 2) for c in comps]
    let_go = calibrate._Row([(comps, vecs, start, True)], stop=stop, released=True)
    half = calibrate._Row([(comps, vecs, start, True)], stop=stop, released=True)
    if released_at is None:  # a release that let go in the judged words stays let go
        half.parts.append((halves, calibrate._vectors(model, halves), end, False))
    if released_at is not None or any(t in words for t in prefix):
        named = calibrate._Row([(comps, vecs, start, True)], stop=stop, released=True)
    else:  # steered on until it feeds one of the steering's words
        named = calibrate._Row([(comps, vecs, start, True)])
    return [keep, half, let_go, named]


def go_on(model, tok, chat, choice: calibrate.AutoChoice, tokens: int) -> list[list[int]]:
    prompt = steering.chat_input_ids(tok, chat)
    prefix = list(choice.prefix)
    eos = set(steering.eos_ids(model, tok))
    if len(prefix) < choice.judge_tokens or (prefix and prefix[-1] in eos):
        return [prefix] * len(WAYS)  # it ended within the judged words
    rows = rows_for(model, prompt, prefix, choice.chosen, choice.words)
    config = calibrate._config(model, tok, tokens - len(prefix), 1.1)
    ids = torch.tensor([prompt + prefix] * len(WAYS))
    with calibrate.scheduled_steering(model, rows, choice.words), torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    out = []
    for row in gen[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(prefix + row[:cut])
    return out


def cmd_run(args) -> None:
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    prompts = prompts_of(args.set)[: args.prompts]
    concepts = args.concepts or list(KEYWORDS)
    done = set()
    if Path(args.out).exists():
        done = {(r["prompt"], r["concept"]) for r in map(json.loads, open(args.out))}
    checked = False
    plain: dict[str, list[int]] = {}  # the unsteered answer to each prompt, for the fluency bar
    with open(args.out, "a") as out:
        for prompt in prompts:
            for concept in concepts:
                if (prompt, concept) in done:
                    continue
                t0 = time.time()
                f = catalog.resolve(concept)
                comp = f.component(f.default_fraction)
                chat = eval_quality.chat(prompt)
                choice = calibrate.auto_choose(model, tok, chat, comp)
                answers = go_on(model, tok, chat, choice, args.tokens)
                if not checked and choice.chosen.components and len(answers[0]) > len(choice.prefix):
                    alone = calibrate.continue_candidate(model, tok, chat, choice.chosen, (), choice.words, list(choice.prefix),
                                                         None, args.tokens - len(choice.prefix), 1.1)
                    assert answers[0] == list(choice.prefix) + alone, "the keep row is not the library's continuation"
                    checked = True
                if prompt not in plain:
                    plain[prompt] = unsteered(model, tok, chat, args.tokens)
                nlls = calibrate.answer_nll(model, tok, [chat] * (len(WAYS) + 1), [*answers, plain[prompt]])
                row = {"set": args.set, "prompt": prompt, "concept": concept, "chosen": choice.chosen.label,
                       "judged": tok.decode(list(choice.prefix), skip_special_tokens=True), "unsteered_nll": nlls[-1],
                       "ways": {w: {"text": tok.decode(a, skip_special_tokens=True),
                                    "after": tok.decode(a[len(choice.prefix):], skip_special_tokens=True), "nll": n}
                                for w, a, n in zip(WAYS, answers, nlls, strict=False)},
                       "named_in_judged": any(t in choice.words for t in choice.prefix)}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"{concept:12s} {prompt[:40]:40s} {choice.chosen.label:45s} {time.time() - t0:5.1f} s", file=sys.stderr,
                      flush=True)


def unsteered(model, tok, chat, tokens: int) -> list[int]:
    return calibrate.generate_candidates(model, tok, chat, [calibrate.Candidate("unsteered")], (), frozenset(), tokens, 1.1)[0][0]


def judge(row: dict, way: dict, mean_nll: float, part: str) -> dict:
    text = way[part]
    fluent = way["nll"] <= FLUENT_NLL * mean_nll and calibrate.rep3(way["text"]) < MAX_REP3
    m, a = mentions(text, row["concept"]), addresses_prompt(row["prompt"], text)
    return {"mention": m, "addresses": a, "fluent": fluent, "tint": m and a and fluent}


def cmd_report(args) -> None:
    rows = [json.loads(line) for p in args.files for line in open(p)]
    for set_ in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == set_]
        mean = sum({r["prompt"]: r["unsteered_nll"] for r in mine}.values()) / len({r["prompt"] for r in mine})
        print(f"\n{set_}: {len(mine)} prompt-concept pairs; cells: whole answer tints / after the judged words: "
              "a keyword, a word of the question")
        print("| way | tints (whole answer) | keyword after | question word after | fluent |\n|---|---|---|---|---|")
        for w in [w for w in WAYS if all(w in r["ways"] for r in mine)]:
            whole = [judge(r, r["ways"][w], mean, "text") for r in mine]
            after = [judge(r, r["ways"][w], mean, "after") for r in mine]
            n = len(mine)
            print(f"| {w} | {sum(j['tint'] for j in whole)}/{n} | {sum(j['mention'] for j in after)}/{n} | "
                  f"{sum(j['addresses'] for j in after)}/{n} | {sum(j['fluent'] for j in whole)}/{n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--set", default="tuning")
    run.add_argument("--prompts", type=int, default=7)
    run.add_argument("--concepts", nargs="*")
    run.add_argument("--tokens", type=int, default=200)
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--out", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
