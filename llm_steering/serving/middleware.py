"""The ASGI middleware that puts steering into vLLM's own OpenAI-compatible server.

Loaded with vLLM's `--middleware llm_steering.serving.middleware.SteeringMiddleware` (serve.py
does that). For every HTTP request it:

- authenticates first, with vLLM's own `AuthenticationMiddleware` and the server's `--api-key`
  (or VLLM_API_KEY): a client without the key gets vLLM's 401 before any byte of its body is read;
- on a POST, reads the body within LLM_STEERING_BODY_TIMEOUT seconds (default 30; a 408 after)
  and up to LLM_STEERING_MAX_BODY_BYTES (default 1 MiB; a 413 above, without parsing it);
- parses the body when its media type is JSON as HTTP defines it (`application/json` or
  `application/*+json`, in any letter case, with parameters): JSON it cannot parse, or nested too
  deep, is a 400; `true` for an integer field (`seed`, `n`, `max_tokens`, ...) is a 400 (vLLM
  would read 1); a client's own `vllm_xargs.llm_steering` is a 400;
- answers a chat with `auto` itself (serving/auto.py: the candidates as parallel engine requests,
  read back and chosen as the app chooses); `auto` on another route is a 400;
- on /v1/chat/completions and /v1/completions, takes the request's steering (the top-level
  `steering` field, or `vllm_xargs.steering` as a JSON string) and resolves it the one way the
  app and the console do (`catalog.Catalog.components`, over the vectors file LLM_STEERING_VECTORS
  and demo.yaml's profile for its model), checks it against the served model, and hands it to the
  workers as one signed `SteeringRecord` (features by name) in `vllm_xargs["llm_steering"]`, with
  the prefix cache salted by that record (`SteeringRecord.cache_salt`);
- on a streamed answer, if the stream ends (`[DONE]`) before every choice has a finish_reason
  (the server shut down under it), sends an error event first, so a client sees the answer was cut.

A request with a media type that is not JSON passes unchanged: vLLM refuses it on its JSON
routes, and a reserved record it might carry is refused at admission (backends/vllm/validator.py)
since only this process can sign one. Everything else (the API, the other validation, errors,
aborts) is vLLM's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from llm_steering.backends.vllm.wire import AUTO_REFUSED, EXTRA_KEY, SteeringRecord, WireComponent, file_digest
from llm_steering.catalog import Catalog, catalog_for_vectors
from llm_steering.config import MAX_SPEC_BYTES, SteeringSpec
from llm_steering.core import one_line, short_repr
from llm_steering.serving.auto import (
    AutoRequest,
    EngineAuto,
    RequestError,
    auto_request,
    serve_auto,
    take_auto,
    take_field,
)
from llm_steering.serving.timeouts import install_header_timeout

logger = logging.getLogger(__name__)

VECTORS_ENV = "LLM_STEERING_VECTORS"
MAX_BODY_ENV = "LLM_STEERING_MAX_BODY_BYTES"
BODY_TIMEOUT_ENV = "LLM_STEERING_BODY_TIMEOUT"
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_BODY_TIMEOUT = 30.0
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions")
INTEGER_FIELDS = ("seed", "n", "max_tokens", "max_completion_tokens", "min_tokens", "top_k", "top_logprobs", "best_of")
BODY_METHODS = ("POST", "PUT", "PATCH")


class SteeringMiddleware:
    """Pure ASGI middleware; configured by environment variables (vLLM passes it no arguments)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.max_body = int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY)
        self.body_timeout = float(os.environ.get(BODY_TIMEOUT_ENV) or DEFAULT_BODY_TIMEOUT)
        self.vectors_path = os.path.abspath(os.environ.get(VECTORS_ENV) or "steering_vectors.pt")
        self._catalog: tuple[Catalog, str] | None = None
        self._entry: Any = None
        self._installed = False
        self._auto: EngineAuto | None = None
        self._lock = asyncio.Lock()
        # Starlette builds its middleware at the lifespan's startup, before uvicorn accepts a connection
        install_header_timeout()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._entry is None:
            self._entry = authenticated(self._handle, scope.get("app"))
        await self._entry(scope, receive, send)

    async def _handle(self, scope: dict, receive: Any, send: Any) -> None:
        send = finish_streams(send)
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.max_body, self.body_timeout)
            if is_json(header(scope, b"content-type")):
                body = await self._rewrite(scope, body)
        except RequestError as exc:
            await send_error(send, exc)
            return
        if isinstance(body, AutoRequest):
            await self._serve_auto(scope, body, receive, send)
            return
        await self.app(replace_length(scope, len(body)), replay(body, receive), send)

    async def _serve_auto(self, scope: dict, req: AutoRequest, receive: Any, send: Any) -> None:
        """A chat with auto, answered here (serving/auto.py); a one-line error for what fails before the answer starts."""
        app_state = scope["app"].state
        engine = app_state.engine_client
        models = getattr(app_state, "openai_serving_models", None)
        started = False

        async def send_once(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if req.model and models is not None and not models.is_base_model(req.model):
                raise RequestError(404, f"The model `{req.model}` does not exist.", "model")
            await self._install(engine)
            catalog, digest = await self._catalog_for()
            if self._auto is None:
                self._auto = EngineAuto(engine, engine.get_tokenizer(), self.vectors_path, digest)
            await serve_auto(self._auto, catalog, req, models.model_name() if models is not None else "default",
                             receive, send_once)
        except RequestError as exc:
            if not started:
                await send_error(send, exc)
        except Exception as exc:  # noqa: BLE001  (one line for the client; the server goes on)
            logger.exception("auto failed")
            if not started:
                await send_error(send, RequestError(500, f"auto failed: {one_line(exc)}"))

    async def _rewrite(self, scope: dict, body: bytes) -> bytes | AutoRequest:
        """The body with its steering resolved into a signed record in vllm_xargs (unchanged if none); a chat
        with auto, checked, to be answered here."""
        data = parse_json(body)
        if not isinstance(data, dict):
            return body
        check_integer_fields(data)
        xargs = data.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise RequestError(400, f"vllm_xargs must be an object of flat values, got {short_repr(xargs)}", "vllm_xargs")
        if isinstance(xargs, dict) and EXTRA_KEY in xargs:
            raise RequestError(400, f"vllm_xargs.{EXTRA_KEY} is reserved: send the steering as 'steering' "
                                    "(or vllm_xargs.steering)", "vllm_xargs")
        auto = take_auto(data)
        spec = take_spec(data)
        if auto is not None:
            if scope["path"] != "/v1/chat/completions":
                raise RequestError(400, AUTO_REFUSED, "auto")
            defaults = scope["app"].state.engine_client.model_config.get_diff_sampling_param()
            return auto_request(data, spec, auto, defaults)
        if spec is None:
            return body
        if scope["path"] not in STEERED_PATHS:
            raise RequestError(400, f"{scope['path']} takes no steering: use /v1/chat/completions", "steering")
        engine = scope["app"].state.engine_client
        record = await self._record(spec, engine.model_config.hf_text_config)
        data["vllm_xargs"] = {**(data.get("vllm_xargs") or {}), EXTRA_KEY: record.sign()}
        salt = record.cache_salt()
        data["cache_salt"] = salt + str(data["cache_salt"]) if data.get("cache_salt") else salt
        await self._install(engine)
        return json.dumps(data).encode()

    async def _record(self, spec: SteeringSpec, config: Any) -> SteeringRecord:
        catalog, digest = await self._catalog_for()
        return resolve_record(catalog, spec, int(config.num_hidden_layers), int(config.hidden_size), self.vectors_path,
                              digest)

    async def _catalog_for(self) -> tuple[Catalog, str]:
        if self._catalog is None:
            from llm_steering.vectors import load_vectors

            def load() -> tuple[Catalog, str]:
                return catalog_for_vectors(load_vectors(self.vectors_path), file_only=True), file_digest(self.vectors_path)

            try:
                self._catalog = await asyncio.to_thread(load)
            except (OSError, ValueError) as exc:
                raise RequestError(400, f"this server has no steering vectors ({exc}): start it with --vectors FILE "
                                        f"(or set {VECTORS_ENV})", "steering") from None
        return self._catalog

    async def _install(self, engine_client: Any) -> None:
        """Hook the workers' decoder layers once, before the first steered request."""
        async with self._lock:
            if not self._installed:
                await engine_client.collective_rpc("steering_install")
                self._installed = True


def resolve_record(catalog: Catalog, spec: SteeringSpec, num_layers: int, hidden_size: int, vectors_path: str,
                   digest: str) -> SteeringRecord:
    """A spec as the server's record: resolved by the catalog as in the app and the console
    (Catalog.active: each feature's own op when none is given, its own fraction range), checked
    against the served model, each feature by its name in the vectors file."""
    try:
        active = list(catalog.active(spec).values())
        comps = [feature.component(fraction, op) for feature, fraction, op in active]
    except ValueError as exc:  # an unknown feature, a fraction out of range, vectors of another model
        raise RequestError(400, str(exc), "steering") from None
    wire = []
    for (feature, _, _), comp in zip(active, comps, strict=True):
        if not 0 <= comp.layer < num_layers or comp.vector.numel() != hidden_size:
            raise RequestError(400, f"feature {feature.key!r} (layer {comp.layer}, size {comp.vector.numel()}) does not "
                                    f"fit the served model ({num_layers} layers, hidden size {hidden_size}): use its "
                                    "vectors file", "steering")
        wire.append(WireComponent(layer=comp.layer, op=comp.op, strength=comp.strength, name=comp.name,
                                  feature=feature.vector.name))
    return SteeringRecord(tuple(wire), spec.steer_prompt, vectors_file=vectors_path, vectors_digest=digest)


def authenticated(inner: Any, app: Any) -> Any:
    """`inner` behind vLLM's own AuthenticationMiddleware when the server has API keys (the same
    keys and rule vLLM applies: --api-key, else VLLM_API_KEY), so authentication comes first."""
    args = getattr(getattr(app, "state", None), "args", None)
    keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
    tokens = [key for key in keys if key]
    if not tokens:
        return inner
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    return AuthenticationMiddleware(inner, tokens=tokens)


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type names JSON as HTTP reads it: `type/subtype` case-insensitive, parameters
    after `;` (what FastAPI parses as JSON: application/json and application/*+json)."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    kind, _, subtype = media.partition(b"/")
    return kind == b"application" and (subtype == b"json" or subtype.endswith(b"+json"))


def take_spec(data: dict) -> SteeringSpec | None:
    """Pop the request's steering (top-level `steering` or `vllm_xargs.steering`) and parse it."""
    raw, in_xargs = take_field(data, "steering", "the steering")
    if in_xargs:
        if isinstance(raw, str):
            if len(raw) > MAX_SPEC_BYTES:
                raise RequestError(400, f"the steering spec is over {MAX_SPEC_BYTES} bytes", "steering")
            raw = parse_json(raw.encode())
    if raw is None:
        return None
    if len(json.dumps(raw)) > MAX_SPEC_BYTES:
        raise RequestError(400, f"the steering spec is over {MAX_SPEC_BYTES} bytes", "steering")
    try:
        return SteeringSpec.from_dict(raw)
    except ValueError as exc:
        raise RequestError(400, str(exc), "steering") from None


def check_integer_fields(data: dict) -> None:
    """vLLM reads `true` as 1 for integer fields; OpenAI's API refuses it."""
    for name in INTEGER_FIELDS:
        if isinstance(data.get(name), bool):
            raise RequestError(400, f"{name} must be an integer, got {short_repr(data[name])}", name)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None


def header(scope: dict, name: bytes) -> bytes | None:
    """A request header (the last one of that name; ASGI gives names in lower case)."""
    value = None
    for key, val in scope.get("headers") or []:
        if key == name:
            value = val
    return value


async def read_body(scope: dict, receive: Any, limit: int, timeout: float) -> bytes:
    """The whole request body; a RequestError 413 (after draining the rest) above `limit` bytes,
    408 when it has not all arrived `timeout` seconds after the headers."""
    declared = header(scope, b"content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {timeout:g} s: send it at once") from None
        if message["type"] == "http.disconnect":
            raise RequestError(400, "the client went away")
        size += len(message.get("body", b""))
        too_large = too_large or size > limit
        if not too_large:
            chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    if too_large:
        raise RequestError(413, f"the request body is over {limit} bytes: send less, or start the server "
                                f"with a larger --max-body-bytes ({MAX_BODY_ENV})")
    return b"".join(chunks)


def replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that hands the app `body` once, then the client's later messages."""
    sent = False

    async def receive_again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def replace_length(scope: dict, length: int) -> dict:
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def finish_streams(send: Any) -> Any:
    """`send`, except that a server-sent-events stream ending in `data: [DONE]` while a choice has no
    finish_reason yet (and no error was sent) gets an error event before its [DONE]."""
    state: dict[str, Any] = {"sse": False, "open": set(), "error": False, "tail": b""}

    async def send_checked(message: dict) -> None:
        if message["type"] == "http.response.start":
            state["sse"] = (header({"headers": message.get("headers")}, b"content-type") or b"").startswith(
                b"text/event-stream")
        elif message["type"] == "http.response.body" and state["sse"]:
            body = message.get("body", b"")
            done = _scan_events(state, body)
            if done >= 0 and state["open"] and not state["error"]:
                event = json.dumps({"error": {
                    "message": "the answer was cut off before it finished (the server is shutting down): "
                               "ask again", "type": "ServiceUnavailableError", "param": None, "code": 503}})
                body = body[:done] + f"data: {event}\n\n".encode() + body[done:]
                state["error"] = True
                message = {**message, "body": body}
        await send(message)

    return send_checked


def _scan_events(state: dict[str, Any], body: bytes) -> int:
    """Track which choices are open and whether an error was sent; the offset of `data: [DONE]` in `body` (-1: none)."""
    text = state["tail"] + body
    events = text.split(b"\n\n")
    state["tail"] = events.pop()  # an unfinished event waits for the next chunk
    offset = len(body) - len(text)  # where `text` starts relative to `body` (<= 0)
    done = -1
    for event in events:
        data = event.strip()
        if data.startswith(b"data:"):
            payload = data[5:].strip()
            if payload == b"[DONE]" and offset >= 0:  # (one that began in an earlier chunk was sent already)
                done = offset
            else:
                _track(state, payload)
        offset += len(event) + 2
    return done


def _track(state: dict[str, Any], payload: bytes) -> None:
    try:
        chunk = json.loads(payload)
    except ValueError:
        return
    if not isinstance(chunk, dict):
        return
    if "error" in chunk:
        state["error"] = True
    for choice in chunk.get("choices") or []:
        if isinstance(choice, dict):
            index = choice.get("index", 0)
            if choice.get("finish_reason"):
                state["open"].discard(index)
            else:
                state["open"].add(index)


async def send_error(send: Any, exc: RequestError) -> None:
    """An error object in the shape vLLM (and OpenAI) use."""
    kind = {413: "RequestEntityTooLarge", 408: "RequestTimeout", 404: "NotFoundError",
            500: "InternalServerError"}.get(exc.status, "BadRequestError")
    body = json.dumps({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.status}}).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
