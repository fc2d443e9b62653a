"""Inside vLLM's worker processes: the extension that steers each request's rows of every batch.

Installed with `worker_extension_cls` (WORKER_EXTENSION) and called through `collective_rpc`.
It imports only torch, the steering math (components.py), the vectors-file reader and the wire
record: not the library's facade, no backend, no front end.

Each request's record (wire.py) is read and checked again here, against this model's layer count
and width, before anything touches the model: a record that does not fit is logged and that
request runs unsteered; nothing a request carries can raise inside the engine. (The record was
already checked at admission, by the process that signed it: see validator.py.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llm_steering.backends.vllm.patches import hook_runner_steps
from llm_steering.backends.vllm.wire import EXTRA_KEY, RecordError, SteeringRecord, file_digest
from llm_steering.components import SteeringComponent, steer_hidden
from llm_steering.traces import ComponentTrace

import torch

WORKER_EXTENSION = "llm_steering.backends.vllm.worker.SteeringWorkerExtension"
SCORE_EPS = 1e-6  # lens.EPS: the probability floor of a scored log-probability
logger = logging.getLogger(__name__)


class SteeringWorkerExtension:
    """Mixed into each vLLM worker (`worker_extension_cls`); called through `collective_rpc`."""

    def steering_install(self) -> int:
        """Hook the decoder layers and the model runner of this worker; return the layer count."""
        if getattr(self, "_steering", None) is None:
            self._steering = WorkerSteering(self.model_runner)
        return len(self._steering.layers)

    def steering_pop_scores(self, keys: list[str]) -> list[tuple[list[float], int] | None]:
        """Per scored request key (SteeringRecord.score): the sum over its scored positions of the log-probability
        the model gave every vocabulary token (log(softmax + EPS), float32) and how many positions; forgotten after."""
        out = []
        for key in keys:
            got = self._steering.scores.pop(key, None)
            out.append(None if got is None else (got[0].tolist(), got[1]))
        return out

    def steering_pop_trace(self, key: str) -> list[list[tuple[int, float, float]]] | None:
        """The recorded (position, before, after) rows of a traced request, per component; forgotten after."""
        rows = self._steering.traces.pop(key, None)
        return None if rows is None else [[(p, *ba) for p, ba in sorted(r.items())] for r in rows]


@dataclass
class RequestSteering:
    """One request's steering inside a worker: per layer, its component indices, components, vectors."""

    layers: dict[int, tuple[list[int], list[SteeringComponent], list[torch.Tensor]]]
    steer_from: int
    trace: list[dict[int, tuple[float, float]]] | None
    n_prompt: int = 0
    stop: int | None = None  # the releasing components are unsteered from this position on
    release_ids: frozenset[int] = frozenset()  # ... or from the first generated token among these
    releasing: frozenset[int] = frozenset()  # the component indices that let go
    score: str | None = None  # record the mean log-probabilities at [score_from, n_prompt - 1) under this key
    score_from: int = 0

    def kept(self, layer: int) -> tuple[list[SteeringComponent], list[torch.Tensor]]:
        """The layer's components that do not let go, and their vectors."""
        idx, comps, vectors = self.layers[layer]
        keep = [j for j, i in enumerate(idx) if i not in self.releasing]
        return [comps[j] for j in keep], [vectors[j] for j in keep]


