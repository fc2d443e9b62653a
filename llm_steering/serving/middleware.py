"""The ASGI middleware that puts steering into vLLM's own OpenAI-compatible server.

Loaded with vLLM's `--middleware llm_steering.serving.middleware.SteeringMiddleware` (serve.py
does that). For every POST it:

- refuses a body larger than `LLM_STEERING_MAX_BODY_BYTES` (default 1 MiB) with a 413, without
  parsing it, and a JSON body it cannot parse (also one nested too deep) with a 400;
- refuses booleans where vLLM's lax validation would read `true` as 1 (`seed`, `n`, `max_tokens`, ...);
- on /v1/chat/completions and /v1/completions, takes the request's steering (the top-level
  `steering` field, or `vllm_xargs.steering` as a JSON string), validates it with the app's
  bounds and resolves it as the app does (catalog.Catalog.components: the spec format, at most 64
  features, each feature's fraction range and own op, features from the vectors file
  `LLM_STEERING_VECTORS`, layers and sizes of the served model), resolves it to components and
  hands them to the worker extension in `vllm_xargs["llm_steering"]` (a JSON string: vLLM's
  xargs hold flat values only), with the prefix cache salted by the steering.

Everything else (the API, the other validation, errors, aborts) is vLLM's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from llm_steering import vllm_backend
from llm_steering.catalog import catalog_for_vectors
from llm_steering.config import MAX_SPEC_BYTES, SteeringSpec
from llm_steering.core import short_repr

VECTORS_ENV = "LLM_STEERING_VECTORS"
MAX_BODY_ENV = "LLM_STEERING_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = 1 << 20
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions")
INTEGER_FIELDS = ("seed", "n", "max_tokens", "max_completion_tokens", "min_tokens", "top_k", "top_logprobs", "best_of")


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class SteeringMiddleware:
    """Pure ASGI middleware; configured by environment variables (vLLM passes it no arguments)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.max_body = int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY)
        self.vectors_path = os.environ.get(VECTORS_ENV) or "steering_vectors.pt"
        self._vectors: Any = None
        self._installed = False
        self._lock = asyncio.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.max_body)
            if b"json" in dict(scope.get("headers") or []).get(b"content-type", b""):
                body = await self._rewrite(scope, body)
        except RequestError as exc:
            await send_error(send, exc)
            return
        await self.app(replace_length(scope, len(body)), replay(body, receive), send)

    async def _rewrite(self, scope: dict, body: bytes) -> bytes:
        """The body with its steering validated and moved into vllm_xargs (unchanged if none)."""
        data = parse_json(body)
        if not isinstance(data, dict):
            return body
        check_integer_fields(data)
        xargs = data.get("vllm_xargs")
        if isinstance(xargs, dict) and vllm_backend.EXTRA_KEY in xargs:
            raise RequestError(400, f"vllm_xargs.{vllm_backend.EXTRA_KEY} is reserved: send the steering as "
                                    "'steering' (or vllm_xargs.steering)", "vllm_xargs")
        spec = take_spec(data)
        if spec is None or scope["path"] not in STEERED_PATHS:
            if spec is not None:
                raise RequestError(400, f"{scope['path']} takes no steering: use /v1/chat/completions", "steering")
            return body
        state = scope["app"].state
        try:
            comps = catalog_for_vectors(await self._vectors_for(spec), file_only=True).components(spec)
        except ValueError as exc:  # an unknown feature, vectors of another model
            raise RequestError(400, str(exc), "steering") from None
        check_components(comps, state.engine_client.model_config.hf_text_config)
        steering = json.dumps({"components": [vllm_backend._comp_to_dict(c) for c in comps],
                               "steer_prompt": spec.steer_prompt})
        data.setdefault("vllm_xargs", {})[vllm_backend.EXTRA_KEY] = steering
        salt = hashlib.sha1(steering.encode()).hexdigest()
        data["cache_salt"] = salt + str(data["cache_salt"]) if data.get("cache_salt") else salt
        await self._install(state.engine_client)
        return json.dumps(data).encode()

    async def _vectors_for(self, spec: SteeringSpec) -> Any:
        if self._vectors is None:
            from llm_steering.vectors import load_vectors

            try:
                self._vectors = await asyncio.to_thread(load_vectors, self.vectors_path)
            except (OSError, ValueError) as exc:
                raise RequestError(400, f"this server has no steering vectors ({exc}): start it with --vectors FILE "
                                        f"(or set {VECTORS_ENV})", "steering") from None
        return self._vectors

    async def _install(self, engine_client: Any) -> None:
        """Hook the workers' decoder layers once, before the first steered request."""
        async with self._lock:
            if not self._installed:
                await engine_client.collective_rpc("steering_install")
                self._installed = True


def take_spec(data: dict) -> SteeringSpec | None:
    """Pop the request's steering (top-level `steering` or `vllm_xargs.steering`) and validate it."""
    raw = data.pop("steering", None)
    xargs = data.get("vllm_xargs")
    if isinstance(xargs, dict) and "steering" in xargs:
        if raw is not None:
            raise RequestError(400, "send the steering once: as 'steering' or as vllm_xargs.steering", "steering")
        raw = xargs.pop("steering")
        if not xargs:
            del data["vllm_xargs"]
        if isinstance(raw, str):
            if len(raw) > MAX_SPEC_BYTES:
                raise RequestError(400, f"the steering spec is over {MAX_SPEC_BYTES} bytes", "steering")
            raw = parse_json(raw.encode())
    if raw is None:
        return None
    if len(json.dumps(raw)) > MAX_SPEC_BYTES:
        raise RequestError(400, f"the steering spec is over {MAX_SPEC_BYTES} bytes", "steering")
    try:
        return SteeringSpec.from_dict(raw)  # fractions: each feature's own range, checked by the catalog
    except ValueError as exc:
        raise RequestError(400, str(exc), "steering") from None


def check_components(comps: list, config: Any) -> None:
    """Every component fits the served model (a bad one would fail inside the engine)."""
    layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    for comp in comps:
        if not 0 <= comp.layer < layers or comp.vector.numel() != hidden:
            raise RequestError(400, f"feature {comp.name!r} (layer {comp.layer}, size {comp.vector.numel()}) does not fit "
                                    f"the served model ({layers} layers, hidden size {hidden}): use its vectors file",
                               "steering")


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


async def read_body(scope: dict, receive: Any, limit: int) -> bytes:
    """The whole request body; a RequestError 413 (after draining the rest) if it exceeds `limit`."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    while True:
        message = await receive()
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


async def send_error(send: Any, exc: RequestError) -> None:
    """An error object in the shape vLLM (and OpenAI) use."""
    kind = {413: "RequestEntityTooLarge"}.get(exc.status, "BadRequestError")
    body = json.dumps({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.status}}).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
