"""Issue 21's dose over the answer, measured: steer only the first N answer tokens, then let go.

Answer-only steering at 2-3x the strength tinted best so far (docs/quality.md), but it pushes on
every answer token, and fluency is what it loses. Here the prompt is left alone (the model starts
on the question), the push acts on the first N answer tokens only, and the rest of the answer is
unsteered (what the model says next follows from what it has written). The window is a position
rule, so it could be a `SteeringComponent` field on every backend; this script measures it first,
with eval_quality's own run (same prompts, settings, rows and JSONL), only the hooks windowed.

    nice -n 10 .venv/bin/python benchmarks/eval_window.py --first 12 -- --set tuning --every 3 \
        --per-concept benchmarks/base_settings.json --flags answer first12 --fractions 2.0 3.0 \
        --out benchmarks/results/window_tuning_every3.jsonl
    .venv/bin/python benchmarks/eval_quality.py tint benchmarks/results/window_tuning_every3.jsonl --keep-incomplete --curves
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from llm_steering import calibrate, steering
from llm_steering.steering import SteeringComponent

import eval_quality
import torch


def windowed_row_steering(first: int):
    """calibrate.row_steering with the prompt pass left alone and only the first `first` answer tokens'
    passes steered (pass j >= 1 edits the position that predicts answer token j)."""

    @contextlib.contextmanager
    def row_steering(model: Any, rows: Sequence[Sequence[SteeringComponent]], steer_prompt: bool = True) -> Iterator[None]:
        if steer_prompt and any(rows):
            raise ValueError("the window is for answer-only rows: give --flags answer")
        owner = threading.get_ident()
        _, layers = steering.decoder_layers(model)
        by_layer = calibrate.rows_by_layer(model, rows)

        def hook_for(per_row):
            seen = [0]

            def hook(module: Any, args: Any, output: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                j = seen[0]
                seen[0] += 1
                if j == 0 or j > first:  # the prompt pass, or past the window
                    return None
                hidden = steering.layer_hidden(output)
                parts = [steering.steer_hidden(hidden[b : b + 1], comps, vecs) if comps else hidden[b : b + 1]
                         for b, (comps, vecs) in enumerate(per_row[: hidden.shape[0]])]
                return steering.with_hidden(output, torch.cat(parts, dim=0))

            return hook

        with steering.forward_hooks((layers[L], hook_for(p)) for L, p in by_layer.items()):
            yield

    return row_steering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, required=True, help="answer tokens steered")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if f"first{args.first}" not in rest:
        parser.error(f"add first{args.first} to --flags, so the rows say which window made them")
    calibrate.row_steering = windowed_row_steering(args.first)  # generate_rows looks it up at call time
    sys.argv = [sys.argv[0], "run", *rest]
    eval_quality.main()


if __name__ == "__main__":
    main()
