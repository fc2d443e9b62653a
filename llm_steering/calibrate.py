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

import functools
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


# ---------------------------------------------------------------------------
# Auto: a way of steering chosen for each prompt, aimed at an answer that still answers
# ---------------------------------------------------------------------------
#
# The feature's default is one dose for every prompt; the right one differs from prompt to prompt
# (docs/quality.md). `auto_answer` generates the same chat under several ways of steering as rows of
# one batch (several strengths of the feature's op, the other op, answer-only steering, the release:
# answer-only steering let go once the answer says one of the steering's own words, and the unsteered
# answer), reads each candidate without any keyword list, and keeps the one that best carries the
# concept while it still answers.

AUTO_PROMPT_MULTIPLIERS = (0.6, 1.0, 1.4, 1.8)  # the feature's op, prompt steered, x its default strength
AUTO_OTHER_OP_MULTIPLIERS = (1.0,)              # the other op (add <-> clamp), prompt steered
AUTO_RELEASE_MULTIPLIERS = (2.0, 3.0, 4.0)      # answer-only, let go at the first word of the concept (until then
                                                # the same answer as answer-only steering, which is not tried apart)
AUTO_LEARNED_MULTIPLIERS = (1.0, 0.6, 1.4, 1.1, 1.2)  # a learned direction shipped beside the feature's vector, prompt steered
AUTO_LEARNED_RELEASE_MULTIPLIERS = (2.0, 3.0)   # with one: the release rows kept (chosen on tuning; the ten rows)
AUTO_LEARNED_OP_MULTIPLIERS = (1.1,)            # with one: the feature's own op just past x1 too (the ten rows: the
                                                # seven and the finer doses chosen on tuning, docs/quality.md)
LEARNED_SUFFIX = "_learned"                     # its name in the vectors file: "<feature>_learned"
AUTO_JUDGE_TOKENS = 48                          # candidates are compared on their first tokens
AUTO_LET_GO = True                              # after the judged tokens the chosen steering lets go (docs/quality.md)
AUTO_NLL_BOUND = 3.0                            # x the unsteered answer's NLL (past it a candidate reads broken)
AUTO_CONCEPT_WORDS = 24                         # how many of the steering's own top tokens count as its words


@dataclass(frozen=True)
class Candidate:
    """One way of steering an answer that auto tries. `components` are the feature's (the request's
    other features are added by auto_answer); `multiplier` is of the feature's default strength (0 =
    unsteered). `steer_prompt=False` steers the answer only; `release` lets go of the steering from the
    first token that is one of the steering's own words (lens.concept_token_ids) on."""

    label: str
    components: tuple[SteeringComponent, ...] = ()
    steer_prompt: bool = True
    release: bool = False
    multiplier: float = 0.0
    vector: str | None = None  # the vector steered when it is not the feature's own: a learned direction's name


def other_op(op: str) -> str:
    """add <-> clamp (keeping a _keepnorm suffix); cap -> clamp."""
    base, suffix = (op[: -len("_keepnorm")], "_keepnorm") if op.endswith("_keepnorm") else (op, "")
    return {"add": "clamp", "clamp": "add", "cap": "clamp"}.get(base, base) + suffix


