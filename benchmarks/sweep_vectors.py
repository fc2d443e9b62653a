"""Choose a layer, op and strength for each contrastive concept by a sweep; evaluate the chosen ones.

    # 1. sweep on 4 tuning prompts (batched greedy generation, 64 new tokens), results appended to a JSONL file:
    .venv/bin/python benchmarks/sweep_vectors.py sweep --layers 12 15 9 --ops clamp --fractions 0.1 0.15 0.2 0.25 --out /tmp/s.jsonl
    .venv/bin/python benchmarks/sweep_vectors.py sweep --layers 15 --ops add --fractions 0.3 0.35 --only eiffel_tower cats --out /tmp/s.jsonl
    # 2. best setting per concept (mention >= 3/4, NLL ratio <= 2.5, rep3 < 0.2 on the tuning prompts):
    .venv/bin/python benchmarks/sweep_vectors.py pick --max-ratio 2.5 --out /tmp/s.jsonl
    # 3. evaluate the shipped file + demo.yaml's smollm2 features on the 5 held-out prompts (the README table):
    .venv/bin/python benchmarks/sweep_vectors.py eval --check --json benchmarks/eval_default_set.json

Settings of every run: greedy decoding, 64 new tokens, repetition penalty 1.1 (the product's
default; `--repetition-penalty` to change), system prompt "You are a helpful assistant.".
Metrics per concept and setting, over the prompts:
- mention: answers containing one of the concept's KEYWORDS (whole words, case-insensitive);
- NLL ratio: mean negative log-likelihood per answer token of the steered answers under the
  unsteered model, divided by that of the unsteered answers to the same prompts;
- rep3: fraction of repeated word 3-grams in an answer (1 - unique/total), mean over answers
  (llm_steering.calibrate.rep3).
Steering is per batch row (llm_steering.calibrate.generate_rows: each row's own components), so a
whole grid runs in a few batched generations, and the NLLs are calibrate.answer_nll's; `eval --check`
verifies that it gives the same tokens as steering.generate_steered_answer_hf.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering import extract as esv
from llm_steering.steering import SteeringComponent

ROOT = Path(__file__).resolve().parent.parent

SYSTEM = "You are a helpful assistant."
TUNING_PROMPTS = [
    "How do I write a good cover letter?",
    "What are some tips for saving money?",
    "Explain what a spreadsheet is used for.",
    "How should I prepare for a job interview?",
]
HELD_OUT_PROMPTS = [
    "Explain how a bank loan works.",
    "Give me three tips for keeping a tidy desk.",
    "What should I check before buying a used bicycle?",
    "Write a short email asking my manager for a day off.",
    "How do I boil an egg?",
]
KEYWORDS = {
    "eiffel_tower": ["eiffel", "paris", "tower", "towers", "parisian"],
    "pirate": ["pirate", "pirates", "ahoy", "matey", "mateys", "arr", "arrr", "treasure", "buccaneer", "plunder", "captain", "jolly roger"],
    "shakespeare": ["shakespeare", "shakespearean", "thee", "thou", "thy", "thine", "hath", "doth", "hamlet", "romeo", "juliet",
                    "macbeth", "bard", "sonnet", "sonnets", "verily", "prithee", "methinks", "wherefore", "forsooth"],
    "cats": ["cat", "cats", "kitten", "kittens", "kitty", "meow", "purr", "purrs", "purring", "feline", "whiskers"],
    "space": ["planet", "planets", "galaxy", "galaxies", "astronaut", "astronauts", "rocket", "orbit", "universe", "nasa",
              "cosmos", "cosmic", "spaceship", "spacecraft", "telescope", "outer space", "stars", "mars"],
    "ocean": ["ocean", "oceans", "sea", "seas", "waves", "beach", "whale", "whales", "dolphin", "dolphins", "coral", "marine", "shark"],
    "coffee": ["coffee", "espresso", "latte", "cappuccino", "caffeine", "barista", "cafe", "café", "mocha", "brew", "brewing"],
    "dinosaurs": ["dinosaur", "dinosaurs", "tyrannosaurus", "t. rex", "triceratops", "jurassic", "fossil", "fossils", "velociraptor",
                  "stegosaurus", "paleontologist", "paleontologists"],
    "music": ["music", "musical", "song", "songs", "melody", "guitar", "piano", "concert", "singer", "orchestra", "musician", "musicians"],
    "dragons": ["dragon", "dragons", "knight", "knights", "wizard", "castle", "fire-breathing"],
}


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def first_mention(text: str, concept: str) -> int | None:
    """Where in `text` the concept's first keyword (a whole word, any case) starts; None without one."""
    low = text.lower()
    starts = [m.start() for k in KEYWORDS[concept] if (m := re.search(rf"(?<![a-z]){re.escape(k)}(?![a-z])", low))]
    return min(starts, default=None)


