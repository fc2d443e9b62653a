"""Steer a chat LLM by editing its residual stream with feature directions.

Components and ops, and backends with one meaning (the same tokens under greedy decoding) behind
one protocol, chosen from a registry: `get_backend(name, model, tok).stream(chat, comps, settings)`
yields text pieces, then `.result` holds the token ids, the finish reason and the trace.

* "hf", Transformers forward hooks (`stream_steered_answer_hf`): streams text, used by the app
  and the console chat. A request's hooks act only in its own generation thread and
  leave the model as soon as its generation ends, so concurrent requests never mix.
* "nnsight", NNsight interventions (`generate_steered_answer`): returns the whole answer and,
  optionally, a `SteeringTrace` of what the steering did at every position.
* "vllm", the vLLM engine: continuous batching, each request with its own steering.

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

from llm_steering.steering import *  # noqa: F403  (the public API)
from llm_steering.steering import __getattr__  # noqa: F401  (vectors and config names, loaded lazily)
