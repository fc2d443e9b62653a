"""Learned directions against the shipped contrastive ones (issue 28, item 6), at the same dose.

For each of the ten shipped concepts, `train` trains a direction with llm_steering.learned
(prompt distillation): the teacher answers are the unsteered model's answers when asked in words
("In your answer, mention the ocean." after the question, or the system prompt that says so; "Answer
like a pirate."), kept when they name the concept (a stem of a word of its name: "eiffel", "tower",
"pirat", "ocean", ...; all of them when fewer than 4 do). They are the stored rows of
`eval_adaptive.py prompted` (results/prompted_tuning_every3.jsonl: greedy, 48 tokens, repetition
penalty 1.1), on the TRAINING prompts: those of its 14 tuning prompts that are not among the 7 tuning
prompts the comparison is judged on (results/auto28_tuning.jsonl's). Only the unit direction trains,
from the contrastive one, at the feature's shipped op, layer and strength (demo.yaml), steering every
position of the plain chat and the answer.

`gen` generates the learned direction's answers (greedy, 48 tokens, repetition penalty 1.1, as the
issue's check runs) at multipliers of the shipped strength, on the tuning prompts of auto28_tuning.jsonl
or all held-out prompts, with their NLL under the unsteered model. The contrastive vector's answers at
the same doses (x0.6, x1, x1.4, x1.8, prompt steered) are the stored rows of results/auto28_*.jsonl (the
same generation); `gen --check N` regenerates N of them and says whether they are the same tokens.

`volcano` makes a concept from five volcano sentences as the app does (concepts.make_concept, topic
template, its default strength), learns a direction for it from teacher answers the library generates
(learned.learn_direction on the 7 training prompts: asked "In your answer, mention volcanoes.", and the
contrastive direction's own answers at x1, x2 and x3 of the default, the best per prompt that names a
volcano, shares a word with the question and reads fluently), and answers three everyday questions and
the 7 tuning prompts with each, at x1 and x2 of the default.

`report` judges every answer with tint.py's rule (eval_auto.judge: a keyword, a word of the prompt,
NLL <= 2.5 x the set's mean unsteered NLL and rep3 < 0.2) and prints per concept, tuning and held-out
side by side: contrastive x1, learned x1 (the same dose), and each at its own best multiplier chosen
on the tuning prompts (ties: x1, then the weaker).

    nice -n 19 .venv/bin/python benchmarks/eval_learned.py train --out benchmarks/results/learned28_vectors.pt
    nice -n 19 .venv/bin/python benchmarks/eval_learned.py gen --set tuning --mult 1 --check 5 --out benchmarks/results/learned28_tuning.jsonl
    nice -n 19 .venv/bin/python benchmarks/eval_learned.py gen --set heldout --mult 1 --out benchmarks/results/learned28_heldout.jsonl
    nice -n 5 .venv/bin/python benchmarks/eval_learned.py gen --set tuning --mult 1.2 1.1 1.3 --out benchmarks/results/auto28_mid_tuning.jsonl
    nice -n 5 .venv/bin/python benchmarks/eval_learned.py gen --set tuning --mult 1.2 1.1 1.3 --vectors shipped --name contrastive \
        --check 3 --out benchmarks/results/auto28_mid_tuning.jsonl   # the same two for --set heldout: the finer doses
    nice -n 5 .venv/bin/python benchmarks/eval_learned.py gen --set tuning --mult 1 0.6 1.4 1.1 1.2 1.3 \
        --auto benchmarks/results/auto28_tuning_more.jsonl --out benchmarks/results/learned28_tuning_more.jsonl
        # and --vectors shipped --name contrastive --mult 1.1 1.2 1.3 --check 3 (auto28_mid_tuning_more.jsonl):
        # the finer rows on the 14 more tuning prompts of eval_auto.py run --offset 1
    nice -n 19 .venv/bin/python benchmarks/eval_learned.py volcano --out benchmarks/results/learned28_volcano.jsonl
    .venv/bin/python benchmarks/eval_learned.py report
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from llm_steering import calibrate, learned, steering
from llm_steering.calibrate import LEARNED_SUFFIX
from llm_steering.catalog import Catalog
from llm_steering.steering import SteeringComponent

import eval_quality
import torch
from eval_auto import judge
from sweep_vectors import KEYWORDS
from tint import addresses_prompt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTED = RESULTS / "prompted_tuning_every3.jsonl"
AUTO = {"tuning": RESULTS / "auto28_tuning.jsonl", "heldout": RESULTS / "auto28_heldout.jsonl"}
VECTORS = RESULTS / "learned28_vectors.pt"
MULTS = (0.6, 1.0, 1.4, 1.8)
EVERYDAY = ["How do I change a flat tire?", "Give me three tips for a job interview.", "What is a good pancake recipe?"]
VOLCANO = ("Volcanoes erupt when magma rises through the crust.", "Lava flowed down the side of the volcano.",
           "Mount Vesuvius buried Pompeii in ash.", "The volcano's crater glowed red at night.",
           "Iceland has many active volcanoes and hot springs.")
VOLCANO_WORDS = ("volcano", "volcanoes", "volcanic", "lava", "magma", "eruption", "erupt", "erupts", "crater", "vesuvius")


def name_stems(concept: str) -> list[str]:
    """Stems of the words of a concept's name (its key): 5 letters, or the word less a final s."""
    return [w[:5] if len(w) > 5 else w.rstrip("s") for w in concept.lower().split("_")]


