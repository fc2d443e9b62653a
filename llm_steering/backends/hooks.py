"""The hooks backend: transformers' generate() with a forward hook on each steered layer, streaming.

A request's hooks act only in its own generation thread and leave the model as soon as its
generation ends, so concurrent requests on one model never mix. `steer` is the same hooks as a
context manager for any forward pass (effects.py's teacher-forced passes use it).

    >>> backend = HooksBackend(model, tok)
    >>> for piece in backend.stream(chat, [comp], GenerationSettings(temperature=0)):
    ...     print(piece, end="")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from llm_steering.backends.base import (
    BackendBase,
    Generation,
    GenerationSettings,
    Stream,
    finish_reason,
    trim_trace,
)
from llm_steering.components import (
    SteeringComponent,
    by_layer,
    device_vectors,
    new_trace,
    resolve_components,
    steer_hidden,
    validate_components,
)
from llm_steering.models import (
    chat_input_ids,
    check_length,
    decoder_layers,
    eos_ids,
    generation_kwargs,
    layer_hidden,
    validate_generation,
    with_hidden,
)
from llm_steering.traces import ComponentTrace, SteeringTrace

import torch


class _Cancelled(Exception):
    """Raised inside a hook to abort a generation whose consumer went away."""


class _Request:
    """One generation's state: its stop flag, its error, its output ids, its hooks."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.stop = threading.Event()
        self.cancel = cancel  # the caller's own stop signal, if any
        self.error: BaseException | None = None
        self.output_ids: list[int] = []
        self.handles: list[Any] = []
        self.done = threading.Event()  # waited on instead of Thread.join, which a Ctrl-C can confuse

    def stopped(self) -> bool:
        return self.stop.is_set() or (self.cancel is not None and self.cancel.is_set())

    def remove_hooks(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()


# The requests whose steering acts in the current thread. A thread-local dies with its
# thread, and a new thread starts with an empty one even when the OS hands it a finished
# thread's id; so a hook can act only in the forward passes of the thread that entered
# its request, whatever the timing of other threads and consumers.
_ACTIVE = threading.local()


@contextmanager
def _acting(request: _Request) -> Iterator[None]:
    """Let `request`'s hooks act in this thread inside the block."""
    active = getattr(_ACTIVE, "requests", None)
    if active is None:
        active = _ACTIVE.requests = set()
    active.add(request)
    try:
        yield
    finally:
        active.discard(request)


def _make_hook(request: _Request, comps: list[SteeringComponent], vectors: list[torch.Tensor],
               steer_from: int, record: list[ComponentTrace] | None):
    """A forward hook for one layer, acting only in the thread that runs `request`."""
    offset = [0]  # positions this layer has already seen in this request

    def hook(module: Any, args: Any, output: Any) -> Any:
        if request not in getattr(_ACTIVE, "requests", ()):
            return None  # another request's forward pass on the same model
        if request.stopped():
            raise _Cancelled()
        if not comps:
            return None  # a stop-only hook (an unsteered stream stops at the next layer too)
        hidden = layer_hidden(output)  # [batch, seq, d_model]
        start = offset[0]
        offset[0] += hidden.shape[1]
        if start + hidden.shape[1] <= steer_from and record is None:
            return None
        return with_hidden(output, steer_hidden(hidden, comps, vectors, steer_from, start, record))

    return hook


class _StopOnEvent:
    """StoppingCriteria that ends generation once any of its events is set."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _install_hooks(model: Any, comps: list[SteeringComponent], request: _Request, steer_from: int,
                   record: list[ComponentTrace] | None) -> None:
    """Register one forward hook per steered layer into `request.handles`."""
    _, layers = decoder_layers(model)
    vectors = device_vectors(model, comps)
    try:
        for layer, idx in by_layer(comps).items():
            hook = _make_hook(
                request,
                [comps[i] for i in idx],
                [vectors[i] for i in idx],
                steer_from,
                None if record is None else [record[i] for i in idx],
            )
            request.handles.append(layers[layer].register_forward_hook(hook))
    except BaseException:
        request.remove_hooks()
        raise


@contextmanager
def steer(model: Any, components: Sequence[SteeringComponent], steer_from: int = 0) -> Iterator[None]:
    """Steer every forward pass this thread runs on `model` inside the block (forward hooks).

    Positions are counted from the first forward in the block; those before
    `steer_from` are left alone. Other threads using the model are not affected, and
    the hooks are gone when the block exits, however it exits.

        >>> with steer(model, [SteeringComponent(layer=3, vector=v, strength=4.0)]):
        ...     logits = model(ids).logits
    """
    comps = list(components)
    validate_components(model, comps)
    request = _Request()
    _install_hooks(model, comps, request, steer_from, None)
    try:
        with _acting(request):
            yield
    finally:
        request.remove_hooks()



class InProcessBackend(BackendBase):
    """A backend that steers the user's transformers model in this process (hooks, NNsight)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def begin(self, chat: Sequence[dict], components: Sequence[SteeringComponent],
              settings: GenerationSettings | None) -> tuple[GenerationSettings, list[SteeringComponent], list[int], Generation]:
        """The request checked: its settings, the components as applied, the prompt's ids, and its result to fill."""
        s = settings or GenerationSettings()
        comps, prompt_ids = check_request(self.model, self.tokenizer, chat, components, s)
        return s, comps, prompt_ids, Generation(prompt_ids, trace=new_trace(comps, prompt_ids) if s.trace else None)

    def stream(self, chat: Sequence[dict], components: Sequence[SteeringComponent],
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> Stream:
        s, comps, prompt_ids, result = self.begin(chat, components, settings)
        return Stream(self.pieces(s, comps, prompt_ids, result, cancel), result)

    def pieces(self, s: GenerationSettings, comps: list[SteeringComponent], prompt_ids: list[int], result: Generation,
               cancel: threading.Event | None) -> Iterator[str]:
        """The answer's text pieces, filling `result` as it goes."""
        raise NotImplementedError


class HooksBackend(InProcessBackend):
    """Forward hooks on the user's transformers model; streams."""

    name = "hf"
    streams = True

    def pieces(self, s: GenerationSettings, comps: list[SteeringComponent], prompt_ids: list[int], result: Generation,
               cancel: threading.Event | None) -> Iterator[str]:
        steer_from = 0 if s.steer_prompt else len(prompt_ids)
        return _stream(self.model, self.tokenizer, s, comps, _Request(cancel), steer_from, result)


def hooks_backend(model: Any, tokenizer: Any, model_id: str | None = None, verbose: bool = False) -> HooksBackend:
    """The registry's factory."""
    return HooksBackend(model, tokenizer)


def check_request(model: Any, tokenizer: Any, chat: Sequence[dict], components: Sequence[SteeringComponent],
                  settings: GenerationSettings) -> tuple[list[SteeringComponent], list[int]]:
    """The components as applied and the prompt's ids; a one-line ValueError for anything bad."""
    comps = resolve_components(components, settings.clamp_intensity)
    validate_components(model, comps)
    validate_generation(chat, settings.max_new_tokens, settings.temperature, settings.repetition_penalty)
    settings.check()
    prompt_ids = chat_input_ids(tokenizer, chat)
    check_length(model, len(prompt_ids))
    return comps, prompt_ids


HOLD_TOKENS = 4  # a streamed word is held back this many tokens at most, waiting for its end
BROKEN_TOKENS = 8  # held this long, a tail that does not decode is shown as it is (replacement characters)


class _RecordingStreamer:
    """transformers' TextIteratorStreamer that also keeps the answer's token ids as they come.

    transformers holds text back until a space or a newline (a word may still change), so text
    without spaces, as broken steering makes, froze the stream for seconds. Here a held tail is shown
    after HOLD_TOKENS tokens, except a character whose bytes have not all come yet (it decodes
    to U+FFFD), which waits up to BROKEN_TOKENS tokens and is then shown as it decodes."""

    def __new__(cls, tokenizer: Any, ids: list[int]) -> Any:
        from transformers import TextIteratorStreamer

        class Recording(TextIteratorStreamer):
            held = 0  # tokens since text was last shown

            def put(self, value: torch.Tensor) -> None:
                prompt = self.skip_prompt and self.next_tokens_are_prompt
                if not prompt:
                    ids.extend(int(t) for t in value.reshape(-1).tolist())
                before = self.print_len
                super().put(value)
                if prompt:
                    return
                self.held = 0 if self.print_len != before or not self.token_cache else self.held + 1
                if self.held >= HOLD_TOKENS:
                    text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                    end = len(text) if self.held >= BROKEN_TOKENS else len(text.rstrip("\ufffd"))
                    if end > self.print_len:
                        self.on_finalized_text(text[self.print_len : end])
                        self.print_len, self.held = end, 0

        return Recording(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _stream(model: Any, tokenizer: Any, s: GenerationSettings, comps: list[SteeringComponent], request: _Request,
            steer_from: int, result: Generation) -> Iterator[str]:
    """Generate in a thread; yield its text pieces; on any exit stop it and complete `result`."""
    from transformers import StoppingCriteriaList

    trace = result.trace
    record = None if trace is None else trace.components
    device = next(model.parameters()).device
    input_ids = torch.tensor([result.prompt_ids], device=device)
    streamer = _RecordingStreamer(tokenizer, result.token_ids)
    kwargs = generation_kwargs(model, tokenizer, s.max_new_tokens, s.temperature, s.repetition_penalty, s.top_p)

    def run() -> None:
        try:
            with _acting(request), torch.inference_mode():
                if s.seed is not None:
                    torch.manual_seed(s.seed)
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_StopOnEvent(request.stop, request.cancel)]),
                               **kwargs)
        except BaseException as exc:  # handed to the consumer below
            request.error = exc
            streamer.end()
        finally:
            request.remove_hooks()  # as soon as generation ends, not when the consumer comes back
            if trace is not None:
                trace.flush()
            request.done.set()

    thread = threading.Thread(target=run, name="steered-generation", daemon=True)
    try:
        _install_hooks(model, comps, request, steer_from, record)
        if not comps:  # no steering hook to stop at: a stop-only hook per layer, or a stop waits for the whole token
            request.handles += [layer.register_forward_hook(_make_hook(request, [], [], 0, None))
                                for layer in decoder_layers(model)[1]]
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        request.done.wait()
        if request.error is not None and not isinstance(request.error, _Cancelled):
            raise request.error
    finally:
        request.stop.set()  # a consumer that stopped reading ends the generation at the next layer
        try:
            if thread.ident is not None:
                request.done.wait()
                thread.join()  # returns at once now; a thread still unwinding at exit can abort the process
        finally:
            request.remove_hooks()  # when the thread never started
            _complete(result, s.max_new_tokens, eos_ids(model, tokenizer))


