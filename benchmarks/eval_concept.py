"""Your own concept that shows (issue 28, item 3): which layer and dose make a concept made from sentences
name itself in everyday answers that still answer.

A concept is made as the app makes it (`concepts.make_concept`'s extraction: the mean residual over the
user's sentences minus the mean over the template's neutral set), here at several layers. Concepts: the
five volcano sentences (topic), the topic template's Eiffel Tower example, the persona template's
pirate example, and five chess sentences (topic: a second concept that moves to the later layer).

`scores` measures, per layer and fraction of the layer's norm, what the steering raises on the neutral
chats (`lens.steering_scores`, one batched forward): the rank of the first of the user's own words (tokens
that start a word of the sentences: a keyword-free signal, since the user gave them) and the top tokens.

`gen` generates fixed-dose answers (greedy, 48 tokens, repetition penalty 1.1, as eval_auto.py) at each
layer and fraction for the three everyday questions, the 7 tuning prompts of results/auto28_tuning.jsonl
and the first 8 held-out prompts, with their NLL under the unsteered model. `layers` makes each concept with
`concepts.make_concept` and prints the layer it chose, the seconds it took and how many of the 12 tokens
its steering raises most are the user's own words at layer 15 and at the later layer. `auto` answers the same
prompts with `calibrate.auto_answer` (the app's default) for the concept made at each layer, at its
default. `report` judges every answer: mentions (a concept word), still answers (a content word of the
question, tint.addresses_prompt), fluent (NLL <= 2.5 x the unsteered mean of the same prompts, rep3 < 0.2).

    nice -n 19 .venv/bin/python benchmarks/eval_concept.py scores --out benchmarks/results/concept28_scores.jsonl
    nice -n 19 .venv/bin/python benchmarks/eval_concept.py gen --concept volcano --out benchmarks/results/concept28_gen.jsonl
    nice -n 19 .venv/bin/python benchmarks/eval_concept.py auto --concept volcano --out benchmarks/results/concept28_auto.jsonl
    nice -n 19 .venv/bin/python benchmarks/eval_concept.py layers --out benchmarks/results/concept28_layers.jsonl
    .venv/bin/python benchmarks/eval_concept.py report benchmarks/results/concept28_gen.jsonl benchmarks/results/concept28_auto.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from llm_steering import calibrate, lens, steering
from llm_steering.catalog import Catalog
from llm_steering.concepts import TEMPLATES, neutral_texts
from llm_steering.extract import extract_contrastive
from llm_steering.steering import SteeringComponent

import eval_quality
from tint import addresses_prompt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EVERYDAY = ["How do I change a flat tire?", "Give me three tips for a job interview.", "What is a good pancake recipe?"]
VOLCANO = ("Volcanoes erupt when magma rises through the crust.", "Lava flowed down the side of the volcano.",
           "Mount Vesuvius buried Pompeii in ash.", "The volcano's crater glowed red at night.",
           "Iceland has many active volcanoes and hot springs.")
CONCEPTS = {
    "volcano": (VOLCANO, "topic", ("volcan", "lava", "magma", "erupt", "crater", "vesuvius")),
    "eiffel": (TEMPLATES["topic"].example, "topic", ("eiffel", "tower", "paris")),
    "pirate": (TEMPLATES["persona"].example, "persona", ("pirate", "matey", "arr", "ahoy", "ye ", "treasure", "ship", "sail")),
    "chess": (("The knight jumped over the pawn.", "She moved her bishop to checkmate the king.",
               "Chess players study openings for years.", "The queen is the strongest piece on the board.",
               "He castled early to protect his king."), "topic",
              ("chess", "checkmate", "pawn", "bishop", " knight", " rook", "grandmaster", "chessboard")),
    "jazz": (("The saxophone player improvised a long solo.", "Miles Davis changed jazz forever.",
              "The trumpet and the piano traded phrases.", "We heard a jazz trio in a smoky club.",
              "Swing rhythm makes you want to dance."), "topic", ("jazz", "saxophone", "trumpet", "swing")),
    "my_cats": (("My cat purrs on my lap every evening.", "The kitten chased a ball of yarn.", "Cats sleep most of the day.",
                 "Our tabby cat caught a mouse.", "She fed the stray cat some tuna."), "topic", (" cat", "kitten", "purr")),
    "space_trip": (("The rocket launched toward the Moon.", "Astronauts floated inside the space station.",
                    "Mars is a cold red planet.", "The telescope showed distant galaxies.", "We watched the shuttle land."),
                   "topic", ("rocket", "astronaut", "space", "planet", "galax", "moon")),
    "baking": (("She kneaded the dough for ten minutes.", "The bread rose in the warm oven.", "Sourdough needs a starter.",
                "Flour dusted the kitchen counter.", "The croissants came out golden and flaky."), "topic",
               ("dough", "bread", "bake", "baking", "oven", "flour")),
    "bard": (TEMPLATES["style"].example, "style", ("thou", "thee", "thy", "hath", "doth", "prithee")),
}
LAYERS = (9, 12, 15, 18, 21, 24)


def prompts() -> list[tuple[str, str]]:
    tuning = sorted({json.loads(line)["prompt"] for line in open(RESULTS / "auto28_tuning.jsonl")},
                    key=eval_quality.load_prompts("tuning").index)
    heldout = eval_quality.load_prompts("heldout")[:8]
    return [("everyday", p) for p in EVERYDAY] + [("tuning", p) for p in tuning] + [("heldout", p) for p in heldout]


def own_token_ids(tok, sentences) -> set[int]:
    """The first token of each content word of the sentences (with a space before it; as written, lower case, capitalised)."""
    ids = set()
    for s in sentences:
        for w in re.findall(r"[A-Za-z']+", s):
            if len(w) >= 3 and w.lower() not in calibrate.STOP_WORDS:
                ids |= {tok.encode(f, add_special_tokens=False)[0] for f in (" " + w, " " + w.lower(), " " + w.capitalize())}
    return ids


def load():
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    return model, tok, catalog


def vectors(model, tok, name, layers):
    sents, template, _ = CONCEPTS[name]
    return extract_contrastive(model, tok, {name: {"positive": list(sents), "negative": neutral_texts(template)}}, list(layers))


def cmd_scores(args) -> None:
    model, tok, catalog = load()
    with open(args.out, "a") as out:
        for name in args.concept:
            own = own_token_ids(tok, CONCEPTS[name][0])
            for v in vectors(model, tok, name, args.layers):
                for frac in args.fractions:
                    comp = SteeringComponent(v.layer, v.vector, strength=frac * catalog.norm(v.layer), op="add", name=name)
                    t0 = time.time()
                    sc = lens.steering_scores(model, tok, [comp])
                    rank = sc.argsort(descending=True).argsort()
                    top = sc.topk(12)
                    row = {"concept": name, "layer": v.layer, "fraction": frac, "own_rank": min(int(rank[i]) for i in own),
                           "own_max": max(float(sc[i]) for i in own), "max": float(top.values[0]),
                           "top": [tok.decode([int(i)]) for i in top.indices], "seconds": round(time.time() - t0, 1)}
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")


def cmd_gen(args) -> None:
    model, tok, catalog = load()
    ps = prompts()
    jobs = [(s, p, None, 0.0, []) for s, p in ps]
    for v in vectors(model, tok, args.concept, args.layers):
        for frac in args.fractions:
            comp = SteeringComponent(v.layer, v.vector, strength=frac * catalog.norm(v.layer), op="add", name=args.concept)
            jobs += [(s, p, v.layer, frac, [comp]) for s, p in ps]
    chats = [eval_quality.chat(p) for _, p, *_ in jobs]
    t0 = time.time()
    ids = calibrate.generate_rows(model, tok, chats, [j[4] for j in jobs], eval_quality.MAX_NEW_TOKENS,
                                  eval_quality.REPETITION_PENALTY, batch_size=args.batch)
    nlls = calibrate.answer_nll(model, tok, chats, ids)
    print(f"{len(jobs)} answers in {time.time() - t0:.0f} s", file=sys.stderr)
    with open(args.out, "a") as out:
        for (s, p, layer, frac, _), a, nll in zip(jobs, ids, nlls, strict=True):
            text = tok.decode(a, skip_special_tokens=True)
            out.write(json.dumps({"kind": "fixed", "concept": args.concept, "set": s, "prompt": p, "layer": layer,
                                  "fraction": frac, "text": text, "nll": nll, "rep3": calibrate.rep3(text)}) + "\n")


def cmd_auto(args) -> None:
    model, tok, catalog = load()
    ps = [x for x in prompts() if x[0] in args.sets]
    with open(args.out, "a") as out:
        for v in vectors(model, tok, args.concept, args.layers):
            frac = args.fraction
            comp = SteeringComponent(v.layer, v.vector, strength=frac * catalog.norm(v.layer), op="add", name=args.concept)
            for s, p in ps:
                t0 = time.time()
                res = calibrate.auto_answer(model, tok, eval_quality.chat(p), comp, norm=catalog.norm(v.layer),
                                            max_new_tokens=args.tokens)
                nll = calibrate.answer_nll(model, tok, [eval_quality.chat(p)], [list(res.token_ids)])[0]
                row = {"kind": "auto" if args.tokens == eval_quality.MAX_NEW_TOKENS else f"auto{args.tokens}", "concept": args.concept, "set": s, "prompt": p, "layer": v.layer, "fraction": frac,
                       "chosen": res.label, "text": res.answer, "nll": nll, "rep3": calibrate.rep3(res.answer),
                       "seconds": round(time.time() - t0, 1)}
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                out.flush()


def cmd_layers(args) -> None:
    """For each concept: the layer make_concept chooses, the time it took, and own_word_share at both layers."""
    from llm_steering import concepts
    from llm_steering.recipe import ConceptRecipe

    model, tok, catalog = load()
    late = concepts.late_layer(catalog)
    with open(args.out, "a") as out:
        for name in args.concept:
            sents, template, _ = CONCEPTS[name]
            key = f"mine_{name}"  # not a shipped feature's name (pirate is one)
            recipe = ConceptRecipe(key, tuple(sents), template)
            t0 = time.time()
            chosen = concepts.make_concept(catalog, recipe)
            seconds = time.time() - t0
            shares = {layer: concepts.own_word_share(catalog, concepts.make_concept(
                catalog, ConceptRecipe(key, tuple(sents), template, layer)), recipe) for layer in (15, late)}
            row = {"concept": name, "layer": chosen.layer, "seconds": round(seconds, 1),
                   "own_words_of_12": {str(k): round(v * concepts.OWN_TOP) for k, v in shares.items()}}
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")


def judge(row: dict, mean_nll: float) -> dict:
    text = row["text"].lower()
    m = any(w in text for w in CONCEPTS[row["concept"]][2])
    a = addresses_prompt(row["prompt"], row["text"])
    f = row["nll"] == row["nll"] and row["nll"] <= 2.5 * mean_nll and row["rep3"] < 0.2
    return {"mention": m, "addresses": a, "fluent": f, "tint": m and a and f}


def cmd_report(args) -> None:
    rows = [json.loads(line) for path in args.files for line in open(path)]
    base = [r for r in rows if r["kind"] == "fixed" and r["layer"] is None]
    mean = sum(r["nll"] for r in base) / len(base)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["concept"], r["kind"], r["layer"] or 0, r["fraction"], r["set"])].append(judge(r, mean))
    sets = ("everyday", "tuning", "heldout")
    print(f"unsteered mean NLL {mean:.3f}; each cell: mention / answers / fluent / tint of n")
    print("| concept | kind | layer | fraction | " + " | ".join(sets) + " |")
    print("|---|---|---|---|" + "---|" * len(sets))
    for key in sorted({k[:4] for k in groups}):
        cells = []
        for s in sets:
            g = groups.get((*key, s), [])
            cells.append(" / ".join(str(sum(x[k] for x in g)) for k in ("mention", "addresses", "fluent", "tint")) + f" of {len(g)}"
                         if g else "-")
        print(f"| {key[0]} | {key[1]} | {key[2] or '-'} | {key[3]:g} | " + " | ".join(cells) + " |")
    if args.show:
        for r in rows:
            if r["set"] == "everyday" and (r["layer"] or 0) in args.show:
                print(f"  [{r['kind']} L{r['layer']} f{r['fraction']:g} {r.get('chosen', '')}] {r['prompt']} -> {r['text'][:200]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scores", help="what the steering raises, per layer and fraction")
    s.add_argument("--concept", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    s.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    s.add_argument("--fractions", nargs="+", type=float, default=[0.12, 0.19, 0.3])
    s.add_argument("--out", default=str(RESULTS / "concept28_scores.jsonl"))
    g = sub.add_parser("gen", help="fixed-dose answers per layer and fraction")
    g.add_argument("--concept", default="volcano", choices=list(CONCEPTS))
    g.add_argument("--layers", nargs="+", type=int, default=[15, 18, 21, 24])
    g.add_argument("--fractions", nargs="+", type=float, default=[0.12, 0.19, 0.25])
    g.add_argument("--batch", type=int, default=48, help="rows per generation batch")
    g.add_argument("--out", default=str(RESULTS / "concept28_gen.jsonl"))
    a = sub.add_parser("auto", help="calibrate.auto_answer per layer, at the default fraction")
    a.add_argument("--concept", default="volcano", choices=list(CONCEPTS))
    a.add_argument("--layers", nargs="+", type=int, default=[15, 21, 24])
    a.add_argument("--fraction", type=float, default=0.19)
    a.add_argument("--sets", nargs="+", default=["everyday", "tuning", "heldout"])
    a.add_argument("--tokens", type=int, default=eval_quality.MAX_NEW_TOKENS,
                   help="answer length (the greedy app of the browser tests: 24; auto then judges on 24)")
    a.add_argument("--out", default=str(RESULTS / "concept28_auto.jsonl"))
    lay = sub.add_parser("layers", help="the layer make_concept chooses for each concept, and why")
    lay.add_argument("--concept", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    lay.add_argument("--out", default=str(RESULTS / "concept28_layers.jsonl"))
    r = sub.add_parser("report", help="judge and tabulate")
    r.add_argument("files", nargs="+")
    r.add_argument("--show", nargs="*", type=int, default=[], help="print the everyday answers of these layers")
    args = ap.parse_args()
    {"scores": cmd_scores, "gen": cmd_gen, "auto": cmd_auto, "layers": cmd_layers, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
