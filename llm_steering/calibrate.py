"""A steering strength that finds itself: try several strengths in one batched generation, keep the strongest that stays fluent.

    import steering, calibrate
    model, tok = steering.load_model()
    vectors = steering.load_vectors("steering_vectors.pt")
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How do I boil an egg?"}]
    cal = calibrate.calibrate_strength(model, tok, chat, vectors.component("pirate", 1.0, op="clamp"),
                                       norm=vectors.norm(vectors.get("pirate").layer))
    cal.fraction, cal.strength, cal.answer     # the chosen strength (fraction of the norm, absolute) and its answer
    cal.table                                  # one CalibrationRow per strength tried (0 = unsteered)

Each row of the batch is the same chat steered at its own strength (a forward hook edits row i
with `steering.steer_hidden` and row i's components, so row i is the single-request steering
at that strength). Each answer's negative log-likelihood per token under the unsteered model,
divided by that of the unsteered answer (row 0), is its NLL ratio; the chosen strength is the
strongest whose ratio is at most `nll_bound` and whose rep3 is below `max_rep3`.
Greedy decoding only: candidates are compared on their deterministic answers.

`generate_rows` and `answer_nll` are the batched pieces, also used by benchmarks/eval_quality.py
(rows may hold different chats, left-padded, and different steering).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from llm_steering import steering  # before torch: it sets PyTorch's OpenMP wait policy
from llm_steering.steering import SteeringComponent

import torch

DEFAULT_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
DEFAULT_MULTIPLIERS = (0.6, 0.85, 1.1)  # of a feature's default fraction: the grid evaluated in benchmarks/eval_quality.py
DEFAULT_NLL_BOUND = 2.5  # per answer; chosen on the tuning prompts (1.8, 2.0, 2.2, 2.5, 3.0 replayed), see the README


def candidate_fractions(default_fraction: float, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS) -> list[float]:
    """The strengths "auto" tries for a feature whose default is `default_fraction` (fractions of the norm)."""
    return [round(m * default_fraction, 4) for m in multipliers]


@dataclass(frozen=True)
class CalibrationRow:
    """One strength tried: `fraction` x norm = `strength` (0 = the unsteered reference row)."""

    fraction: float
    strength: float
    nll: float          # mean NLL per answer token under the unsteered model
    nll_ratio: float    # nll / the unsteered answer's nll
    rep3: float         # fraction of repeated word 3-grams
    answer: str
    within_bound: bool


@dataclass(frozen=True)
class Calibration:
    """The result of `calibrate_strength`: the chosen strength, its answer, and every row tried."""

    fraction: float     # chosen fraction (0.0 when no steered strength stayed within the bound)
    strength: float     # chosen absolute strength = fraction x norm
    answer: str         # the answer generated at the chosen strength (the unsteered one when fraction is 0)
    nll_ratio: float
    table: tuple[CalibrationRow, ...]
    seconds: float      # wall time of the whole calibration (generation + scoring)

    @property
    def found(self) -> bool:
        """True when a steered strength (not only the unsteered row) kept within the bound."""
        return self.fraction > 0


def calibrate_strength(
    model: Any,
    tokenizer: Any,
    chat: Sequence[dict],
    component: SteeringComponent,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    norm: float = 1.0,
    nll_bound: float = DEFAULT_NLL_BOUND,
    max_rep3: float = 0.2,
    other_components: Sequence[SteeringComponent] = (),
    max_new_tokens: int = 48,
    repetition_penalty: float = 1.1,
    steer_prompt: bool = True,
) -> Calibration:
    """Generate `chat` once per strength in one batch; return the strongest within `nll_bound`.

    `component` is the feature to calibrate; its strength is replaced by fraction x `norm` for
    each of `fractions` (for op "cap", cap_min is: the one-sided clamp). `norm` is the layer's
    typical residual norm (`vectors.norm(layer)`) so fractions are in the app's slider units;
    leave it at 1.0 to pass absolute strengths. `other_components` are applied unchanged in every
    row, the unsteered reference row included (other features switched on at fixed strengths).
    The reference row (fraction 0) is always generated: its answer's NLL is the denominator.

        >>> cal = calibrate_strength(model, tok, chat, vectors.component("pirate", 1.0, op="clamp"), norm=172.0)
        >>> cal.fraction, cal.answer
    """
    if not fractions:
        raise ValueError("fractions is empty: give at least one strength to try, e.g. (0.1, 0.2, 0.3)")
    if not (nll_bound >= 1.0):
        raise ValueError(f"nll_bound must be at least 1.0 (the unsteered answer's ratio), got {nll_bound!r}")
    if any(not (f >= 0) for f in fractions):
        raise ValueError(f"fractions must be positive (strengths along the feature), got {list(fractions)!r}")
    if not (norm > 0):
        raise ValueError(f"norm must be positive, got {norm!r}")
    t0 = time.perf_counter()
    fracs = [0.0] + sorted({float(f) for f in fractions if f != 0})
    others = list(other_components)
    rows = [others + ([] if f == 0 else [with_strength(component, f * norm)]) for f in fracs]
    steering.validate_components(model, [*others, component])
    answers = generate_rows(model, tokenizer, [chat] * len(rows), rows, max_new_tokens=max_new_tokens,
                            repetition_penalty=repetition_penalty, steer_prompt=steer_prompt)
    nlls = answer_nll(model, tokenizer, [chat] * len(rows), answers)
    base = nlls[0]
    table = []
    for f, ids, nll in zip(fracs, answers, nlls, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ratio = 1.0 if f == 0 else nll / base if base > 0 else float("inf")
        r3 = rep3(text)
        ok = f == 0 or (ratio <= nll_bound and r3 < max_rep3)
        table.append(CalibrationRow(f, f * norm, nll, ratio, r3, text, ok))
    best = max((r for r in table if r.within_bound), key=lambda r: r.fraction)
    return Calibration(best.fraction, best.strength, best.answer, best.nll_ratio, tuple(table), time.perf_counter() - t0)


def with_strength(component: SteeringComponent, strength: float) -> SteeringComponent:
    """The component at another strength (cap: cap_min = strength, a one-sided clamp from below)."""
    if component.op == "cap":
        return replace(component, cap_min=strength, cap_max=None)
    if component.op == "ablate":
        raise ValueError("an ablate component has no strength to calibrate: use add, clamp or cap")
    return replace(component, strength=strength)


def rep3(text: str) -> float:
    """Fraction of repeated word 3-grams (1 - unique/total); above about 0.2 means trouble."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


