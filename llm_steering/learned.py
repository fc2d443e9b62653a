"""Learned directions (issue 28, item 6): a steering direction trained for what we want, as RePS or
ReFT-r1 do: only the vector trains, through the frozen model, on the CPU.

The objective is prompt distillation: the model asked in words to bring a concept in ("In your
answer, mention the ocean.") writes a *teacher* answer; the direction is trained so that the model
steered by it, and given the plain question with no instruction, gives that answer (the
cross-entropy of the teacher's answer tokens). The dose is fixed: the direction is a unit vector
applied with the feature's own op and strength (add: h + s*v; clamp: the component along v set to s),
so a learned direction can be compared with the contrastive one at the same dose, or swapped in for it.

    >>> learned = learn_direction(model, tok, prompts, "In your answer, mention the ocean.", layer=15,
    ...                           op="clamp", strength=14.64, init=contrastive_unit_vector, steps=24)
    >>> SteeringComponent(15, learned.vector, strength=14.64, op="clamp", name="ocean")

`teacher_answers` and `train_direction` are the two halves, for callers that have their teacher
answers already. Nothing of the model changes: its weights, their requires_grad flags and its
train/eval mode are as they were afterwards, and no hook stays on it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_steering import models, steering
from llm_steering.components import SteeringComponent, _delta

import torch

SYSTEM = "You are a helpful assistant."
OPS = ("add", "clamp")


@dataclass
class LearnedDirection:
    """A trained unit direction and how it was trained."""

    vector: torch.Tensor  # unit, float32, on the CPU
    layer: int
    op: str
    strength: float
    losses: list[float] = field(default_factory=list)  # the training loss at each step (its batch)
    start_loss: float = float("nan")  # mean loss over all teacher answers before training
    end_loss: float = float("nan")  # and after
    cosine_to_init: float = float("nan")  # cosine with the initial direction
    teacher: list[str] = field(default_factory=list)  # the teacher answers trained on (text)


def plain_chat(prompt: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def asked_chat(prompt: str, instruction: str, system: str = SYSTEM) -> list[dict]:
    """The chat that asks in words: the instruction after the question, in the user's turn."""
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{prompt}\n\n{instruction}"}]


def teacher_answers(model: Any, tokenizer: Any, prompts: Sequence[str], instruction: str, max_new_tokens: int = 48,
                    repetition_penalty: float = 1.1, system: str = SYSTEM, batch_size: int = 32) -> list[list[int]]:
    """The unsteered model's greedy answers (token ids) to each prompt with `instruction` added."""
    from llm_steering import calibrate

    if not instruction or not instruction.strip():
        raise ValueError("the teacher needs an instruction, e.g. 'In your answer, mention the ocean.'")
    chats = [asked_chat(p, instruction, system) for p in prompts]
    return calibrate.generate_rows(model, tokenizer, chats, [[] for _ in chats], max_new_tokens, repetition_penalty,
                                   batch_size=batch_size)


