"""Auto on the server: the way of steering chosen for each prompt, as the app and the console choose it.

A chat request with `"auto": true` (or `"auto": "<feature>"` when its steering has several features)
is answered here, by the middleware, with vLLM doing the model's work in the steps of
`calibrate.stream_auto_answer`:

1. the feature's steering scores (`lens.steering_scores`: the neutral chats read steered and
   unsteered, the mean log-probability rise of every token) are recorded by the workers
   (`SteeringRecord.score`), once per feature, strength and op; its own words are their top 24 (`lens.words_of`);
2. the candidates (`calibrate.auto_candidates`, with the learned direction where the vectors file
   has one) run as parallel requests, greedy, `calibrate.AUTO_JUDGE_TOKENS` tokens: vLLM batches
   them. A release candidate's record lets go at the first generated token among the words;
3. each answer is read back by the unsteered model (`prompt_logprobs`: its NLL), the rows built by
   `calibrate.candidate_rows` and one chosen by `calibrate.pick_candidate`: the same signals and rule;
4. the chosen answer goes on from its judged tokens at the request's own sampling settings, the
   chosen steering let go after them (`calibrate.AUTO_LET_GO`); the other features stay on.

The response is a chat completion (streamed or not) with a `steering_auto` object: the candidate
chosen, its setting in the words of the app's tag, and each candidate's signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from llm_steering import calibrate, lens
from llm_steering.backends.vllm.wire import EXTRA_KEY, SteeringRecord, WireComponent
from llm_steering.config import SteeringSpec
from llm_steering.core import short_repr

import torch

# the fields a request with auto may carry (the others would be dropped, or mean something auto does not do)
AUTO_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "seed", "stream", "stream_options", "repetition_penalty", "n", "user", "auto"})
AUTO_REPETITION_PENALTY = 1.1  # what auto was chosen with (docs/quality.md), unless the request says otherwise


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param




def take_field(data: dict, name: str, what: str) -> tuple[Any, bool]:
    """Pop `name` from the body or from vllm_xargs (sent once, by either); and whether it came in vllm_xargs."""
    value = data.pop(name, None)
    xargs = data.get("vllm_xargs")
    if not (isinstance(xargs, dict) and name in xargs):
        return value, False
    if value is not None:
        raise RequestError(400, f"send {what} once: as '{name}' or as vllm_xargs.{name}", name)
    value = xargs.pop(name)
    if not xargs:
        del data["vllm_xargs"]
    return value, True


def take_auto(data: dict) -> Any:
    """Pop the request's `auto` (top-level, or in vllm_xargs); None when it asks for none."""
    value, in_xargs = take_field(data, "auto", "auto")
    if in_xargs and isinstance(value, str):
        value = {"true": True, "false": False}.get(value, value)
    if value is None or value is False:
        return None
    if value is not True and not (isinstance(value, str) and 0 < len(value) <= 200):
        raise RequestError(400, f"auto must be true or the name of one of the request's features, got {short_repr(value)}",
                        "auto")
    return value


@dataclass(frozen=True)
class AutoRequest:
    """A chat request with auto, checked: what the answer is generated from."""

    chat: list[dict]
    auto: Any  # True, or the feature's key
    spec: SteeringSpec
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stream: bool
    include_usage: bool
    repetition_penalty: float
    model: str | None