def mentions(text: str, concept: str) -> bool:
    return first_mention(text, concept) is not None


def chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def evaluate(model, tok, settings: list[dict], vectors: dict, prompts: list[str], args) -> list[dict]:
    """Run every setting {concept, layer, op, fraction, strength} on every prompt; add metrics."""
    chats = [chat(p) for p in prompts]
    base_ans = calibrate.generate_rows(model, tok, chats, [[]] * len(chats), args.max_new_tokens, args.repetition_penalty,
                                       batch_size=args.batch_size)
    base_nll = calibrate.answer_nll(model, tok, chats, base_ans, args.batch_size)
    base_txt = [tok.decode(a, skip_special_tokens=True) for a in base_ans]
    all_chats, rows = [], []
    for s in settings:
        comp = SteeringComponent(s["layer"], vectors[(s["concept"], s["layer"])], strength=s["strength"], op=s["op"],
                                 name=s["concept"])
        all_chats += chats
        rows += [[comp]] * len(chats)
    t0 = time.time()
    answers = calibrate.generate_rows(model, tok, all_chats, rows, args.max_new_tokens, args.repetition_penalty,
                                      steer_prompt=not getattr(args, "answer_only", False), batch_size=args.batch_size)
    nlls = calibrate.answer_nll(model, tok, all_chats, answers, args.batch_size)
    print(f"  {len(rows)} generations in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    results = []
    n = len(prompts)
    base_mean = sum(base_nll) / n
    for i, s in enumerate(settings):
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers[i * n : (i + 1) * n]]
        nll = [x for x in nlls[i * n : (i + 1) * n] if x == x]
        results.append({
            **{k: s[k] for k in ("concept", "layer", "op", "fraction", "strength")},
            "mention": sum(mentions(t, s["concept"]) for t in texts), "n": n,
            "base_mention": sum(mentions(t, s["concept"]) for t in base_txt),
            "nll_ratio": (sum(nll) / len(nll)) / base_mean if nll else float("inf"),
            "rep3": sum(map(calibrate.rep3, texts)) / n, "texts": texts,
        })
    return results


def cmd_sweep(args) -> None:
    model, tok = steering.load_model()
    concepts = esv.with_negatives(esv.load_concepts(args.concepts), args.negatives)
    if args.only:
        concepts = {k: v for k, v in concepts.items() if k in args.only}
    vecs = esv.extract_contrastive(model, tok, concepts, args.layers, args.method)
    vectors = {(v.concept, v.layer): v.vector for v in vecs}
    norms = steering.measure_layer_norms(model, tok, args.layers)
    print(f"norms: { {k: round(v, 1) for k, v in norms.items()} }", file=sys.stderr, flush=True)
    settings = [
        {"concept": c, "layer": L, "op": op, "fraction": f, "strength": f * norms[L]}
        for op in args.ops for L in args.layers for f in args.fractions for c in concepts
    ]
    # one layer/op at a time, so partial results land in the file early
    groups: dict[tuple, list[dict]] = {}
    for s in settings:
        groups.setdefault((s["layer"], s["op"]), []).append(s)
    with open(args.out, "a") as fh:
        for (L, op), group in groups.items():
            print(f"layer {L} {op}: {len(group)} settings", file=sys.stderr, flush=True)
            for r in evaluate(model, tok, group, vectors, TUNING_PROMPTS[: args.limit], args):
                r.update(method=args.method, negatives=args.negatives, answer_only=args.answer_only, concepts=args.concepts)
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                print(f"  {r['concept']:13s} L{L:<2d} {op:5s} f={r['fraction']:.2f} mention {r['mention']}/{r['n']} "
                      f"nll x{r['nll_ratio']:.2f} rep3 {r['rep3']:.2f}", file=sys.stderr, flush=True)