def auto_candidates(component: SteeringComponent, max_multiplier: float | None = None,
                    learned: Any = None) -> list[Candidate]:
    """The candidates auto compares for `component` at its default strength and op (unsteered first); with
    `max_multiplier`, those that would take it past that many times its strength are left out (the app's and
    the console's strength range: a setting they could not show or apply again is never chosen).

    With `learned` (a SteeringVector: the direction learned for this feature, `learned_direction`), the ten
    rows chosen on the tuning prompts: unsteered, the op x1, the release x2 and x3, the learned direction x1,
    x0.6, x1.4, x1.1 and x1.2 (same op, prompt steered), and the op x1.1 (the right dose is often just past
    the default, and differs from prompt to prompt); without, the nine: the op x0.6-x1.8, the other op x1,
    the release x2-x4 (docs/quality.md)."""
    if component.op == "ablate":
        raise ValueError("an ablate component has no strength to choose: use add, clamp or cap")
    s = component.cap_min if component.op == "cap" else component.strength
    if not (s == s) or s == 0:
        raise ValueError(f"auto needs the feature at a nonzero default strength, got {s!r}")
    out = [Candidate("unsteered")]
    if learned is not None and component.op != "cap":
        if learned.layer != component.layer or learned.vector.numel() != component.vector.numel():
            raise ValueError(f"the learned direction {learned.name!r} is at layer {learned.layer} with "
                             f"{learned.vector.numel()} values; the feature is at layer {component.layer}")
        out.append(Candidate(f"{component.op} x1", (component,), multiplier=1.0))
        out += [Candidate(f"{component.op} x{m:g}, answer only until it names the concept", (with_strength(component, m * s),),
                          steer_prompt=False, release=True, multiplier=m) for m in AUTO_LEARNED_RELEASE_MULTIPLIERS]
        out += [Candidate(f"{component.op} x{m:g}, learned direction",
                          (replace(component, vector=learned.vector, strength=m * s, name=learned.name),),
                          multiplier=m, vector=learned.name) for m in AUTO_LEARNED_MULTIPLIERS]
        out += [Candidate(f"{component.op} x{m:g}", (with_strength(component, m * s),), multiplier=m)
                for m in AUTO_LEARNED_OP_MULTIPLIERS]
        return [c for c in out if max_multiplier is None or c.multiplier <= max_multiplier + 1e-9]
    out += [Candidate(f"{component.op} x{m:g}", (with_strength(component, m * s),), multiplier=m) for m in AUTO_PROMPT_MULTIPLIERS]
    alt = other_op(component.op)
    out += [Candidate(f"{alt} x{m:g}", (with_strength(component.with_op(alt) if component.op != "cap" else
                                                     replace(component, op=alt, strength=s, cap_min=None, cap_max=None), m * s),),
                      multiplier=m) for m in AUTO_OTHER_OP_MULTIPLIERS]
    out += [Candidate(f"{component.op} x{m:g}, answer only until it names the concept", (with_strength(component, m * s),),
                      steer_prompt=False, release=True, multiplier=m) for m in AUTO_RELEASE_MULTIPLIERS]
    if max_multiplier is not None:
        out = [c for c in out if c.multiplier <= max_multiplier + 1e-9]
    return out


@functools.cache
def _shipped_vectors() -> Any:
    from llm_steering.vectors import load_vectors

    return load_vectors()


def learned_direction(component: SteeringComponent, vectors: Any = None) -> Any:
    """The direction learned for `component`'s feature (a SteeringVector named "<feature>_learned" whose
    metadata says `learned_for`), from `vectors` (a SteeringVectorSet; default the embedded model's shipped
    file), or None. Found by the vector itself: only a component that steers the very vector of that feature
    (same layer, cosine above 0.9999) gets it, whatever it is called; a user's own concept or another file's
    vector gets None."""
    vectors = _shipped_vectors() if vectors is None else vectors
    v = component.vector.detach().to(device="cpu", dtype=torch.float32).flatten()
    for cand in vectors.vectors:
        target = cand.metadata.get("learned_for")
        if not isinstance(target, str) or cand.layer != component.layer or cand.vector.numel() != v.numel():
            continue
        base = next((b for b in vectors.vectors if b.name == target), None)
        if base is not None and base.layer == cand.layer and float(torch.dot(base.vector, v) / v.norm().clamp_min(1e-12)) > 0.9999:
            return cand
    return None


@dataclass
class _Row:
    """A batch row's steering: `parts` of (components, their vectors, first steered position, release)."""

    parts: list[tuple[list[SteeringComponent], list[torch.Tensor], int, bool]]
    stop: int | None = None  # positions from here on are unsteered (released), for parts with release
    released: bool = False