def auto_request(data: dict, spec: SteeringSpec | None, auto: Any, defaults: dict) -> AutoRequest:
    """The request's fields, each checked (a one-line 400 for what auto does not take); `defaults` are the
    model's sampling defaults (vLLM's `get_diff_sampling_param`)."""
    if spec is None or not spec.features:
        raise RequestError(400, "auto chooses how to steer a feature: send the steering with it", "auto")
    extra = sorted(set(data) - AUTO_FIELDS)
    if extra:
        raise RequestError(400, f"with auto this server takes {', '.join(sorted(AUTO_FIELDS - {'auto'}))}; not "
                             f"{', '.join(extra)[:200]}: drop it, or send the feature with a strength", extra[0])
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        raise RequestError(400, "with auto, messages must be a non-empty list of {role: system, user or assistant, "
                             "content: text}", "messages")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise RequestError(400, "the chat has no user message with text: send a question", "messages")
    if data.get("n", 1) != 1:
        raise RequestError(400, "with auto, n must be 1: the candidates are compared for one answer", "n")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(400, f"max_tokens must be a whole number of at least 1, got {short_repr(max_tokens)}", "max_tokens")

    def number(name: str, default: Any, ok: Any, what: str, fixed: Any = None) -> Any:
        """The request's value; else `fixed` (what auto was chosen with), else the model's default, else `default`."""
        value = data.get(name, fixed if fixed is not None else defaults.get(name, default))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            raise RequestError(400, f"{name} must be {what}, got {short_repr(value)}", name)
        return value

    for name, kind, what in (("stream", bool, "true or false"), ("model", str, "text")):
        if data.get(name) is not None and not isinstance(data[name], kind):
            raise RequestError(400, f"{name} must be {what}, got {short_repr(data[name])}", name)
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object", "stream_options")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed must be an integer, got {short_repr(seed)}", "seed")
    return AutoRequest(
        chat=[{"role": m["role"], "content": m["content"]} for m in messages], auto=auto, spec=spec,
        max_tokens=max_tokens,
        temperature=float(number("temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 is greedy)")),
        top_p=float(number("top_p", 1.0, lambda v: 0 < v <= 1, "a number above 0 and at most 1")),
        top_k=int(number("top_k", 0, lambda v: v == int(v) and v >= -1, "a whole number (0 or -1: off)")),
        seed=seed, stream=data.get("stream") is True, include_usage=bool((options or {}).get("include_usage")),
        repetition_penalty=float(number("repetition_penalty", None, lambda v: v > 0, "a number > 0", AUTO_REPETITION_PENALTY)),
        model=data.get("model"))


