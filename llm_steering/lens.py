"""What a feature does, read through the model's own output: the tokens its direction pushes up and down.

The logit lens: a direction v in the residual stream, put through the model's final norm and its
unembedding (`lm_head(norm(v))`), gives one logit per vocabulary token; the highest are the
tokens the direction promotes, the lowest those it suppresses. The same for every feature,
SAE or contrastive (Neuronpedia shows the same list for each SAE feature). Results are cached
per model and vector content, so a vectors file's features are computed once.

    >>> lens = top_tokens(model, tok, catalog.resolve("eiffel_tower").vector.vector)
    >>> lens.promoted[:3]
    (Token(id=..., text=' Paris', logit=...), ...)
    >>> describe(lens)
    'promotes Paris, Eiffel, ...; suppresses ...'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_steering.models import final_norm, unembedding

import torch

DEFAULT_K = 8
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(vector digest, k): TokenLens}


@dataclass(frozen=True)
class Token:
    """One vocabulary token: its id, its text (as the tokenizer decodes it) and its logit."""

    id: int
    text: str
    logit: float


@dataclass(frozen=True)
class TokenLens:
    """The `k` tokens a direction promotes most (highest logit first) and suppresses most (lowest first);
    `how` says which reading they come from: LOGIT_LENS (`top_tokens`) or MEASURED (`steered_tokens`)."""

    promoted: tuple[Token, ...]
    suppressed: tuple[Token, ...]
    how: str = "logit lens"

    @property
    def measured(self) -> bool:
        return self.how == MEASURED

    @property
    def verbs(self) -> tuple[str, str]:
        """What to call the two lists: ("raises", "lowers") measured, ("pushes up", "pushes down") by the lens."""
        return ("raises", "lowers") if self.measured else ("pushes up", "pushes down")


LOGIT_LENS, MEASURED = "logit lens", "measured"


def direction_logits(model: Any, vector: torch.Tensor) -> torch.Tensor:
    """lm_head(final_norm(v)) for a direction `vector` [d_model]: one float32 logit per token [vocab]."""
    head, norm = unembedding(model), final_norm(model)
    param = next(head.parameters())
    v = vector.detach().reshape(1, 1, -1).to(device=param.device, dtype=param.dtype)  # [1, 1, d_model]
    with torch.inference_mode():
        return head(norm(v))[0, 0].float().cpu()  # [vocab]


def top_tokens(model: Any, tokenizer: Any, vector: torch.Tensor, k: int = DEFAULT_K) -> TokenLens:
    """The `k` tokens `vector` pushes up most and the `k` it pushes down most, through the model's
    own final norm and unembedding; cached per model and vector.

        >>> top_tokens(model, tok, feature.vector.vector, k=5).promoted[0].text
        ' Paris'
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
        raise ValueError(f"k must be a whole number from 1 to 100, got {k!r}")
    digest = hashlib.sha1(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    per_model = _CACHE.setdefault(model, {})
    if (digest, k) not in per_model:
        logits = direction_logits(model, vector)  # [vocab]
        up, down = logits.topk(k), (-logits).topk(k)

        def tokens(ids: torch.Tensor) -> tuple[Token, ...]:
            return tuple(Token(int(i), tokenizer.decode([int(i)]), float(logits[i])) for i in ids)

        per_model[(digest, k)] = TokenLens(tokens(up.indices), tokens(down.indices))
    return per_model[(digest, k)]


def token_words(tokens: tuple[Token, ...] | list[Token]) -> list[str]:
    """Tokens as people read them: stripped of the leading space, shown quoted when only spaces or odd."""
    words = []
    for t in tokens:
        word = t.text.strip()
        words.append(word if word and word.isprintable() else repr(t.text))
    return words


def describe(lens: TokenLens, n: int = DEFAULT_K) -> str:
    """One line: "promotes Paris, Eiffel, ...; suppresses ..." (the first `n` of each)."""
    return (f"promotes {', '.join(token_words(lens.promoted[:n]))}; "
            f"suppresses {', '.join(token_words(lens.suppressed[:n]))}")


# ---------------------------------------------------------------------------
# What the steering does to this model, measured
# ---------------------------------------------------------------------------

NEUTRAL_QUESTIONS = ("Tell me about your day.", "What happened at work?", "Any news?", "What are you up to?")
EPS = 1e-6  # probability floor of the log ratio: a token at 1e-9 that rises to 1e-7 is not a rise
_STEERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(digest, op, strength, k): TokenLens}
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): unsteered mean log-prob [vocab]}


def neutral_texts() -> list[str]:
    """Everyday sentences about nothing in particular: the first 8 of the topic template's neutral set
    (concepts.neutral_texts, read once)."""
    from llm_steering.concepts import neutral_texts as template_texts

    return template_texts("topic")[:8]