@contextmanager
def scheduled_steering(model: Any, rows: Sequence[_Row], release_ids: frozenset[int] | Sequence[frozenset[int]] = frozenset()
                       ) -> Iterator[None]:
    """Forward hooks for one generate call: batch row b is steered by rows[b]'s parts, each from its
    first position on (positions count from the first column of the left-padded batch), a releasing
    part only until the row feeds a token in `release_ids` (from that pass on, unsteered; a row may also
    arrive released, with `stop`). `release_ids` is one set for every row, or one per row. Same
    thread-ownership rule as `row_steering`."""
    per_row = [release_ids] * len(rows) if isinstance(release_ids, (set, frozenset)) else list(release_ids)
    owner = threading.get_ident()
    emb, layers = steering.base_model(model).embed_tokens, steering.decoder_layers(model)[1]
    span = [0, 0]  # the positions of the current pass: [start, end)

    def read(module: Any, args: Any) -> None:
        if threading.get_ident() != owner:
            return
        ids = args[0]
        span[0], span[1] = span[1], span[1] + ids.shape[1]
        if span[0] == 0:
            return
        for b, row in enumerate(rows[: ids.shape[0]]):
            if not row.released and any(p[3] for p in row.parts) and int(ids[b, -1]) in per_row[b]:
                row.released, row.stop = True, span[0]

    def hook_for(layer: int):
        def hook(module: Any, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            hidden = steering.layer_hidden(output)
            parts = []
            for b in range(hidden.shape[0]):
                h = hidden[b : b + 1]
                for comps, vecs, start, releasing in (rows[b].parts if b < len(rows) else ()):
                    mine = [(c, v) for c, v in zip(comps, vecs, strict=True) if c.layer == layer]
                    if not mine:
                        continue
                    end = rows[b].stop if releasing and rows[b].stop is not None else None
                    if end is not None and end <= span[0]:
                        continue
                    cut = h.shape[1] if end is None else end - span[0]
                    head = steering.steer_hidden(h[:, :cut], [c for c, _ in mine], [v for _, v in mine],
                                                 steer_from=start, start_pos=span[0])
                    h = head if cut == h.shape[1] else torch.cat([head, h[:, cut:]], dim=1)
                parts.append(h)
            return steering.with_hidden(output, torch.cat(parts, dim=0))

        return hook

    used = sorted({c.layer for row in rows for comps, *_ in row.parts for c in comps})
    pre = emb.register_forward_pre_hook(read)
    try:
        with steering.forward_hooks((layers[L], hook_for(L)) for L in used):
            yield
    finally:
        pre.remove()


def _vectors(model: Any, comps: Sequence[SteeringComponent]) -> list[torch.Tensor]:
    param = next(model.parameters())
    return [c.vector.to(device=param.device, dtype=param.dtype) for c in comps]


@dataclass(frozen=True)
class AutoRow:
    """One candidate as auto read it: its answer (first `judge` tokens) and the signals, none of them a keyword."""

    candidate: Candidate
    token_ids: tuple[int, ...]
    text: str
    nll: float            # mean NLL per token under the unsteered model
    nll_ratio: float      # / the unsteered answer's
    rep3: float
    on_question: bool     # the answer has a content word of the question
    concept_words: int    # how many of its tokens are the steering's own words (lens.concept_token_ids)
    released_at: int | None  # the answer token where a release let go
    concept_score: float = 0.0  # the most any of its tokens is raised by the steering (lens.steering_scores, nats)


@dataclass(frozen=True)
class AutoAnswer:
    """`auto_answer`'s result: the answer, the candidate chosen, and every candidate as read."""

    answer: str
    token_ids: tuple[int, ...]
    chosen: Candidate
    table: tuple[AutoRow, ...]
    seconds: float
    judge_seconds: float   # until the candidates were compared (the first words can show from here)
    let_go_at: int | None = None  # the answer token from which the chosen steering was let go (after the judged words)

    @property
    def label(self) -> str:
        """The chosen way of steering, as an answer's tag says it: "clamp x1.4", "unsteered"."""
        return self.chosen.label


STOP_WORDS = frozenset("""a an the and or but if then so of to in on at by for with from about into over under as is are was
were be been being do does did how what when where which who whom why can could should would will shall may might must i me
my you your we our they their it its this that these those there here some any few more most other such no not only own same
than too very just also give make write tell explain short simple good best way ways tips three things need want like""".split())


def content_stems(text: str) -> set[str]:
    """Content words by their first five letters: an answer that answers repeats some of the question's."""
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in STOP_WORDS}


