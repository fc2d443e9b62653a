"""vLLM's admission check of a request's steering record: a 400 for that request, never a crash.

Registered as a custom logits processor (`--logits-processors`, `logits_processors=`) only for its
`validate_params`, which vLLM calls for every request as it is admitted, in the process that
serves the API (the one that signed the record). It refuses a record this process did not sign (a
client's own `vllm_xargs.llm_steering`, by any route: JSON in any casing, a form, a path the
middleware does not rewrite) or one that is malformed. It changes no logits.
"""

from __future__ import annotations

from typing import Any

from llm_steering.backends.vllm.wire import EXTRA_KEY, SteeringRecord

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

VALIDATOR = "llm_steering.backends.vllm.validator:SteeringValidator"


class SteeringValidator(LogitsProcessor):
    """Checks `extra_args[EXTRA_KEY]` at admission (SteeringRecord.verify); a no-op on the logits."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        value = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
        if value is not None:
            SteeringRecord.verify(value)  # RecordError is a ValueError: vLLM answers 400

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: Any) -> Any:
        return logits
