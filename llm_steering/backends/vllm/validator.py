"""vLLM's admission check of a request's steering record: a 400 for that request, never a crash.

Registered as a custom logits processor (`--logits-processors`, `logits_processors=`) only for its
`validate_params`, which vLLM calls for every request as it is admitted, in the process that
serves the API (the one that signed the record). It refuses a record this process did not sign (a
client's own `vllm_xargs.llm_steering`, by any route: JSON in any casing, a form, a path the
middleware does not rewrite) or one that is malformed, and what only the middleware reads
(`steering`, `auto`) if it arrives unread. It changes no logits.
"""

from __future__ import annotations

from typing import Any

from llm_steering.backends.vllm.wire import AUTO_REFUSED, EXTRA_KEY, SteeringRecord

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

VALIDATOR = "llm_steering.backends.vllm.validator:SteeringValidator"


class SteeringValidator(LogitsProcessor):
    """Checks `extra_args[EXTRA_KEY]` at admission (SteeringRecord.verify); a no-op on the logits."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        value = extra.get(EXTRA_KEY)
        if value is not None:
            SteeringRecord.verify(value)  # RecordError is a ValueError: vLLM answers 400
        # what only the middleware reads, arriving here, was not read by it: it would be dropped without a word
        if "steering" in extra:
            raise ValueError("vllm_xargs.steering reached the engine unread: send it in a JSON body "
                             "(Content-Type: application/json) to /v1/chat/completions or /v1/completions")
        if "auto" in extra:
            raise ValueError(AUTO_REFUSED)

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: Any) -> Any:
        return logits