def _complete(result: Generation, max_new_tokens: int, eos: list[int]) -> None:
    result.finish_reason = finish_reason(result.token_ids, max_new_tokens, eos)
    if result.trace is not None:
        result.trace.token_ids[:] = [*result.prompt_ids, *result.token_ids]  # in place: callers hold the list
        trim_trace(result.trace)


def stream_steered_answer_hf(
    model: Any,
    tokenizer: Any,
    chat: Sequence[dict],
    components: Sequence[SteeringComponent],
    clamp_intensity: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    steer_prompt: bool = True,
    trace: SteeringTrace | None = None,
    cancel: threading.Event | None = None,
) -> Stream:
    """Yield the steered answer's text pieces as they are generated (the hooks backend; older API).

    `chat` is a list of {"role", "content"} dicts. `clamp_intensity=True` turns every
    add into a clamp. `temperature=0` is greedy. `steer_prompt=False` leaves the
    prompt positions unsteered. Pass an empty `SteeringTrace()` as `trace` to have it
    filled with the projections at every position. Closing the generator, setting
    `cancel` from any thread, or an error stops the generation at the next layer and
    removes the hooks (a cancelled stream simply ends).

        >>> for piece in stream_steered_answer_hf(model, tok, chat, [comp], temperature=0):
        ...     print(piece, end="")
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  repetition_penalty=repetition_penalty, steer_prompt=steer_prompt,
                                  clamp_intensity=clamp_intensity, trace=trace is not None)
    stream = HooksBackend(model, tokenizer).stream(chat, components, settings, cancel)
    if trace is not None:  # the caller's trace shares the result's lists, filled in place
        filled = stream.result.trace
        trace.prompt_len, trace.token_ids, trace.components = filled.prompt_len, filled.token_ids, filled.components
    return stream


def generate_steered_answer_hf(model: Any, tokenizer: Any, chat: Sequence[dict],
                               components: Sequence[SteeringComponent], **kwargs: Any) -> str:
    """The whole answer from the hooks backend (see `stream_steered_answer_hf`)."""
    return "".join(stream_steered_answer_hf(model, tokenizer, chat, components, **kwargs))