def _check(model: Any, chats: Sequence[Sequence[dict]], answers: Sequence[Sequence[int]], layer: Any, op: str,
           strength: Any, init: torch.Tensor | None, steps: Any, batch_size: Any, lr: Any) -> None:
    n_layers, d = models.num_layers(model), models.hidden_size(model)
    if len(chats) == 0:
        raise ValueError("no prompts to train on: give at least one prompt and its teacher answer")
    if len(chats) != len(answers):
        raise ValueError(f"{len(chats)} chats but {len(answers)} teacher answers: give one answer per chat")
    if not any(len(a) for a in answers):
        raise ValueError("every teacher answer is empty: nothing to train on")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range: this model has {n_layers} layers (0-{n_layers - 1})")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} for a learned direction; use one of {', '.join(OPS)}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or \
            (op == "add" and strength == 0):
        raise ValueError(f"strength must be a finite number (nonzero for add), got {strength!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.dim() != 1 or init.numel() != d:
            raise ValueError(f"init must be a 1-D tensor of the model's hidden size {d}")
        if not torch.isfinite(init).all() or float(init.norm()) == 0:
            raise ValueError("init must be a finite, nonzero direction")


def _batch(tokenizer: Any, chats: Sequence[Sequence[dict]], answers: Sequence[Sequence[int]], device: Any):
    """Right-padded ids, attention mask, the answer's start per row, and each row's answer targets."""
    pids = [steering.chat_input_ids(tokenizer, c) for c in chats]
    seqs = [p + list(a) for p, a in zip(pids, answers, strict=True)]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask, [len(p) for p in pids], seqs


def _loss(model: Any, tokenizer: Any, chats, answers, u: torch.Tensor, layer: int, op: str, strength: float,
          steer_prompt: bool) -> torch.Tensor:
    """Mean cross-entropy per teacher answer token, the model steered by u/|u| at `layer`."""
    device = next(model.parameters()).device
    ids, mask, starts, seqs = _batch(tokenizer, chats, answers, device)
    steer_mask = torch.ones(ids.shape, device=device)
    if not steer_prompt:
        for b, s in enumerate(starts):
            steer_mask[b, :s] = 0
    _, layers = models.decoder_layers(model)

    comp = SteeringComponent(layer, u.detach(), strength=strength, op=op)  # the op's rule, as the library steers

    def hook(module: Any, args: Any, output: Any) -> Any:
        hidden = steering.layer_hidden(output)
        v = (u / u.norm()).to(hidden.dtype)
        delta = _delta(comp, hidden @ v)
        return steering.with_hidden(output, hidden + (delta * steer_mask.to(hidden.dtype)).unsqueeze(-1) * v)

    base, head = models.base_model(model), models.unembedding(model)
    with steering.forward_hooks([(layers[layer], hook)]):
        last = base(input_ids=ids, attention_mask=mask).last_hidden_state
    total, count = last.new_zeros(()), 0
    for b, (s, seq) in enumerate(zip(starts, seqs, strict=True)):
        n = len(seq) - s
        if n == 0:
            continue
        logits = head(last[b, s - 1 : len(seq) - 1]).float()  # only where an answer token is predicted
        targets = torch.tensor(seq[s:], device=device)
        total = total + torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        count += n
    return total / max(1, count)


def train_direction(model: Any, tokenizer: Any, chats: Sequence[Sequence[dict]], answers: Sequence[Sequence[int]],
                    layer: int, *, op: str = "add", strength: float, init: torch.Tensor | None = None, steps: int = 24,
                    lr: float = 0.02, batch_size: int = 8, seed: int = 0, steer_prompt: bool = True,
                    progress: Callable[[int, int, float], None] | None = None) -> LearnedDirection:
    """Train a unit direction v so that the model steered by (layer, v, op, strength) gives answers[b]
    after chats[b] (mean cross-entropy of the answer tokens; Adam on v's unnormalised parameter).

    `init` is the starting direction (e.g. the contrastive vector); without it, a random one from `seed`.
    Batches are drawn with `seed`, so the result is deterministic for a seed on the same machine.
    `steer_prompt=False` steers the answer positions only. `progress(step, steps, loss)` after each step.
    One-line ValueErrors for inputs that do not fit."""
    _check(model, chats, answers, layer, op, strength, init, steps, batch_size, lr)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    start = init.detach().float().cpu() if init is not None else torch.randn(models.hidden_size(model), generator=gen)
    start = start / start.norm()
    u = start.clone().to(device).requires_grad_(True)
    keep = [(c, list(a)) for c, a in zip(chats, answers, strict=True) if len(a)]
    order = random.Random(seed)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    result = LearnedDirection(vector=start, layer=layer, op=op, strength=float(strength))
    try:
        model.requires_grad_(False)
        model.eval()

        def full_loss() -> float:
            with torch.no_grad():
                tot = 0.0
                for i in range(0, len(keep), batch_size):
                    part = keep[i : i + batch_size]
                    tot += float(_loss(model, tokenizer, [c for c, _ in part], [a for _, a in part], u, layer, op,
                                       float(strength), steer_prompt)) * len(part)
                return tot / len(keep)

        result.start_loss = full_loss()
        opt = torch.optim.Adam([u], lr=lr)
        pool: list[int] = []
        for step in range(steps):
            if len(pool) < min(batch_size, len(keep)):
                idx = list(range(len(keep)))
                order.shuffle(idx)
                pool += idx
            pick, pool = pool[:batch_size], pool[batch_size:]
            loss = _loss(model, tokenizer, [keep[i][0] for i in pick], [keep[i][1] for i in pick], u, layer, op,
                         float(strength), steer_prompt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                u /= u.norm()
            result.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, steps, result.losses[-1])
        result.end_loss = full_loss()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    vec = u.detach().float().cpu()
    result.vector = vec / vec.norm()
    result.cosine_to_init = float(result.vector @ start)
    return result


def steered_teachers(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, op: str, strength: float,
                     direction: torch.Tensor, keep: Callable[[str], bool], multipliers: Sequence[float] = (1.0, 2.0, 3.0),
                     nll_bound: float = 2.5, max_new_tokens: int = 48, system: str = SYSTEM,
                     batch_size: int = 32) -> list[tuple[int, list[int], str]]:
    """(prompt index, answer ids, text): for each prompt, of its answers steered by `direction` at each
    multiplier of `strength`, the one with the lowest NLL under the unsteered model among those that
    `keep` accepts (they name the concept), share a content word with the prompt and read fluently
    (NLL at most `nll_bound` x the unsteered answer's, rep3 < 0.2); prompts where none does give none."""
    from llm_steering import calibrate

    chats = [plain_chat(p, system) for p in prompts]
    rows = [[]] + [[SteeringComponent(layer, direction, strength=m * strength, op=op)] for m in multipliers]
    jobs = [(i, r) for i in range(len(prompts)) for r in rows]
    ids = calibrate.generate_rows(model, tokenizer, [chats[i] for i, _ in jobs], [r for _, r in jobs], max_new_tokens,
                                  batch_size=batch_size)
    nlls = calibrate.answer_nll(model, tokenizer, [chats[i] for i, _ in jobs], ids, batch_size)
    out = []
    k = len(rows)
    for i, p in enumerate(prompts):
        base = nlls[i * k]
        best = None
        for j in range(i * k + 1, (i + 1) * k):
            text = tokenizer.decode(ids[j], skip_special_tokens=True)
            ok = (keep(text) and bool(calibrate.content_stems(text) & calibrate.content_stems(p)) and nlls[j] == nlls[j]
                  and nlls[j] <= nll_bound * base and calibrate.rep3(text) < 0.2)
            if ok and (best is None or nlls[j] < best[0]):
                best = (nlls[j], ids[j], text)
        if best is not None:
            out.append((i, best[1], best[2]))
    return out


def learn_direction(model: Any, tokenizer: Any, prompts: Sequence[str], instruction: str, layer: int, *,
                    op: str = "add", strength: float, init: torch.Tensor | None = None, steps: int = 24,
                    lr: float = 0.02, batch_size: int = 8, seed: int = 0, steer_prompt: bool = True,
                    keep: Callable[[str], bool] | None = None, min_kept: int = 4,
                    steered: Sequence[float] = (), max_new_tokens: int = 48,
                    system: str = SYSTEM, progress: Callable[[int, int, float], None] | None = None) -> LearnedDirection:
    """Prompt distillation: the model's answers to `prompts` asked in words (`instruction`) become the
    targets of `train_direction` given the plain prompts. With `keep`, only the teacher answers whose
    text it accepts are used (e.g. those that name the concept), unless fewer than `min_kept` are.
    With `steered` multipliers (needs `keep` and `init`), each prompt's best answer steered by `init`
    at those multiples of `strength` (`steered_teachers`) is a teacher too."""
    if not prompts:
        raise ValueError("no prompts to train on: give at least one prompt")
    if steered and (keep is None or init is None):
        raise ValueError("steered teachers need keep (does a text name the concept?) and init (the direction to steer with)")
    answers = teacher_answers(model, tokenizer, prompts, instruction, max_new_tokens, system=system)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    idx = list(range(len(prompts)))
    if keep is not None:
        kept = [i for i in idx if keep(texts[i])]
        idx = kept if len(kept) >= min_kept or steered else idx
    pairs = [(i, answers[i], texts[i]) for i in idx]
    if steered:
        pairs += steered_teachers(model, tokenizer, prompts, layer, op, strength, init, keep, steered, max_new_tokens=max_new_tokens,
                                  system=system)
    if not pairs:
        raise ValueError("no teacher answer names the concept: try other prompts, an instruction, or stronger steered teachers")
    result = train_direction(model, tokenizer, [plain_chat(prompts[i], system) for i, _, _ in pairs], [a for _, a, _ in pairs],
                             layer, op=op, strength=strength, init=init, steps=steps, lr=lr, batch_size=batch_size,
                             seed=seed, steer_prompt=steer_prompt, progress=progress)
    result.teacher = [t for _, _, t in pairs]
    return result


__all__ = ["LearnedDirection", "asked_chat", "learn_direction", "plain_chat", "steered_teachers", "teacher_answers",
           "train_direction"]
