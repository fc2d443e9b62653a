"""The OpenAI-compatible server for steered answers (usage: serve.py's docstring)."""

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from llm_steering import steering  # before torch: it sets PyTorch's OpenMP wait policy
from llm_steering import vllm_backend as steering_vllm


def build_app(engine: steering_vllm.VLLMEngine, vectors: steering.SteeringVectorSet | None, model_name: str) -> Any:
    """The FastAPI app serving `engine`; `vectors` resolves the features a spec names."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="SAE steering chat (vLLM)")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llm-steering"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
            kwargs = request_arguments(body, vectors, engine.model_id)
            pieces = engine.stream_async(**kwargs)  # validates at call time
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=400)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(sse_chunks(engine, pieces, rid, created, model_name), media_type="text/event-stream")
        text = "".join([piece async for piece in on_engine_loop(engine, pieces)])
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    return app


def request_arguments(body: Any, vectors: steering.SteeringVectorSet | None, model_id: str) -> dict[str, Any]:
    """`VLLMEngine.stream_async` arguments from an OpenAI chat request body; ValueError if malformed."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list of {role, content} objects")
    comps: list[steering.SteeringComponent] = []
    steer_prompt = True
    spec_data = body.get("steering")
    if spec_data is not None:
        spec = steering.SteeringSpec.from_dict(spec_data)
        if vectors is None:
            raise ValueError("this server has no steering vectors: start it with --vectors FILE")
        if spec.model_id != model_id:
            raise ValueError(f"this steering spec is for {spec.model_id!r}, but this server runs {model_id!r}")
        comps = steering.spec_components(spec, vectors)
        steer_prompt = spec.steer_prompt
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    return {
        "chat": messages, "components": comps, "steer_prompt": steer_prompt, "max_new_tokens": max_tokens,
        "temperature": body.get("temperature", 0.0), "repetition_penalty": body.get("repetition_penalty", 1.0),
        "seed": body.get("seed"),
    }


async def on_engine_loop(engine: steering_vllm.VLLMEngine, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Iterate an engine stream (which lives on the engine's own loop) from the server's loop."""
    try:
        while True:
            try:
                yield await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(pieces.__anext__(), engine.loop))
            except StopAsyncIteration:
                return
    finally:  # a client that went away: abort the request in the engine
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(pieces.aclose(), engine.loop))


async def sse_chunks(engine: steering_vllm.VLLMEngine, pieces: AsyncIterator[str], rid: str, created: int,
                     model_name: str) -> AsyncIterator[str]:
    """Server-sent `chat.completion.chunk` events, then `[DONE]`."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in on_engine_loop(engine, pieces):
            yield chunk({"content": piece})
    except Exception as exc:  # the stream has started: report in-band
        yield f"data: {json.dumps({'error': {'message': str(exc).splitlines()[0] if str(exc) else type(exc).__name__}})}\n\n"
        return
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--vectors", default="steering_vectors.pt", help="steering vector file the specs' features come from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default="auto", help="model dtype for vLLM (auto, float32, bfloat16, ...)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="number of workers the model is split over")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer in tokens")
    parser.add_argument("--served-model-name", default="default", help="the model name clients send")
    args = parser.parse_args(argv)

    import uvicorn

    try:
        vectors = steering.load_vectors(args.vectors) if args.vectors else None
        engine = steering_vllm.VLLMEngine(args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                                          max_model_len=args.max_model_len)
    except ValueError as exc:
        raise SystemExit(f"serve.py: {exc}") from None
    try:
        uvicorn.run(build_app(engine, vectors, args.served_model_name), host=args.host, port=args.port)
    finally:
        engine.shutdown()