def names_concept(text: str, concept: str) -> bool:
    words = re.findall(r"[a-z]+", text.lower())
    return any(w.startswith(s) for s in name_stems(concept) for w in words)


def eval_prompts(set_name: str, auto: str | Path | None = None) -> list[str]:
    """The prompts of a set's stored auto rows (results/auto28_<set>.jsonl, or `auto`), in the set's order."""
    return sorted({json.loads(line)["prompt"] for line in open(auto or AUTO[set_name])},
                  key=eval_quality.load_prompts(set_name).index)


def train_prompts() -> list[str]:
    tuning = set(eval_prompts("tuning"))
    return sorted({json.loads(line)["prompt"] for line in open(PROMPTED)} - tuning)


def shipped(model, tok) -> tuple[Catalog, dict[str, SteeringComponent]]:
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    comps = {}
    for c in KEYWORDS:
        f = catalog.resolve(c)
        comps[c] = f.component(f.default_fraction)
    return catalog, comps


def steered_teachers() -> dict[str, list[dict]]:
    """For each concept, on each TRAINING prompt (every tuning prompt but the 7 judged on), the stored steered
    answer (results/*tuning*.jsonl: every setting tried so far, shipped or not) that names the concept (a
    stem of its name, no keyword list), has a word of the prompt, and reads fluently (NLL <= 2.5 x the
    unsteered mean, rep3 < 0.2): the one with the lowest NLL. What the best setting for that prompt gives."""
    judged = set(eval_prompts("tuning"))
    files = [f for f in sorted(RESULTS.glob("*tuning*.jsonl")) if not f.name.startswith(("auto", "prompted", "decoding", "learned"))]
    rows = [json.loads(line) for f in files for line in open(f)]
    base = [r["nll"] for r in rows if r.get("concept") is None]
    mean = sum(base) / len(base)
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        c, p = r.get("concept"), r["prompt"]
        if c is None or p in judged or r.get("set", "tuning") != "tuning":
            continue
        if names_concept(r["text"], c) and addresses_prompt(p, r["text"]) and r["nll"] <= 2.5 * mean \
                and calibrate.rep3(r["text"]) < 0.2 and ((c, p) not in best or r["nll"] < best[(c, p)]["nll"]):
            best[(c, p)] = r
    out: dict[str, list[dict]] = defaultdict(list)
    for (c, _), r in sorted(best.items()):
        out[c].append(r)
    return out