def pick_candidate(rows: Sequence[AutoRow], nll_bound: float = AUTO_NLL_BOUND, max_rep3: float = 0.2) -> int:
    """Auto's choice among the candidates read (an index into rows; rows[0] is the unsteered answer).

    Gates, each about the answer still being an answer: the NLL ratio within `nll_bound`, rep3 below
    `max_rep3`, a content word of the question. Of the candidates that pass, the one with the highest
    concept score (it has a token the steering raises most: the concept named outright, not only
    leaned towards); the unsteered answer when none passes. Chosen on the tuning prompts over a grid
    of gates, signals and rules (docs/quality.md, benchmarks/eval_auto.py)."""
    ok = [i for i, r in enumerate(rows) if i > 0 and r.candidate.components and r.nll_ratio <= nll_bound
          and r.rep3 < max_rep3 and r.on_question]
    return max(ok, key=lambda i: (rows[i].concept_score, -rows[i].nll_ratio), default=0)


def setting_text(op: str | None, multiplier: float, steer_prompt: bool = True, release: bool = False,
                 learned: bool = False, let_go_at: int | None = None) -> str:
    """How auto steered an answer, in the words of its tag ("clamp, 1.4x its default, let go after its first 48
    tokens"); `op` None: the unsteered answer was kept."""
    if op is None:
        return "unsteered: no way of steering kept the answer on the question"
    how = "answer only, let go once it named the concept" if release else "answer only" if not steer_prompt else op
    text = f"{how}{', its learned direction' if learned else ''}, {multiplier:g}x its default"
    return text + (f", let go after its first {let_go_at} tokens" if let_go_at else "")


@dataclass(frozen=True)
class AutoChoice:
    """The candidate auto chose for a chat, from its first `judge` tokens: its index in `table`."""

    index: int
    table: tuple[AutoRow, ...]
    words: frozenset[int]
    judge_tokens: int
    seconds: float

    @property
    def chosen(self) -> Candidate:
        return self.table[self.index].candidate

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.table[self.index].token_ids


def auto_choose(model: Any, tokenizer: Any, chat: Sequence[dict], component: SteeringComponent,
                other_components: Sequence[SteeringComponent] = (), judge_tokens: int = AUTO_JUDGE_TOKENS,
                repetition_penalty: float = 1.1, candidates: Sequence[Candidate] | None = None, picker: Any = None,
                concept_words: frozenset[int] | None = None, cancel: threading.Event | None = None) -> AutoChoice:
    """Generate every candidate for `judge_tokens` tokens in one batch, read them, choose (see auto_answer).
    Setting `cancel` ends the batch at its next token: the choice is then made on the tokens so far."""
    t0 = time.perf_counter()
    others = list(other_components)
    steering.validate_components(model, [*others, component])
    cands = list(candidates) if candidates is not None else auto_candidates(component, learned=learned_direction(component))
    if concept_words is None:
        from llm_steering.lens import concept_token_ids

        concept_words = concept_token_ids(model, tokenizer, component, AUTO_CONCEPT_WORDS)
    words = frozenset(concept_words)
    from llm_steering.lens import cached_steering_scores

    scores = cached_steering_scores(model, tokenizer, component)
    rows, released = generate_candidates(model, tokenizer, chat, cands, others, words, judge_tokens, repetition_penalty,
                                         cancel)
    table = read_candidates(model, tokenizer, chat, cands, rows, released, words, scores)
    choice = (picker or pick_candidate)(table)
    return AutoChoice(choice, tuple(table), words, judge_tokens, time.perf_counter() - t0)


