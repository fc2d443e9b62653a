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
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from llm_steering import calibrate, steering
from llm_steering import extract as esv
from llm_steering.steering import SteeringComponent

import torch
from sweep_vectors import KEYWORDS, mentions

ROOT = Path(__file__).resolve().parent.parent

SYSTEM = "You are a helpful assistant."
MAX_NEW_TOKENS = 48
REPETITION_PENALTY = 1.1
PROBE_LAYER = 15
PROBE_FILE = ROOT / "benchmarks" / "probe_vectors.pt"
SETS = {"tuning": ROOT / "benchmarks" / "prompts_tuning.txt", "heldout": ROOT / "benchmarks" / "prompts_heldout.txt"}
STOP = set("""a an the and or but if then so of to in on at by for with from about into over under as is are was were be
been being do does did how what when where which who whom why can could should would will shall may might must i me my
you your we our they their it its this that these those there here some any few more most other such no not only own same
than too very just also give make write tell explain short simple good best way ways tips three things need want like""".split())


def load_prompts(name: str) -> list[str]:
    path = SETS.get(name, Path(name))
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return prompts


def chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in STOP}


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
                                      "nll": nll, "probe": proj}) + "\n")
            out.flush()
            done = start + len(part)
            print(f"  {done}/{len(idx)} ({'answer-only' if flag else 'prompt+answer'}) {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def load_rows(paths: list[str], keep_incomplete: bool = False) -> list[dict]:
    """All answers of the files, keeping only the prompts that have the unsteered answer and one answer
    for every setting of their set (a run stopped early leaves some prompts incomplete)."""
    rows = [json.loads(line) for p in paths for line in open(p)]
    if keep_incomplete:
        return rows
    settings: dict[str, set] = defaultdict(set)
    have: dict[tuple, set] = defaultdict(set)
    for r in rows:
        key = (r["concept"], r["variant"], r["fraction"])
        settings[r["set"]].add(key)
        have[(r["set"], r["prompt"])].add(key)
    complete = {sp for sp, keys in have.items() if keys == settings[sp[0]]}
    dropped = len({sp for sp in have} - complete)
    if dropped:
        print(f"(left out {dropped} prompts without an answer for every setting)", file=sys.stderr)
    return [r for r in rows if (r["set"], r["prompt"]) in complete]


def summarise(rows: list[dict], thresholds: dict[str, float]) -> tuple[dict, dict]:
    """Per (set, concept, variant, fraction) metrics; and the unsteered rows per (set, prompt)."""
    base = {(r["set"], r["prompt"]): r for r in rows if r["concept"] is None}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["concept"] is not None:
            groups[(r["set"], r["concept"], r["variant"], r["fraction"])].append(r)
    table = {}
    for key, rs in groups.items():
        st, c = key[0], key[1]
        table[key] = metrics(rs, [base[(st, r["prompt"])] for r in rs], c, thresholds)
    return table, base


def metrics(rs: list[dict], bs: list[dict], c: str, thresholds: dict[str, float]) -> dict:
    n = len(rs)
    nll = [r["nll"] for r in rs if r["nll"] == r["nll"]]
    bnll = [b["nll"] for b in bs if b["nll"] == b["nll"]]
    on_topic = [bool(stems(r["prompt"]) & stems(r["text"])) for r in rs]
    overlap = [len(stems(r["text"]) & stems(b["text"])) / max(1, len(stems(b["text"]))) for r, b in zip(rs, bs, strict=True)]
    return {
        "n": n,
        "mention": sum(mentions(r["text"], c) for r in rs) / n,
        "base_mention": sum(mentions(b["text"], c) for b in bs) / n,
        "probe": sum(r["probe"][c] > thresholds[c] for r in rs) / n,
        "base_probe": sum(b["probe"][c] > thresholds[c] for b in bs) / n,
        "nll_ratio": (sum(nll) / len(nll)) / (sum(bnll) / len(bnll)) if nll else float("inf"),
        "rep3": sum(calibrate.rep3(r["text"]) for r in rs) / n,
        "on_topic": sum(on_topic) / n,
        "overlap": sum(overlap) / n,
    }


def passes(m: dict) -> bool:
    return m["mention"] >= 0.625 and m["base_mention"] <= 0.125 and m["nll_ratio"] <= 2.0 and m["rep3"] < 0.2


def auto_rows(rows: list[dict], base: dict, st: str, c: str, variant: str, bound: float, fractions: list[float] | None = None) -> list[dict]:
    """calibrate.py's choice per prompt, replayed on the grid's rows: the strongest fraction whose
    answer has NLL ratio <= bound against the unsteered answer to the same prompt and rep3 < 0.2."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["set"] == st and r["concept"] == c and r["variant"] == variant and (fractions is None or r["fraction"] in fractions):
            by_prompt[r["prompt"]].append(r)
    chosen = []
    for p, rs in by_prompt.items():
        b = base[(st, p)]
        ok = [r for r in rs if r["nll"] / b["nll"] <= bound and calibrate.rep3(r["text"]) < 0.2]
        chosen.append(max(ok, key=lambda r: r["fraction"]) if ok else b)
    return chosen


def cmd_report(args) -> None:
    rows = load_rows(args.files, args.keep_incomplete)
    tun_base = [r for r in rows if r["concept"] is None and r["set"] == "tuning"]
    if not tun_base:
        sys.exit("no unsteered tuning rows: the probe thresholds come from them (run --set tuning first)")
    # one unsteered answer per prompt (several runs repeat them: identical greedy answers)
    thresholds = {c: max(r["probe"][c] for r in tun_base) for c in KEYWORDS}
    table, base = summarise(rows, thresholds)
    if not args.quiet:
        print("| set | concept | variant | fraction | mention | probe | unsteered mention/probe | NLL ratio | rep3 | on-topic | overlap | pass |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(table) if not args.quiet else []:
        m = table[key]
        st, c, variant, f = key
        print(f"| {st} | {c} | {variant} | {f:.2f} | {m['mention']:.0%} | {m['probe']:.0%} | {m['base_mention']:.0%}/{m['base_probe']:.0%} | "
              f"{m['nll_ratio']:.2f} | {m['rep3']:.3f} | {m['on_topic']:.0%} | {m['overlap']:.2f} | {'yes' if passes(m) else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"thresholds": thresholds,
                                               "table": [dict(zip(("set", "concept", "variant", "fraction"), k, strict=True)) | m
                                                         for k, m in sorted(table.items())]}, indent=1))
    if args.curves:
        curves(table)
    if args.picks:
        auto_grid = None
        if args.auto_base:  # auto tries calibrate.candidate_fractions(first default) (0.6/0.85/1.1 x it)
            auto_base = json.loads(Path(args.auto_base).read_text())
            auto_grid = {c: calibrate.candidate_fractions(v["fraction"]) for c, v in auto_base.items()}
        picks = side_by_side(rows, table, base, thresholds, args.bound, auto_grid)
        Path(args.picks).write_text(json.dumps(picks, indent=1) + "\n")
        if args.defaults_yaml:
            grids = auto_grid or {c: sorted({k[3] for k in table if k[:3] == ("tuning", c, p["variant"])}) for c, p in picks.items()}
            write_defaults(picks, args.vectors, args.defaults_yaml, grids, args.bound)
    if args.bound and args.all_auto:
        print(f"\nauto (calibrate.py rule replayed on the grid: strongest fraction with per-prompt NLL ratio <= {args.bound}, rep3 < 0.2)")
        print("| set | concept | variant | mention | probe | NLL ratio | rep3 | on-topic | mean fraction | pass |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for st, c, variant in sorted({k[:3] for k in table}):
            chosen = auto_rows(rows, base, st, c, variant, args.bound)
            m = metrics(chosen, [base[(st, r["prompt"])] for r in chosen], c, thresholds)
            mf = sum(r["fraction"] for r in chosen) / len(chosen)
            print(f"| {st} | {c} | {variant} | {m['mention']:.0%} | {m['probe']:.0%} | {m['nll_ratio']:.2f} | {m['rep3']:.3f} | "
                  f"{m['on_topic']:.0%} | {mf:.2f} | {'yes' if passes(m) else 'no'} |")


def pick(table: dict, concept: str) -> tuple:
    """The default for a concept, from the TUNING rows only: among the settings that pass, the one
    with the largest margin on both bars (mention above 62.5%, NLL ratio below 2.0); when none
    passes, the one closest to passing (smallest shortfall: (0.625 - mention) / 0.375 + (NLL ratio - 2.0),
    each counted when positive), so a default still shows its concept."""
    cands = [(k, m) for k, m in table.items() if k[0] == "tuning" and k[1] == concept]
    ok = [(k, m) for k, m in cands if passes(m)]
    if ok:
        return max(ok, key=lambda km: min((km[1]["mention"] - 0.625) / 0.375, 2.0 - km[1]["nll_ratio"]))[0]
    return min(cands, key=lambda km: max(0.0, 0.625 - km[1]["mention"]) / 0.375 + max(0.0, km[1]["nll_ratio"] - 2.0)
               + (km[1]["rep3"] >= 0.2))[0]


def side_by_side(rows: list[dict], table: dict, base: dict, thresholds: dict, bound: float,
                 auto_grid: dict[str, list[float]] | None = None) -> dict:
    """Print the README table: per concept, the default picked on tuning, tuning and held-out figures
    side by side, then the same with auto calibration; return the picks."""
    picks = {}
    fmt = "{mention:.0%} / {probe:.0%} / {base_mention:.0%}, {base_probe:.0%} / {nll_ratio:.2f} / {rep3:.2f} / {on_topic:.0%}"
    print("\n| concept | op | fraction | tuning: mention / probe / unsteered mention, probe / NLL ratio / rep3 / on-topic | held-out: same | held-out pass | auto tuning | auto held-out | auto pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    n_pass = n_strong = n_auto = 0
    for c in KEYWORDS:
        if not any(k[1] == c for k in table):
            continue
        k = pick(table, c)
        picks[c] = {"variant": k[2], "fraction": k[3]}
        tun = table[k]
        held = table.get(("heldout", *k[1:]))
        autos = {}
        for st in ("tuning", "heldout"):
            chosen = auto_rows(rows, base, st, c, k[2], bound, None if auto_grid is None else auto_grid[c])
            if chosen:
                autos[st] = metrics(chosen, [base[(st, r["prompt"])] for r in chosen], c, thresholds)
        ok = held is not None and passes(held)
        n_pass += ok
        n_strong += held is not None and held["mention"] >= 0.75 and held["nll_ratio"] <= 1.5
        aok = "heldout" in autos and passes(autos["heldout"])
        n_auto += aok
        a = {st: "{mention:.0%} @ {nll_ratio:.2f}".format(**m) for st, m in autos.items()}
        print(f"| `{c}` | {k[2]} | {k[3]:.3f} | {fmt.format(**tun)} | {fmt.format(**held) if held else '-'} | {'yes' if ok else 'no'} | "
              f"{a.get('tuning', '-')} | {a.get('heldout', '-')} | {'yes' if aok else 'no'} |")
    print(f"\nheld-out: {n_pass} of {len(picks)} pass at their defaults; {n_strong} reach mention >= 75% at NLL ratio <= 1.5; "
          f"auto (bound {bound}): {n_auto} pass")
    return picks


def write_defaults(picks: dict, vectors_path: str, out: str, grids: dict[str, list[float]], bound: float) -> None:
    """demo.yaml-style settings for the picks: feature [layer, null, absolute strength], mode, fraction,
    the fractions "auto" was evaluated with (`grids`) and its bound; presets."""
    vset = steering.load_vectors(vectors_path)
    lines = ["# Per-concept defaults picked on the tuning prompts by benchmarks/eval_quality.py (issue 10).",
             "# feature: [layer, null (contrastive), absolute strength = fraction x the layer's norm]; mode as in demo.yaml.",
             "features:"]
    for c, p in picks.items():
        L = vset.get(c).layer
        op = p["variant"].split("+")[0]
        lines += [f"  - name: {c}", f"    feature: [{L}, null, {p['fraction'] * vset.norm(L):.1f}]   # {p['fraction']:.3f} x norm {vset.norm(L):.1f}",
                  f"    mode: {op}", f"    fraction: {p['fraction']:.3f}",
                  f"    auto_fractions: [{', '.join(f'{f:g}' for f in grids[c])}]   # calibrate_strength(..., fractions=these, nll_bound={bound:g})"]
    lines.append("presets:")
    for name, key in (("Eiffel Tower", "eiffel_tower"), ("Pirate", "pirate"), ("Shakespeare", "shakespeare")):
        if key in picks:
            lines += [f"  - name: {name}", "    features:",
                      f"      - {{key: {key}, fraction: {picks[key]['fraction']:.3f}, mode: {picks[key]['variant'].split('+')[0]}}}"]
    Path(out).write_text("\n".join(lines) + "\n")


def curves(table: dict) -> None:
    """Strength vs mention (keywords / probe) vs NLL ratio, tuning and held-out side by side."""
    print("\n| concept | op | fraction | tuning: mention / probe / NLL ratio / on-topic | held-out: mention / probe / NLL ratio / on-topic |")
    print("|---|---|---|---|---|")
    for c, variant, f in sorted({k[1:] for k in table}, key=lambda k: (list(KEYWORDS).index(k[0]), k[1], k[2])):
        cells = []
        for st in ("tuning", "heldout"):
            m = table.get((st, c, variant, f))
            cells.append("-" if m is None else f"{m['mention']:.0%} / {m['probe']:.0%} / {m['nll_ratio']:.2f} / {m['on_topic']:.0%}")
        print(f"| `{c}` | {variant} | {f:.3f} | {cells[0]} | {cells[1]} |")


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


def cmd_auto_report(args) -> None:
    """Per concept: the auto answers' mention rate, NLL ratio, rep3, pass; the time of auto vs one answer."""
    rows = [json.loads(line) for f in args.files for line in open(f)]
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["set"], r["concept"])].append(r)
    print("| set | concept | variant | n | mention | unsteered mention | NLL ratio | rep3 | on-topic | fitted | mean fraction | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    n_pass: dict[str, int] = defaultdict(int)
    for (st, c), rs in by.items():
        m = {"mention": sum(mentions(r["text"], c) for r in rs) / len(rs),
             "base_mention": sum(mentions(r["base_text"], c) for r in rs) / len(rs),
             "nll_ratio": sum(r["nll"] for r in rs) / sum(r["base_nll"] for r in rs),
             "rep3": sum(calibrate.rep3(r["text"]) for r in rs) / len(rs)}
        on_topic = sum(bool(stems(r["prompt"]) & stems(r["text"])) for r in rs) / len(rs)
        ok = passes(m)
        n_pass[st] += ok
        print(f"| {st} | {c} | {rs[0]['variant']} | {len(rs)} | {m['mention']:.0%} | {m['base_mention']:.0%} | {m['nll_ratio']:.2f} | "
              f"{m['rep3']:.3f} | {on_topic:.0%} | {sum(r['found'] for r in rs)}/{len(rs)} | "
              f"{sum(r['fraction'] for r in rs) / len(rs):.3f} | {'yes' if ok else 'no'} |")
    for st, k in n_pass.items():
        print(f"{st}: {k} of {len({c for s, c in by if s == st})} pass with auto")
    timed = [r for r in rows if "one_answer_s" in r and "answer_s" in r]
    if timed:
        one = sum(r["one_answer_s"] for r in timed)
        cal = sum(r["calibration_s"] for r in timed)
        ans = sum(r["answer_s"] for r in timed)
        print(f"time over {len(timed)} timed pairs: one answer {one / len(timed):.1f} s; auto = calibration {cal / len(timed):.1f} s "
              f"+ answer at the chosen strength {ans / len(timed):.1f} s = {(cal + ans) / one:.1f}x one answer "
              f"(calibration alone {cal / one:.1f}x)")
    again = [r for r in rows if "same_as_calibration_row" in r]
    print(f"{sum(r['same_as_calibration_row'] for r in again)}/{len(again)} answers generated again at the chosen strength "
          "equal the calibration's row for it (the row's answer and NLL are the ones scored)")


def cmd_curves_json(args) -> None:
    """llm_steering/data/strength_curves.json: per concept, at its shipped variant (op, steer_prompt),
    the tuning set's mention rate, NLL ratio and rep3 at every fraction measured, sorted by fraction."""
    rows = load_rows(args.files)
    tun_base = [r for r in rows if r["concept"] is None and r["set"] == "tuning"]
    thresholds = {c: max(r["probe"][c] for r in tun_base) for c in KEYWORDS}
    table, _ = summarise(rows, thresholds)
    settings = json.loads(Path(args.settings).read_text())
    doc: dict = {"command": args.command}  # then one list of points per concept, sorted by fraction
    for c, st in settings.items():
        op, *flags = st["variant"].split("+")
        op += "_keepnorm" if "keepnorm" in flags else ""
        doc[c] = sorted(({"fraction": k[3], "mention_rate": round(m["mention"], 4), "nll_ratio": round(m["nll_ratio"], 4),
                          "rep3": round(m["rep3"], 4), "n_prompts": m["n"], "op": op, "steer_prompt": "answer" not in flags}
                         for k, m in table.items() if k[:3] == ("tuning", c, st["variant"])), key=lambda q: q["fraction"])
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{c} {len(doc[c])} points" for c in settings))


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
    args = parser.parse_args()
    {"run": cmd_run, "report": cmd_report, "check": cmd_check, "cost": cmd_cost, "auto": cmd_auto,
     "auto-report": cmd_auto_report, "curves-json": cmd_curves_json}[args.cmd](args)


if __name__ == "__main__":
    main()
