"""Issue 21's last two measurements: a dose that stops once the concept is in, and the model's own ceiling.

`release`: answer-only steering that lets go of each answer the moment it mentions its concept. The
prompt is left alone (the model starts on the question), every answer token is pushed until one of
the concept's keywords is written, and from the next token on the answer is unsteered, so the model
can go back to the question. It reads the answer as it grows, so it is the best case of a dose that
adapts to the answer's state (one that reads the concept's projection instead can only detect the
concept later or less surely). eval_quality's own run (prompts, settings, rows, JSONL); only the hooks
change.

`prompted`: no steering at all. The unsteered model is *asked* to bring the concept in ("In your
answer, mention the ocean." after the question, or a system prompt that says so), and its answers are
scored as steered ones are: tint (benchmarks/tint.py), with the NLL taken under the plain chat (the
question without the request), as for every steered answer. Asking is the strongest way to put a
concept into an answer that this model has; how often it tints when asked bounds what a push on its
residual stream can be expected to do.

    nice -n 10 .venv/bin/python benchmarks/eval_adaptive.py release -- --set tuning --every 3 \
        --per-concept benchmarks/base_settings.json --flags answer release --fractions 1.0 1.5 2.0 2.5 3.0 4.0 \
        --out benchmarks/results/release_tuning_every3.jsonl
    nice -n 10 .venv/bin/python benchmarks/eval_adaptive.py release -- --set heldout \
        --per-concept benchmarks/results/release_picks.json --flags answer release --fractions 1.0 \
        --out benchmarks/results/release_heldout.jsonl   # the tuning picks (tint --pick-out), ops without flags
    # the same release with no keywords: let go once the answer's own component along the concept, at the
    # steering layer before the edit, reaches kappa x the strength (one run per kappa; rows say projK*100)
    nice -n 10 .venv/bin/python benchmarks/eval_adaptive.py release -- --set tuning --every 3 \
        --per-concept benchmarks/base_settings.json --flags answer release proj40 --kappa 0.4 \
        --fractions 1.5 2.0 2.5 3.0 --out benchmarks/results/release_proj_tuning_every3.jsonl
    .venv/bin/python benchmarks/eval_adaptive.py levels benchmarks/results/release_tuning_every3.jsonl   # how sure a detector
    nice -n 10 .venv/bin/python benchmarks/eval_adaptive.py prompted --set tuning --every 3 \
        --out benchmarks/results/prompted_tuning_every3.jsonl
    nice -n 10 .venv/bin/python benchmarks/eval_adaptive.py prompted --set heldout --out benchmarks/results/prompted_heldout.jsonl
    .venv/bin/python benchmarks/eval_quality.py tint benchmarks/results/prompted_*.jsonl --keep-incomplete
    # the release changes nothing before the first mention (against answer-only rows at the same strengths):
    .venv/bin/python benchmarks/eval_adaptive.py check benchmarks/results/release_tuning_every3.jsonl \
        benchmarks/results/answer_strong_tuning_every3.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from llm_steering import calibrate, steering
from llm_steering.steering import SteeringComponent

import eval_quality
import torch
from sweep_vectors import KEYWORDS, first_mention, mentions

# What the unsteered model is asked, per concept: a topic to mention, or a style to answer in.
TOPICS = {"eiffel_tower": "the Eiffel Tower", "cats": "cats", "space": "outer space", "ocean": "the ocean",
          "coffee": "coffee", "dinosaurs": "dinosaurs", "music": "music", "dragons": "dragons"}
STYLES = {"pirate": "like a pirate", "shakespeare": "in the style of Shakespeare"}


def asked_chat(prompt: str, concept: str, how: str) -> list[dict]:
    """The chat that asks for the concept: "user" adds one sentence after the question, "system" says it
    in the system prompt."""
    if concept in STYLES:
        user_line, system = f"Answer {STYLES[concept]}.", f"You are a helpful assistant who always answers {STYLES[concept]}."
    else:
        topic = TOPICS[concept]
        user_line, system = f"In your answer, mention {topic}.", f"You are a helpful assistant who loves {topic} and brings {topic} into every answer."
    if how == "user":
        return [{"role": "system", "content": eval_quality.SYSTEM}, {"role": "user", "content": f"{prompt}\n\n{user_line}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def released_once_mentioned(tokenizer: Any, kappa: float | None = None):
    """calibrate.row_steering, answer-only, with each row let go once its answer mentions the row's concept
    (the components' name). The answer so far is read in a pre-hook on the embeddings (each decode pass
    feeds the newest token), up to its last space, so a word still being written ("cat" of "category")
    does not count; from the pass that feeds the token after the mention, the row is unsteered.

    With `kappa`, no keywords: a row is let go at the first answer position whose own component along
    the concept (at the steering layer, before the edit) reaches kappa x the component's strength. That
    reads only the residual stream, so it is the form a `SteeringComponent` op could take on every
    backend (SAE features have no keywords). Before the edit, a position's component at the steering
    layer depends on the text so far, not on the earlier edits (they act on later layers only)."""

    @contextlib.contextmanager
    def row_steering(model: Any, rows: Sequence[Sequence[SteeringComponent]], steer_prompt: bool = True) -> Iterator[None]:
        if steer_prompt and any(rows):
            raise ValueError("release is for answer-only rows: give --flags answer release")
        owner = threading.get_ident()
        concepts = [comps[0].name if comps else None for comps in rows]
        answer: list[list[int]] = [[] for _ in rows]
        released = [c is None for c in concepts]
        passes = [0]

        def read_answer(module: Any, args: Any) -> None:
            if threading.get_ident() != owner:
                return
            ids = args[0]
            passes[0] += 1
            if passes[0] == 1:  # the prompt pass
                return
            for b in range(ids.shape[0]):
                answer[b].append(int(ids[b, -1]))
                if not released[b] and kappa is None:
                    text = tokenizer.decode(answer[b], skip_special_tokens=True)
                    released[b] = mentions(text[: text.rfind(" ")], concepts[b])

        _, layers = steering.decoder_layers(model)
        by_layer = calibrate.rows_by_layer(model, rows)

        def hook_for(per_row):
            def hook(module: Any, args: Any, output: Any) -> Any:
                if threading.get_ident() != owner or passes[0] <= 1:
                    return None
                hidden = steering.layer_hidden(output)
                if kappa is not None:
                    for b, (comps, vecs) in enumerate(per_row[: hidden.shape[0]]):
                        if comps and not released[b]:
                            released[b] = float(hidden[b, -1].float() @ vecs[0].float()) >= kappa * comps[0].strength
                parts = [steering.steer_hidden(hidden[b : b + 1], comps, vecs) if comps and not released[b] else hidden[b : b + 1]
                         for b, (comps, vecs) in enumerate(per_row[: hidden.shape[0]])]
                return steering.with_hidden(output, torch.cat(parts, dim=0))

            return hook

        reader = model.get_input_embeddings().register_forward_pre_hook(read_answer)
        try:
            with steering.forward_hooks((layers[L], hook_for(p)) for L, p in by_layer.items()):
                yield
        finally:
            reader.remove()

    return row_steering


def cmd_release(rest: list[str]) -> None:
    kappa = None
    if "--kappa" in rest:  # ours, not eval_quality run's
        i = rest.index("--kappa")
        kappa = float(rest[i + 1])
        del rest[i : i + 2]
        if f"proj{round(kappa * 100)}" not in rest:
            sys.exit(f"add proj{round(kappa * 100)} to --flags, so the rows say which threshold made them")
    if "release" not in rest:
        sys.exit("add release to --flags, so the rows say how they were made")
    load = steering.load_model

    def load_model(*a: Any, **k: Any):  # eval_quality's run loads the model; keep its tokenizer for the hook
        model, tok = load(*a, **k)
        calibrate.row_steering = released_once_mentioned(tok, kappa)  # generate_rows looks it up at call time
        return model, tok

    steering.load_model = load_model
    sys.argv = [sys.argv[0], "run", *rest]
    eval_quality.main()


def cmd_prompted(args: argparse.Namespace) -> None:
    model, tok = steering.load_model()
    prompts = eval_quality.load_prompts(args.set)
    if args.every > 1 or args.offset:
        prompts = prompts[args.offset :: args.every]
    concepts = args.concepts or list(KEYWORDS)
    probe_set = steering.load_vectors(eval_quality.PROBE_FILE)
    stacked = torch.stack([probe_set.get(c).vector for c in KEYWORDS])
    jobs = [(None, None, p) for p in prompts] + [(c, how, p) for p in prompts for c in concepts for how in ("user", "system")]
    print(f"{len(jobs)} answers, {len(prompts)} prompts, set {args.set}", file=sys.stderr, flush=True)
    out = open(args.out, "a")
    t0 = time.time()
    for start in range(0, len(jobs), args.batch_size):
        part = jobs[start : start + args.batch_size]
        asked = [eval_quality.chat(p) if c is None else asked_chat(p, c, how) for c, how, p in part]
        plain = [eval_quality.chat(p) for _, _, p in part]
        ans = calibrate.generate_rows(model, tok, asked, [[] for _ in part], eval_quality.MAX_NEW_TOKENS,
                                      eval_quality.REPETITION_PENALTY, batch_size=args.batch_size)
        nlls, projs = calibrate.answer_nll(model, tok, plain, ans, args.batch_size, probe={eval_quality.PROBE_LAYER: stacked.T})
        for (c, how, p), a, nll, pr in zip(part, ans, nlls, projs, strict=True):
            proj = dict(zip(KEYWORDS, pr[eval_quality.PROBE_LAYER], strict=True))
            out.write(json.dumps({"set": args.set, "concept": c, "variant": None if c is None else f"prompted-{how}",
                                  "fraction": 0.0, "prompt": p, "layer": None, "text": tok.decode(a, skip_special_tokens=True),
                                  "n_tokens": len(a), "nll": nll, "probe": proj, "vectors": "none (asked)"}) + "\n")
        out.flush()
        print(f"  {start + len(part)}/{len(jobs)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def cmd_check(args: argparse.Namespace) -> None:
    """Release rows against plain answer-only rows of the same concept, strength and prompt: where the plain
    answer never mentions the concept the two must be equal; where it does, they must agree up to its first
    mention (the release changes nothing before it)."""
    plain = {(r["concept"], round(r["fraction"], 4), r["prompt"]): r["text"] for r in map(json.loads, open(args.answer_only))
             if r["concept"] and r["variant"].endswith("+answer")}
    n = equal = prefix = 0
    for r in map(json.loads, open(args.release)):
        a = plain.get((r["concept"], round(r["fraction"], 4), r["prompt"])) if r["concept"] else None
        if a is None:
            continue
        n += 1
        b = r["text"]
        start = first_mention(a, r["concept"])
        if start is None:
            equal += a == b
            continue
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix += common >= start
    print(f"{n} answers with an answer-only twin: {equal} of the twins that never mention the concept are equal, "
          f"{prefix} of those that do agree up to the first mention ({n - equal - prefix} break the rule)")
    if n == 0 or equal + prefix != n:
        sys.exit(1)


def cmd_levels(args: argparse.Namespace) -> None:
    """How well the concept's own component finds a mention: on keyword-release rows (every `--every`-th), the
    answer is fed back through the unsteered model, and at the steering layer (before any edit, where a
    position's component depends on the text alone) its component along the concept is read per answer
    token, as a multiple of the row's strength. Printed per concept: the highest value in the three tokens
    up to the first mention, the highest before them, and the highest in answers that never mention it."""
    model, tok = steering.load_model()
    vset = steering.load_vectors(eval_quality.ROOT / "steering_vectors.pt")
    norms = {int(L): float(n) for L, n in vset.layer_norms.items()}
    rows = [r for r in map(json.loads, open(args.release)) if r["concept"]][:: args.every]
    seen: dict[str, dict[str, list[float]]] = {c: {"at": [], "before": [], "never": []} for c in KEYWORDS}
    for r in rows:
        c, layer = r["concept"], vset.get(r["concept"]).layer
        comp = SteeringComponent(layer, vset.get(c).vector, strength=r["fraction"] * norms[layer])
        prompt = tok.apply_chat_template(eval_quality.chat(r["prompt"]), add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]
        answer = tok(r["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(torch.cat([prompt, answer], 1), output_hidden_states=True).hidden_states[layer + 1]
        level = (hidden[0, prompt.shape[1]:].float() @ comp.vector) / comp.strength
        first = next((i for i in range(answer.shape[1]) if mentions(tok.decode(answer[0, : i + 1]), c)), None)
        if first is None:
            seen[c]["never"].append(float(level.max()))
        else:
            seen[c]["at"].append(float(level[max(0, first - 2) : first + 1].max()))
            seen[c]["before"].append(float(level[: max(1, first - 2)].max()))

    def median(xs: list[float]) -> str:
        return f"{sorted(xs)[len(xs) // 2]:.2f} (n={len(xs)})" if xs else "-"

    print("| concept | at the first mention | before it | answers that never mention it |\n|---|---|---|---|")
    for c, d in seen.items():
        print(f"| `{c}` | {median(d['at'])} | {median(d['before'])} | {median(d['never'])} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "release":
        cmd_release([a for a in sys.argv[2:] if a != "--"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("release", help="answer-only steering let go once the answer mentions its concept (eval_quality run's options)")
    pr = sub.add_parser("prompted", help="the unsteered model asked to bring the concept in")
    pr.add_argument("--set", default="tuning")
    pr.add_argument("--every", type=int, default=1)
    pr.add_argument("--offset", type=int, default=0)
    pr.add_argument("--concepts", nargs="+")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--out", required=True)
    chk = sub.add_parser("check", help="release rows agree with answer-only rows up to the first mention")
    chk.add_argument("release")
    chk.add_argument("answer_only")
    lv = sub.add_parser("levels", help="the concept's pre-edit component (x strength) at first mentions and in answers without one")
    lv.add_argument("release")
    lv.add_argument("--every", type=int, default=3, help="read every n-th steered row")
    args = parser.parse_args()
    {"prompted": cmd_prompted, "check": cmd_check, "levels": cmd_levels}[args.cmd](args)


if __name__ == "__main__":
    main()