def cmd_train(args) -> None:
    model, tok = steering.load_model()
    _, comps = shipped(model, tok)
    prompts = set(train_prompts())
    rows = [json.loads(line) for line in open(PROMPTED)]
    steered = steered_teachers() if args.teacher == "asked+steered" else {}
    out = {}
    log = open(args.log, "a") if args.log else None
    for c in args.concepts or list(KEYWORDS):
        comp = comps[c]
        teach = [r for r in rows if r["concept"] == c and r["prompt"] in prompts]
        kept = [r for r in teach if names_concept(r["text"], c)]
        use = kept if len(kept) >= 4 or steered else teach
        use = use + steered.get(c, [])
        chats = [learned.plain_chat(r["prompt"]) for r in use]
        answers = [tok.encode(r["text"], add_special_tokens=False) for r in use]
        t0 = time.time()
        res = learned.train_direction(model, tok, chats, answers, comp.layer, op=comp.op, strength=comp.strength,
                                      init=comp.vector, steps=args.steps, lr=args.lr, batch_size=args.batch, seed=args.seed,
                                      progress=lambda s, n, loss, c=c: print(f"  {c} step {s}/{n}: loss {loss:.3f}", file=sys.stderr)
                                      if s % 4 == 0 or s == n else None)
        info = {"concept": c, "layer": comp.layer, "op": comp.op, "strength": comp.strength, "teacher_kept": len(kept),
                "teacher_all": len(teach), "steered_teachers": len(steered.get(c, [])), "teacher": args.teacher,
                "trained_on": len(use), "steps": args.steps, "lr": args.lr, "batch": args.batch,
                "seed": args.seed, "start_loss": res.start_loss, "end_loss": res.end_loss,
                "cosine_to_contrastive": res.cosine_to_init, "seconds": time.time() - t0, "losses": res.losses}
        print(f"{c}: {len(use)} teacher answers ({len(kept)} of {len(teach)} asked name it; "
              f"{len(steered.get(c, []))} steered), loss {res.start_loss:.3f} -> "
              f"{res.end_loss:.3f}, cosine to the contrastive {res.cosine_to_init:.3f}, {info['seconds']:.0f} s", flush=True)
        out[c] = {"vector": res.vector, **{k: v for k, v in info.items() if k != "losses"}}
        if log:
            log.write(json.dumps(info) + "\n")
            log.flush()
        prev = torch.load(args.out) if Path(args.out).exists() else {}
        prev[c] = out[c]
        torch.save(prev, args.out)


