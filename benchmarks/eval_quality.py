"""Steering quality on a tuning set (choices are made here) and a held-out set (only reported), per concept.

    # the runs behind the README's quality table (raw answers in benchmarks/results/; the 42 tuning
    # prompts in three runs of every third prompt, the first saved as grid_tuning_every3.jsonl):
    for o in 0 1 2; do nice -n 10 .venv/bin/python benchmarks/eval_quality.py run --set tuning --every 3 --offset $o \
        --per-concept benchmarks/base_settings.json --fractions 0.6 0.85 1.1 --out benchmarks/results/grid_tuning_rest.jsonl; done
    nice -n 10 .venv/bin/python benchmarks/eval_quality.py run --set heldout --per-concept benchmarks/base_settings.json \
        --fractions 0.6 0.85 1.1 --out benchmarks/results/grid_heldout.jsonl
    # defaults picked on the tuning rows, tuning and held-out side by side, curves, replayed "auto":
    .venv/bin/python benchmarks/eval_quality.py report benchmarks/results/grid_tuning_every3.jsonl \
        benchmarks/results/grid_tuning_rest.jsonl benchmarks/results/grid_heldout.jsonl --quiet --curves \
        --picks benchmarks/results/picks.json --defaults-yaml defaults.yaml
    # the variant comparison (stopped after eiffel_tower and part of pirate for lack of CPU):
    nice -n 10 .venv/bin/python benchmarks/eval_quality.py run --set tuning --every 4 \
        --variants clamp cap add cap+centred cap+2layer --fractions 0.15 0.3 --out benchmarks/results/variants_tuning_every4.jsonl
    .venv/bin/python benchmarks/eval_quality.py report benchmarks/results/variants_tuning_every4.jsonl --keep-incomplete --bound 0
    # variants: clamp | cap (one-sided: raise the component to at least s) | add, each optionally
    #   +centred (vector minus the mean of the ten concepts' vectors at that layer),
    #   +2layer (the same op at layer L-3 and L, each at the fraction x its layer's norm x 0.6),
    #   +answer (steer only the answer positions, steer_prompt=False),
    #   +keepnorm (the op's norm-preserving form: add_keepnorm, clamp_keepnorm); --per-concept FILE takes each
    #   concept's variant and base fraction from a JSON {concept: {"variant": v, "fraction": f0}} and
    #   --fractions become multiples of f0 (benchmarks/base_settings.json: the first default set)
    # norm-preserving ops and answer-only steering on all ten concepts (the README's "What was tried"):
    nice -n 10 .venv/bin/python benchmarks/eval_quality.py run --set tuning --per-concept benchmarks/base_settings.json \
        --flags answer --fractions 1.0 1.3 1.6 --out benchmarks/results/answer_only_tuning.jsonl
    for f in "0.85 1.1 1.3" 0.6; do nice -n 10 .venv/bin/python benchmarks/eval_quality.py run --set tuning \
        --per-concept benchmarks/base_settings.json --flags keepnorm --fractions $f --out benchmarks/results/keepnorm_tuning.jsonl; done
    # auto for real on the held-out prompts (as the app: candidates from the shipped defaults), and its cost:
    nice -n 5 .venv/bin/python benchmarks/eval_quality.py auto --set heldout --settings benchmarks/results/picks.json \
        --time-every 8 --out benchmarks/results/auto_heldout.jsonl
    .venv/bin/python benchmarks/eval_quality.py auto-report benchmarks/results/auto_heldout.jsonl
    # the shipped settings' strength curves on the tuning set (llm_steering/data/strength_curves.json):
    .venv/bin/python benchmarks/eval_quality.py curves-json benchmarks/results/grid_tuning_every3.jsonl \
        benchmarks/results/grid_tuning_rest.jsonl benchmarks/results/grid2_tuning.jsonl --settings benchmarks/results/picks.json
    # tint (issue 21: mentions the concept AND addresses the question AND fluent; benchmarks/tint.py), picked on
    # tuning tint, tuning and held-out side by side; the other runs behind docs/quality.md's tint section are there:
    .venv/bin/python benchmarks/eval_quality.py tint benchmarks/results/grid*.jsonl benchmarks/results/tint_heldout_dinosaurs.jsonl \
        --keep-incomplete --curves --pick-out benchmarks/results/picks.json
    # check once that batched answers are the library's single answers; time calibration against one answer:
    nice -n 10 .venv/bin/python benchmarks/eval_quality.py check
    nice -n 10 .venv/bin/python benchmarks/eval_quality.py cost --concept pirate --op clamp --fractions 0.12 0.17 0.22

Settings: system prompt "You are a helpful assistant.", greedy, 48 new tokens, repetition
penalty 1.1, steering on the prompt too (unless +answer). Per answer:
- mention: one of the concept's KEYWORDS (benchmarks/sweep_vectors.py) as a whole word;
- probe: the mean projection of the answer's hidden states, under the unsteered model, on the
  concept's probe direction (benchmarks/probe_vectors.pt, frozen: the shipped vectors of the
  first default set, at layer 15) is above the highest value of any unsteered TUNING answer
  (so the unsteered tuning rate is 0 by construction; held-out shows whether that holds);
- nll: mean NLL per token under the unsteered model; NLL ratio = mean steered / mean unsteered;
- rep3: fraction of repeated word 3-grams;
- on-topic: the answer contains a content word of the prompt (first 5 letters), i.e. it still
  addresses the question; overlap: share of the unsteered answer's content words it keeps.
Pass (issue 10): mention >= 62.5% (5 of 8), unsteered mention <= 12.5%, NLL ratio <= 2.0, rep3 < 0.2.
The reporting commands (report, auto-report, curves-json) are in benchmarks/eval_quality_report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering import extract as esv
from llm_steering.steering import SteeringComponent

import torch
from eval_quality_report import cmd_auto_report, cmd_curves_json, cmd_report
from sweep_vectors import KEYWORDS
from tint import cmd_tint

ROOT = Path(__file__).resolve().parent.parent

SYSTEM = "You are a helpful assistant."
MAX_NEW_TOKENS = 48
REPETITION_PENALTY = 1.1
PROBE_LAYER = 15
PROBE_FILE = ROOT / "benchmarks" / "probe_vectors.pt"
SETS = {"tuning": ROOT / "benchmarks" / "prompts_tuning.txt", "heldout": ROOT / "benchmarks" / "prompts_heldout.txt"}


def load_prompts(name: str) -> list[str]:
    path = SETS.get(name, Path(name))
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return prompts


def chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------
# Steering variants
# ---------------------------------------------------------------------------


def variant_components(variant: str, concept: str, fraction: float, vecs: dict, norms: dict[int, float],
                       layer_of: dict[str, int]) -> list[SteeringComponent]:
    """The components of `variant` ("cap", "clamp+centred", "cap+2layer", ...) at `fraction` of the norm."""
    op, *flags = variant.split("+")
    kind = "centred" if "centred" in flags else "plain"
    L = layer_of[concept]
    layers = [L - 3, L] if "2layer" in flags else [L]
    scale = 0.6 if "2layer" in flags else 1.0
    if "keepnorm" in flags:
        op += "_keepnorm"  # the edited state rescaled to its old norm (steering's add_keepnorm / clamp_keepnorm)
    comps = []
    for layer in layers:
        s = fraction * norms[layer] * scale
        v = vecs[(kind, concept, layer)]
        if op == "cap":
            comps.append(SteeringComponent(layer, v, op="cap", cap_min=s, cap_max=None, name=concept))
        else:
            comps.append(SteeringComponent(layer, v, strength=s, op=op, name=concept))
    return comps


def build_vectors(model, tok, vset, concepts_file: Path, variants: list[str]) -> tuple[dict, dict[int, float], dict[str, int]]:
    """Vectors {(plain|centred, concept, layer): tensor} for every layer the variants need."""
    layer_of = {name: vset.get(name).layer for name in KEYWORDS}
    layers = set(layer_of.values())
    if any("2layer" in v for v in variants):
        layers |= {L - 3 for L in layer_of.values()}
    vecs = {("plain", c, L): vset.get(c).vector for c, L in layer_of.items()}
    missing = sorted(layers - set(layer_of.values()))
    if missing:
        concepts = esv.load_concepts(concepts_file)
        for sv in esv.extract_contrastive(model, tok, concepts, missing):
            vecs[("plain", sv.concept, sv.layer)] = sv.vector
    if any("centred" in v for v in variants):
        concepts = esv.load_concepts(concepts_file)
        for L in sorted(layers):
            have = {c: vecs.get(("plain", c, L)) for c in KEYWORDS}
            if any(v is None for v in have.values()):
                for sv in esv.extract_contrastive(model, tok, concepts, [L]):
                    have[sv.concept] = sv.vector
            mean = torch.stack([v / v.norm() for v in have.values()]).mean(0)
            for c, v in have.items():
                vecs[("plain", c, L)] = v
                vecs[("centred", c, L)] = v / v.norm() - mean
    norms = {int(L): float(n) for L, n in vset.layer_norms.items()}
    need = sorted(L for L in layers if L not in norms)
    if need:
        norms.update(steering.measure_layer_norms(model, tok, need))
    return vecs, norms, layer_of


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_run(args) -> None:
    model, tok = steering.load_model()
    vset = steering.load_vectors(args.vectors)
    prompts = load_prompts(args.set)
    if args.every > 1 or args.offset:
        prompts = prompts[args.offset :: args.every]
    concepts = args.concepts or list(KEYWORDS)
    # {concept: {"variant": ..., "fraction": f0}}: that concept's variant, and --fractions as multiples of f0
    per_concept = json.loads(Path(args.per_concept).read_text()) if args.per_concept else {}
    variants = sorted(set(args.variants) | {v["variant"] for v in per_concept.values()})
    vecs, norms, layer_of = build_vectors(model, tok, vset, Path(args.concepts_file), variants)
    probe_set = steering.load_vectors(PROBE_FILE)
    probe_vecs = {c: probe_set.get(c).vector for c in KEYWORDS}

    jobs = [(None, None, 0.0, p) for p in prompts]  # unsteered rows first
    for c in concepts:
        if c in per_concept:
            variant = "+".join([per_concept[c]["variant"], *args.flags])
            for m in args.fractions:
                jobs += [(c, variant, round(m * per_concept[c]["fraction"], 4), p) for p in prompts]
            continue
        for variant in args.variants:
            for f in args.fractions:
                jobs += [(c, variant, f, p) for p in prompts]
    # prompt-major: a run stopped early leaves every setting on the same prompts (report keeps complete prompts)
    order = {p: i for i, p in enumerate(prompts)}
    jobs.sort(key=lambda j: order[j[3]])
    rows, answer_only = [], []
    for c, variant, f, _ in jobs:
        rows.append([] if c is None else variant_components(variant, c, f, vecs, norms, layer_of))
        answer_only.append(c is not None and "answer" in variant.split("+"))
    print(f"{len(jobs)} answers, {len(prompts)} prompts, set {args.set}", file=sys.stderr, flush=True)

    out = open(args.out, "a")
    t0 = time.time()
    for flag in (False, True):  # answer-only rows in their own batches
        idx = [i for i, a in enumerate(answer_only) if a == flag]
        for start in range(0, len(idx), args.batch_size):
            part = idx[start : start + args.batch_size]
            chats = [chat(jobs[i][3]) for i in part]
            ans = calibrate.generate_rows(model, tok, chats, [rows[i] for i in part], MAX_NEW_TOKENS, REPETITION_PENALTY,
                                          steer_prompt=not flag, batch_size=args.batch_size)
            stacked = torch.stack([probe_vecs[c] for c in KEYWORDS])  # [concepts, d]
            nlls, projs = calibrate.answer_nll(model, tok, chats, ans, args.batch_size, probe={PROBE_LAYER: stacked.T})
            for i, a, nll, pr in zip(part, ans, nlls, projs, strict=True):
                c, variant, f, p = jobs[i]
                text = tok.decode(a, skip_special_tokens=True)
                proj = dict(zip(KEYWORDS, pr[PROBE_LAYER], strict=True)) if isinstance(pr[PROBE_LAYER], list) else {}
                out.write(json.dumps({"set": args.set, "concept": c, "variant": variant, "fraction": f, "prompt": p,
                                      "layer": None if c is None else layer_of[c], "text": text, "n_tokens": len(a),
                                      "nll": nll, "probe": proj, "vectors": Path(args.vectors).name}) + "\n")
            out.flush()
            done = start + len(part)
            print(f"  {done}/{len(idx)} ({'answer-only' if flag else 'prompt+answer'}) {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def cmd_check(args) -> None:
    """A batched answer (several rows, different steering and prompts) equals the library's single answer."""
    model, tok = steering.load_model()
    vset = steering.load_vectors(args.vectors)
    prompts = load_prompts("heldout")[:4]
    comps = [[vset.component("pirate", 0.2, op="clamp")], [], [vset.component("ocean", 0.15, op="add")],
             [SteeringComponent(vset.get("music").layer, vset.get("music").vector, op="cap", cap_min=0.2 * vset.norm(15))]]
    ans = calibrate.generate_rows(model, tok, [chat(p) for p in prompts], comps, MAX_NEW_TOKENS, REPETITION_PENALTY)
    same = 0
    for p, c, a in zip(prompts, comps, ans, strict=True):
        lib = steering.generate_steered_answer_hf(model, tok, chat(p), c, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                  repetition_penalty=REPETITION_PENALTY)
        ok = lib.strip() == tok.decode(a, skip_special_tokens=True).strip()
        same += ok
        print(f"{'same' if ok else 'DIFFERENT'}: {[x.op for x in c] or 'unsteered'} on {p!r}")
    print(f"check: {same}/{len(prompts)} batched answers equal steering.generate_steered_answer_hf")