def steered_tokens(model: Any, tokenizer: Any, component: Any, k: int = DEFAULT_K) -> TokenLens:
    """The `k` tokens whose probability the steering raises most, and the `k` it lowers most, measured:
    a few neutral chats (an everyday question, an everyday answer) are read once unsteered and once
    steered by `component` (a SteeringComponent at the strength and op to be shown), in one batch
    each; a token's score is its log-probability rise, log(p_steered + EPS) - log(p + EPS), averaged
    over every answer position. Unlike the logit lens of an early layer, this is what the later layers
    make of the edit. Deterministic and cached per model, vector, op and strength; `Token.logit` holds
    the score (nats)."""

    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
        raise ValueError(f"k must be a whole number from 1 to 100, got {k!r}")
    key = (*component_key(component), k)
    per_model = _STEERED.setdefault(model, {})
    if key not in per_model:
        scores = cached_steering_scores(model, tokenizer, component)
        down = tuple(Token(int(i), tokenizer.decode([int(i)]), float(scores[i])) for i in (-scores).topk(k).indices)
        per_model[key] = TokenLens(top_raised(tokenizer, scores, k), down, MEASURED)
    return per_model[key]


_SCORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {component key: scores [vocab]}


def component_key(component: Any) -> tuple:
    """What makes two components steer alike: the vector's content, layer, op and strengths."""
    digest = hashlib.sha1(component.vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return (digest, component.layer, component.op, float(component.strength), component.cap_min, component.cap_max)


def cached_steering_scores(model: Any, tokenizer: Any, component: Any) -> torch.Tensor:
    """`steering_scores` of one component, cached per model and component (auto reads every answer with it),
    in memory and on disk (`disk_cache_path`): the app's cards and the console's /features then cost one
    forward per feature once per machine, not at every start."""
    per_model = _SCORES.setdefault(model, {})
    key = component_key(component)
    if key not in per_model:
        if len(per_model) > 256:
            per_model.clear()
        path = disk_cache_path(model, tokenizer, component)
        scores = _read_scores(path, unembedding(model).weight.shape[0])
        if scores is None:
            scores = steering_scores(model, tokenizer, [component])
            _write_scores(path, scores)
        per_model[key] = scores
    return per_model[key]


MAX_SCORE_FILES = 512  # about 100 MB for the embedded model's vocabulary (196 kB a file)
SCORES_VERSION = 1  # bump when steering_scores measures differently: older files on disk are then not read
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its weights' fingerprint


def model_fingerprint(model: Any) -> str:
    """A digest of the model's config, dtype, device type and weights (up to 256 evenly spaced values of every
    parameter: any fine-tune or other checkpoint changes it), computed once per model object."""
    if model not in _FINGERPRINTS:
        h = hashlib.sha256()
        config = getattr(model, "config", None)
        h.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
        with torch.inference_mode():
            for name, param in model.named_parameters():
                if param.device.type == "meta":  # offloaded: its shape and name stand for it
                    h.update(f"{name}:{tuple(param.shape)}:meta".encode())
                    continue
                flat = param.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
                h.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{param.device.type}".encode())
                h.update(sample.numpy().tobytes())
        _FINGERPRINTS[model] = h.hexdigest()
    return _FINGERPRINTS[model]


def disk_cache_path(model: Any, tokenizer: Any, component: Any) -> Path:
    """Where one component's scores are kept: models.cache_dir()/steering-scores/<digest>.pt, the digest of
    everything they depend on (the model's fingerprint, the component, the neutral chats' token ids as this
    tokenizer writes them, SCORES_VERSION)."""
    from llm_steering.models import cache_dir

    h = hashlib.sha256()
    prompts, seqs = neutral_chats(tokenizer)
    parts = (SCORES_VERSION, model_fingerprint(model), component_key(component), [len(p) for p in prompts], seqs, EPS)
    h.update(repr(parts).encode())
    return cache_dir() / "steering-scores" / f"{h.hexdigest()[:40]}.pt"


def _read_scores(path: Path, vocab: int) -> torch.Tensor | None:
    """The scores kept at `path`, or None when there are none or they are not a finite float32 [vocab] tensor
    (a damaged file is measured again and rewritten)."""
    try:
        scores = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, partly written by a killed process, not ours: measure again
        return None
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or tuple(scores.shape) != (vocab,) \
            or not torch.isfinite(scores).all():
        return None
    return scores


def _write_scores(path: Path, scores: torch.Tensor) -> None:
    """Keep `scores` at `path`, whole or not at all (a temporary file renamed into place); a cache that cannot be
    written (read-only home, full disk) only costs the next start its forward."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            torch.save(scores.contiguous(), f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return
    with contextlib.suppress(OSError):  # each strength a user tries is a file: the oldest go past MAX_SCORE_FILES
        kept = sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[MAX_SCORE_FILES:]:
            old.unlink()


def neutral_chats(tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """The neutral chats `steering_scores` reads, as token ids: each one's prompt (system, an everyday
    question, the assistant turn opened) and the whole chat (that prompt, then an everyday answer)."""
    from llm_steering import steering

    system = {"role": "system", "content": "You are a helpful assistant."}
    texts = neutral_texts()
    prompts = [steering.chat_input_ids(tokenizer, [system, {"role": "user", "content": NEUTRAL_QUESTIONS[i % 4]}])
               for i in range(len(texts))]
    answers = [tokenizer.encode(" " + text, add_special_tokens=False) for text in texts]
    return prompts, [p + a for p, a in zip(prompts, answers, strict=True)]


def steering_scores(model: Any, tokenizer: Any, components: list[Any]) -> torch.Tensor:
    """Per vocabulary token, the mean log-probability rise the steering gives it over the answer positions
    of the neutral chats (float32 [vocab]; see `steered_tokens`)."""
    from llm_steering import calibrate, steering

    prompts, seqs = neutral_chats(tokenizer)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    # the positions that predict an answer token
    where = torch.zeros_like(mask, dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        where[b, len(p) - 1 : len(s) - 1] = True

    def logp(rows: list[list[Any]]) -> torch.Tensor:  # mean over the answer positions [vocab]
        with calibrate.row_steering(model, rows), torch.inference_mode():
            probs = model(input_ids=ids, attention_mask=mask).logits[where].float().softmax(-1)
        return (probs + EPS).log().mean(0).cpu()

    steering.validate_components(model, components)
    # the mean of a difference is the difference of the means: the unsteered side is read once per model
    # (and device and dtype), so each feature costs one forward, not two (the app's start: ten features)
    plain_key = (str(device), next(model.parameters()).dtype)
    plain = _PLAIN.setdefault(model, {})
    if plain_key not in plain:
        plain[plain_key] = logp([[]] * len(seqs))
    return logp([list(components)] * len(seqs)) - plain[plain_key]


def concept_token_ids(model: Any, tokenizer: Any, component: Any, k: int = 24) -> frozenset[int]:
    """The steering's own words, for reading an answer without a keyword list: of the `k` tokens the
    steering raises most (`steered_tokens`), those that start a word and have at least three letters
    and are not a stop word (" ocean", " Shakespeare"; not ",", "ass", "The")."""
    return words_of(steered_tokens(model, tokenizer, component, k).promoted)


def words_of(tokens: Sequence[Token]) -> frozenset[int]:
    """Of `tokens` (with their scores in `logit`), the ids of those raised that start a word, have at least three
    letters and are not a stop word: `concept_token_ids`' rule (the server applies it to its own scores)."""
    from llm_steering.calibrate import STOP_WORDS

    words = set()
    for t in tokens:
        text = t.text
        if (t.logit > 0 and (text[:1] == " " or text[:1].isupper()) and sum(ch.isalpha() for ch in text) >= 3
                and text.strip().lower() not in STOP_WORDS):
            words.add(t.id)
    return frozenset(words)


