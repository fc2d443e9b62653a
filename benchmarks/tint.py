"""Tint: does a steered answer mention its concept AND still answer the question AND read fluently?

The product's promise is a model that "thinks about" a concept while it still helps (issue 21). A
steered answer *tints* when all three hold at once:

- mention: one of the concept's KEYWORDS (benchmarks/sweep_vectors.py) as a whole word;
- addresses the question, signal A: the answer contains a content word of the prompt (first five
  letters; `stems`). Signal B, independent of the prompt's wording: the answer keeps at least
  OVERLAP_MIN of the unsteered answer's content words. `tint` uses A; the report gives how often A and
  B agree, and how often each agrees with a hand-checked sample (results/addresses_handcheck.jsonl);
- fluent: its NLL under the unsteered model is at most FLUENT_NLL x the mean NLL of the unsteered
  answers of its set, and rep3 < 0.2.

    # today's figures from the existing rows (no generation), per concept, tuning and held-out side by side:
    .venv/bin/python benchmarks/eval_quality.py tint benchmarks/results/grid*.jsonl --settings benchmarks/results/picks.json
    # pick each concept's setting by tuning tint, write the picks:
    .venv/bin/python benchmarks/eval_quality.py tint FILES... --pick-out picks.json
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from llm_steering import calibrate

from eval_quality_report import load_rows, stems
from sweep_vectors import KEYWORDS, mentions

FLUENT_NLL = 2.5  # x the unsteered answers' mean NLL (issue 21)
MAX_REP3 = 0.2
OVERLAP_MIN = 0.1  # signal B: share of the unsteered answer's content words kept
SHIPPED_VECTORS = "steering_vectors.pt"  # rows without a "vectors" field were made with it
HANDCHECK = Path(__file__).resolve().parent / "results" / "addresses_handcheck.jsonl"


def addresses_prompt(prompt: str, text: str) -> bool:
    """Signal A: the answer contains a content word of the prompt."""
    return bool(stems(prompt) & stems(text))


def addresses_base(text: str, base_text: str) -> bool:
    """Signal B: the answer keeps at least OVERLAP_MIN of the unsteered answer's content words."""
    keep = stems(base_text)
    return len(stems(text) & keep) / max(1, len(keep)) >= OVERLAP_MIN


def names_eiffel(text: str) -> bool:
    """The stricter check for the Eiffel Tower preset: the answer names the Eiffel Tower itself."""
    return re.search(r"\beiffel\b", text.lower()) is not None


def answer_tint(row: dict, base_row: dict, base_mean_nll: float, threshold: float | None = None) -> dict[str, bool]:
    """Per-answer flags: mention, probe, addresses (A), addresses_b (B), fluent, tint (mention & A & fluent)."""
    c = row["concept"]
    m = mentions(row["text"], c)
    a = addresses_prompt(row["prompt"], row["text"])
    nll = row["nll"]
    fluent = nll == nll and nll <= FLUENT_NLL * base_mean_nll and calibrate.rep3(row["text"]) < MAX_REP3
    probe = threshold is not None and row["probe"].get(c, float("-inf")) > threshold
    return {"mention": m, "probe": probe, "addresses": a, "addresses_b": addresses_base(row["text"], base_row["text"]),
            "fluent": fluent, "tint": m and a and fluent}


def setting_name(row: dict) -> str:
    """The variant, and the vectors file when it is not the shipped one: "clamp", "clamp@woven_vectors.pt"."""
    vectors = row.get("vectors", SHIPPED_VECTORS)
    return row["variant"] if vectors == SHIPPED_VECTORS else f"{row['variant']}@{vectors}"


def row_flags(rows: list[dict]) -> tuple[list[tuple[dict, dict[str, bool]]], dict, dict[str, float]]:
    """Each steered row with its answer_tint flags (and tint_b, tint_probe, eiffel, agree_ab); the unsteered
    rows {(set, prompt): row}; the unsteered mean NLL per set."""
    base = {(r["set"], r["prompt"]): r for r in rows if r["concept"] is None}
    mean_nll = {}
    for st in {s for s, _ in base}:
        nlls = [b["nll"] for (s, _), b in base.items() if s == st]
        mean_nll[st] = sum(nlls) / len(nlls)
    tun = [b for (s, _), b in base.items() if s == "tuning"]
    thresholds = {c: max(b["probe"][c] for b in tun) for c in KEYWORDS} if tun else {}
    flagged = []
    for r in rows:
        if r["concept"] is not None:
            b = base[(r["set"], r["prompt"])]
            f = answer_tint(r, b, mean_nll[r["set"]], thresholds.get(r["concept"]))
            f["tint_b"] = f["mention"] and f["addresses_b"] and f["fluent"]
            f["tint_probe"] = f["probe"] and f["addresses"] and f["fluent"]
            f["eiffel"] = names_eiffel(r["text"])
            f["agree_ab"] = f["addresses"] == f["addresses_b"]
            flagged.append((r, f))
    return flagged, base, mean_nll


