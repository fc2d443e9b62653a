"""Where auto with the learned directions (shipped) picks another answer than auto with the nine rows (issue 28).

The nine candidates (results/auto28_heldout.jsonl) against the seven rows chosen on tuning among those
nine and the learned direction at x0.6, x1, x1.4, x1.8 (`eval_auto.py report --subsets --extra ...`): unsteered, op x1,
release x2 and x3, learned x1, x0.6 and x1.4. Prints the held-out pairs where the two pick different candidates, and
20 of them drawn with random.seed(28), both answers side by side (written to the file given, as JSONL; the verdicts read
by hand are in results/auto28_learned_handcheck.jsonl).

    .venv/bin/python benchmarks/eval_auto_learned_diff.py /tmp/diff_sample.jsonl
    .venv/bin/python benchmarks/eval_auto_learned_diff.py /tmp/diff_sample.jsonl --long /tmp/long.jsonl

With `--long FILE`: for the first 8 drawn pairs where the seven rows keep a learned one, both autos again through
`calibrate.auto_answer` to 200 tokens (the app's answers go on past the 48 judged), written to FILE side by side
(read by hand: results/auto28_learned_long_handcheck.jsonl).
"""

import json
import random
import sys

import eval_auto as ea

rows = ea.load(["benchmarks/results/auto28_tuning.jsonl", "benchmarks/results/auto28_heldout.jsonl"])
n0 = len(rows[0]["candidates"])
ea.add_extra(rows, ["benchmarks/results/learned28_tuning.jsonl", "benchmarks/results/learned28_heldout.jsonl"], ["learned"])
ea.concept_scores(rows)
keep = [0, 2, 6, 7, 9, 10, 11]
diff = []
for r in rows:
    if r["set"] != "heldout":
        continue
    a = r["candidates"][ea.auto_picker(r["candidates"][:n0])]
    b = r["candidates"][keep[ea.auto_picker([r["candidates"][i] for i in keep])]]
    if a is not b:
        diff.append((r, a, b))
print(len(diff), "held-out pairs where the 7-row auto picks another candidate than the shipped 9-row auto")
random.seed(28)
out = open(sys.argv[1], "w")
for r, a, b in random.sample(diff, 20):
    out.write(json.dumps({"concept": r["concept"], "prompt": r["prompt"], "shipped": [a["label"], a["text"], a["tint"]], "seven": [b["label"], b["text"], b["tint"]]}) + "\n")
    print(f"\n## {r['concept']} | {r['prompt']}\n  9-row [{a['label']}] tint={a['tint']}: {a['text']!r}\n  7-row [{b['label']}] tint={b['tint']}: {b['text']!r}")

if "--long" in sys.argv:
    from pathlib import Path

    from llm_steering import calibrate, steering
    from llm_steering.catalog import Catalog

    import eval_quality

    model, tok = steering.load_model()
    catalog = Catalog.open(steering.load_config(Path("demo.yaml")).profile(), model, tok)
    drawn = [json.loads(line) for line in open(sys.argv[1])]
    with open(sys.argv[sys.argv.index("--long") + 1], "w") as long_out:
        for d in [d for d in drawn if "learned" in d["seven"][0]][:8]:
            f = catalog.resolve(d["concept"])
            comp = f.component(f.default_fraction)
            chat = eval_quality.chat(d["prompt"])
            seven = calibrate.auto_answer(model, tok, chat, comp, norm=f.norm, max_new_tokens=200)
            nine = calibrate.auto_answer(model, tok, chat, comp, norm=f.norm, max_new_tokens=200,
                                         candidates=calibrate.auto_candidates(comp))
            long_out.write(json.dumps({"concept": d["concept"], "prompt": d["prompt"], "seven": [seven.label, seven.answer],
                                       "nine": [nine.label, nine.answer]}) + "\n")
            long_out.flush()
            print(d["concept"], d["prompt"], seven.label, "|", nine.label, flush=True)
