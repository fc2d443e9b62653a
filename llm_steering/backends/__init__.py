"""Every way to generate a steered answer, behind one protocol (base.py), chosen from a registry.

    >>> from llm_steering.backends import GenerationSettings, get_backend
    >>> backend = get_backend("vllm", model, tok)       # "hf" (forward hooks), "nnsight", "vllm"
    >>> result = backend.generate(chat, [comp], GenerationSettings(temperature=0))
    >>> result.text, result.finish_reason

A backend is registered here with a factory and a one-line reason it cannot run (None when it
can); tests/test_backends.py runs the conformance suite on every registered one.
"""

from __future__ import annotations

from llm_steering.backends.base import (
    FINISH_REASONS,
    Backend,
    BackendBase,
    BackendEntry,
    Generation,
    GenerationSettings,
    Stream,
    available_backends,
    backend_entry,
    backend_names,
    check_backend,
    get_backend,
    register,
)
from llm_steering.backends.vllm import vllm_unavailable

__all__ = ["FINISH_REASONS", "Backend", "BackendBase", "BackendEntry", "Generation", "GenerationSettings", "Stream",
           "available_backends", "backend_entry", "backend_names", "check_backend", "get_backend", "register"]

register(BackendEntry("hf", "transformers forward hooks; streams", "llm_steering.backends.hooks:hooks_backend"))
register(BackendEntry("nnsight", "NNsight interventions; the whole answer at the end",
                      "llm_steering.backends.nnsight:nnsight_backend"))
register(BackendEntry("vllm", "the vLLM engine (requirements-vllm.txt); streams, batches requests",
                      "llm_steering.backends.vllm:vllm_backend", vllm_unavailable,
                      "starting the vLLM engine (about 30 s on a CPU)..."))
