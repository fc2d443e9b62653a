"""The vLLM engine's former import site: `llm_steering.backends.vllm` is the backend's package now.

    >>> from llm_steering.backends.vllm.engine import VLLMEngine      # the engine
    >>> from llm_steering.vllm_backend import VLLMEngine              # the same class, as before

Only the engine's public names are kept here (it imports the package one way; nothing imports
this module back).
"""

from llm_steering.backends.vllm.engine import VLLMEngine, stream_steered_answer_vllm  # noqa: F401
from llm_steering.backends.vllm.wire import EXTRA_KEY  # noqa: F401
from llm_steering.backends.vllm.worker import WORKER_EXTENSION, SteeringWorkerExtension  # noqa: F401
