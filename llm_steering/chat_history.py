"""Which earlier turns the model reads, now that every answer carries the steering it was made with.

One rule for every front end (the console today, the web app later), with no model and no
front-end types: plain dicts and the steering specs of `config.SteeringSpec` (or their
`to_dict()`, the export format).

A turn is one finished exchange:

    {"user": str, "answer": str, "spec": SteeringSpec | dict, "unsteered": str | None}

`spec` is the steering `answer` was made with (no features: unsteered); `unsteered` is the
unsteered answer a compare turn made too (None otherwise). The web app's turn dicts work as
they are: their steering may sit under "steering" instead of "spec", and a turn with
"done": False (still streaming) is neither read nor counted.

What the model reads before a new message, with `spec` the steering in force now:

- mode "same" (the default): only the turns that have an answer made with this steering:
  their `answer` when the turn's spec is the same, or, when nothing is steered now, a compare
  turn's `unsteered` answer. Earlier steering cannot leak into the new answer.
- mode "all": every turn, each with its answer made with this steering where it has one, else
  its `answer`; `other_steering` counts those, so a front end can say so in one line.

Compare's unsteered side always reads `unsteered_chat(turns)`: the turns answered unsteered
(plain turns, and compare turns' own unsteered answers), whatever the mode.

Two steerings are the same when they are for the same model and switch on the same features
(key, fraction, op; in any order) and, when any feature is on, agree on steer_prompt (a spec
without a model_id, or None for no steering, fits any model). An op of None (the feature's
own) is not resolved here: front ends record the op they used.

    >>> seen = visible_chat(turns, spec, "same")
    >>> chat = [{"role": "system", "content": system}, *seen.messages, {"role": "user", "content": text}]
    >>> seen.left_out                                   # turns the model does not read
    >>> unsteered_chat(turns).messages                 # compare's unsteered side
    >>> export = chat_export(turns, model_id, system)  # JSON-ready, each turn with its steering
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HISTORY_MODES = ("same", "all")
CHAT_FORMAT = "llm-steering/chat"
CHAT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SeenChat:
    """What the model reads of the earlier turns.

    `messages`: user/assistant messages, oldest first (no system prompt, not the new message);
    `used`: the indices in `turns` of the turns they come from; `left_out`: how many turns the
    model does not read; `other_steering`: how many it reads whose answer was made with other
    steering (mode "all" only).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    left_out: int = 0
    other_steering: int = 0


def spec_dict(spec: Any) -> dict:
    """A spec as its export dict (SteeringSpec.to_dict()); None is no steering."""
    if spec is None:
        return {"features": []}
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    if isinstance(spec, Mapping):
        return dict(spec)
    raise ValueError(f"a turn's spec must be a SteeringSpec or its dict, got {type(spec).__name__}")


def turn_spec(turn: Mapping) -> Any:
    """The steering a turn's answer was made with: its "spec" (or the app's "steering")."""
    return turn["spec"] if "spec" in turn else turn.get("steering")


def steering_key(spec: Any) -> tuple:
    """What makes two steerings the same (see the module docstring); hashable."""
    data = spec_dict(spec)
    features = frozenset(
        (str(f.get("key")), round(float(f.get("fraction", 0.0)), 4), f.get("op"))
        for f in data.get("features") or ()
    )
    return data.get("model_id"), features, bool(data.get("steer_prompt", True)) if features else None


def same_steering(a: Any, b: Any) -> bool:
    """Whether two specs are the same steering; a spec without a model_id (or None) fits any model."""
    ka, kb = steering_key(a), steering_key(b)
    return ka[1:] == kb[1:] and (ka[0] is None or kb[0] is None or ka[0] == kb[0])


def visible_chat(turns: Sequence[Mapping], spec: Any, mode: str = "same") -> SeenChat:
    """The earlier turns the model reads before answering with `spec`, in `mode` ("same" or "all")."""
    if mode not in HISTORY_MODES:
        raise ValueError(f"unknown history mode {mode!r}: use same or all")
    unsteered_now = not steering_key(spec)[1]
    messages: list[dict[str, str]] = []
    used: list[int] = []
    left_out = other = 0
    for i, turn in enumerate(turns):
        if not turn.get("done", True):
            continue
        user, answer, alternative = turn.get("user"), turn.get("answer"), turn.get("unsteered")
        if not isinstance(user, str) or not isinstance(answer, str):
            raise ValueError(f"turn {i} needs 'user' and 'answer' texts")
        if same_steering(turn_spec(turn), spec):
            text = answer
        elif unsteered_now and isinstance(alternative, str):
            text = alternative
        elif mode == "all":
            text, other = answer, other + 1
        else:
            left_out += 1
            continue
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        used.append(i)
    return SeenChat(messages, used, left_out, other)


def unsteered_chat(turns: Sequence[Mapping]) -> SeenChat:
    """What compare's unsteered side reads: only turns with an unsteered answer, whatever the mode."""
    return visible_chat(turns, None, "same")


def chat_export(turns: Sequence[Mapping], model_id: str, system: str = "", mode: str = "same") -> dict:
    """The chat as a JSON-ready dict (the one chat export of the app and the console): each turn's
    user text, answer and steering (the spec export format), `unsteered` for compare turns, and
    where the front end recorded them, whether it was `stopped`, where it was cut (`capped_at`) and
    which feature had its strength picked by `auto`."""
    out = []
    for turn in turns:
        item = {"user": turn["user"], "answer": turn["answer"], "steering": spec_dict(turn_spec(turn))}
        if isinstance(turn.get("unsteered"), str):
            item["unsteered"] = turn["unsteered"]
        item.update({k: turn[k] for k in ("stopped", "capped_at", "auto", "auto_setting") if turn.get(k)})
        out.append(item)
    return {"format": CHAT_FORMAT, "version": CHAT_FORMAT_VERSION, "model_id": model_id, "system_prompt": system,
            "history": mode, "turns": out}