def top_raised(tokenizer: Any, scores: torch.Tensor, k: int) -> tuple[Token, ...]:
    """The `k` tokens with the highest scores, as `steered_tokens` lists them."""
    return tuple(Token(int(i), tokenizer.decode([int(i)]), float(scores[i])) for i in scores.topk(k).indices)


# ---------------------------------------------------------------------------
# What a feature card shows: the one rule
# ---------------------------------------------------------------------------

def lens_reads(model: Any, feature: Any) -> bool:
    """Whether the logit lens of `feature`'s direction says what it does (else it is measured,
    `steered_tokens`). The one rule of the cards, the console and extract.py: only for an SAE feature
    (its vector has an SAE index), whose decoder direction is one the SAE learned to read back out, and
    whose lens is what Neuronpedia shows (on the 8B profile, L15F21576 promotes Paris and Eiffel);
    measuring one there would also mean 8B forwards at start.

    Everything else, the contrastive vectors and your own concepts, is measured, at every layer: the lens
    is noise for them in the middle of the embedded model (layer 15 of 30) and late too (five volcano
    sentences at layer 24 of 30: "aughed, aughtered, erno, ountains" by the lens, where the steering
    raises "volcanic, volcano, lava, eruption"; tests/test_lens.py). `model` is kept for callers."""
    del model
    return feature.vector.index is not None


def feature_tokens(model: Any, tokenizer: Any, feature: Any, k: int = DEFAULT_K) -> TokenLens:
    """What a feature does, as its card and /features show it: the logit lens where it reads
    (`lens_reads`), else the tokens the steering raises and lowers at the feature's default strength
    and op (`steered_tokens`: one batched forward, the unsteered one read once per model; cached). `.how` says which."""
    if lens_reads(model, feature):
        return top_tokens(model, tokenizer, feature.vector.vector, k)
    return steered_tokens(model, tokenizer, feature.component(feature.default_fraction), k)