def auto_answer(
    model: Any,
    tokenizer: Any,
    chat: Sequence[dict],
    component: SteeringComponent,
    norm: float = 1.0,
    max_new_tokens: int = 48,
    repetition_penalty: float = 1.1,
    other_components: Sequence[SteeringComponent] = (),
    judge_tokens: int = AUTO_JUDGE_TOKENS,
    candidates: Sequence[Candidate] | None = None,
    picker: Any = None,
    concept_words: frozenset[int] | None = None,
    let_go: bool = AUTO_LET_GO,
) -> AutoAnswer:
    """The steered answer to `chat` with the way of steering chosen for this prompt (greedy).

    `component` is the feature at its default strength and op; `norm` the layer's typical norm (only
    checked: candidates are multiples of the component's own strength). The candidates
    (`auto_candidates`) are generated for `judge_tokens` tokens as rows of one batch, read back by the
    unsteered model (NLL, rep3, the question's words, the steering's own words: no keyword list) and
    compared (`pick_candidate`); the chosen one goes on to `max_new_tokens`, its steering let go after the
    judged tokens unless `let_go` is false (`stream_auto_answer`). `other_components` are
    applied in every row as they are (other switched-on features). `concept_words`: token ids that
    count as the concept's words (default: `lens.concept_token_ids` of the component); `picker`: a
    function of the rows read to the index chosen (default `pick_candidate`).

        >>> out = auto_answer(model, tok, chat, catalog.resolve("ocean").component(0.085), norm=172.0)
        >>> out.answer, out.label
    """
    if not (norm > 0):
        raise ValueError(f"norm must be positive, got {norm!r}")
    stream = stream_auto_answer(model, tokenizer, chat, component, other_components, max_new_tokens,
                                repetition_penalty, judge_tokens=judge_tokens, candidates=candidates, picker=picker,
                                concept_words=concept_words, let_go=let_go)
    for _ in stream:
        pass
    return stream.result


class AutoStream:
    """`stream_auto_answer`'s iterator of text pieces: the judged prefix at once, then the rest as it
    comes. `choice` is set before the first piece; `result` (an AutoAnswer) once it ends."""

    def __init__(self, pieces: Any) -> None:
        self._pieces = pieces
        self.choice: AutoChoice | None = None
        self.result: AutoAnswer | None = None
        self.stopped = False
        self.let_go_at: int | None = None  # set with `choice`: where the chosen steering will be let go, if it is

    def __iter__(self) -> Iterator[str]:
        return self._pieces(self)