def tint_table(rows: list[dict]) -> tuple[dict, dict]:
    """{(set, concept, variant, fraction): {n, mention, probe, addresses, addresses_b, fluent, tint, tint_b, tint_probe,
    eiffel, agree_ab}} (rates) and {set: unsteered rates of addresses A and B}."""
    flagged, base, mean_nll = row_flags(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r, f in flagged:
        groups[(r["set"], r["concept"], setting_name(r), r["fraction"])].append(f)
    table = {k: {"n": len(fs)} | {name: sum(f[name] for f in fs) / len(fs) for name in fs[0]} for k, fs in groups.items()}
    unsteered = {}
    for st in mean_nll:
        bs = [b for (s, _), b in base.items() if s == st]
        unsteered[st] = {"addresses": sum(addresses_prompt(b["prompt"], b["text"]) for b in bs) / len(bs), "n": len(bs)}
    return table, unsteered


def handcheck_agreement(path: Path = HANDCHECK) -> dict[str, float]:
    """Agreement of signals A and B with the hand-checked judgements (and with each other) on that sample
    (30 tuning answers at the first shipped defaults, drawn with random.seed(21), each with its unsteered answer)."""
    judged = [json.loads(line) for line in open(path)]
    a = [addresses_prompt(j["prompt"], j["text"]) for j in judged]
    b = [addresses_base(j["text"], j["base_text"]) for j in judged]
    h = [j["addresses"] for j in judged]
    n = len(judged)
    return {"n": n, "hand_yes": sum(h), "a_vs_hand": sum(x == y for x, y in zip(a, h, strict=True)) / n,
            "b_vs_hand": sum(x == y for x, y in zip(b, h, strict=True)) / n,
            "a_vs_b": sum(x == y for x, y in zip(a, b, strict=True)) / n}


def pick_by_tint(table: dict, concept: str) -> tuple:
    """A concept's setting from the TUNING rows only: the highest tint rate; ties go to the weaker fraction."""
    cands = [k for k in table if k[0] == "tuning" and k[1] == concept]
    return max(cands, key=lambda k: (round(table[k]["tint"], 6), -k[3]))


def cmd_tint(args) -> None:
    rows = load_rows(args.files, args.keep_incomplete)
    table, unsteered = tint_table(rows)
    for st, u in sorted(unsteered.items()):
        print(f"unsteered {st}: {u['addresses']:.0%} of {u['n']} answers address the question (signal A)")
    h = handcheck_agreement()
    steered = [m for m in table.values()]
    agree = sum(m["agree_ab"] * m["n"] for m in steered) / max(1, sum(m["n"] for m in steered))
    print(f"signals A and B agree on {agree:.0%} of all {sum(m['n'] for m in steered)} steered answers; on the {h['n']} "
          f"hand-checked answers ({h['hand_yes']} judged to address the question): A agrees with the judgement on "
          f"{h['a_vs_hand']:.0%}, B on {h['b_vs_hand']:.0%}, A with B on {h['a_vs_b']:.0%}")
    if args.settings:
        settings = json.loads(Path(args.settings).read_text())
        chosen = {c: (c, s["variant"], s["fraction"]) for c, s in settings.items()}
    else:
        chosen = {c: pick_by_tint(table, c)[1:] for c in KEYWORDS if any(k[1] == c and k[0] == "tuning" for k in table)}
    side_by_side(table, chosen)
    if args.pick_out:
        picks = {c: {"variant": k[1], "fraction": k[2]} for c, k in chosen.items()}
        Path(args.pick_out).write_text(json.dumps(picks, indent=1) + "\n")
        print(f"wrote {args.pick_out}")
    if args.curves:
        curves(table, {k[:2] for k in chosen.values()} if args.settings else None)
    if args.ceiling:
        ceiling(rows)


def ceiling(rows: list[dict]) -> None:
    """The best any single setting could do is below this: per concept, the share of prompts on which at
    least one of the settings in the files tints (an oracle that picks the setting per prompt after seeing
    the answers), with the number of settings it chose from."""
    flagged, _, _ = row_flags(rows)
    hit: dict[tuple, bool] = defaultdict(bool)
    tried: dict[tuple, set] = defaultdict(set)
    for r, f in flagged:
        hit[(r["set"], r["concept"], r["prompt"])] |= f["tint"]
        tried[(r["set"], r["concept"])].add((setting_name(r), r["fraction"]))
    print("\n| concept | tuning: prompts where some setting tints (settings tried) | held-out: same |")
    print("|---|---|---|")
    tot: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in KEYWORDS:
        cells = []
        for st in ("tuning", "heldout"):
            h = [v for (s, cc, _), v in hit.items() if s == st and cc == c]
            tot[st][0] += sum(h)
            tot[st][1] += len(h)
            cells.append(f"{sum(h)} of {len(h)} ({sum(h) / len(h):.0%}; {len(tried[(st, c)])})" if h else "-")
        print(f"| `{c}` | {cells[0]} | {cells[1]} |")
    for st, (t, n) in tot.items():
        print(f"ceiling {st}: {t} of {n} prompt-concept pairs tint under some setting ({t / max(1, n):.0%})")
    for st in ("tuning", "heldout"):
        named: dict[str, list[bool]] = defaultdict(lambda: [False, False])
        for r, f in flagged:
            if r["set"] == st and r["concept"] == "eiffel_tower":
                named[r["prompt"]][0] |= f["eiffel"]
                named[r["prompt"]][1] |= f["eiffel"] and f["fluent"]
        if named:
            print(f"eiffel_tower {st}: some setting names the Eiffel Tower on {sum(a for a, _ in named.values())} of "
                  f"{len(named)} prompts, fluently on {sum(b for _, b in named.values())}")


FMT = "{tint:.0%} ({mention:.0%} / {addresses:.0%} / {fluent:.0%}) B {tint_b:.0%} probe {tint_probe:.0%}"


def side_by_side(table: dict, chosen: dict[str, tuple]) -> None:
    """Per concept at its setting: tint (mention / addresses / fluent), tint with signal B, tint with the
    probe as the mention; tuning and held-out side by side; the totals and the Eiffel Tower check."""
    print("\n| concept | op | fraction | tuning: tint (mention / addresses / fluent), tint with B, with probe | "
          "held-out: same | held-out tints in >= 3/8 |")
    print("|---|---|---|---|---|---|")
    tot: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for c, k in chosen.items():
        cells, ok = [], "-"
        for st in ("tuning", "heldout"):
            m = table.get((st, *k))
            cells.append("-" if m is None else FMT.format(**m))
            if m is not None:
                tot[st][0] += m["tint"] * m["n"]
                tot[st][1] += m["n"]
                if st == "heldout":
                    ok = "yes" if m["tint"] >= 3 / 8 else "no"
        print(f"| `{c}` | {k[1]} | {k[2]:.4g} | {cells[0]} | {cells[1]} | {ok} |")
    for st, (t, n) in tot.items():
        print(f"{st}: {int(round(t))} of {n} steered answers tint ({t / max(1, n):.0%})")
    if "eiffel_tower" in chosen:
        for st in ("tuning", "heldout"):
            m = table.get((st, *chosen["eiffel_tower"]))
            if m:
                print(f"eiffel_tower {st}: names the Eiffel Tower ('eiffel') in {m['eiffel']:.0%} of {m['n']} answers "
                      f"(any keyword: {m['mention']:.0%})")


def curves(table: dict, only: set | None = None) -> None:
    """Tint against strength per concept and variant, tuning and held-out side by side."""
    print("\n| concept | variant | fraction | tuning: tint (mention / addresses / fluent) | held-out: same |")
    print("|---|---|---|---|---|")
    fmt = "{tint:.0%} ({mention:.0%} / {addresses:.0%} / {fluent:.0%})"
    keys = sorted({k[1:] for k in table}, key=lambda k: (list(KEYWORDS).index(k[0]), k[1], k[2]))
    for c, variant, f in keys:
        if only is not None and (c, variant) not in only:
            continue
        cells = [fmt.format(**table[(st, c, variant, f)]) if (st, c, variant, f) in table else "-" for st in ("tuning", "heldout")]
        print(f"| `{c}` | {variant} | {f:.4g} | {cells[0]} | {cells[1]} |")
