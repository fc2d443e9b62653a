"""The vLLM 0.32 model-runner patches the steering needs, in each worker process.

`hook_runner_steps` calls the steering before each step's forward (the batch layout is known by
then) and after each step; `fix_cpu_seeded_chunked_prefill` works around a vLLM 0.32 bug on the
CPU build. Both read `GPUModelRunner` internals of the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def hook_runner_steps(runner: Any, before_forward: Callable[[], None], after_step: Callable[[], None]) -> None:
    """Call `before_forward` once the runner has laid out a step's batch, `after_step` when the step ends."""
    if not hasattr(runner, "_prepare_inputs") or not hasattr(runner, "query_start_loc"):
        raise ValueError(f"steering needs vLLM 0.32's V1 model runner, not {type(runner).__name__}: "
                         "set VLLM_USE_V2_MODEL_RUNNER=0")
    prepare, execute = runner._prepare_inputs, runner.execute_model

    def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        result = prepare(*args, **kwargs)
        before_forward()
        return result

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        try:
            return execute(*args, **kwargs)
        finally:
            after_step()

    runner._prepare_inputs, runner.execute_model = prepare_inputs, execute_model
    if hasattr(runner, "_bookkeeping_sync") and hasattr(runner, "discard_request_mask"):
        fix_cpu_seeded_chunked_prefill(runner)


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