def cmd_gen(args) -> None:
    model, tok = steering.load_model()
    _, comps = shipped(model, tok)
    # "shipped": the features' own (contrastive) vectors, at other doses than the stored rows'
    vecs = {c: {"vector": comp.vector} for c, comp in comps.items()} if args.vectors == "shipped" else torch.load(args.vectors)
    prompts = eval_prompts(args.set, args.auto)
    concepts = [c for c in (args.concepts or list(KEYWORDS)) if c in vecs]
    done = set()
    if Path(args.out).exists():
        done = {(r["prompt"], r["concept"], r["vector"], r["multiplier"]) for r in map(json.loads, open(args.out))}
    jobs = []
    stored = {(r["prompt"], r["concept"]): r for r in map(json.loads, open(args.auto or AUTO[args.set]))}
    for c in concepts:
        comp = comps[c]
        for p in prompts:
            for m in args.mult:
                if (p, c, args.name, m) not in done:
                    jobs.append((p, c, args.name, m, SteeringComponent(comp.layer, vecs[c]["vector"], strength=m * comp.strength,
                                                                      op=comp.op, name=c)))
    for p, c in list(stored)[: args.check]:  # the stored contrastive rows, regenerated: the same tokens?
        if (p, c, "contrastive-check", 1.0) not in done:
            jobs.append((p, c, "contrastive-check", 1.0, comps[c]))
    print(f"{len(jobs)} answers to generate", file=sys.stderr)
    with open(args.out, "a") as out:
        for start in range(0, len(jobs), args.batch):
            part = jobs[start : start + args.batch]
            t0 = time.time()
            chats = [eval_quality.chat(p) for p, *_ in part]
            ids = calibrate.generate_rows(model, tok, chats, [[j[4]] for j in part], eval_quality.MAX_NEW_TOKENS,
                                          eval_quality.REPETITION_PENALTY, batch_size=args.batch)
            nlls = calibrate.answer_nll(model, tok, chats, ids)
            for (p, c, kind, m, _), a, nll in zip(part, ids, nlls, strict=True):
                text = tok.decode(a, skip_special_tokens=True)
                row = {"set": args.set, "prompt": p, "concept": c, "vector": kind, "multiplier": m, "text": text,
                       "ids": a, "nll": nll, "rep3": calibrate.rep3(text)}
                if kind == "contrastive-check":
                    x1 = next(k for k in stored[(p, c)]["candidates"] if k["label"].endswith(" x1") and k["steer_prompt"]
                              and k["op"] == comps[c].op)
                    row["same_as_stored"] = x1["ids"] == a
                out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{start + len(part)}/{len(jobs)} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def cmd_volcano(args) -> None:
    from llm_steering.concepts import ConceptRecipe, make_concept

    model, tok = steering.load_model()
    catalog, _ = shipped(model, tok)
    feature = make_concept(catalog, ConceptRecipe("volcanoes", VOLCANO, "topic"))
    norm = catalog.norm(feature.layer)
    comp = feature.component(feature.default_fraction)
    print(f"volcanoes: layer {comp.layer}, op {comp.op}, default fraction {feature.default_fraction} "
          f"(strength {comp.strength:.2f}, norm {norm:.1f})", flush=True)
    t0 = time.time()
    judged = set(eval_prompts("tuning"))
    prompts = train_prompts() if args.prompts == "7" else [p for p in eval_quality.load_prompts("tuning") if p not in judged]
    res = learned.learn_direction(model, tok, prompts, "In your answer, mention volcanoes.", comp.layer,
                                  op=comp.op, strength=comp.strength, init=comp.vector, steps=args.steps, lr=args.lr,
                                  batch_size=args.batch, seed=args.seed,
                                  keep=lambda t: any(w in t.lower() for w in ("volcan", "lava", "magma")),
                                  steered=tuple(args.teacher_mult),
                                  progress=lambda s, n, loss: print(f"  step {s}/{n}: loss {loss:.3f}", file=sys.stderr))
    print(f"learned: {len(res.teacher)} teacher answers, loss {res.start_loss:.3f} -> {res.end_loss:.3f}, "
          f"cosine {res.cosine_to_init:.3f}, {time.time() - t0:.0f} s", flush=True)
    prompts = [("everyday", p) for p in EVERYDAY] + [("tuning", p) for p in eval_prompts("tuning")]
    jobs = [(s, p, "unsteered", 0.0, []) for s, p in prompts]
    for kind, v in (("contrastive", comp.vector), ("learned", res.vector)):
        for m in args.mult:
            jobs += [(s, p, kind, m, [SteeringComponent(comp.layer, v, strength=m * comp.strength, op=comp.op, name="volcanoes")])
                     for s, p in prompts]
    chats = [eval_quality.chat(p) for _, p, *_ in jobs]
    ids = calibrate.generate_rows(model, tok, chats, [j[4] for j in jobs], eval_quality.MAX_NEW_TOKENS,
                                  eval_quality.REPETITION_PENALTY, batch_size=args.batch_gen)
    nlls = calibrate.answer_nll(model, tok, chats, ids)
    with open(args.out, "w") as out:
        out.write(json.dumps({"teacher": res.teacher, "train_prompts": len(prompts), "start_loss": res.start_loss, "end_loss": res.end_loss,
                              "cosine": res.cosine_to_init, "fraction": feature.default_fraction, "layer": comp.layer,
                              "op": comp.op, "strength": comp.strength, "steps": args.steps, "lr": args.lr}) + "\n")
        for (s, p, kind, m, _), a, nll in zip(jobs, ids, nlls, strict=True):
            text = tok.decode(a, skip_special_tokens=True)
            out.write(json.dumps({"set": s, "prompt": p, "vector": kind, "multiplier": m, "text": text, "nll": nll,
                                  "rep3": calibrate.rep3(text)}) + "\n")
    volcano_report(args.out)


def volcano_judge(row: dict, mean_nll: float) -> dict:
    m = any(re.search(rf"\b{w}\b", row["text"].lower()) for w in VOLCANO_WORDS)
    a = addresses_prompt(row["prompt"], row["text"])
    f = row["nll"] == row["nll"] and row["nll"] <= 2.5 * mean_nll and row["rep3"] < 0.2
    return {"mention": m, "addresses": a, "fluent": f, "tint": m and a and f}