def cmd_cost(args) -> None:
    """Wall time of calibrate_strength (one batch of len(fractions) + 1 rows, then one scoring pass) vs one answer."""
    model, tok = steering.load_model()
    vset = steering.load_vectors(args.vectors)
    prompts = load_prompts("heldout")[: args.prompts]
    key, op = args.concept, args.op
    layer = vset.get(key).layer
    steering.generate_steered_answer_hf(model, tok, chat(prompts[0]), [], max_new_tokens=4)  # warm-up
    single, calib = [], []
    for p in prompts:
        t = time.perf_counter()
        steering.generate_steered_answer_hf(model, tok, chat(p), [vset.component(key, args.fractions[0], op=op)],
                                            max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, repetition_penalty=REPETITION_PENALTY)
        single.append(time.perf_counter() - t)
        cal = calibrate.calibrate_strength(model, tok, chat(p), vset.component(key, 1.0, op=op), fractions=args.fractions,
                                           norm=vset.norm(layer), nll_bound=args.bound, max_new_tokens=MAX_NEW_TOKENS,
                                           repetition_penalty=REPETITION_PENALTY)
        calib.append(cal.seconds)
        print(f"{p[:40]!r}: one answer {single[-1]:.1f} s, calibration ({len(cal.table)} rows) {cal.seconds:.1f} s, "
              f"chose {cal.fraction} ({', '.join(f'{r.fraction}:{r.nll_ratio:.2f}' for r in cal.table)})", flush=True)
    print(f"mean: one answer {sum(single) / len(single):.1f} s, calibration {sum(calib) / len(calib):.1f} s "
          f"({sum(calib) / sum(single):.1f}x) with {len(args.fractions)} strengths + the unsteered row")


