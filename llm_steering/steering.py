"""Steering components and ops, and the two in-process backends (Transformers hooks, NNsight).

The public API is the root `steering` module, which re-exports this one (and, lazily, the vector
file and config names); its docstring has the usage. Ops on the hidden state h after decoder
layer L, with unit direction v and p = h·v: add h + s·v; clamp h + (s - p)·v; cap
h + (clip(p, min, max) - p)·v; ablate h + (scale - 1)·p·v; add_keepnorm and clamp_keepnorm: add or
clamp, then the edited state rescaled to |h| at each position (norm-preserving).
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from llm_steering.models import (  # noqa: F401  (first: it sets the OpenMP wait policy; re-exported for users)
    CACHE_ENV,
    EMBEDDED_GGUF,
    EMBEDDED_MODEL_ID,
    EMBEDDED_PACKAGE,
    cache_dir,
    chat_input_ids,
    check_length,
    decoder_layers,
    embedded_gguf_path,
    embedded_model_dir,
    eos_ids,
    generation_kwargs,
    hidden_size,
    is_finite_number,
    layer_hidden,
    load_model,
    model_id_of,
    num_layers,
    short_repr,
    validate_generation,
    with_hidden,
)
from llm_steering.traces import ComponentTrace, SteeringTrace

import torch

OPS = ("add", "clamp", "cap", "ablate", "add_keepnorm", "clamp_keepnorm")
KEEPNORM = "_keepnorm"  # op suffix: the edited state is rescaled to the norm it had before the edit


# ---------------------------------------------------------------------------
# Steering components (their traces: traces.py)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringComponent:
    """One edit of the residual stream after decoder layer `layer`.

    `vector` is stored as a float32 unit vector. `op` is one of:
    "add" (h + strength·v), "clamp" (component along v set to `strength`),
    "cap" (component along v limited to [cap_min, cap_max]; None = unbounded),
    "ablate" (component along v multiplied by `scale`; 0 removes it),
    "add_keepnorm" / "clamp_keepnorm" (norm-preserving: add or clamp, then the edited hidden
    state is rescaled to the norm it had before, position by position, so only its direction
    turns towards v; after a clamp_keepnorm the component along v is s·|h|/|h + (s - p)·v|).

        >>> SteeringComponent(layer=15, vector=v, strength=8.5, op="clamp", name="eiffel_tower")
    """

    layer: int
    vector: torch.Tensor
    strength: float = 0.0
    op: str = "add"
    cap_min: float | None = None
    cap_max: float | None = None
    scale: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        label = f"component {self.name!r}" if self.name else "steering component"
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"{label}: layer must be a non-negative integer, got {self.layer!r}")
        if self.op not in OPS:
            raise ValueError(f"{label}: unknown op {self.op!r}; use one of {', '.join(OPS)}")
        for key in ("strength", "scale"):
            value = getattr(self, key)
            if not is_finite_number(value):
                raise ValueError(f"{label}: {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        for key in ("cap_min", "cap_max"):
            value = getattr(self, key)
            if value is not None:
                if not is_finite_number(value):
                    raise ValueError(f"{label}: {key} must be a finite number or None, got {value!r}")
                object.__setattr__(self, key, float(value))
        if self.op == "cap" and self.cap_min is None and self.cap_max is None:
            raise ValueError(f"{label}: op 'cap' needs cap_min, cap_max or both")
        if self.cap_min is not None and self.cap_max is not None and self.cap_min > self.cap_max:
            raise ValueError(f"{label}: cap_min {self.cap_min} is above cap_max {self.cap_max}")
        vec = self.vector
        if not isinstance(vec, torch.Tensor):
            raise ValueError(f"{label}: vector must be a torch.Tensor, got {type(vec).__name__}")
        if vec.dim() != 1 or vec.numel() == 0:
            raise ValueError(f"{label}: vector must be 1-D of the model's hidden size, got shape {tuple(vec.shape)}")
        if not vec.is_floating_point():
            raise ValueError(f"{label}: vector must be floating point, got {vec.dtype}")
        vec = vec.detach().to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(vec).all():
            raise ValueError(f"{label}: vector contains NaN or infinite values")
        norm = vec.norm()
        if norm == 0 or not torch.isfinite(norm):
            raise ValueError(f"{label}: vector has zero norm; give a non-zero direction")
        object.__setattr__(self, "vector", vec / norm)

    def with_op(self, op: str, **changes: Any) -> SteeringComponent:
        """A copy with another op (and any other field changed)."""
        return replace(self, op=op, **changes)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def validate_components(model: Any, components: Sequence[SteeringComponent]) -> None:
    """Raise ValueError if a component does not fit this model (layer range, vector size)."""
    n_layers, d_model = num_layers(model), hidden_size(model)
    for comp in components:
        if not isinstance(comp, SteeringComponent):
            raise ValueError(f"components must be SteeringComponent objects, got {type(comp).__name__}")
        label = f"component {comp.name!r}" if comp.name else "steering component"
        if comp.layer >= n_layers:
            raise ValueError(
                f"{label}: layer {comp.layer} is out of range: this model has {n_layers} layers (0-{n_layers - 1})"
            )
        if comp.vector.numel() != d_model:
            raise ValueError(
                f"{label}: vector has size {comp.vector.numel()}, but this model's hidden size is {d_model}"
            )


# ---------------------------------------------------------------------------
# The steering math, shared by both backends
# ---------------------------------------------------------------------------


def steer_hidden(
    hidden: torch.Tensor,
    components: Sequence[SteeringComponent],
    vectors: Sequence[torch.Tensor],
    steer_from: int = 0,
    start_pos: int = 0,
    record: list[ComponentTrace] | None = None,
) -> torch.Tensor:
    """Apply `components` in order to `hidden` [batch, seq, d_model]; return the edited tensor.

    `vectors` are the components' directions already on hidden's device (float32 at least).
    Positions are numbered from `start_pos`; those before `steer_from` are left as they
    are. When `record` is given, the projections before and after each edit (batch
    row 0) are recorded in it, one ComponentTrace per component (call `flush` after).
    A 16-bit hidden state is steered in float32 and rounded once: in bfloat16, projecting
    on a rounded v put a clamp off by up to 2% of its strength at hidden size 4096.
    """
    seq = hidden.shape[1]
    first = max(0, steer_from - start_pos)  # first position of this chunk that is steered
    for i, (comp, v) in enumerate(zip(components, vectors, strict=True)):
        v = v.to(device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
        h = hidden.to(v.dtype)  # no copy for float32 states
        before = h @ v  # [batch, seq]
        if first < seq:
            part = h[:, first:]
            edited = part + _delta(comp, before[:, first:]).unsqueeze(-1) * v  # [batch, seq - first, d]
            if comp.op.endswith(KEEPNORM):  # back to each position's old norm (a zero state stays zero)
                edited = edited * (part.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            edited = edited.to(hidden.dtype)
            hidden = edited if first == 0 else torch.cat([hidden[:, :first], edited], dim=1)
        if record is not None:
            record[i].record(before[0], hidden[0].to(v.dtype) @ v)
    return hidden


def _delta(comp: SteeringComponent, proj: torch.Tensor) -> torch.Tensor:
    """How far to move along v, given the current projections `proj` (before any keepnorm rescale)."""
    op = comp.op.removesuffix(KEEPNORM)
    if op == "add":
        return torch.full_like(proj, comp.strength)
    if op == "clamp":
        return comp.strength - proj
    if op == "cap":
        return proj.clamp(min=comp.cap_min, max=comp.cap_max) - proj
    return (comp.scale - 1.0) * proj  # ablate


def resolve_components(components: Sequence[SteeringComponent], clamp_intensity: bool) -> list[SteeringComponent]:
    """The components as a backend applies them: with `clamp_intensity`, every add becomes a clamp
    (add_keepnorm a clamp_keepnorm)."""
    comps = list(components)
    if clamp_intensity:
        comps = [c.with_op(c.op.replace("add", "clamp", 1)) if c.op.startswith("add") else c for c in comps]
    return comps


def _by_layer(components: Sequence[SteeringComponent]) -> dict[int, list[int]]:
    """Component indices grouped by layer, in the given order within a layer."""
    groups: dict[int, list[int]] = {}
    for i, comp in enumerate(components):
        groups.setdefault(comp.layer, []).append(i)
    return dict(sorted(groups.items()))


def _new_trace(components: Sequence[SteeringComponent], prompt_ids: list[int]) -> SteeringTrace:
    return SteeringTrace(
        prompt_len=len(prompt_ids),
        token_ids=list(prompt_ids),
        components=[ComponentTrace(layer=c.layer, name=c.name, op=c.op) for c in components],
    )


def _device_vectors(model: Any, components: Sequence[SteeringComponent]) -> list[torch.Tensor]:
    param = next(model.parameters())  # float32 even for a 16-bit model: steer_hidden computes in it
    return [c.vector.to(device=param.device, dtype=torch.promote_types(param.dtype, torch.float32)) for c in components]


# ---------------------------------------------------------------------------
# Transformers backend: forward hooks, streaming
# ---------------------------------------------------------------------------


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
    vectors = _device_vectors(model, comps)
    try:
        for layer, idx in _by_layer(comps).items():
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
) -> Iterator[str]:
    """Yield the steered answer's text pieces as they are generated (forward hooks).

    `chat` is a list of {"role", "content"} dicts. `clamp_intensity=True` turns every
    add into a clamp. `temperature=0` is greedy. `steer_prompt=False` leaves the
    prompt positions unsteered. Pass an empty `SteeringTrace()` as `trace` to have it
    filled with the projections at every position. Closing the generator, setting
    `cancel` from any thread, or an error stops the generation at the next layer and
    removes the hooks (a cancelled stream simply ends).

        >>> for piece in stream_steered_answer_hf(model, tok, chat, [comp], temperature=0):
        ...     print(piece, end="")
    """
    from transformers import TextIteratorStreamer

    comps = resolve_components(components, clamp_intensity)
    validate_components(model, comps)
    validate_generation(chat, max_new_tokens, temperature, repetition_penalty)
    prompt_ids = chat_input_ids(tokenizer, chat)
    check_length(model, len(prompt_ids))

    request = _Request(cancel)
    record = None
    if trace is not None:
        fresh = _new_trace(comps, prompt_ids)
        trace.prompt_len, trace.token_ids, trace.components = fresh.prompt_len, fresh.token_ids, fresh.components
        record = trace.components
    steer_from = 0 if steer_prompt else len(prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = generation_kwargs(model, tokenizer, max_new_tokens, temperature, repetition_penalty)
    # Everything above raises at call time; the generator below runs when iterated.
    return _stream(model, streamer, kwargs, input_ids, comps, request, steer_from, trace, record)


def _stream(model: Any, streamer: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
            comps: list[SteeringComponent], request: _Request, steer_from: int,
            trace: SteeringTrace | None, record: list[ComponentTrace] | None) -> Iterator[str]:
    from transformers import StoppingCriteriaList

    n_prompt = input_ids.shape[1]

    def run() -> None:
        try:
            with _acting(request), torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(request.stop, request.cancel)]),
                    **kwargs,
                )
            request.output_ids = out[0, n_prompt:].tolist()
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
        if trace is not None:
            trace.token_ids.extend(request.output_ids)
    finally:
        request.stop.set()  # a consumer that stopped reading ends the generation at the next layer
        try:
            if thread.ident is not None:
                request.done.wait()
                thread.join()  # returns at once now; a thread still unwinding at exit can abort the process
        finally:
            request.remove_hooks()  # when the thread never started


def generate_steered_answer_hf(model: Any, tokenizer: Any, chat: Sequence[dict],
                               components: Sequence[SteeringComponent], **kwargs: Any) -> str:
    """The whole answer from the hooks backend (see `stream_steered_answer_hf`)."""
    return "".join(stream_steered_answer_hf(model, tokenizer, chat, components, **kwargs))


# ---------------------------------------------------------------------------
# NNsight backend: interventions on every generation step, with a trace
# ---------------------------------------------------------------------------

_NNSIGHT: weakref.WeakKeyDictionary[Any, tuple[Any, threading.Lock]] = weakref.WeakKeyDictionary()
_NNSIGHT_LOCK = threading.Lock()


def _nnsight_model(model: Any, tokenizer: Any) -> tuple[Any, threading.Lock]:
    """An NNsight wrapper around a structural copy of `model` that shares its weights.

    NNsight installs its own forward on every module it wraps; wrapping a copy keeps
    the user's model (and the hooks backend running on it) untouched. One trace at a
    time runs on a wrapper, so a lock comes with it.
    """
    with _NNSIGHT_LOCK:
        if model not in _NNSIGHT:
            from nnsight import TransformersModel

            _unmount_nnsight_save()

            shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            clone = copy.deepcopy(model, memo=shared)
            for module in clone.modules():  # hooks of requests in flight must not come along
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
            _NNSIGHT[model] = (TransformersModel(clone, tokenizer=tokenizer), threading.Lock())
        return _NNSIGHT[model]


def _unmount_nnsight_save() -> None:
    """Take back the `.save` NNsight 0.8 mounts on every object at import.

    With it in place, any class anyio checks that is defined later (gradio's MCP server, for
    one) fails with "Attribute 'save' is missing its type annotation": importing gradio after
    an NNsight answer broke. This backend calls `nnsight.save(...)` instead.
    """
    try:
        from nnsight._c import unmount
    except ImportError:
        return
    if unmount is not None and "save" in object.__dict__:
        unmount("save")


def generate_steered_answer(
    model: Any,
    tokenizer: Any,
    chat: Sequence[dict],
    components: Sequence[SteeringComponent],
    clamp_intensity: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    steer_prompt: bool = True,
    return_trace: bool = False,
    cancel: threading.Event | None = None,
) -> str | tuple[str, SteeringTrace]:
    """The whole steered answer, with the steering applied by NNsight interventions.

    Same arguments and meaning as `stream_steered_answer_hf`; under greedy decoding
    both return the same tokens. With `return_trace=True` it returns
    `(answer, SteeringTrace)`: the projection on each component's direction before
    and after its edit, at every prompt and answer position. Setting the `cancel`
    event from another thread ends the generation after the current token; the call
    then returns the answer so far.

        >>> answer, trace = generate_steered_answer(model, tok, chat, [comp], return_trace=True)
        >>> trace.components[0].after[-1]
    """
    import warnings

    import nnsight

    comps = resolve_components(components, clamp_intensity)
    validate_components(model, comps)
    validate_generation(chat, max_new_tokens, temperature, repetition_penalty)
    prompt_ids = chat_input_ids(tokenizer, chat)
    check_length(model, len(prompt_ids))

    nn_model, lock = _nnsight_model(model, tokenizer)
    path, _ = decoder_layers(model)
    layer_list = nn_model
    for part in path.split("."):
        layer_list = getattr(layer_list, part)
    groups = [
        (layer_list[layer], [comps[i] for i in idx], idx) for layer, idx in _by_layer(comps).items()
    ]
    vectors = _device_vectors(model, comps)
    trace = _new_trace(comps, prompt_ids)
    record = trace.components if return_trace else None
    steer_from = 0 if steer_prompt else len(prompt_ids)
    n_prompt = len(prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    kwargs = generation_kwargs(model, tokenizer, max_new_tokens, temperature, repetition_penalty)
    if cancel is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(cancel)])

    with lock, warnings.catch_warnings(), torch.inference_mode():
        # An open `tracer.iter[:]` ends by parking on the step after the last one: expected.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with nn_model.generate(**kwargs) as tracer:
            with tracer.invoke({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}):
                # With no component nothing is touched per step, and an open loop would never end.
                for step in tracer.iter[:] if groups else ():
                    start = 0 if step == 0 else n_prompt + step - 1
                    for envoy, group, idx in groups:
                        hidden = layer_hidden(envoy.output)  # [batch, seq, d_model]
                        edited = steer_hidden(
                            hidden,
                            group,
                            [vectors[i] for i in idx],
                            steer_from,
                            start,
                            None if record is None else [record[i] for i in idx],
                        )
                        hidden[:] = edited
            with tracer.invoke():
                output_ids = nnsight.save(tracer.result)
    trace.flush()
    answer_ids = output_ids[0, n_prompt:].tolist()
    eos = set(eos_ids(model, tokenizer))
    answer = tokenizer.decode([t for t in answer_ids if t not in eos], skip_special_tokens=True)
    if not return_trace:
        return answer
    trace.token_ids.extend(answer_ids)
    return answer, trace


# The data layer lives in vectors.py and config.py, which import this module; they are
# re-exported lazily so that `steering.load_vectors(...)` and
# `from steering import SteeringSpec` keep working without an import cycle.
_REEXPORTS = {
    "vectors": ("SteeringVector", "SteeringVectorSet", "load_vectors", "measure_layer_norms", "components_from_file",
                "load_saes_from_file"),
    "config": ("DemoConfig", "ModelProfile", "FeatureConfig", "SPEC_FORMAT", "parse_yaml_text", "spec_components", "Preset", "GenerationDefaults", "ActiveFeature",
               "SteeringSpec", "load_config", "save_steering_spec", "load_steering_spec", "read_yaml_file"),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _REEXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"llm_steering.{module}"), name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")