def volcano_report(path) -> None:
    lines = [json.loads(line) for line in open(path)]
    rows = lines[1:]
    base = [r for r in rows if r["vector"] == "unsteered"]
    mean = sum(r["nll"] for r in base) / len(base)
    print(f"\nvolcanoes (learned: loss {lines[0]['start_loss']:.3f} -> {lines[0]['end_loss']:.3f}, "
          f"{len(lines[0]['teacher'])} teacher answers); mention / still answers (a word of the prompt) / fluent / tint:")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["vector"], r["multiplier"], r["set"])].append(volcano_judge(r, mean))
    print("| vector | x default | everyday (3): mention / answers / fluent / tint | tuning (7): same |")
    print("|---|---|---|---|")
    for kind, m in sorted({k[:2] for k in groups}, key=lambda k: (k[0] != "unsteered", k)):
        cells = []
        for s in ("everyday", "tuning"):
            g = groups[(kind, m, s)]
            cells.append(" / ".join(str(sum(x[k] for x in g)) for k in ("mention", "addresses", "fluent", "tint")) + f" of {len(g)}")
        print(f"| {kind} | {m:g} | {cells[0]} | {cells[1]} |")
    for r in rows:
        if r["set"] == "everyday":
            print(f"  [{r['vector']} x{r['multiplier']:g}] {r['prompt']} -> {r['text'][:160]!r}")