def stream_auto_answer(model: Any, tokenizer: Any, chat: Sequence[dict], component: SteeringComponent,
                       other_components: Sequence[SteeringComponent] = (), max_new_tokens: int = 256,
                       repetition_penalty: float = 1.1, temperature: float = 0.0, cancel: threading.Event | None = None,
                       judge_tokens: int = AUTO_JUDGE_TOKENS, candidates: Sequence[Candidate] | None = None,
                       picker: Any = None, concept_words: frozenset[int] | None = None,
                       let_go: bool = AUTO_LET_GO) -> AutoStream:
    """Auto, streamed: choose on the first `judge_tokens` greedy tokens (auto_choose), yield that prefix,
    then go on (sampled at `temperature` after the greedy prefix) and yield the rest as it comes. With
    `let_go` (the default), the chosen steering of `component` is let go from the first token after the
    judged ones (they named the concept; steered on, long answers drift off the question: docs/quality.md,
    "After the judged words"); `other_components` stay on. Without, it goes on steered as it was judged.
    Setting `cancel` ends it at the next token (`stopped` then says so)."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    cancelled = _cancelled(cancel)  # the continuation's: `fired` says it was cut by `cancel`

    def pieces(out: AutoStream) -> Iterator[str]:
        t0 = time.perf_counter()
        judge = min(judge_tokens, max_new_tokens)
        choice = auto_choose(model, tokenizer, chat, component, other_components, judge, repetition_penalty,
                             candidates, picker, concept_words, cancel)
        out.choice = choice
        ids = list(choice.prefix)
        eos = steering.eos_ids(model, tokenizer)
        goes_on = max_new_tokens > judge and len(ids) == judge and not (ids and ids[-1] in eos)
        if let_go and goes_on:
            out.let_go_at = let_go_point(choice.chosen, ids, choice.words)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text:
            yield text
        rest: list[int] = []
        if cancel is not None and cancel.is_set():
            out.stopped = True
        elif goes_on:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            failed: list[BaseException] = []

            def run() -> None:
                try:
                    rest.extend(continue_candidate(model, tokenizer, chat, choice.chosen, other_components, choice.words,
                                                   ids, None, max_new_tokens - judge, repetition_penalty,
                                                   streamer=streamer, temperature=temperature,
                                                   stopping_criteria=StoppingCriteriaList([cancelled]),
                                                   let_go_at=out.let_go_at))
                except BaseException as exc:  # handed to the reader
                    failed.append(exc)
                    streamer.end()

            thread = threading.Thread(target=run, name="auto-continuation", daemon=True)
            thread.start()
            read_all = False
            try:
                for piece in streamer:
                    if piece:
                        yield piece
                read_all = True
            finally:
                # closed before the end (Clear, a dropped client): the generation ends at its next token. Not
                # when every word was read: its thread may still be finishing an answer that ended by itself.
                if cancel is not None and not read_all and thread.is_alive():
                    cancel.set()
                thread.join()
            if failed:
                raise failed[0]
            out.stopped = cancelled.fired and len(rest) < max_new_tokens - judge
        all_ids = ids + rest
        out.result = AutoAnswer(tokenizer.decode(all_ids, skip_special_tokens=True), tuple(all_ids), choice.chosen,
                                choice.table, time.perf_counter() - t0, choice.seconds,
                                out.let_go_at if rest else None)

    return AutoStream(pieces)


def let_go_point(cand: Candidate, prefix: Sequence[int], words: frozenset[int]) -> int | None:
    """Where the chosen steering lets go after its judged words `prefix` (an answer token index): right after
    them, unless it steers nothing or is a release that already let go in them (at one of `words`)."""
    if not cand.components or (cand.release and any(t in words for t in prefix)):
        return None
    return len(prefix)


def _row(model: Any, cand: Candidate, others: Sequence[SteeringComponent], prompt_start: int, answer_start: int,
         stop: int | None = None) -> _Row:
    parts = []
    start = prompt_start if cand.steer_prompt else answer_start  # the other features too: a spec has one steer_prompt
    if others:
        parts.append((list(others), _vectors(model, others), start, False))
    if cand.components:
        parts.append((list(cand.components), _vectors(model, cand.components), start, cand.release))
    return _Row(parts, stop=stop, released=stop is not None)


def _config(model: Any, tokenizer: Any, max_new_tokens: int, repetition_penalty: float) -> Any:
    from transformers import GenerationConfig

    eos = steering.eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                            repetition_penalty=repetition_penalty, pad_token_id=pad, eos_token_id=eos,
                            bos_token_id=getattr(model.generation_config, "bos_token_id", None))


def _cancelled(cancel: threading.Event | None) -> Any:
    """A StoppingCriteria that ends every row of a generate call once `cancel` (if any) is set; its `fired`
    says whether it did (not the EOS or the length)."""
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        fired = False

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = cancel is not None and cancel.is_set()
            self.fired = self.fired or stop
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return Cancelled()


def generate_candidates(model: Any, tokenizer: Any, chat: Sequence[dict], cands: Sequence[Candidate],
                        others: Sequence[SteeringComponent], release_ids: frozenset[int], max_new_tokens: int,
                        repetition_penalty: float, cancel: threading.Event | None = None
                        ) -> tuple[list[list[int]], list[int | None]]:
    """Each candidate's greedy answer (ids, cut at EOS) in one batch, and where each release let go
    (the answer token index, or None). Setting `cancel` ends the batch at its next token."""
    return generate_many(model, tokenizer, [(chat, c, others, release_ids) for c in cands], max_new_tokens,
                         repetition_penalty, cancel)


def generate_many(model: Any, tokenizer: Any, jobs: Sequence[tuple[Sequence[dict], Candidate, Sequence[SteeringComponent],
                                                                 frozenset[int]]],
                  max_new_tokens: int, repetition_penalty: float, cancel: threading.Event | None = None
                  ) -> tuple[list[list[int]], list[int | None]]:
    """`generate_candidates` for rows of different chats (left-padded): jobs[b] = (chat, candidate,
    other components, release ids). One generate call; every row's ids and release point. Setting
    `cancel` ends it at the next token (every row then shorter than `max_new_tokens`)."""
    from transformers import StoppingCriteriaList

    prompts = [steering.chat_input_ids(tokenizer, chat) for chat, *_ in jobs]
    config = _config(model, tokenizer, max_new_tokens, repetition_penalty)
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    pad = config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows = [_row(model, cand, others, width - len(p), width) for p, (_, cand, others, _) in zip(prompts, jobs, strict=True)]
    stop = StoppingCriteriaList([_cancelled(cancel)]) if cancel is not None else None
    with scheduled_steering(model, rows, [r for *_, r in jobs]), torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=stop)
    eos = set(config.eos_token_id)
    out = []
    for row in gen[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out, [None if r.stop is None else r.stop - width for r in rows]


def read_candidates(model: Any, tokenizer: Any, chat: Sequence[dict], cands: Sequence[Candidate],
                    answers: Sequence[list[int]], released: Sequence[int | None], words: frozenset[int],
                    scores: torch.Tensor | None = None) -> list[AutoRow]:
    """The candidates' answers read back by the unsteered model: the signals `pick_candidate` uses."""
    nlls = answer_nll(model, tokenizer, [chat] * len(answers), answers)
    return candidate_rows(tokenizer, chat, cands, answers, nlls, released, words, scores)