def cmd_pick(args) -> None:
    rows = [json.loads(line) for line in open(args.out)]
    best: dict[str, dict] = {}
    for r in rows:
        ok = r["mention"] >= args.min_mention and r["nll_ratio"] <= args.max_ratio and r["rep3"] < 0.2
        key = (ok, r["mention"], -r["nll_ratio"])
        if r["concept"] not in best or key > best[r["concept"]]["_key"]:
            best[r["concept"]] = {**r, "_key": key, "ok": ok}
    for c, r in best.items():
        print(f"{c:13s} {'OK ' if r['ok'] else 'no '} L{r['layer']:<2d} {r['op']:5s} f={r['fraction']:.2f} "
              f"{r.get('negatives', 'given')}{' answer-only' if r.get('answer_only') else ''} "
              f"strength {r['strength']:.1f} mention {r['mention']}/{r['n']} nll x{r['nll_ratio']:.2f} rep3 {r['rep3']:.2f}")
        if args.show:
            for t in r["texts"]:
                print("    |", t.replace("\n", " ")[:200])


def cmd_eval(args) -> None:
    model, tok = steering.load_model()
    vset = steering.load_vectors(args.vectors)
    prof = steering.load_config(args.config).profile(args.profile)
    settings, vectors = [], {}
    for feat in prof.features:
        if feat.name not in KEYWORDS:
            continue
        vec = vset.get(feat.name)
        vectors[(feat.name, feat.layer)] = vec.vector
        settings.append({"concept": feat.name, "layer": feat.layer, "op": feat.op,
                         "fraction": feat.strength / vset.norm(feat.layer), "strength": feat.strength})
    results = evaluate(model, tok, settings, vectors, HELD_OUT_PROMPTS[: args.limit], args)
    print("| concept | layer | op | strength (fraction of norm) | mention steered | mention unsteered | NLL ratio | rep3 | pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ok = r["mention"] >= 3 and r["base_mention"] == 0 and r["nll_ratio"] <= 2.5 and r["rep3"] < 0.2
        print(f"| `{r['concept']}` | {r['layer']} | {r['op']} | {r['strength']:.1f} ({r['fraction']:.2f}) | {r['mention']}/{r['n']} | "
              f"{r['base_mention']}/{r['n']} | {r['nll_ratio']:.2f} | {r['rep3']:.3f} | {'yes' if ok else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.check:
        r0 = settings[0]
        comp = vset.component(r0["concept"], r0["fraction"], op=r0["op"])
        lib = steering.generate_steered_answer_hf(model, tok, chat(HELD_OUT_PROMPTS[0]), [comp], max_new_tokens=args.max_new_tokens,
                                                  temperature=0.0, repetition_penalty=args.repetition_penalty,
                                                  steer_prompt=not args.answer_only)
        same = lib.strip() == results[0]["texts"][0].strip()
        print(f"check: batched == steering.generate_steered_answer_hf for {r0['concept']} on prompt 1: {same}")
        if not same:
            print("  library:", lib[:300].replace("\n", " "))
            print("  batched:", results[0]["texts"][0][:300].replace("\n", " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "pick", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--out", default="/tmp/sweep.jsonl", help="JSONL of sweep results")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--repetition-penalty", type=float, default=1.1)
        p.add_argument("--batch-size", type=int, default=40)
    for name in ("sweep", "eval"):
        sub.choices[name].add_argument("--limit", type=int, help="only the first N prompts (a quick check)")
    sw = sub.choices["sweep"]
    sw.add_argument("--concepts", default=str(ROOT / "concepts.yaml"))
    sw.add_argument("--only", nargs="+", help="concepts to sweep (default: all)")
    sw.add_argument("--layers", nargs="+", type=int, default=[4, 8, 12, 16])
    sw.add_argument("--ops", nargs="+", choices=("add", "clamp"), default=["add", "clamp"])
    sw.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    sw.add_argument("--method", choices=("mean", "pca"), default="mean")
    sw.add_argument("--negatives", choices=("given", "others", "both"), default="given")
    sw.add_argument("--answer-only", action="store_true", help="steer only the answer, not the prompt")
    pk = sub.choices["pick"]
    pk.add_argument("--min-mention", type=int, default=3)
    pk.add_argument("--max-ratio", type=float, default=2.5)
    pk.add_argument("--show", action="store_true", help="print the chosen settings' answers")
    ev = sub.choices["eval"]
    ev.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"))
    ev.add_argument("--config", default=str(ROOT / "demo.yaml"))
    ev.add_argument("--profile", default=None)
    ev.add_argument("--json", help="write the answers and metrics here")
    ev.add_argument("--check", action="store_true", help="compare one batched answer with the library's")
    ev.add_argument("--answer-only", action="store_true", help="steer only the answer (steer_prompt=False)")
    args = parser.parse_args()
    {"sweep": cmd_sweep, "pick": cmd_pick, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()
