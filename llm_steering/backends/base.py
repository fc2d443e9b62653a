"""One protocol for every backend: the same settings in, the same streamed result out.

    >>> backend = get_backend("hf", model, tokenizer)              # or "nnsight", "vllm"
    >>> stream = backend.stream(chat, [comp], GenerationSettings(temperature=0), cancel=event)
    >>> for piece in stream:
    ...     print(piece, end="")
    >>> stream.result.finish_reason, stream.result.token_ids      # "stop" | "length" | "cancelled"

Every backend raises the same one-line ValueError for the same bad input, at call time; under
greedy decoding all give the same tokens (tests/test_backends.py checks each registered one).
Setting `cancel` (a threading.Event) from any thread, or closing the stream, ends the generation
within a second and keeps the text so far (finish reason "cancelled").
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llm_steering.models import is_finite_number
from llm_steering.traces import SteeringTrace

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate one answer; the same meaning in every backend.

    `temperature=0` is greedy; `top_p=1` and `repetition_penalty=1` are off. `seed` makes a sampled
    answer repeatable on one backend. `steer_prompt=False` leaves the prompt positions unsteered;
    `clamp_intensity` turns every add into a clamp; `trace` asks for a SteeringTrace in the result.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    steer_prompt: bool = True
    clamp_intensity: bool = False
    trace: bool = False

    def check(self) -> None:
        """Raise a one-line ValueError for settings no backend can run (the rest: validate_generation)."""
        if not is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 is off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")


@dataclass
class Generation:
    """One answer, filled while it streams: complete once the stream has ended or been closed.

    `token_ids` are the answer's ids (a final stop token included), `text` its text as streamed,
    `finish_reason` "stop" (the model ended it), "length" (cut at max_new_tokens) or "cancelled".
    `trace` (when asked for) covers the prompt and the answer: `trace.token_ids` is
    `prompt_ids + token_ids`, each component's projections one per position but the last.
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    trace: SteeringTrace | None = None


def finish_reason(answer_ids: Sequence[int], max_new_tokens: int, eos: Sequence[int]) -> str:
    """Why an answer ended, from its ids: a stop token, the length limit, or neither (cancelled)."""
    if answer_ids and answer_ids[-1] in set(eos):
        return "stop"
    return "length" if len(answer_ids) >= max_new_tokens else "cancelled"


def trim_trace(trace: SteeringTrace) -> None:
    """Keep one projection per position but the last (the last token is never read back in), so a
    cancelled answer's trace has the same shape as a finished one's."""
    keep = max(len(trace.token_ids) - 1, 0)
    for comp in trace.components:
        del comp.before[keep:], comp.after[keep:]


class Stream:
    """The text pieces of one answer, as an iterator; `result` is its `Generation`.

    Closing the stream (or leaving a `with` block) ends the generation and completes `result`.
    """

    def __init__(self, pieces: Iterator[str], result: Generation) -> None:
        self._pieces, self.result = pieces, result

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.result.text += piece
        return piece

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@runtime_checkable
class Backend(Protocol):
    """What the app, the console and the benchmarks use of a backend, and nothing else."""

    name: str
    streams: bool  # text comes piece by piece (False: the whole answer at the end)

    def stream(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Stream:
        """Start one answer; raise ValueError for bad input now, before any piece."""
        ...

    def generate(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """The whole answer."""
        ...

    def close(self) -> None:
        """Free what the backend holds (an engine's processes); the model stays."""
        ...


class BackendBase:
    """`generate` and `close` for backends that implement `stream`."""

    name = ""
    streams = True

    def stream(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Stream:
        raise NotImplementedError

    def generate(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        with self.stream(chat, components, settings, cancel) as stream:
            for _ in stream:
                pass
        return stream.result

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: `factory(model, tokenizer, model_id, **options)` builds it (imported
    lazily from "module:function"); `unavailable()` says in one line why it cannot run here, or None."""

    name: str
    summary: str
    factory: str
    unavailable: Callable[[], str | None] = lambda: None
    start_note: str = ""  # what a front end says while a slow backend starts ("" = it starts at once)


_REGISTRY: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> None:
    """Add a backend (it must pass tests/test_backends.py, which runs on every registered one)."""
    _REGISTRY[entry.name] = entry


def backend_names() -> list[str]:
    """Every registered backend, available here or not."""
    return list(_REGISTRY)


def available_backends() -> list[str]:
    """The registered backends that can run in this environment."""
    return [name for name, entry in _REGISTRY.items() if entry.unavailable() is None]


def backend_entry(name: str) -> BackendEntry:
    """The registry's entry for `name` (ValueError when unknown or unavailable: see check_backend)."""
    check_backend(name)
    return _REGISTRY[name]


def check_backend(name: str) -> None:
    """ValueError in one line when `name` is not registered or cannot run here."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(_REGISTRY)}")
    reason = entry.unavailable()
    if reason:
        raise ValueError(f"backend {name} cannot run here: {reason}")


def get_backend(name: str, model: Any, tokenizer: Any, model_id: str | None = None, verbose: bool = False,
                **options: Any) -> Backend:
    """Build the backend `name` for this (transformers) model; `model_id` is what it was loaded from
    (None: the embedded model), for backends that load their own copy (vLLM); `verbose` lets a
    backend's own logs through (to stderr). `options` go to that backend's factory."""
    module, _, function = backend_entry(name).factory.partition(":")
    return getattr(importlib.import_module(module), function)(model, tokenizer, model_id, verbose=verbose, **options)
