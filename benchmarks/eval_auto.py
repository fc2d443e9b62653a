"""Auto for each prompt (issue 28): every candidate auto compares, generated once, judged, and pickers replayed.

`run` generates, for each prompt of a set and each of the ten shipped concepts at its default (demo.yaml),
every candidate of `calibrate.auto_candidates` (48 greedy tokens, repetition penalty 1.1, as the check
runs) and the unsteered answer, and writes one JSONL row per prompt and concept: each candidate's answer
with the signals auto reads (calibrate.read_candidates: NLL ratio, rep3, a word of the question, the
steering's own words) and the judge's flags (tint.py: a keyword, a word of the prompt, fluent against the
set's unsteered NLL), plus the concept's component in the answer under the unsteered model (the
projection signal). `report` replays pickers on those rows, on tuning and held-out side by side: the
fixed default, auto's picker, the oracle, and how each keyword-free signal agrees with the keywords.

    nice -n 5 .venv/bin/python benchmarks/eval_auto.py run --set tuning --out benchmarks/results/auto28_tuning.jsonl
    nice -n 5 .venv/bin/python benchmarks/eval_auto.py run --set heldout --out benchmarks/results/auto28_heldout.jsonl
    .venv/bin/python benchmarks/eval_auto.py report benchmarks/results/auto28_*.jsonl
    .venv/bin/python benchmarks/eval_auto.py report --subsets benchmarks/results/auto28_tuning.jsonl benchmarks/results/auto28_heldout.jsonl
    .venv/bin/python benchmarks/eval_auto.py report benchmarks/results/auto28_tuning.jsonl benchmarks/results/auto28_heldout.jsonl \
        --extra benchmarks/results/learned28_tuning.jsonl benchmarks/results/learned28_heldout.jsonl --variants
    .venv/bin/python benchmarks/eval_auto.py report benchmarks/results/auto28_tuning.jsonl benchmarks/results/auto28_heldout.jsonl \
        --extra benchmarks/results/learned28_*.jsonl benchmarks/results/auto28_mid_*.jsonl --extra-kinds learned contrastive \
        --grow "learned x1.1" "learned x1.2" "learned x1.3" "contrastive x1.1" "contrastive x1.2" "contrastive x1.3"
    nice -n 5 .venv/bin/python benchmarks/eval_auto.py run --set tuning --offset 1 --every 3 --out benchmarks/results/auto28_tuning_more.jsonl
    R=benchmarks/results; .venv/bin/python benchmarks/eval_auto.py report $R/auto28_tuning.jsonl $R/auto28_tuning_more.jsonl \
        $R/auto28_heldout.jsonl --extra $R/learned28_*.jsonl $R/auto28_mid_*.jsonl --extra-kinds learned contrastive \
        --variants --ten [--only $R/auto28_tuning_more.jsonl]     # the pickers over the ten rows on 21 tuning prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llm_steering import calibrate, steering
from llm_steering.catalog import Catalog
from llm_steering.core import human_name
from llm_steering.lens import concept_token_ids

import eval_quality
import torch
from sweep_vectors import KEYWORDS, mentions
from tint import FLUENT_NLL, MAX_REP3, addresses_prompt, names_eiffel

ROOT = Path(__file__).resolve().parent.parent


def cmd_run(args) -> None:
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    prompts = eval_quality.load_prompts(args.set)[args.offset :: args.every]
    concepts = args.concepts or list(KEYWORDS)
    done = set()
    if Path(args.out).exists():
        done = {(r["prompt"], r["concept"]) for r in map(json.loads, open(args.out))}
    feats = {c: catalog.resolve(c) for c in concepts}
    comps = {c: f.component(f.default_fraction) for c, f in feats.items()}
    words = {c: concept_token_ids(model, tok, comps[c], calibrate.AUTO_CONCEPT_WORDS) for c in concepts}
    cands = {c: calibrate.auto_candidates(comps[c]) for c in concepts}
    probe = {c: comps[c].vector / comps[c].vector.norm() for c in concepts}
    print("the steering's own words:", {c: sorted(tok.decode([i]).strip() for i in w) for c, w in words.items()}, file=sys.stderr)
    with open(args.out, "a") as out:
        for p in prompts:
            todo = [c for c in concepts if (p, c) not in done]
            if not todo:
                continue
            t0 = time.time()
            chat = eval_quality.chat(p)
            jobs = [(chat, calibrate.Candidate("unsteered"), (), frozenset())]
            for c in todo:
                jobs += [(chat, cand, (), words[c]) for cand in cands[c][1:]]
            ids, released = [], []
            for start in range(0, len(jobs), args.batch):
                i, r = calibrate.generate_many(model, tok, jobs[start : start + args.batch], eval_quality.MAX_NEW_TOKENS,
                                               eval_quality.REPETITION_PENALTY)
                ids += i
                released += r
            k = 1
            for c in todo:
                n = len(cands[c]) - 1
                a_ids, a_rel = [ids[0], *ids[k : k + n]], [None, *released[k : k + n]]
                k += n
                table = calibrate.read_candidates(model, tok, chat, cands[c], a_ids, a_rel, words[c])
                layer = comps[c].layer
                _, projs = calibrate.answer_nll(model, tok, [chat] * len(a_ids), a_ids, probe={layer: probe[c]})
                strength = abs(comps[c].cap_min if comps[c].op == "cap" else comps[c].strength)
                cand_rows = [{"label": r.candidate.label, "multiplier": r.candidate.multiplier,
                              "steer_prompt": r.candidate.steer_prompt, "release": r.candidate.release,
                              "op": r.candidate.components[0].op if r.candidate.components else None,
                              "text": r.text, "ids": list(r.token_ids), "nll": r.nll, "nll_ratio": r.nll_ratio,
                              "rep3": r.rep3, "on_question": r.on_question, "concept_words": r.concept_words,
                              "released_at": r.released_at, "projection": pr[layer] / strength}
                             for r, pr in zip(table, projs, strict=True)]
                out.write(json.dumps({"set": args.set if args.set in eval_quality.SETS else "tuning", "prompt": p, "concept": c,
                                      "words": sorted(words[c]), "candidates": cand_rows}) + "\n")
            out.flush()
            print(f"{p[:50]!r}: {len(jobs)} answers in {time.time() - t0:.0f} s", file=sys.stderr)


def cmd_check(args) -> None:
    """The issue's check, as it calls it: `calibrate.auto_answer(model, tok, chat, component, norm=norm,
    max_new_tokens=48)` (greedy, repetition penalty 1.1) for each concept at its shipped default and op, on the
    first `--prompts` prompts of a set; each answer and the unsteered one with their NLL, judged by tint.py's rule
    (the set's mean unsteered NLL); per concept: tint, and which candidate auto kept."""
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    prompts = eval_quality.load_prompts(args.set)[: args.prompts]
    concepts = args.concepts or list(KEYWORDS)
    done = {(r["prompt"], r["concept"]) for r in map(json.loads, open(args.out))} if Path(args.out).exists() else set()
    with open(args.out, "a") as out:
        for p in prompts:
            chat = eval_quality.chat(p)
            plain = None
            for c in concepts:
                if (p, c) in done:
                    continue
                t0 = time.time()
                f = catalog.resolve(c)
                res = calibrate.auto_answer(model, tok, chat, f.component(f.default_fraction), norm=f.norm, max_new_tokens=48)
                if plain is None:
                    plain = res.table[0]
                (nll,) = calibrate.answer_nll(model, tok, [chat], [list(res.token_ids)])
                out.write(json.dumps({"set": args.set, "prompt": p, "concept": c, "label": res.label, "text": res.answer,
                                      "nll": nll, "rep3": calibrate.rep3(res.answer), "unsteered_nll": plain.nll,
                                      "candidates": len(res.table), "seconds": round(time.time() - t0, 1)}) + "\n")
                out.flush()
                print(f"{c:13s} {p[:40]!r:44s} {res.label} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    check_report(args.out)


def check_report(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    mean = set_means(rows, lambda r: r["unsteered_nll"])
    cells: dict = defaultdict(lambda: [0, 0, 0, defaultdict(int)])
    for r in rows:
        j = judge(r, r, mean[r["set"]])
        cell = cells[r["concept"]]
        cell[0] += j["tint"]
        cell[1] += j["eiffel"]
        cell[2] += 1
        cell[3][r["label"].split(",")[-1].strip() if "learned" in r["label"] else r["label"]] += 1
    print("| concept | tint | kept |\n|---|---|---|")
    for c, (t, _, n, kept) in cells.items():
        print(f"| `{c}` | {t}/{n} | {', '.join(f'{k} {v}' for k, v in sorted(kept.items(), key=lambda kv: -kv[1]))} |")
    t, n = sum(v[0] for v in cells.values()), sum(v[2] for v in cells.values())
    e = cells.get("eiffel_tower", [0, 0, 0])
    print(f"in all: {t} of {n} tint ({t / max(1, n):.0%}); the Eiffel Tower named in {e[1]} of {e[2]}")


# ---------------------------------------------------------------------------
# Judging and replaying
# ---------------------------------------------------------------------------


def set_means(rows: list[dict], unsteered: Callable[[dict], float]) -> dict[str, float]:
    """Per set, the mean unsteered NLL over its prompts (each prompt once, whatever the concepts): the judge's
    fluency bar."""
    base = {(r["set"], r["prompt"]): unsteered(r) for r in rows}
    sets = {s for s, _ in base}
    return {s: sum(v for (t, _), v in base.items() if t == s) / sum(t == s for t, _ in base) for s in sets}


def load(paths: list[str]) -> list[dict]:
    rows = [json.loads(line) for p in paths for line in open(p)]
    mean = set_means(rows, lambda r: r["candidates"][0]["nll"])
    for r in rows:
        for cand in r["candidates"]:
            cand.update(judge(r, cand, mean[r["set"]]))
    return rows


def judge(row: dict, cand: dict, mean_nll: float) -> dict:
    """tint.py's rule: a keyword, a word of the prompt, and fluent (NLL within FLUENT_NLL x the set's
    mean unsteered NLL, rep3 below MAX_REP3)."""
    m = mentions(cand["text"], row["concept"])
    a = addresses_prompt(row["prompt"], cand["text"])
    nll = cand["nll"]
    f = nll == nll and nll <= FLUENT_NLL * mean_nll and cand["rep3"] < MAX_REP3
    return {"mention": m, "addresses": a, "fluent": f, "tint": m and a and f, "eiffel": names_eiffel(cand["text"])}


Picker = Callable[[list[dict]], int]


def as_autorows(cands: list[dict]) -> list[calibrate.AutoRow]:
    return [calibrate.AutoRow(calibrate.Candidate(c["label"], (None,) if c["multiplier"] else (), multiplier=c["multiplier"]),
                              (), c["text"], c["nll"],
                              c["nll_ratio"], c["rep3"], c["on_question"], c["concept_words"], c["released_at"],
                              c.get("score", 0.0))
            for c in cands]


def auto_picker(cands: list[dict]) -> int:
    """calibrate.pick_candidate, as shipped."""
    return calibrate.pick_candidate(as_autorows(cands))


def fixed(label_suffix: str = " x1") -> Picker:
    """The fixed default: the feature's op at its default strength, prompt steered."""
    return lambda cands: next(i for i, c in enumerate(cands) if c["label"].endswith(label_suffix) and c["steer_prompt"]
                              and c["op"] == cands[1]["op"])


def oracle(cands: list[dict]) -> int:
    return next((i for i, c in enumerate(cands) if c["tint"]), 0)


def rates(rows: list[dict], picker: Picker) -> dict:
    """{(set, concept): [tint, eiffel named, n]} of the picked candidates."""
    out: dict = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        c = r["candidates"][picker(r["candidates"])]
        cell = out[(r["set"], r["concept"])]
        cell[0] += c["tint"]
        cell[1] += c["eiffel"]
        cell[2] += 1
    return out


def table(rows: list[dict], pickers: dict[str, Picker]) -> None:
    sets = [s for s in ("tuning", "heldout") if any(r["set"] == s for r in rows)]
    res = {name: rates(rows, p) for name, p in pickers.items()}
    print("| concept | " + " | ".join(f"{n} ({s})" for s in sets for n in pickers) + " |")
    print("|---|" + "---|" * (len(sets) * len(pickers)))
    for c in KEYWORDS:
        cells = []
        for s in sets:
            for n in pickers:
                t, _, k = res[n].get((s, c), [0, 0, 0])
                cells.append(f"{t}/{k}" if k else "-")
        print(f"| `{c}` | " + " | ".join(cells) + " |")
    for s in sets:
        for n in pickers:
            t = sum(v[0] for (st, _), v in res[n].items() if st == s)
            k = sum(v[2] for (st, _), v in res[n].items() if st == s)
            e = res[n].get((s, "eiffel_tower"), [0, 0, 0])
            print(f"{s:8s} {n:10s}: {t} of {k} tint ({t / max(1, k):.0%}); Eiffel Tower named in {e[1]} of {e[2]}")


def signals(rows: list[dict]) -> None:
    """How each keyword-free signal agrees with the judge's flags, over every steered candidate."""
    for s in ("tuning", "heldout"):
        cands = [c for r in rows if r["set"] == s for c in r["candidates"][1:]]
        if not cands:
            continue
        n = len(cands)

        def agree(sig: Callable[[dict], bool], ref: str, cands: list[dict] = cands, n: int = n) -> str:
            tp = sum(sig(c) and c[ref] for c in cands)
            pos = sum(sig(c) for c in cands)
            ref_n = sum(c[ref] for c in cands)
            acc = sum(sig(c) == c[ref] for c in cands) / n
            return (f"agrees {acc:.0%}, precision {tp / max(1, pos):.0%}, recall {tp / max(1, ref_n):.0%} "
                    f"({pos} flagged, {ref_n} by the judge)")

        print(f"\n{s}: {n} steered candidates")
        print("  steering's own words >= 1 vs keyword mention:", agree(lambda c: c["concept_words"] > 0, "mention"))
        for t in (2.0, 2.5, 3.0):
            print(f"  steering score of a token >= {t} vs keyword mention:", agree(lambda c, t=t: c["score"] >= t, "mention"))
        for t in (0.3, 0.5):
            print(f"  projection > {t} x strength vs keyword mention:", agree(lambda c, t=t: c["projection"] > t, "mention"))
        print("  a word of the question vs the judge's 'addresses':", agree(lambda c: c["on_question"], "addresses"))
        for b in (2.0, 2.5):
            print(f"  NLL ratio <= {b} and rep3 < 0.2 vs the judge's 'fluent':",
                  agree(lambda c, b=b: c["nll_ratio"] <= b and c["rep3"] < 0.2, "fluent"))


def word_key(text: str) -> str:
    """The word a token spells, whatever its case, its leading space or a plural's final s: " Cats", "cat" and
    "cats" all give "cat" (a final s is dropped only from a word of four letters or more, not after an s)."""
    word = text.strip().lower()
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def word_groups(tokenizer: Any, vocab: int) -> tuple[torch.Tensor, int]:
    """For each of the first `vocab` token ids, the index of its `word_key` (ids past the tokenizer's own
    vocabulary each alone), and how many indices there are."""
    n_tok = min(vocab, len(tokenizer))
    index: dict[str, int] = {}
    groups = [index.setdefault(word_key(t), len(index)) for t in tokenizer.batch_decode([[i] for i in range(n_tok)])]
    groups += [len(index) + j for j in range(vocab - n_tok)]
    return torch.tensor(groups), len(index) + vocab - n_tok


def word_scores(groups: tuple[torch.Tensor, int], scores: torch.Tensor) -> torch.Tensor:
    """`scores` (one per vocabulary token) with each token given the highest score of any token that spells the
    same word (`word_groups`): the steering raises " cats" mid-sentence, and "Cats" opening one is the same word."""
    index, n = groups
    best = torch.full((n,), float("-inf"), dtype=scores.dtype).scatter_reduce(0, index, scores.cpu(), "amax")
    return best[index]


def concept_scores(rows: list[dict]) -> None:
    """Each candidate's `score`: the highest steering score (lens.steering_scores: the log-probability rise the
    feature gives a token on neutral chats) of any of its tokens, and `score3`, the mean of its three highest;
    `score_word` and `score3_word` the same by words (`word_scores`: " cats", "Cats" and "cat" are one word,
    scored as the highest of them); `score_new`, the highest of a token whose word neither the prompt nor the
    unsteered answer has."""
    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(ROOT / "demo.yaml").profile(), model, tok)
    from llm_steering.lens import steering_scores

    vec, by_word = {}, {}
    groups = word_groups(tok, steering.unembedding(model).weight.shape[0])
    for c in {r["concept"] for r in rows}:
        f = catalog.resolve(c)
        vec[c] = steering_scores(model, tok, [f.component(f.default_fraction)])
        by_word[c] = word_scores(groups, vec[c])
    group_of = groups[0].tolist()
    for r in rows:
        # the words the question and the unsteered answer already have (by word: " Earth" and "earth" are one)
        known = {group_of[i] for i in [*tok.encode(r["prompt"], add_special_tokens=False), *r["candidates"][0]["ids"]]}
        for cand in r["candidates"]:
            s = sorted((float(vec[r["concept"]][i]) for i in set(cand["ids"])), reverse=True) or [0.0]
            cand["score"], cand["score3"] = s[0], sum(s[:3]) / 3
            cand["score_new"] = max((float(vec[r["concept"]][i]) for i in set(cand["ids"]) if group_of[i] not in known),
                                    default=0.0)
            w = sorted({group_of[i]: float(by_word[r["concept"]][i]) for i in set(cand["ids"])}.values(), reverse=True) or [0.0]
            cand["score_word"], cand["score3_word"] = w[0], sum(w[:3]) / 3


def make_picker(bound: float, signal: str, tau: float, choose: str, fallback: str) -> Picker:
    """A keyword-free picker: gates (NLL ratio <= bound, rep3 < 0.2, a word of the question), then of the
    candidates whose concept signal passes, the one `choose` prefers; else `fallback`."""
    def sig(c: dict) -> float:
        return {"words": c["concept_words"], "score": c.get("score", 0), "score3": c.get("score3", 0),
                "projection": c["projection"]}[signal]

    def pick(cands: list[dict]) -> int:
        ok = [i for i, c in enumerate(cands) if i > 0 and c["nll_ratio"] <= bound and c["rep3"] < 0.2 and c["on_question"]]
        named = [i for i in ok if sig(cands[i]) >= tau]
        if named:
            key = {"nll": lambda i: cands[i]["nll_ratio"], "signal": lambda i: -sig(cands[i]),
                   "weakest": lambda i: (cands[i]["multiplier"], cands[i]["nll_ratio"])}[choose]
            return min(named, key=key)
        if fallback == "strongest_signal" and ok:
            return max(ok, key=lambda i: sig(cands[i]))
        return 0

    return pick


def search(rows: list[dict]) -> tuple[str, Picker]:
    """The picker with the most tints on the TUNING rows over a small grid (ties: the earlier in the grid)."""
    tun = [r for r in rows if r["set"] == "tuning"]
    best = None
    grid = []
    for bound in (1.8, 2.2, 2.5, 3.0):
        for signal, taus in (("words", (1, 2)), ("score", (1.5, 2.0, 2.5, 3.0)), ("score3", (1.0, 1.5, 2.0)),
                             ("projection", (0.2, 0.3, 0.5))):
            for tau in taus:
                for choose in ("nll", "signal", "weakest"):
                    for fallback in ("unsteered", "strongest_signal"):
                        grid.append((bound, signal, tau, choose, fallback))
    for g in grid:
        p = make_picker(*g)
        t = sum(r["candidates"][p(r["candidates"])]["tint"] for r in tun)
        if best is None or t > best[0]:
            best = (t, g)
    name = "bound {} {} >= {} by {} else {}".format(*best[1])
    print(f"best picker on tuning: {name}: {best[0]} of {len(tun)} tint")
    return name, make_picker(*best[1])


HANDCHECK = ROOT / "benchmarks" / "results" / "auto28_handcheck.jsonl"


def handcheck(rows: list[dict]) -> None:
    """The signals and the judge against 30 tuning candidates read by hand (results/auto28_handcheck.jsonl:
    drawn with random.seed(28); names the concept, still answers the question, reads fluently)."""
    if not HANDCHECK.exists():
        return
    index = {(r["prompt"], r["concept"], c["label"]): c for r in rows for c in r["candidates"]}
    judged = [(h, index[(h["prompt"], h["concept"], h["label"])]) for h in map(json.loads, open(HANDCHECK))
              if (h["prompt"], h["concept"], h["label"]) in index]
    n = len(judged)
    if not n:
        return

    def agree(name: str, sig: Callable[[dict], bool], hand: str) -> None:
        ok = sum(sig(c) == h[hand] for h, c in judged)
        print(f"  {name:48s} vs hand '{hand[5:]}': agrees on {ok} of {n} ({ok / n:.0%})")

    print(f"\nthe {n} hand-checked answers ({sum(h['hand_mention'] for h, _ in judged)} name the concept, "
          f"{sum(h['hand_addresses'] for h, _ in judged)} still answer, {sum(h['hand_fluent'] for h, _ in judged)} fluent, "
          f"{sum(h['hand_tint'] for h, _ in judged)} all three):")
    agree("keyword mention (the judge)", lambda c: c["mention"], "hand_mention")
    for t in (1.5, 2.0, 2.5, 3.0):
        agree(f"steering score of a token >= {t}", lambda c, t=t: c["score"] >= t, "hand_mention")
    agree("steering's own words >= 1", lambda c: c["concept_words"] > 0, "hand_mention")
    agree("projection > 0.3 x strength", lambda c: c["projection"] > 0.3, "hand_mention")
    agree("a word of the question (auto and the judge)", lambda c: c["on_question"], "hand_addresses")
    agree(f"NLL ratio <= {calibrate.AUTO_NLL_BOUND} and rep3 < 0.2 (auto)",
          lambda c: c["nll_ratio"] <= calibrate.AUTO_NLL_BOUND and c["rep3"] < 0.2, "hand_fluent")
    agree("NLL <= 2.5 x the set's unsteered mean (the judge)", lambda c: c["fluent"], "hand_fluent")
    agree("tint (the judge)", lambda c: c["tint"], "hand_tint")


def subsets(rows: list[dict], per_concept: Sequence[int] = ()) -> None:
    """Auto with fewer candidates (a smaller batch, so the first words come sooner): for each size, the
    subsets (the unsteered answer always kept) whose picker tints most on tuning, replayed on held-out."""
    import itertools

    n = len(rows[0]["candidates"])
    names = ["unsteered", "op x0.6", "op x1", "op x1.4", "op x1.8", "other op x1", "release x2", "release x3", "release x4"]
    names += [c["label"] for c in rows[0]["candidates"][len(names):]]  # --extra's

    def rate(set_: str, keep: list[int]) -> tuple[int, int]:
        picked = [r["candidates"][keep[auto_picker([r["candidates"][i] for i in keep])]] for r in rows if r["set"] == set_]
        return sum(c["tint"] for c in picked), len(picked)

    print("| rows | kept (chosen on tuning) | tuning | held-out |\n|---|---|---|---|")
    for k in range(3, n + 1):
        ranked = sorted(((rate("tuning", [0, *sub])[0], -len(sub), [0, *sub])
                         for sub in itertools.combinations(range(1, n), k - 1)), reverse=True)
        for _tuned, _, keep in ranked[:2]:
            t, m = rate("tuning", keep)
            h, hm = rate("heldout", keep)
            print(f"| {k} | {', '.join(names[i] for i in keep)} | {t}/{m} | {h}/{hm} ({h / max(1, hm):.0%}) |")
    if per_concept:
        for k in per_concept:
            keep = max((rate("tuning", [0, *sub])[0], -len(sub), [0, *sub])
                        for sub in itertools.combinations(range(1, n), k - 1))[2]
            print(f"\n{k} rows, the best on tuning ({', '.join(names[i] for i in keep)}):")
            table(rows, {f"auto ({k})": lambda c, keep=keep: keep[auto_picker([c[i] for i in keep])],
                         f"oracle ({k})": lambda c, keep=keep: keep[oracle([c[i] for i in keep])]})


def add_extra(rows: list[dict], paths: list[str], kinds: list[str]) -> int:
    """More candidates for each stored prompt and concept, from rows of another run with the same decoding
    (benchmarks/eval_learned.py: a learned direction at multiples of the default), read with auto's signals:
    the NLL ratio to the stored unsteered answer, rep3, a word of the question, the steering's own words
    (projection not measured: NaN), and judged as `load` judges (against the set's mean unsteered NLL). Returns
    how many candidates were added."""
    index = {(r["set"], r["prompt"], r["concept"]): r for r in rows}
    mean = set_means(rows, lambda r: r["candidates"][0]["nll"])
    added = 0
    for path in paths:
        for e in map(json.loads, open(path)):
            r = index.get((e.get("set"), e.get("prompt"), e.get("concept")))
            if r is None or e.get("vector") not in kinds:
                continue
            base, words = r["candidates"][0], set(r["words"])
            r["candidates"].append({
                "label": f"{e['vector']} x{e['multiplier']:g}", "multiplier": e["multiplier"], "steer_prompt": True,
                "release": False, "op": r["candidates"][2]["op"], "text": e["text"], "ids": e["ids"], "nll": e["nll"],
                "nll_ratio": e["nll"] / base["nll"], "rep3": e["rep3"],
                "on_question": bool(calibrate.content_stems(e["text"]) & calibrate.content_stems(e["prompt"])),
                "concept_words": sum(t in words for t in e["ids"]), "released_at": None, "projection": float("nan")})
            r["candidates"][-1].update(judge(r, r["candidates"][-1], mean[r["set"]]))
            added += 1
    return added


def shipped_seven(cands: list[dict]) -> list[dict]:
    """The seven rows auto ships for a feature with a learned direction, from a row with --extra's candidates."""
    op = cands[1]["op"]
    want = ["unsteered", f"{op} x1", "x2, answer only", "x3, answer only", "learned x1", "learned x0.6", "learned x1.4"]
    return [next(c for c in cands if c["label"] == w or (", answer only" in w and w in c["label"])) for w in want]


def grow(rows: list[dict], pool: Sequence[str]) -> None:
    """Auto with more rows: every subset of `pool` (--extra's labels: "learned x1.2", "contrastive x1.1", the
    feature's own vector) added to the shipped seven, ranked on tuning (auto's tint, then fewer rows, then the
    oracle's tint); the twelve best and the whole pool, with held-out beside them (held-out only reports)."""
    import itertools

    def pick_rows(r: dict, extra: Sequence[str]) -> list[dict]:
        return shipped_seven(r["candidates"]) + [next(c for c in r["candidates"] if c["label"] == x) for x in extra]

    def rate(extra: Sequence[str], picker: Picker) -> tuple[int, int, str, int]:
        tally: dict = defaultdict(int)
        named = 0
        for r in rows:
            cands = pick_rows(r, extra)
            c = cands[picker(cands)]
            tally[(r["set"], r["concept"])] += c["tint"]
            named += r["set"] == "heldout" and r["concept"] == "eiffel_tower" and c["eiffel"]
        tun, held = (sum(v for (s, _), v in tally.items() if s == st) for st in ("tuning", "heldout"))
        return tun, held, " ".join(str(tally[("heldout", c)]) for c in KEYWORDS), named

    rows = [r for r in rows if all(any(c["label"] == x for c in r["candidates"]) for x in pool)]
    ranked = []
    for k in range(len(pool) + 1):
        for extra in itertools.combinations(pool, k):
            a, o = rate(extra, auto_picker), rate(extra, oracle)
            ranked.append(((a[0], -k, o[0]), extra, a, o))
    ranked.sort(key=lambda x: x[0], reverse=True)
    n_t, n_h = sum(r["set"] == "tuning" for r in rows), sum(r["set"] == "heldout" for r in rows)
    print(f"| rows | added to the seven (ranked on tuning) | tuning | held-out | held-out per concept ({', '.join(KEYWORDS)}) "
          f"| Eiffel named | oracle: tuning, held-out, per concept |\n|---|---|---|---|---|---|---|")
    for _, extra, a, o in [*ranked[:12], *[x for x in ranked if len(x[1]) in (0, len(pool))]]:
        print(f"| {7 + len(extra)} | {', '.join(extra) or '(the seven)'} | {a[0]}/{n_t} | {a[1]}/{n_h} ({a[1] / max(1, n_h):.0%}) "
              f"| {a[2]} | {a[3]} | {o[0]}, {o[1]}, {o[2]} |")


TEN = ("learned x1.1", "learned x1.2", "contrastive x1.1")  # the rows the ten add to the seven (--extra's labels)


def shipped_ten(cands: list[dict]) -> list[dict]:
    """The ten rows auto ships for a feature with a learned direction (the seven, learned x1.1 and x1.2, the
    feature's own op at x1.1), from a row with --extra's candidates, in calibrate.auto_candidates' order."""
    return shipped_seven(cands) + [next(c for c in cands if c["label"] == x) for x in TEN]


def variants(rows: list[dict], ten: bool = False) -> None:
    """Keyword-free pickers beside the shipped one, over the shipped seven rows (or `ten`), tuning and held-out
    side by side (a picker is chosen on tuning; held-out only reports): the NLL bound, a second word of the
    question, a share of the unsteered answer's words, the steering's own words first, the concept score less
    the NLL ratio, the mean of the three highest scores, and the score read by words (`word_scores`)."""
    if ten:
        rows[:] = [r for r in rows if all(any(c["label"] == x for c in r["candidates"]) for x in TEN)]
    for r in rows:
        r["candidates"] = shipped_ten(r["candidates"]) if ten else shipped_seven(r["candidates"])

    def gated(cands: list[dict], bound: float = calibrate.AUTO_NLL_BOUND) -> list[int]:
        return [i for i, c in enumerate(cands) if i > 0 and c["nll_ratio"] <= bound and c["rep3"] < 0.2 and c["on_question"]]

    def best(key: Callable[[dict], Any], keep: Callable[[dict, list[dict], str], bool] = lambda c, cs, p: True,
             bound: float = calibrate.AUTO_NLL_BOUND) -> Picker:
        return lambda cands, prompt="": max((i for i in gated(cands, bound) if keep(cands[i], cands, prompt)),
                                            key=lambda i: key(cands[i]), default=0)

    def shared(c: dict, cands: list[dict]) -> float:
        mine = calibrate.content_stems(c["text"])
        return len(mine & calibrate.content_stems(cands[0]["text"])) / max(1, len(mine))

    def score(c: dict) -> tuple[float, float]:  # the shipped rule
        return c["score"], -c["nll_ratio"]

    pickers: dict[str, Any] = {"the fixed default": lambda cands, prompt="": fixed()(cands),
                               "shipped (bound 3.0, highest score)": best(score)}
    for b in (2.0, 2.5, 3.5, 4.0):
        pickers[f"bound {b}"] = best(score, bound=b)
    pickers["two words of the question"] = best(score, lambda c, cs, p: len(calibrate.content_stems(c["text"])
                                                                            & calibrate.content_stems(p)) >= 2)
    for t in (0.05, 0.1, 0.2):
        pickers[f"shares {t:.0%} of the unsteered answer's words"] = best(score, lambda c, cs, p, t=t: shared(c, cs) >= t)
    pickers["the steering's own words first"] = best(lambda c: (c["concept_words"] > 0, c["score"], -c["nll_ratio"]))
    for lam in (0.5, 1.0):
        pickers[f"score - {lam:g} x NLL ratio"] = best(lambda c, lam=lam: c["score"] - lam * c["nll_ratio"])
    pickers["mean of the three highest scores"] = best(lambda c: (c["score3"], -c["nll_ratio"]))
    pickers["by words: the highest word score"] = best(lambda c: (c["score_word"], -c["nll_ratio"]))
    pickers["the highest score of a word the question and the unsteered answer lack"] = best(
        lambda c: (c["score_new"], -c["nll_ratio"]))
    for b in (2.5, 3.5):
        pickers[f"by words, bound {b}"] = best(lambda c: (c["score_word"], -c["nll_ratio"]), bound=b)
    pickers["by words, then more of the steering's own words"] = best(lambda c: (c["score_word"], c["concept_words"],
                                                                                 -c["nll_ratio"]))
    pickers["by words: the mean of the three highest"] = best(lambda c: (c["score3_word"], -c["nll_ratio"]))
    # the feature's own name (what a user names a concept, an SAE feature's label): not a keyword list
    named = {c: calibrate.content_stems(human_name(c)) for c in KEYWORDS}

    def says_name(c: dict, concept: str) -> bool:
        return bool(calibrate.content_stems(c["text"]) & named[concept])

    for r in rows:
        for c in r["candidates"]:
            c["says_name"] = says_name(c, r["concept"])
    pickers["its name first, then the score"] = best(lambda c: (c["says_name"], c["score"], -c["nll_ratio"]))
    pickers["its name first, then the lowest NLL ratio"] = best(lambda c: (c["says_name"], -c["nll_ratio"]))
    pickers["oracle"] = lambda cands, prompt="": oracle(cands)
    print("| picker | tuning | tuning per concept | held-out | held-out per concept (" + ", ".join(KEYWORDS)
          + ") | Eiffel named (held-out) |\n|---|---|---|---|---|---|")
    for name, pick in pickers.items():
        tally: dict = defaultdict(int)
        named = 0
        for r in rows:
            c = r["candidates"][pick(r["candidates"], r["prompt"])]
            tally[(r["set"], r["concept"])] += c["tint"]
            named += r["set"] == "heldout" and r["concept"] == "eiffel_tower" and c["eiffel"]
        tun, held = (sum(v for (s, _), v in tally.items() if s == st) for st in ("tuning", "heldout"))
        per_t, per = (" ".join(str(tally[(st, c)]) for c in KEYWORDS) for st in ("tuning", "heldout"))
        print(f"| {name} | {tun}/{sum(r['set'] == 'tuning' for r in rows)} | {per_t} | {held}/"
              f"{sum(r['set'] == 'heldout' for r in rows)} | {per} | {named} |")


def cmd_report(args) -> None:
    rows = load(args.files)
    if args.extra:
        n = len(rows[0]["candidates"])
        print(f"{add_extra(rows, args.extra, args.extra_kinds)} candidates added ({', '.join(args.extra_kinds)})")
        concept_scores(rows)
        if args.only:  # judged against every loaded prompt of the set (its mean unsteered NLL), then kept
            keep = {json.loads(line)["prompt"] for path in args.only for line in open(path)}
            rows[:] = [r for r in rows if r["prompt"] in keep]
        if args.untaught:  # not the pairs whose steered answers taught the learned directions (eval_learned.py train)
            from eval_learned import steered_teachers

            taught = {(c, t["prompt"]) for c, ts in steered_teachers().items() for t in ts}
            rows[:] = [r for r in rows if (r["concept"], r["prompt"]) not in taught]
        if args.subsets:
            subsets(rows, args.per_concept)
            return
        if args.variants:
            variants(rows, args.ten)
            return
        if args.grow:
            grow(rows, args.grow)
            return
        table(rows, {"fixed": fixed(), f"auto ({n})": lambda c: auto_picker(c[:n]), "auto (all)": auto_picker,
                     f"oracle ({n})": lambda c: oracle(c[:n]), "oracle (all)": oracle})
        return
    concept_scores(rows)
    pickers = {"fixed": fixed(), "auto": auto_picker, "oracle": oracle}
    if args.search:
        name, p = search(rows)
        pickers["searched"] = p
    if args.subsets:
        subsets(rows)
        return
    table(rows, pickers)
    signals(rows)
    handcheck(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--set", default="tuning")
    run.add_argument("--every", type=int, default=1)
    run.add_argument("--offset", type=int, default=0)
    run.add_argument("--concepts", nargs="*")
    run.add_argument("--batch", type=int, default=64, help="rows per generate call")
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--out", required=True)
    chk = sub.add_parser("check", help="calibrate.auto_answer as the issue's check calls it, judged")
    chk.add_argument("--set", default="heldout")
    chk.add_argument("--prompts", type=int, default=8)
    chk.add_argument("--concepts", nargs="*")
    chk.add_argument("--threads", type=int, default=None)
    chk.add_argument("--out", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--search", action="store_true", help="also search pickers on the tuning rows")
    rep.add_argument("--subsets", action="store_true", help="only: auto with fewer candidates, chosen on tuning")
    rep.add_argument("--extra", nargs="*", default=[], help="only: auto with more candidates, from these rows (eval_learned.py's)")
    rep.add_argument("--per-concept", nargs="*", type=int, default=[], help="with --subsets: per concept, for these sizes")
    rep.add_argument("--extra-kinds", nargs="*", default=["learned"], help="the `vector` kinds of --extra rows to add")
    rep.add_argument("--variants", action="store_true", help="with --extra: other pickers over the shipped seven rows")
    rep.add_argument("--only", nargs="*", default=[],
                     help="with --extra: report only the prompts of these files (judged against all the files' prompts)")
    rep.add_argument("--untaught", action="store_true",
                     help="with --extra: leave out the prompt-concept pairs whose steered answers taught the learned directions")
    rep.add_argument("--ten", action="store_true", help="with --variants: over the shipped ten rows (--extra: the mid rows too)")
    rep.add_argument("--grow", nargs="*", default=[],
                     help="with --extra: subsets of these --extra labels added to the shipped seven, ranked on tuning")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    {"run": cmd_run, "check": cmd_check, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