class WorkerSteering:
    """Per-step row layout of the batch and one forward hook per decoder layer."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.layers = decoder_layers(runner.model)
        self.dtype = next(runner.model.parameters()).dtype
        self.hidden_size = int(runner.model_config.get_hidden_size())
        self.plan: dict[int, list[tuple[int, int, int, RequestSteering]]] | None = None
        self.requests: dict[str, RequestSteering | None] = {}
        self.traces: dict[str, list[dict[int, tuple[float, float]]]] = {}
        self.vector_files: dict[str, tuple[str, Any]] = {}  # path -> (digest, SteeringVectorSet)
        self.releases: list[tuple[int, int, int, RequestSteering]] = []  # this step's rows that may let go
        self.scoring: list[tuple[int, int, int, RequestSteering]] = []  # this step's rows that are scored
        self.scores: dict[str, tuple[torch.Tensor, int]] = {}
        hook_runner_steps(runner, self._plan_step, self._end_step)
        held = held_layers(self.layers)
        for index in held:
            self.layers[index].register_forward_hook(self._make_hook(index, last=index == len(self.layers) - 1))
        embed = getattr(getattr(runner.model, "model", None), "embed_tokens", None)
        if embed is not None and 0 in held:
            embed.register_forward_pre_hook(self._read_fed_tokens)

    def _end_step(self) -> None:
        self.plan = None  # dummy and profiling runs must never see a stale plan
        self.releases, self.scoring = [], []

    def _read_fed_tokens(self, module: Any, args: Any) -> None:
        """A releasing request lets go from the position of the first generated token it is fed that is one of
        its release ids (that token's own position on unsteered; calibrate.scheduled_steering's rule)."""
        if not self.releases or not args:
            return
        ids = args[0]  # [tokens] this step's input ids, rows laid out as the plan's
        for a, b, pos, req in self.releases:
            for k in range(b - a):
                if pos + k >= req.n_prompt and int(ids[a + k]) in req.release_ids:
                    req.stop = pos + k if req.stop is None else min(req.stop, pos + k)
                    break

    def _plan_step(self) -> None:
        """Which rows [a, b) of this step's batch belong to which steered request, from which position."""
        batch, runner = self.runner.input_batch, self.runner
        n = batch.num_reqs
        for req_id in [r for r in self.requests if r not in runner.requests]:
            del self.requests[req_id]
        starts = runner.query_start_loc.np[: n + 1]  # [n + 1] cumulative row counts
        computed = batch.num_computed_tokens_cpu[:n]  # [n] positions already in the KV cache
        plan: dict[int, list[tuple[int, int, int, RequestSteering]]] = {}
        for i, req_id in enumerate(batch.req_ids[:n]):
            if req_id not in self.requests:
                self.requests[req_id] = self._parse(req_id)
            req = self.requests[req_id]
            if req is None:
                continue
            a, b, pos = int(starts[i]), int(starts[i + 1]), int(computed[i])
            if req.score is not None:
                self.scoring.append((a, b, pos, req))
            if req.release_ids and req.releasing and req.stop is None:
                self.releases.append((a, b, pos, req))
            if pos + (b - a) <= req.steer_from and req.trace is None:
                continue
            for layer in req.layers:
                plan.setdefault(layer, []).append((a, b, pos, req))
        self.plan = plan or None

    def _parse(self, req_id: str) -> RequestSteering | None:
        """The request's steering, checked against this model; None (logged) if it has none or it does not fit."""
        state = self.runner.requests[req_id]
        value = (getattr(state.sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
        if value is None:
            return None
        try:
            record = SteeringRecord.read(value)
            record.check(len(self.layers), self.hidden_size)
            return self._build(record, int(state.num_prompt_tokens))
        except Exception as exc:  # noqa: BLE001  (whatever a request carries must never end the engine)
            logger.warning("request %s: steering refused in the worker, the request runs unsteered: %s",
                           req_id, _one_line(exc))
            return None

    def _build(self, record: SteeringRecord, n_prompt: int) -> RequestSteering:
        vectors = self._vectors_file(record) if any(wc.feature is not None for wc in record.components) else None
        layers: dict[int, tuple[list[int], list[SteeringComponent], list[torch.Tensor]]] = {}
        for i, (comp, vector) in enumerate(record_components(record, vectors)):
            if comp.vector.numel() != self.hidden_size:
                raise RecordError(f"component {comp.name!r} has width {comp.vector.numel()}, the model {self.hidden_size}")
            idx, cs, vs = layers.setdefault(comp.layer, ([], [], []))
            idx.append(i)
            cs.append(comp)
            vs.append(vector.to(self.dtype))
        trace = None
        if record.trace:
            trace = self.traces.setdefault(record.trace, [{} for _ in record.components])
        steer_from = record.steer_from if record.steer_from is not None else 0 if record.steer_prompt else n_prompt
        return RequestSteering(layers, steer_from, trace, n_prompt, record.let_go_at, frozenset(record.release_ids),
                               frozenset(i for i, c in enumerate(record.components) if c.release), record.score,
                               record.score_from)

    def _vectors_file(self, record: SteeringRecord) -> Any:
        """The record's vectors file, read once per file and checked by its digest."""
        from llm_steering.vectors import SteeringVectorSet

        path = str(record.vectors_file)
        if path not in self.vector_files:
            self.vector_files[path] = (file_digest(path), SteeringVectorSet.load(path))
        digest, vectors = self.vector_files[path]
        if digest != record.vectors_digest:
            raise RecordError(f"{path} is not the vectors file this steering was resolved in (its digest differs)")
        return vectors

    def _make_hook(self, index: int, last: bool = False) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            entries = self.plan.get(index) if self.plan else None
            if not entries:
                if last and self.scoring:
                    self._score(*output)
                return None
            hidden, residual = output  # [tokens, d_model] each; the stream is their sum
            for a, b, pos, req in entries:
                idx, comps, vectors = req.layers[index]
                record = None if req.trace is None else [ComponentTrace(c.layer, c.name, c.op) for c in comps]
                stream = (hidden[a:b] + residual[a:b]).unsqueeze(0)  # [1, b - a, d_model]
                cut = b - a if req.stop is None else min(b - a, max(0, req.stop - pos))  # where the release lets go
                if cut == b - a:
                    steered = steer_hidden(stream, comps, vectors, req.steer_from, pos, record)
                else:  # positions from the release on: only the components that do not let go
                    kept, kept_vectors = req.kept(index)
                    tail = stream[:, cut:]
                    if kept:
                        tail = steer_hidden(tail, kept, kept_vectors, req.steer_from, pos + cut)
                    head = steer_hidden(stream[:, :cut], comps, vectors, req.steer_from, pos) if cut else stream[:, :0]
                    steered = torch.cat([head, tail], dim=1)
                hidden[a:b] = steered[0]
                residual[a:b] = 0  # the next layer's fused add reads hidden + 0 = the steered stream exactly
                for i, rec in zip(idx, record or [], strict=False):
                    if hasattr(rec, "flush"):  # steering keeps recorded projections on the device until flush
                        rec.flush()
                    for k, (before, after) in enumerate(zip(rec.before, rec.after, strict=True)):
                        req.trace[i][pos + k] = (before, after)
            if last and self.scoring:
                self._score(hidden, residual)
            return hidden, residual

        return hook

    def _score(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """For each scored row of this step, the model's log-probabilities at its scored positions, summed (the
        final norm and the unembedding applied to a copy of the stream: the forward itself is untouched)."""
        model = self.runner.model
        for a, b, pos, req in self.scoring:
            lo, hi = max(a, a + req.score_from - pos), min(b, a + req.n_prompt - 1 - pos)
            if lo >= hi:
                continue
            stream = hidden[lo:hi] + residual[lo:hi]
            logits = model.compute_logits(model.model.norm(stream.clone()))  # [n, vocab]
            logp = (logits.float().softmax(-1) + SCORE_EPS).log().sum(0).cpu()
            total, count = self.scores.get(req.score, (torch.zeros_like(logp), 0))
            self.scores[req.score] = (total + logp, count + hi - lo)


def record_components(record: SteeringRecord, vectors: Any = None) -> list[tuple[SteeringComponent, torch.Tensor]]:
    """Each component of a record, with the float32 unit vector the hook steers along: a feature's
    from `vectors` (the SteeringVectorSet of record.vectors_file), a carried one exactly as sent."""
    out = []
    for wc in record.components:
        if wc.feature is not None:
            vec = vectors.get(wc.feature)
            if vec.layer != wc.layer:
                raise RecordError(f"feature {wc.feature!r} is at layer {vec.layer} in the vectors file, not {wc.layer}")
            raw = vec.vector
        else:
            raw = torch.tensor(wc.vector_values().tolist(), dtype=torch.float32)  # [d_model]
        comp = SteeringComponent(layer=wc.layer, vector=raw, strength=wc.strength, op=wc.op, cap_min=wc.cap_min,
                                 cap_max=wc.cap_max, scale=wc.scale, name=wc.name)
        # a feature steers along the unit vector every other backend uses for it (SteeringComponent's);
        # a carried vector is the caller's component's own unit vector already: not normalized again
        out.append((comp, comp.vector if wc.feature is not None else raw))
    return out


def held_layers(layers: torch.nn.ModuleList) -> list[int]:
    """The indices of the decoder layers this worker runs (with pipeline parallelism, the others are
    vLLM's PPMissingLayer placeholders: a request steering them is steered on the worker that holds them)."""
    try:
        from vllm.model_executor.models.utils import PPMissingLayer
    except ImportError:  # (tests without vLLM)
        return list(range(len(layers)))
    return [i for i, layer in enumerate(layers) if not isinstance(layer, PPMissingLayer)]


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """vLLM's decoder layers (`model.model.layers` for Llama-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: steering on vLLM supports Llama-style models")
    return layers


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