def cmd_report(args) -> None:
    rows = []
    means = {}
    for s, path in AUTO.items():
        stored = [json.loads(line) for line in open(path)]
        base = {r["prompt"]: r["candidates"][0]["nll"] for r in stored}
        means[s] = sum(base.values()) / len(base)
        for r in stored:
            for k in r["candidates"][1:]:
                if k["steer_prompt"] and k["op"] == r["candidates"][2]["op"] and k["multiplier"] in MULTS and not k["release"]:
                    rows.append({"set": s, "prompt": r["prompt"], "concept": r["concept"], "vector": "contrastive",
                                 "multiplier": k["multiplier"], "text": k["text"], "nll": k["nll"], "rep3": k["rep3"]})
    checks = []
    for path in args.files:
        for r in map(json.loads, open(path)):
            (checks if r["vector"] == "contrastive-check" else rows).append(r)
    for r in rows:
        r.update(judge(r, r, means[r["set"]]))
    if checks:
        print(f"stored contrastive rows regenerated: {sum(r['same_as_stored'] for r in checks)} of {len(checks)} the same tokens")
    cell = defaultdict(list)
    for r in rows:
        cell[(r["set"], r["concept"], r["vector"], r["multiplier"])].append(r)

    def rate(s, c, v, m, key="tint"):
        g = cell.get((s, c, v, m), [])
        return sum(x[key] for x in g), len(g)

    kinds = ["contrastive"] + sorted({r["vector"] for r in rows} - {"contrastive"})
    best = {}
    for c in KEYWORDS:
        for v in kinds:
            ms = [m for m in MULTS if cell.get(("tuning", c, v, m))]
            if ms:
                best[(c, v)] = max(ms, key=lambda m, c=c, v=v: (rate("tuning", c, v, m)[0], m == 1.0, -m))
    cols = [(v, lambda c: 1.0) for v in kinds] + [(f"{v} best", lambda c, v=v: best.get((c, v))) for v in kinds]
    print("\n| concept | " + " | ".join(f"{n} (tuning)" for n, _ in cols) + " | " + " | ".join(f"{n} (held-out)" for n, _ in cols) + " |")
    print("|---|" + "---|" * (2 * len(cols)))
    tot = defaultdict(lambda: [0, 0])
    for c in KEYWORDS:
        cells = []
        for s in ("tuning", "heldout"):
            for n, f in cols:
                m = f(c)
                t, k = rate(s, c, n.split()[0], m) if m is not None else (0, 0)
                tot[(s, n)][0] += t
                tot[(s, n)][1] += k
                cells.append(f"{t}/{k}" + (f" (x{m:g})" if "best" in n and k else "") if k else "-")
        print(f"| `{c}` | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"**{tot[(s, n)][0]}/{tot[(s, n)][1]}** ({tot[(s, n)][0] / max(1, tot[(s, n)][1]):.0%})"
                                       for s in ("tuning", "heldout") for n, _ in cols) + " |")
    named = []
    for s in ("tuning", "heldout"):
        for n, f in cols:
            m = f("eiffel_tower")
            g = cell.get((s, "eiffel_tower", n.split()[0], m), []) if m is not None else []
            named.append(f"{sum(r['eiffel'] for r in g)}/{len(g)}" if g else "-")
    print("| Eiffel Tower named | " + " | ".join(named) + " |")
    print("\npaired on the same held-out prompt and concept (answers that tint under one and not the other):")
    for a, b in [(kinds[0], v) for v in kinds[1:]]:
        for label, fa, fb in (("x1", lambda c: 1.0, lambda c: 1.0),
                              ("each at its best on tuning", lambda c, a=a: best.get((c, a)), lambda c, b=b: best.get((c, b)))):
            ta = {(r["prompt"], r["concept"]): r["tint"] for c in KEYWORDS for r in cell.get(("heldout", c, a, fa(c)), [])}
            tb = {(r["prompt"], r["concept"]): r["tint"] for c in KEYWORDS for r in cell.get(("heldout", c, b, fb(c)), [])}
            both = set(ta) & set(tb)
            if both:
                print(f"  {b} vs {a}, {label}: {sum(tb[k] and not ta[k] for k in both)} only {b}, "
                      f"{sum(ta[k] and not tb[k] for k in both)} only {a}, of {len(both)} pairs")
    print("\nthe oracle (some multiplier of x0.6, x1, x1.4, x1.8, prompt steered, tints: what a perfect per-prompt picker "
          "over those candidates reaches, not a method):")
    for s in ("tuning", "heldout"):
        for group in [[k] for k in kinds] + [kinds[:2]]:
            hit: dict = defaultdict(bool)
            for (ss, c, v, _m), rs in cell.items():
                if ss == s and v in group:
                    for r in rs:
                        hit[(r["prompt"], c)] |= r["tint"]
            full = all(len({m for (ss, c, v, m) in cell if ss == s and v == g}) == len(MULTS) for g in group)
            if hit and full:
                print(f"  {s:8s} {' + '.join(group):30s}: {sum(hit.values())} of {len(hit)} ({sum(hit.values()) / len(hit):.0%})")
    import eval_auto

    auto_rows = eval_auto.load([str(AUTO["tuning"]), str(AUTO["heldout"])])
    for s in ("tuning", "heldout"):
        hit = {(r["prompt"], r["concept"]): any(c["tint"] for c in r["candidates"]) for r in auto_rows if r["set"] == s}
        for v in kinds[1:]:
            if len({m for (ss, _, vv, m) in cell if ss == s and vv == v}) < len(MULTS):
                continue
            more = dict(hit)
            for (ss, c, vv, _m), rs in cell.items():
                if ss == s and vv == v:
                    for r in rs:
                        more[(r["prompt"], c)] = more.get((r["prompt"], c), False) or r["tint"]
            print(f"  {s:8s} auto's 9 candidates (results/auto28): oracle {sum(hit.values())} of {len(hit)}; "
                  f"with {v} x0.6-x1.8 added: oracle {sum(more.values())} of {len(more)}")
    print("\nmention / addresses / fluent, and the Eiffel Tower named (eiffel_tower rows), at x1:")
    for s in ("tuning", "heldout"):
        for v in kinds:
            g = [r for (ss, _, vv, m), rs in cell.items() if ss == s and vv == v and m == 1.0 for r in rs]
            e = cell.get((s, "eiffel_tower", v, 1.0), [])
            if g:
                print(f"  {s:8s} {v:12s}: mention {sum(r['mention'] for r in g)}, addresses {sum(r['addresses'] for r in g)}, "
                      f"fluent {sum(r['fluent'] for r in g)}, tint {sum(r['tint'] for r in g)} of {len(g)}; "
                      f"Eiffel Tower named in {sum(r['eiffel'] for r in e)} of {len(e)}")
    for (c, v), m in best.items():
        if m != 1.0 and not cell.get(("heldout", c, v, m)):
            print(f"  ({v} best for {c} is x{m:g}: held-out rows at it not generated)")
    if args.volcano and Path(args.volcano).exists():
        volcano_report(args.volcano)


