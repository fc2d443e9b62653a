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

import hashlib
import weakref
from dataclasses import dataclass
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
    """The `k` tokens a direction promotes most (highest logit first) and suppresses most (lowest first)."""

    promoted: tuple[Token, ...]
    suppressed: tuple[Token, ...]


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
