"""What the model reads: a system prompt, a history and a message fitted into the model's input
limit, the same way for the app and the console.

    >>> fitted = fit_chat(tok, "You are a helpful assistant.", history, message, limit=2048)
    >>> fitted.chat, fitted.notices       # what the model reads, and what was left out (for people)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_steering import models

MAX_MESSAGE_CHARS = 200_000  # a longer message is refused before it is tokenized
MAX_HISTORY_MESSAGES = 200  # only the newest this many earlier messages are considered
CHARS_PER_TOKEN_BOUND = 32  # history beyond limit x this many characters cannot fit: skipped untokenized



@dataclass
class FittedChat:
    """The chat the model reads, the message as it went in, and what was left out (for people)."""

    chat: list[dict[str, str]]
    message: str
    notices: list[str] = field(default_factory=list)
    dropped_messages: int = 0
    cut_tokens: int = 0


def fit_chat(tokenizer: Any, system: str, history: Sequence[dict], message: str, limit: int) -> FittedChat:
    """System prompt + history + message, within `limit` tokens of chat template.

    A message too long on its own keeps its start and its end (where the question
    usually is) and loses its middle; then the oldest exchanges are left out until the
    whole fits. Bounded work for any input: a message over MAX_MESSAGE_CHARS is refused,
    and only the newest MAX_HISTORY_MESSAGES of history (and never more text than could
    fit) are tokenized.
    """
    if not isinstance(message, str) or not message.strip():
        raise ValueError("the message is empty: type a message first")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(
            f"the message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}: send a shorter text"
        )
    sys_msgs = [{"role": "system", "content": system}] if system and system.strip() else []
    notices: list[str] = []
    overhead = len(models.chat_input_ids(tokenizer, sys_msgs + [{"role": "user", "content": ""}]))
    budget = max(8, limit - overhead)
    ids = tokenizer(message, add_special_tokens=False)["input_ids"]
    cut = 0
    if len(ids) > budget:
        keep = budget - len(tokenizer("\n[...]\n", add_special_tokens=False)["input_ids"])
        for _ in range(4):  # decoding and re-encoding can merge tokens differently at the seams
            head = keep // 4
            cut = len(ids) - keep
            message = (tokenizer.decode(ids[:head], skip_special_tokens=True) + "\n[...]\n"
                       + tokenizer.decode(ids[len(ids) - (keep - head):], skip_special_tokens=True))
            excess = len(models.chat_input_ids(tokenizer, sys_msgs + [{"role": "user", "content": message}])) - limit
            if excess <= 0:
                break
            keep = max(2, keep - excess)
        notices.append(
            f"Your message is {len(ids):,} tokens; the model reads at most {limit:,} here, so {cut:,} tokens from its "
            "middle were left out (its start and its end, where the question usually is, were kept)."
        )
    turns = _recent_turns(history, limit * CHARS_PER_TOKEN_BOUND)
    dropped = sum(1 for m in history if isinstance(m, dict)) - len(turns)
    user = [{"role": "user", "content": message}]
    while turns and len(models.chat_input_ids(tokenizer, sys_msgs + turns + user)) > limit:
        n = _drop_count(tokenizer, turns, len(models.chat_input_ids(tokenizer, sys_msgs + turns + user)) - limit)
        turns, dropped = turns[n:], dropped + n
    if dropped:
        notices.append(f"The chat is longer than the model reads ({limit:,} tokens): the oldest {dropped} messages were left out.")
    return FittedChat(sys_msgs + turns + user, message, notices, dropped, cut)


def _recent_turns(history: Iterable[Any], max_chars: int) -> list[dict[str, str]]:
    """The newest user/assistant messages as {"role", "content": str}, bounded in count and text."""
    msgs = [m for m in history if isinstance(m, dict) and m.get("role") in ("user", "assistant")] if history else []
    out: list[dict[str, str]] = []
    total = 0
    for m in reversed(msgs[-MAX_HISTORY_MESSAGES:]):
        content = m.get("content")
        text = content if isinstance(content, str) else message_text(content)
        total += len(text)
        if total > max_chars:
            break
        out.append({"role": m["role"], "content": text[:MAX_MESSAGE_CHARS]})
    out.reverse()
    while out and out[0]["role"] != "user":  # start with a user turn
        out.pop(0)
    return out


def _drop_count(tokenizer: Any, turns: list[dict[str, str]], excess: int) -> int:
    """How many of the oldest messages (a whole exchange at least) to leave out to shed `excess` tokens."""
    shed, n = 0, 0
    while n < len(turns) and shed < excess:
        shed += len(tokenizer(turns[n]["content"], add_special_tokens=False)["input_ids"]) + 4
        n += 1
    if n < len(turns) and turns[n]["role"] == "assistant":
        n += 1  # never keep an answer without its question
    return max(n, 2) if len(turns) >= 2 else len(turns)


def message_text(content: Any) -> str:
    """The text of a message's content (gradio 6 gives a list of {"type": "text", "text"} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content[:100])
    return "" if content is None else str(content)[:MAX_MESSAGE_CHARS]
