"""Steer a chat LLM by editing its residual stream with feature directions.

Components and ops (components.py), and backends with one meaning, the same tokens under greedy
decoding, behind one protocol (backends/: `get_backend(name, model, tok).stream(chat, comps, settings)`):

* "hf", transformers forward hooks (`stream_steered_answer_hf`): streams text. A request's hooks
  act only in its own generation thread and leave the model as soon as its generation ends.
* "nnsight", NNsight interventions (`generate_steered_answer`): the whole answer at the end.
* "vllm", the vLLM engine (vllm_backend.py): continuous batching, each request with its steering.

    >>> model, tok = load_model()                      # embedded SmolLM2-135M-Instruct
    >>> comp = SteeringComponent(layer=10, vector=v, strength=60.0, op="clamp")
    >>> "".join(stream_steered_answer_hf(model, tok, [{"role": "user", "content": "Hi"}], [comp]))

Steering ops on the hidden state h after decoder layer L, with unit direction v and
p = h·v: add h + s·v; clamp h + (s - p)·v; cap h + (clip(p, min, max) - p)·v;
ablate h + (scale - 1)·p·v; add_keepnorm and clamp_keepnorm: add or clamp, then the edited
state rescaled to |h| at each position (norm-preserving).

The rest of the library lives beside this module and is re-exported here, so that
`import steering` is all a user needs: models.py (loading, layers, chat template),
vectors.py (vector files, layer norms), config.py (demo.yaml, steering specs).
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
from llm_steering.backends.nnsight import NNsightBackend, generate_steered_answer  # noqa: F401
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
    "vectors": ("SteeringVector", "SteeringVectorSet", "load_vectors", "measure_layer_norms", "load_saes_from_file"),
    "config": ("DemoConfig", "ModelProfile", "FeatureConfig", "SPEC_FORMAT", "parse_yaml_text", "spec_components", "Preset", "GenerationDefaults", "ActiveFeature",
               "SteeringSpec", "load_config", "save_steering_spec", "load_steering_spec", "read_yaml_file"),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _REEXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"llm_steering.{module}"), name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")