def cmd_ship(args) -> None:
    """The learned directions into vectors files, as `<concept>_learned` beside each shipped concept (auto's
    candidates: calibrate.learned_direction finds them by the concept's vector)."""
    from llm_steering.vectors import SteeringVector, SteeringVectorSet

    learned_vecs = torch.load(args.vectors, weights_only=True)
    for path in args.files:
        vs = SteeringVectorSet.load(path)
        add = []
        for c, v in learned_vecs.items():
            base = vs.get(c)
            if base.layer != v["layer"]:
                raise SystemExit(f"{c}: learned at layer {v['layer']}, but {path} has it at {base.layer}")
            add.append(SteeringVector(
                name=f"{c}{LEARNED_SUFFIX}", layer=v["layer"], vector=v["vector"], concept=base.concept,
                source="benchmarks/eval_learned.py train", description=f"{base.description or c}: learned through the "
                "frozen model on answers that name it (auto's candidates, docs/learned.md)".strip(),
                metadata={"learned_for": c, "default_fraction": round(v["strength"] / vs.norm(v["layer"]), 6),
                          "default_op": v["op"], "teacher": v["teacher"], "steps": v["steps"], "lr": v["lr"],
                          "seed": v["seed"], "cosine_to_contrastive": round(float(v["cosine_to_contrastive"]), 4)}))
        vs.merged(SteeringVectorSet(vs.model_id, vs.hidden_size, add, {})).save(path)
        print(f"{path}: {len(add)} learned directions written beside their concepts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--concepts", nargs="*")
    tr.add_argument("--teacher", choices=("asked", "asked+steered"), default="asked+steered")
    tr.add_argument("--steps", type=int, default=16)
    tr.add_argument("--lr", type=float, default=0.02)
    tr.add_argument("--batch", type=int, default=7)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default=str(VECTORS))
    tr.add_argument("--log", default=str(RESULTS / "learned28_train.jsonl"))
    g = sub.add_parser("gen")
    g.add_argument("--set", choices=("tuning", "heldout"), default="tuning")
    g.add_argument("--mult", type=float, nargs="+", default=[1.0])
    g.add_argument("--concepts", nargs="*")
    g.add_argument("--check", type=int, default=0, help="regenerate this many stored contrastive x1 rows")
    g.add_argument("--batch", type=int, default=40)
    g.add_argument("--vectors", default=str(VECTORS), help='a vectors file, or "shipped": the features\' own vectors')
    g.add_argument("--name", default="learned", help="the rows' vector label (a variant of the learned vectors)")
    g.add_argument("--auto", default=None,
                   help="the stored auto rows whose prompts to answer (default: results/auto28_<set>.jsonl)")
    g.add_argument("--out", required=True)
    v = sub.add_parser("volcano")
    v.add_argument("--steps", type=int, default=16)
    v.add_argument("--lr", type=float, default=0.02)
    v.add_argument("--batch", type=int, default=7)
    v.add_argument("--batch-gen", type=int, default=40)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--mult", type=float, nargs="+", default=[1.0, 2.0])
    v.add_argument("--prompts", choices=("7", "35"), default="7",
                   help="training prompts: the 7 with stored asked answers, or all 35 tuning prompts not judged on")
    v.add_argument("--teacher-mult", type=float, nargs="*", default=[1.0, 2.0, 3.0],
                   help="steered teachers at these multiples of the default (none: asked teachers only)")
    v.add_argument("--out", default=str(RESULTS / "learned28_volcano.jsonl"))
    r = sub.add_parser("report")
    r.add_argument("files", nargs="*", default=[str(RESULTS / "learned28_tuning.jsonl"), str(RESULTS / "learned28_heldout.jsonl")])
    r.add_argument("--volcano", default=str(RESULTS / "learned28_volcano.jsonl"))
    sh = sub.add_parser("ship", help="write the learned directions into vectors files, beside their concepts")
    sh.add_argument("files", nargs="+", help="vectors files (steering_vectors.pt; the package data file links to it)")
    sh.add_argument("--vectors", default=str(VECTORS))
    args = parser.parse_args()
    if getattr(args, "files", None) and args.cmd != "ship":
        args.files = [f for f in args.files if Path(f).exists()]
    {"train": cmd_train, "gen": cmd_gen, "volcano": cmd_volcano, "report": cmd_report, "ship": cmd_ship}[args.cmd](args)


if __name__ == "__main__":
    main()
