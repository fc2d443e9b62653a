"""serve.py: vLLM's own OpenAI server with steering, through the official `openai` client.

One real `python serve.py` process on the embedded model (float32, small KV cache) serves the
module; the last test ends it with SIGTERM. Skipped when vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm.txt)")

from llm_steering import steering

import httpx
import openai
import psutil
from browser import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Tell me a short story about a dog."}]
SPEC = {"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID, "steer_prompt": True,
        "features": [{"key": "pirate", "fraction": 0.5, "op": "clamp"}]}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(ROOT / "tests" / ".serve_test.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--max-model-len", "1024"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"serve.py did not come up: see {log.name}")
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    for p in session_processes(proc.pid):  # whatever the SIGTERM test may have left
        p.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="none", max_retries=0, timeout=120)


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def ask(client, **kw):
    return client.chat.completions.create(model="default", messages=PROMPT, temperature=0, **kw)


def test_usage_and_finish_reason_length(client):
    out = ask(client, max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3 and out.usage.prompt_tokens > 10


def test_n_stop_and_logprobs(client):
    two = client.chat.completions.create(model="default", messages=PROMPT, n=2, max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    full = ask(client, max_tokens=16).choices[0].message.content
    word = full.split()[3]
    stopped = ask(client, max_tokens=16, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert full.startswith(stopped.message.content)
    lp = ask(client, max_tokens=4, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 for t in lp)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=2)


def deep_spec_body() -> bytes:
    depth = 100_000
    return (b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "steering": '
            + b"[" * depth + b"]" * depth + b"}")


BAD_REQUESTS = {
    "seed abc": {"seed": "abc"},
    "seed 1.5": {"seed": 1.5},
    "seed true": {"seed": True},
    "temperature 2.5": {"temperature": 2.5},
    "20 MB body": {"messages": [{"role": "user", "content": "x" * 20_000_000}]},
    "5 MB message": {"messages": [{"role": "user", "content": "hello " * 850_000}]},
    "fraction 99": {"steering": {**SPEC, "features": [{"key": "pirate", "fraction": 99}]}},
    "fraction 1e300": {"steering": {**SPEC, "features": [{"key": "pirate", "fraction": 1e300}]}},
    "unknown feature": {"steering": {**SPEC, "features": [{"key": "no_such_feature", "fraction": 0.5}]}},
    "65 features": {"steering": {**SPEC, "features": [{"key": "pirate", "fraction": 0.1}] * 65}},
    "spec for another model": {"steering": {**SPEC, "model_id": "other/model"}},
    "not a spec": {"steering": "not a spec"},
    "wrong spec format": {"steering": {**SPEC, "format": "nope"}},
    "reserved xargs": {"vllm_xargs": {"llm_steering": "{}"}},
    "deep spec": None,
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_is_a_fast_4xx_and_the_server_goes_on(client, server, case):
    start = time.monotonic()
    if BAD_REQUESTS[case] is None:  # the openai client cannot even serialize this body
        resp = httpx.post(f"{server[1]}/v1/chat/completions", content=deep_spec_body(),
                          headers={"content-type": "application/json"}, timeout=30)
        status, body = resp.status_code, resp.json()
    else:
        fields = dict(BAD_REQUESTS[case])
        kw = {"messages": fields.pop("messages", PROMPT), "max_tokens": 4}
        extra = {k: fields.pop(k) for k in ("steering", "vllm_xargs") if k in fields}
        try:
            client.chat.completions.create(model="default", **kw, **fields, extra_body=extra or None)
        except openai.APIStatusError as exc:
            status, body = exc.status_code, exc.body
        else:
            pytest.fail(f"{case}: answered instead of refused")
    elapsed = time.monotonic() - start
    assert 400 <= status < 500, (case, status, body)
    assert elapsed < 3, (case, elapsed)
    message = body["message"] if "message" in body else body["error"]["message"]
    assert message and "Traceback" not in message
    assert ask(client, max_tokens=2).choices[0].message.content  # the server goes on


def hooks_answer(embedded, spec: dict, n: int) -> str:
    model, tok = embedded
    parsed = steering.SteeringSpec.from_dict(spec)
    comps = steering.spec_components(parsed, steering.load_vectors(ROOT / "steering_vectors.pt"))
    return "".join(steering.stream_steered_answer_hf(model, tok, PROMPT, comps, max_new_tokens=n, temperature=0.0,
                                                     steer_prompt=parsed.steer_prompt))


def test_a_streamed_steered_answer_equals_the_hooks_backend(client, embedded):
    n = 24
    stream = ask(client, max_tokens=n, stream=True, extra_body={"steering": SPEC})
    steered = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    plain = ask(client, max_tokens=n).choices[0].message.content
    assert steered != plain
    assert steered == hooks_answer(embedded, SPEC, n)
    assert plain == hooks_answer(embedded, {**SPEC, "features": []}, n)


def test_steering_in_vllm_xargs_and_without_the_prompt(client, embedded):
    spec = {**SPEC, "steer_prompt": False}
    via_body = ask(client, max_tokens=16, extra_body={"steering": spec}).choices[0].message.content
    via_xargs = ask(client, max_tokens=16, extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})
    assert via_xargs.choices[0].message.content == via_body == hooks_answer(embedded, spec, 16)


def test_vllm_endpoints_answer(server):
    url = server[1]
    for path in ("/health", "/version", "/metrics", "/v1/models"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    tok = httpx.post(f"{url}/tokenize", json={"model": "default", "prompt": "hello world"}, timeout=10).json()
    assert tok["count"] >= 2
    done = httpx.post(f"{url}/v1/completions", json={"model": "default", "prompt": "Once upon", "max_tokens": 3},
                      timeout=60).json()
    assert done["usage"]["completion_tokens"] == 3


def test_sigterm_leaves_no_process_behind(server):  # last: it ends the module's server
    proc, _ = server
    family = session_processes(proc.pid)
    assert len(family) >= 2  # the server and at least the engine core
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        time.sleep(0.5)
    assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
