"""Steering components and ops, and the backends (Transformers hooks, NNsight, vLLM) behind one protocol.

The public API is the root `steering` module, which re-exports this one (and, lazily, the vector
file and config names); its docstring has the usage. Components and ops live in components.py, the
backends (one protocol, a registry: "hf" forward hooks, "nnsight", "vllm") in backends/. Ops on the
hidden state h after decoder layer L, with unit direction v and p = h·v: add h + s·v; clamp
h + (s - p)·v; cap h + (clip(p, min, max) - p)·v; ablate h + (scale - 1)·p·v; add_keepnorm and
clamp_keepnorm: add or clamp, then the edited state rescaled to |h| at each position (norm-preserving).
"""

from __future__ import annotations

from typing import Any

from llm_steering.backends import (  # noqa: F401  (re-exported for users)
    Backend,
    Generation,
    GenerationSettings,
    Stream,
    available_backends,
    backend_names,
    check_backend,
    get_backend,
)
from llm_steering.backends.hooks import (  # noqa: F401
    HooksBackend,
    generate_steered_answer_hf,
    steer,
    stream_steered_answer_hf,
)
from llm_steering.backends.nnsight import (  # noqa: F401
    NNsightBackend,
    generate_steered_answer,
    generate_steered_answer_nnsight,
)
from llm_steering.components import (  # noqa: F401
    KEEPNORM,
    OPS,
    SteeringComponent,
    resolve_components,
    steer_hidden,
    validate_components,
)
from llm_steering.models import (  # noqa: F401
    CACHE_ENV,
    DTYPE_ENV,
    EMBEDDED_GGUF,
    EMBEDDED_MODEL_ID,
    EMBEDDED_PACKAGE,
    base_model,
    cache_dir,
    chat_input_ids,
    check_length,
    decoder_layers,
    default_dtype,
    embedded_gguf_path,
    embedded_model_dir,
    eos_ids,
    final_norm,
    forward_hooks,
    generation_kwargs,
    hidden_size,
    is_finite_number,
    layer_hidden,
    load_model,
    model_id_of,
    num_layers,
    short_repr,
    unembedding,
    validate_generation,
    with_hidden,
)
from llm_steering.traces import ComponentTrace, SteeringTrace  # noqa: F401

# The data layer lives in vectors.py and config.py, which import this module; they are
# re-exported lazily so that `steering.load_vectors(...)` and
# `from steering import SteeringSpec` keep working without an import cycle.
_REEXPORTS = {
    "vectors": ("SteeringVector", "SteeringVectorSet", "load_vectors", "measure_layer_norms", "components_from_file",
                "load_saes_from_file"),
    "catalog": ("spec_components", "catalog_for_vectors"),
    "config": ("DemoConfig", "ModelProfile", "FeatureConfig", "SPEC_FORMAT", "parse_yaml_text", "Preset", "GenerationDefaults", "ActiveFeature",
               "SteeringSpec", "load_config", "save_steering_spec", "load_steering_spec", "read_yaml_file"),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _REEXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"llm_steering.{module}"), name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")

