"""The reporting commands of benchmarks/eval_quality.py (`report`, `auto-report`, `curves-json`): tables,
picks and strength curves from the JSONL files that `run` and `auto` write. No model is loaded.

Run them through eval_quality.py (`python benchmarks/eval_quality.py report ...`); the metrics and the
pass rule are described there.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from llm_steering import calibrate, steering

from sweep_vectors import KEYWORDS, mentions

# the question's content words (signal A of tint.py); auto (calibrate.py) reads answers the same way
stems = calibrate.content_stems


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