def candidate_rows(tokenizer: Any, chat: Sequence[dict], cands: Sequence[Candidate], answers: Sequence[Sequence[int]],
                   nlls: Sequence[float], released: Sequence[int | None], words: frozenset[int],
                   scores: torch.Tensor | None = None) -> list[AutoRow]:
    """The rows `pick_candidate` reads, from the candidates' answers and their NLLs under the unsteered model
    (read_candidates here; the server reads the NLLs through vLLM: serving/auto.py)."""
    question = content_stems(" ".join(m["content"] for m in chat if m["role"] == "user")[-2000:])
    base = nlls[0]
    table = []
    for cand, ids, nll, rel in zip(cands, answers, nlls, released, strict=True):
        if cand.release and rel is None:  # its last token, never fed back, may be the word
            rel = next((i for i, t in enumerate(ids) if t in words), None)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ratio = 1.0 if not cand.components else (nll / base if base > 0 else float("inf")) if nll == nll else float("inf")
        score = max((float(scores[t]) for t in set(ids) if t < scores.shape[0]), default=0.0) if scores is not None else 0.0
        table.append(AutoRow(cand, tuple(ids), text, nll, ratio, rep3(text), bool(content_stems(text) & question),
                             sum(t in words for t in ids), rel, score))
    return table


def continue_candidate(model: Any, tokenizer: Any, chat: Sequence[dict], cand: Candidate,
                       others: Sequence[SteeringComponent], release_ids: frozenset[int], prefix: list[int],
                       released_at: int | None, max_new_tokens: int, repetition_penalty: float,
                       streamer: Any = None, temperature: float = 0.0, stopping_criteria: Any = None,
                       let_go_at: int | None = None) -> list[int]:
    """The chosen candidate's answer after `prefix` (its first tokens), steered as it was: the prompt
    and the prefix are read again with the same positions steered (a release that let go in the
    prefix stays let go), then generation goes on. With `let_go_at` (an answer token index), the
    candidate's own steering stops there (`others` stay on)."""
    prompt = steering.chat_input_ids(tokenizer, chat)
    seq = prompt + list(prefix)
    if cand.release:  # where it let go, read from the tokens (the judged run never fed its last token)
        released_at = next((i for i, t in enumerate(prefix) if t in release_ids), None)
    if let_go_at is not None and cand.components:
        released_at = let_go_at if released_at is None else min(released_at, let_go_at)
        cand = replace(cand, release=True)  # its part now ends at `stop`, whatever tokens come
    stop = None if released_at is None else len(prompt) + released_at
    row = _row(model, cand, others, 0, len(prompt), stop)
    config = _config(model, tokenizer, max_new_tokens, repetition_penalty)
    if temperature > 0:
        config.do_sample, config.temperature = True, temperature
    ids = torch.tensor([seq], device=next(model.parameters()).device)
    with scheduled_steering(model, [row], release_ids), torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer,
                             stopping_criteria=stopping_criteria)
    out = gen[0, len(seq):].tolist()
    eos = set(config.eos_token_id)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return out[:cut]