class EngineAuto:
    """Auto through a vLLM engine client (the server's, or the library's VLLMEngine): the steering scores,
    the candidates and their read-back as engine requests; the choice is calibrate's own.

    With `vectors_file` (the server), a component travels by its name in that file (a feature's component
    is named after its vector, a learned direction after its own); without (the library), its vector travels
    with it."""

    def __init__(self, engine: Any, tokenizer: Any, vectors_file: str | None = None, digest: str | None = None) -> None:
        self.engine, self.tokenizer, self.vectors_file, self.digest = engine, tokenizer, vectors_file, digest
        self._plain: torch.Tensor | None = None
        self._scores: dict[tuple, torch.Tensor] = {}

    def wire(self, comp: Any, release: bool = False) -> WireComponent:
        """A component as the workers read it."""
        fields = {"layer": comp.layer, "op": comp.op, "strength": float(comp.strength), "cap_min": comp.cap_min,
                  "cap_max": comp.cap_max, "scale": float(getattr(comp, "scale", 0.0) or 0.0), "name": comp.name,
                  "release": release}
        if self.vectors_file is not None:
            return WireComponent(**fields, feature=comp.name)
        unit = comp.vector.detach().float().cpu().flatten()
        return WireComponent(**fields, vector=WireComponent.encode_vector((unit / unit.norm()).tolist()))

    def record(self, comps: list[WireComponent], **fields: Any) -> SteeringRecord:
        return SteeringRecord(tuple(comps), vectors_file=self.vectors_file, vectors_digest=self.digest, **fields)

    async def run(self, prompt_ids: list[int], params: Any, record: SteeringRecord | None = None) -> Any:
        """One request through the engine, to its last output."""
        last = None
        async for out in self.engine.generate(self.prompt(prompt_ids, params, record), params, f"auto-{uuid.uuid4().hex}"):
            last = out
        return last

    @staticmethod
    def prompt(prompt_ids: list[int], params: Any, record: SteeringRecord | None) -> dict[str, Any]:
        """The engine prompt, its record put in `params` (and the prefix cache salted by it)."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(prompt_ids)}
        if record is not None:
            params.extra_args = {**(params.extra_args or {}), EXTRA_KEY: record.sign()}
            prompt["cache_salt"] = record.cache_salt()
        return prompt

    # -- the steering scores (lens.steering_scores, measured by the workers) ------------------------

    async def _mean_logp(self, comps: list[WireComponent]) -> torch.Tensor:
        from vllm import SamplingParams

        prompts, seqs = lens.neutral_chats(self.tokenizer)
        records = [self.record(comps, score=f"score-{uuid.uuid4().hex}", score_from=len(p) - 1) for p in prompts]
        await asyncio.gather(*(self.run(seq, SamplingParams(max_tokens=1, temperature=0.0,
                                                            skip_reading_prefix_cache=True), rec)
                               for seq, rec in zip(seqs, records, strict=True)))
        got = await self.engine.collective_rpc("steering_pop_scores", args=([r.score for r in records],))
        total, count = None, 0
        for i in range(len(records)):
            part = next((worker[i] for worker in got if worker[i] is not None), None)
            if part is None:
                raise RuntimeError("the workers recorded no scores: is the steering installed?")
            values = torch.tensor(part[0], dtype=torch.float32)
            total, count = (values if total is None else total + values), count + part[1]
        return total / max(count, 1)

    async def steering_scores(self, comp: Any) -> torch.Tensor:
        """`lens.steering_scores` of one component, through the engine (cached per vector, layer, op, strength)."""
        key = lens.component_key(comp)
        if key not in self._scores:
            if self._plain is None:
                self._plain = await self._mean_logp([])
            self._scores[key] = await self._mean_logp([self.wire(comp)]) - self._plain
        return self._scores[key]

    # -- the candidates, read and chosen -----------------------------------------------------------

    async def choose(self, chat: list[dict], chat_ids: list[int], component: Any, others: list[Any],
                     cands: list[calibrate.Candidate], judge: int, repetition_penalty: float) -> calibrate.AutoChoice:
        """Every candidate generated (greedy, `judge` tokens, in parallel) and read; the choice
        (calibrate.auto_choose's steps). `others`: the other switched-on features' components, in every row."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        scores = await self.steering_scores(component)
        words = lens.words_of(lens.top_raised(self.tokenizer, scores, calibrate.AUTO_CONCEPT_WORDS))
        fixed = [self.wire(c) for c in others]

        def cand_record(cand: calibrate.Candidate) -> SteeringRecord | None:
            if not cand.components and not others:
                return None
            return self.record([*fixed, *(self.wire(c, cand.release) for c in cand.components)],
                               steer_prompt=cand.steer_prompt, release_ids=tuple(sorted(words)) if cand.release else ())

        greedy = SamplingParams(max_tokens=judge, temperature=0.0, repetition_penalty=repetition_penalty)
        outs = await asyncio.gather(*(self.run(chat_ids, greedy.clone(), cand_record(c)) for c in cands))
        answers = [answer_ids(out) for out in outs]
        nlls = await asyncio.gather(*(self.nll(chat_ids, ids) for ids in answers))
        table = calibrate.candidate_rows(self.tokenizer, chat, cands, answers, nlls, [None] * len(cands), words, scores)
        return calibrate.AutoChoice(calibrate.pick_candidate(table), tuple(table), words, judge,
                                    time.perf_counter() - t0)

    async def nll(self, chat_ids: list[int], ids: list[int]) -> float:
        """Mean NLL per answer token under the unsteered model (calibrate.answer_nll), from prompt_logprobs."""
        from vllm import SamplingParams

        if not ids:
            return float("nan")
        out = await self.run(chat_ids + ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        logps = out.prompt_logprobs
        n = len(chat_ids)
        return -sum(logps[n + i][t].logprob for i, t in enumerate(ids)) / len(ids)

    def continuation(self, choice: calibrate.AutoChoice, others: list[Any], chat_ids: list[int], max_tokens: int,
                     **sampling: Any) -> tuple[Any, SteeringRecord | None, int | None, bool]:
        """The sampling parameters (`sampling`: temperature, top_p, ...) and record the chosen answer goes on
        with (calibrate.continue_candidate), where its steering is let go after the judged words (None: it is
        not, it let go in them, or the answer does not go on), and whether it goes on at all (calibrate.
        stream_auto_answer's rule: its judged words filled the judged tokens, and `max_tokens` leaves room)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        cand, prefix, words = choice.chosen, list(choice.prefix), choice.words
        let_go_at = calibrate.let_go_point(cand, prefix, words) if calibrate.AUTO_LET_GO else None
        released_at = let_go_at if let_go_at is not None else (
            next((i for i, t in enumerate(prefix) if t in words), None) if cand.release else None)
        record = None
        if cand.components or others:
            mine = [self.wire(c, release=cand.release or let_go_at is not None) for c in cand.components]
            record = self.record([*(self.wire(c) for c in others), *mine],
                                 steer_from=0 if cand.steer_prompt else len(chat_ids),
                                 let_go_at=None if released_at is None else len(chat_ids) + released_at,
                                 release_ids=tuple(sorted(words)) if cand.release else ())
        params = SamplingParams(max_tokens=max(1, max_tokens - len(prefix)), output_kind=RequestOutputKind.DELTA,
                                **sampling)
        goes_on = len(prefix) == choice.judge_tokens and max_tokens > len(prefix)
        return params, record, let_go_at if goes_on else None, goes_on


def answer_ids(out: Any) -> list[int]:
    """A candidate's answer ids, without the token that ended it (calibrate cuts at the EOS): vLLM keeps an EOS or
    a stop token among the ids (the text leaves it out)."""
    done = out.outputs[0]
    ids = list(done.token_ids)
    if done.finish_reason == "stop" and ids and (done.stop_reason is None or done.stop_reason == ids[-1]):
        ids.pop()
    return ids


def auto_key(auto: Any, active: dict) -> str:
    """The key of the feature `auto` (true, or a feature's key or name) chooses for."""
    if auto is True:
        if len(active) != 1:
            raise RequestError(400, f"auto chooses for one feature: name it (\"auto\": \"{next(iter(active))}\"); "
                                    f"this steering has {len(active)}", "auto")
        return next(iter(active))
    key = next((k for k, (f, _, _) in active.items() if auto in (k, f.name)), None)
    if key is None:
        raise RequestError(400, f"auto names {short_repr(auto)}, which is not one of this steering's features "
                                f"({', '.join(active)})", "auto")
    return key


def setting_summary(key: str, fraction: float, choice: calibrate.AutoChoice, let_go_at: int | None) -> dict[str, Any]:
    """The response's `steering_auto`: the candidate chosen, in the app's words, and every candidate's signals."""
    cand = choice.chosen
    comp = cand.components[0] if cand.components else None

    def finite(x: float) -> float | None:
        return round(float(x), 4) if math.isfinite(x) else None

    return {
        "feature": key,
        "chosen": cand.label,
        "setting": calibrate.setting_text(comp.op if comp else None, cand.multiplier, cand.steer_prompt, cand.release,
                                          bool(cand.vector), let_go_at),
        "op": comp.op if comp else None,
        "fraction": round(fraction * cand.multiplier, 6) if comp else None,
        "multiplier": cand.multiplier,
        "steer_prompt": cand.steer_prompt,
        "release": cand.release,
        "vector": cand.vector,
        "let_go_at": let_go_at,
        "judged_tokens": choice.judge_tokens,
        "seconds": round(choice.seconds, 3),
        "candidates": [{"label": r.candidate.label, "nll_ratio": finite(r.nll_ratio), "rep3": finite(r.rep3),
                        "on_question": r.on_question, "concept_score": finite(r.concept_score),
                        "tokens": len(r.token_ids)} for r in choice.table],
    }


async def serve_auto(auto: EngineAuto, catalog: Any, req: AutoRequest, model_name: str, receive: Any, send: Any) -> None:
    """Answer `req` with auto (features resolved by `catalog`, the server's): a chat completion, streamed as
    server-sent events when it asks for a stream."""
    from llm_steering.models import chat_input_ids

    tok = auto.tokenizer
    chat_ids = chat_input_ids(tok, req.chat)
    limit = int(auto.engine.model_config.max_model_len)
    judge = min(calibrate.AUTO_JUDGE_TOKENS, req.max_tokens or calibrate.AUTO_JUDGE_TOKENS)
    if len(chat_ids) + (req.max_tokens or judge) > limit:
        raise RequestError(400, f"the chat is {len(chat_ids)} tokens and the answer may take {req.max_tokens or judge}: this "
                             f"server's context is {limit} tokens; shorten the chat or ask for fewer tokens", "messages")
    req = replace(req, max_tokens=req.max_tokens or limit - len(chat_ids))
    gone = asyncio.Event()

    async def watch() -> None:  # the client going away stops what runs for it (vLLM aborts its requests)
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        await _answer(auto, catalog, req, model_name, send, chat_ids, judge, gone)
    finally:
        watcher.cancel()


async def _answer(auto: EngineAuto, catalog: Any, req: AutoRequest, model_name: str, send: Any, chat_ids: list[int],
                  judge: int, gone: asyncio.Event) -> None:
    tok = auto.tokenizer
    try:
        active = catalog.active(req.spec)  # an unknown feature, a strength out of range: one line
        key = auto_key(req.auto, active)
        feature, fraction, op = active[key]
        component = feature.component(fraction, op)
        others = [f.component(fr, o) for k, (f, fr, o) in active.items() if k != key]
        cands = calibrate.auto_candidates(component, catalog.auto_max_multiplier(feature, fraction),
                                          learned=calibrate.learned_direction(component, catalog.vectors))
        choosing = asyncio.ensure_future(auto.choose(req.chat, chat_ids, component, others, cands, judge,
                                                     req.repetition_penalty))
        leaving = asyncio.ensure_future(gone.wait())
        await asyncio.wait({choosing, leaving}, return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if not choosing.done():  # nobody to answer: the candidates' requests are aborted
            choosing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await choosing
            return
        choice = choosing.result()
    except ValueError as exc:  # the catalog's and the engine's one-line refusals
        raise RequestError(400, str(exc).strip().splitlines()[-1], "steering") from None
    prefix = list(choice.prefix)
    params, record, let_go_at, goes_on = auto.continuation(
        choice, others, chat_ids, req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        seed=req.seed, repetition_penalty=req.repetition_penalty)
    summary = setting_summary(key, fraction, choice, let_go_at)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or model_name}
    first_text = tok.decode(prefix, skip_special_tokens=True)
    finish = "length" if len(prefix) == judge else "stop"
    rest: list[int] = []

    async def pieces() -> Any:
        nonlocal finish
        if not goes_on:
            return
        stream = auto.engine.generate(auto.prompt(chat_ids + prefix, params, record), params, f"auto-{uuid.uuid4().hex}")
        try:
            async for out in stream:
                done = out.outputs[0]
                rest.extend(done.token_ids)
                if done.finish_reason:
                    finish = done.finish_reason
                yield done.text
                if gone.is_set():
                    return
        finally:
            await stream.aclose()

    usage = lambda: {"prompt_tokens": len(chat_ids), "completion_tokens": len(prefix) + len(rest),  # noqa: E731
                     "total_tokens": len(chat_ids) + len(prefix) + len(rest)}
    if not req.stream:
        async for _ in pieces():
            pass
        ids = prefix + rest  # (an EOS among them is a special token: not in the text)
        body = json.dumps({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)},
            "logprobs": None, "finish_reason": finish}], "usage": usage(), "steering_auto": summary}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return

    chunk = {**head, "object": "chat.completion.chunk"}

    def event(delta: dict, reason: str | None = None, **extra: Any) -> bytes:
        data = {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], **extra}
        return f"data: {json.dumps(data)}\n\n".encode()

    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "more_body": True,
                "body": event({"role": "assistant", "content": first_text}, steering_auto=summary)})
    try:
        async for text in pieces():
            if text:
                await send({"type": "http.response.body", "body": event({"content": text}), "more_body": True})
    except Exception as exc:  # noqa: BLE001  (the answer is cut: the client is told, in the stream)
        error = {"error": {"message": f"the answer was cut off: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
                           "type": "InternalServerError", "param": None, "code": 500}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(), "more_body": True})
    else:
        tail = event({}, finish)
        if req.include_usage:
            tail += f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage()})}\n\n".encode()
        await send({"type": "http.response.body", "body": tail, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