def cmd_auto(args) -> None:
    """"Auto" for real, as the app does it: per prompt and concept, calibrate.calibrate_strength over
    calibrate.candidate_fractions(the default fraction) (one batched generation of 4 rows and one
    scoring pass), then the answer at the chosen strength (the weakest candidate when none stayed
    within the bound). On every --time-every-th prompt, side by side in the same process: one answer at
    the default strength, the calibration, and the answer at the chosen strength generated again with
    steering.generate_steered_answer_hf (as the app streams it; it must equal the calibration's row for
    that strength, which is what is scored: greedy). Pairs already in --out are skipped (resume)."""
    model, tok = steering.load_model()
    vset = steering.load_vectors(args.vectors)
    prompts = load_prompts(args.set)
    if args.every > 1 or args.offset:
        prompts = prompts[args.offset :: args.every]
    settings = json.loads(Path(args.settings).read_text())
    concepts = args.concepts or list(settings)
    steering.generate_steered_answer_hf(model, tok, chat(prompts[0]), [], max_new_tokens=4)  # warm-up
    gen = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": REPETITION_PENALTY}
    done = {(r["prompt"], r["concept"]) for r in map(json.loads, open(args.out))} if Path(args.out).exists() else set()
    out = open(args.out, "a")
    t0 = time.time()
    for n, p in enumerate(prompts):
        for c in concepts:
            if (p, c) in done:
                continue
            variant, f0 = settings[c]["variant"], settings[c]["fraction"]
            op, *flags = variant.split("+")
            op += "_keepnorm" if "keepnorm" in flags else ""
            steer_prompt = "answer" not in flags
            layer = vset.get(c).layer
            rec = {"set": args.set, "concept": c, "variant": variant, "default_fraction": f0, "prompt": p}
            timed = n % args.time_every == 0
            if timed:
                t = time.perf_counter()
                steering.generate_steered_answer_hf(model, tok, chat(p), [vset.component(c, f0, op=op)],
                                                    steer_prompt=steer_prompt, **gen)
                rec["one_answer_s"] = time.perf_counter() - t
            tried = calibrate.candidate_fractions(f0)
            cal = calibrate.calibrate_strength(model, tok, chat(p), vset.component(c, 1.0, op=op), fractions=tried,
                                               norm=vset.norm(layer), max_new_tokens=MAX_NEW_TOKENS,
                                               repetition_penalty=REPETITION_PENALTY, steer_prompt=steer_prompt)
            fraction = cal.fraction if cal.found else min(tried)
            row = next(r for r in cal.table if r.fraction == fraction)
            rec |= {"tried": tried, "found": cal.found, "fraction": fraction, "calibration_s": cal.seconds, "text": row.answer}
            if timed:
                t = time.perf_counter()
                text = steering.generate_steered_answer_hf(model, tok, chat(p), [vset.component(c, fraction, op=op)],
                                                           steer_prompt=steer_prompt, **gen)
                rec |= {"answer_s": time.perf_counter() - t, "same_as_calibration_row": text.strip() == row.answer.strip()}
            rec |= {"nll": row.nll, "base_nll": cal.table[0].nll, "base_text": cal.table[0].answer,
                    "table": [[r.fraction, r.nll_ratio, r.rep3] for r in cal.table]}
            out.write(json.dumps(rec) + "\n")
            out.flush()
        print(f"  prompt {n + 1}/{len(prompts)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="generate and score a grid")
    run.add_argument("--set", default="tuning", help="tuning, heldout, or a prompts file")
    run.add_argument("--every", type=int, default=1, help="take every n-th prompt (a quicker subset)")
    run.add_argument("--offset", type=int, default=0, help="with --every: start at this prompt (0-based)")
    run.add_argument("--variants", nargs="+", default=["clamp"], help="clamp, cap, add, with +centred, +2layer, +answer")
    run.add_argument("--per-concept", help='JSON {concept: {"variant": v, "fraction": f0}}: per concept, --fractions are multiples of f0')
    run.add_argument("--flags", nargs="+", default=[], help="with --per-concept: flags added to every concept's variant "
                                                           "(answer, keepnorm: e.g. clamp -> clamp+keepnorm+answer)")
    run.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    run.add_argument("--concepts", nargs="+", help="default: all ten")
    run.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"))
    run.add_argument("--concepts-file", default=str(ROOT / "concepts.yaml"))
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--out", required=True, help="JSONL to append the answers to")
    rep = sub.add_parser("report", help="tables from one or more JSONL files")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--bound", type=float, default=calibrate.DEFAULT_NLL_BOUND, help="NLL bound of the replayed auto calibration (0: skip)")
    rep.add_argument("--json", help="write the per-setting table here")
    rep.add_argument("--picks", help="pick each concept's default on the tuning rows, print tuning and held-out side by side, "
                                     "write the picks (JSON) here")
    rep.add_argument("--defaults-yaml", help="with --picks: write the picks as demo.yaml-style settings here")
    rep.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"), help="for the norms in --defaults-yaml")
    rep.add_argument("--keep-incomplete", action="store_true", help="keep prompts that lack some settings (concept-major runs)")
    rep.add_argument("--auto-base", help="replay auto with calibrate.candidate_fractions of these base fractions (JSON as --per-concept)")
    rep.add_argument("--quiet", action="store_true", help="leave out the full per-setting table")
    rep.add_argument("--curves", action="store_true", help="print the trade-off curves, tuning and held-out side by side")
    rep.add_argument("--all-auto", action="store_true", help="print the replayed auto calibration for every variant")
    chk = sub.add_parser("check", help="batched answers == steering.generate_steered_answer_hf")
    chk.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"))
    cost = sub.add_parser("cost", help="time of calibrate_strength vs one answer")
    cost.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"))
    cost.add_argument("--concept", default="pirate")
    cost.add_argument("--op", default="clamp")
    cost.add_argument("--fractions", nargs="+", type=float, default=list(calibrate.DEFAULT_FRACTIONS))
    cost.add_argument("--bound", type=float, default=calibrate.DEFAULT_NLL_BOUND)
    cost.add_argument("--prompts", type=int, default=3)
    auto = sub.add_parser("auto", help="calibrate_strength for real per prompt and concept, then the answer at the chosen strength")
    auto.add_argument("--set", default="heldout")
    auto.add_argument("--settings", required=True, help='JSON {concept: {"variant": v, "fraction": default}} (e.g. results/picks.json)')
    auto.add_argument("--concepts", nargs="+")
    auto.add_argument("--every", type=int, default=1)
    auto.add_argument("--offset", type=int, default=0)
    auto.add_argument("--time-every", type=int, default=1, help="time one answer at the default on every n-th prompt")
    auto.add_argument("--vectors", default=str(ROOT / "steering_vectors.pt"))
    auto.add_argument("--out", required=True)
    arep = sub.add_parser("auto-report", help="tables from `auto` JSONL files")
    arep.add_argument("files", nargs="+")
    cj = sub.add_parser("curves-json", help="strength curves of the shipped settings on the tuning set, as JSON")
    cj.add_argument("files", nargs="+")
    cj.add_argument("--settings", required=True, help="JSON {concept: {variant, fraction}}: the shipped settings")
    cj.add_argument("--out", default=str(ROOT / "llm_steering" / "data" / "strength_curves.json"))
    cj.add_argument("--command", default=" ".join(["python", *sys.argv]), help="the command recorded in the file")
    tin = sub.add_parser("tint", help="tint (mention AND addresses the question AND fluent) per concept, tuning and held-out")
    tin.add_argument("files", nargs="+")
    tin.add_argument("--settings", help='JSON {concept: {"variant", "fraction"}}: report these; default: pick by tuning tint')
    tin.add_argument("--pick-out", help="write the settings reported (picked or given) here as JSON")
    tin.add_argument("--curves", action="store_true", help="tint against strength, tuning and held-out side by side")
    tin.add_argument("--keep-incomplete", action="store_true", help="keep prompts that lack some settings")
    tin.add_argument("--ceiling", action="store_true", help="per concept, the prompts on which some setting in the files tints")
    args = parser.parse_args()
    {"tint": cmd_tint, "run": cmd_run, "report": cmd_report, "check": cmd_check, "cost": cmd_cost, "auto": cmd_auto,
     "auto-report": cmd_auto_report, "curves-json": cmd_curves_json}[args.cmd](args)


if __name__ == "__main__":
    main()
