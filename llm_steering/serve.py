"""The launcher of vLLM's own OpenAI-compatible server with steering (usage: serve.py's docstring).

`main` turns the project's few options into vLLM's server arguments (the embedded model's
converted directory, the dtype of the project's `load_model` policy, eager mode, the worker
extension, the steering middleware) and runs vLLM's server in this process; any option it does
not know goes to vLLM unchanged (`python serve.py --max-num-seqs 64`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llm_steering import models
from llm_steering.backends.vllm import vllm_unavailable
from llm_steering.backends.vllm.engine import VALIDATOR, vllm_dtype
from llm_steering.backends.vllm.worker import WORKER_EXTENSION
from llm_steering.serving.middleware import (
    BODY_TIMEOUT_ENV,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY,
    MAX_BODY_ENV,
    VECTORS_ENV,
)
from llm_steering.serving.timeouts import DEFAULT_HEADER_TIMEOUT, HEADER_TIMEOUT_ENV

MIDDLEWARE = "llm_steering.serving.middleware.SteeringMiddleware"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="vLLM's OpenAI-compatible server with per-request steering.",
                                     epilog="Other options go to vLLM's server unchanged.")
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--vectors", default="steering_vectors.pt", help="steering vector file the specs' features come from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default=None,
                        help="model dtype (default: as every backend loads it, models.default_dtype: $STEERING_DTYPE, "
                             "else float32 on a CPU, the checkpoint's 16-bit dtype on a GPU)")
    parser.add_argument("--served-model-name", default="default", help="the model name clients send")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (413 above)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                        help="seconds a request body may take to arrive (408 after)")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                        help="seconds a connection may take to send its request headers (closed after)")
    return parser.parse_known_args(argv)


def vllm_arguments(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The arguments of vLLM's server for these options (after which `rest` comes unchanged)."""
    from vllm.platforms import current_platform

    path = str(models.embedded_model_dir()) if args.model is None else args.model
    names = [args.served_model_name] + ([models.EMBEDDED_MODEL_ID] if args.model is None else [args.model])
    out = ["--model", path, "--served-model-name", *dict.fromkeys(names), "--host", args.host, "--port", str(args.port),
           "--dtype", args.dtype or vllm_dtype(path), "--enforce-eager",
           "--worker-extension-cls", WORKER_EXTENSION, "--middleware", MIDDLEWARE, "--logits-processors", VALIDATOR]
    if current_platform.is_cpu() and not any(a.startswith("--gpu-memory-utilization") for a in rest):
        out += ["--gpu-memory-utilization", "0.3"]  # vLLM's default asks for 92% of the machine's memory
    return out + rest


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(argv)
    problem = vllm_unavailable()
    if problem:  # the README's Quick start does not install vLLM: say what to do, not a traceback
        sys.exit(f"serve.py runs vLLM's OpenAI server, which cannot run here: {problem} (docs/serving.md)")
    # The steering reads the V1 model runner's batch layout (backends/vllm/patches.py); small KV cache on a CPU.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ[VECTORS_ENV] = str(Path(args.vectors).resolve()) if args.vectors else ""
    os.environ[MAX_BODY_ENV] = str(args.max_body_bytes)
    os.environ[BODY_TIMEOUT_ENV] = str(args.body_timeout)
    os.environ[HEADER_TIMEOUT_ENV] = str(args.header_timeout)
    try:
        run_vllm_server(vllm_arguments(args, rest))
    except KeyboardInterrupt:
        pass


def run_vllm_server(argv: list[str]) -> None:
    """vLLM's `vllm serve` in this process (what `python -m vllm.entrypoints.openai.api_server` runs)."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import configure_logging_from_args, run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="serve.py", description="vLLM's OpenAI-compatible server"))
    vargs = parser.parse_args(argv)
    configure_logging_from_args(vargs)
    validate_parsed_serve_args(vargs)
    print(f"serve.py: vLLM's OpenAI server on http://{vargs.host}:{vargs.port}/v1", file=sys.stderr, flush=True)
    uvloop.run(run_server(vargs))