# ---------------------------------------------------------------------------
# Batched generation, each row with its own steering
# ---------------------------------------------------------------------------


def rows_by_layer(model: Any, rows: Sequence[Sequence[SteeringComponent]]) -> dict[int, list[tuple[list[SteeringComponent], list[torch.Tensor]]]]:
    """{layer: for each batch row, (its components at that layer, their vectors on the model's device and dtype)}."""
    param = next(model.parameters())
    by_layer: dict[int, list[tuple[list[SteeringComponent], list[torch.Tensor]]]] = {}
    for b, comps in enumerate(rows):
        for c in comps:
            per_row = by_layer.setdefault(c.layer, [([], []) for _ in rows])
            per_row[b][0].append(c)
            per_row[b][1].append(c.vector.to(device=param.device, dtype=param.dtype))
    return by_layer


@contextmanager
def row_steering(model: Any, rows: Sequence[Sequence[SteeringComponent]], steer_prompt: bool = True) -> Iterator[None]:
    """Forward hooks that steer batch row b with rows[b] (a list of components; empty = unsteered).

    Row b's edit is `steering.steer_hidden` on that row alone, with its components in order,
    exactly as a single request does. `steer_prompt=False` leaves the prompt pass (the first
    forward, which holds every prompt position of the left-padded batch) alone, like
    steer_prompt=False in steering's generation functions. The hooks act only in the thread
    that entered the block (other requests on the same model are left alone) and are removed
    on exit.
    """
    owner = threading.get_ident()
    _, layers = steering.decoder_layers(model)
    by_layer = rows_by_layer(model, rows)

    def hook_for(per_row: list[tuple[list[SteeringComponent], list[torch.Tensor]]]):
        seen = [0]

        def hook(module: Any, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None  # another request's forward pass on the same model
            hidden = steering.layer_hidden(output)  # [batch, seq, d_model]
            first_pass = seen[0] == 0
            seen[0] += 1
            if first_pass and not steer_prompt:
                return None
            parts = [steering.steer_hidden(hidden[b : b + 1], comps, vecs) if comps else hidden[b : b + 1]
                     for b, (comps, vecs) in enumerate(per_row[: hidden.shape[0]])]
            return steering.with_hidden(output, torch.cat(parts, dim=0))

        return hook

    with steering.forward_hooks((layers[L], hook_for(per_row)) for L, per_row in by_layer.items()):
        yield


def generate_rows(model: Any, tokenizer: Any, chats: Sequence[Sequence[dict]], rows: Sequence[Sequence[SteeringComponent]],
                  max_new_tokens: int = 48, repetition_penalty: float = 1.1, steer_prompt: bool = True,
                  batch_size: int = 64) -> list[list[int]]:
    """Greedy answers (token ids, cut at EOS) for chats[b] steered by rows[b], in left-padded batches."""
    from transformers import GenerationConfig

    if len(chats) != len(rows):
        raise ValueError(f"{len(chats)} chats but {len(rows)} rows of steering: give one per chat")
    eos = steering.eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                              repetition_penalty=repetition_penalty, pad_token_id=pad, eos_token_id=eos,
                              bos_token_id=getattr(model.generation_config, "bos_token_id", None))
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(chats), batch_size):
        chunk = [steering.chat_input_ids(tokenizer, c) for c in chats[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with row_steering(model, rows[start : start + batch_size], steer_prompt), torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def answer_nll(model: Any, tokenizer: Any, chats: Sequence[Sequence[dict]], answers: Sequence[list[int]],
               batch_size: int = 64, probe: dict[int, torch.Tensor] | None = None) -> list[float] | tuple[list[float], list[dict[int, float]]]:
    """Mean NLL per answer token of answers[b] after chats[b] under the unsteered model (right-padded batches).

    With `probe` ({layer: unit vector [d] or matrix [d, k]}), also return, per answer, the mean
    projection of the answer's hidden states after each layer on it (a float, or k floats), from
    the same forward pass."""
    device = next(model.parameters()).device
    base, head = steering.base_model(model), steering.unembedding(model)  # model.model and lm_head for a Llama
    nlls: list[float] = []
    projs: list[dict[int, float]] = []
    for start in range(0, len(chats), batch_size):
        pids = [steering.chat_input_ids(tokenizer, c) for c in chats[start : start + batch_size]]
        seqs = [p + list(a) for p, a in zip(pids, answers[start : start + batch_size], strict=True)]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.inference_mode():
            out = base(input_ids=ids, attention_mask=mask, output_hidden_states=probe is not None)
            last = out.last_hidden_state  # [batch, seq, d_model]
            for b, (p, s) in enumerate(zip(pids, seqs, strict=True)):
                n = len(s) - len(p)
                if n == 0:
                    nlls.append(float("nan"))
                else:
                    # logits only where an answer token is predicted (the full [seq, vocab] is most of the cost)
                    logp = head(last[b, len(p) - 1 : len(s) - 1]).float().log_softmax(-1)  # [n, vocab]
                    targets = torch.tensor(s[len(p) :], device=device)
                    nlls.append(float(-logp.gather(-1, targets[:, None]).mean()))
                if probe is not None:
                    # hidden_states[L + 1] is the output of decoder layer L; answer positions only
                    projs.append({L: (out.hidden_states[L + 1][b, len(p) : len(s)].float() @ v.to(device)).mean(0).tolist()
                                  if n else float("nan") for L, v in probe.items()})
    return (nlls, projs) if probe is not None else nlls
