"""serve.py: vLLM's own OpenAI server with steering, through the official `openai` client.

One real `python serve.py` process on the embedded model (float32, small KV cache, an API key,
3 s bounds on stalled headers and bodies) serves the module; the last test ends it with SIGTERM.
Skipped when vLLM is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
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
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STALL_BOUND = 3  # serve.py's --body-timeout and --header-timeout here, seconds
SPEC = {"format": "llm-steering/spec", "version": 1, "model_id": steering.EMBEDDED_MODEL_ID, "steer_prompt": True,
        "features": [{"key": "pirate", "fraction": 0.5, "op": "clamp"}]}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(ROOT / "tests" / ".serve_test.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--max-model-len", "1024", "--api-key", KEY,
                             "--body-timeout", str(STALL_BOUND), "--header-timeout", str(STALL_BOUND)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", headers=AUTH, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"serve.py did not come up: see {log.name}")
    yield proc, url
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    finally:  # a server that does not end within the bound is still not left behind
        for p in [proc, *session_processes(proc.pid)]:  # whatever the SIGTERM test may have left
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=120)


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
                          headers={"content-type": "application/json", **AUTH}, timeout=30)
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


def hooks_answer(embedded, spec: dict, n: int, chat: list | None = None, repetition_penalty: float = 1.0) -> str:
    model, tok = embedded
    parsed = steering.SteeringSpec.from_dict(spec)
    comps = steering.spec_components(parsed, steering.load_vectors(ROOT / "steering_vectors.pt"))
    return "".join(steering.stream_steered_answer_hf(model, tok, chat or PROMPT, comps, max_new_tokens=n, temperature=0.0,
                                                     steer_prompt=parsed.steer_prompt,
                                                     repetition_penalty=repetition_penalty))


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


def test_the_same_messages_and_penalty_give_the_hooks_answer_with_no_system_prompt_added(client, embedded):
    chat = [{"role": "system", "content": "You answer in one sentence."}, *PROMPT]
    spec = {**SPEC, "features": [{"key": "pirate", "fraction": 0.3}]}  # no op: the feature's own, as in the app
    out = client.chat.completions.create(model="default", messages=chat, temperature=0, max_tokens=16,
                                         extra_body={"steering": spec, "repetition_penalty": 1.1})
    assert out.choices[0].message.content == hooks_answer(embedded, spec, 16, chat, 1.1)
    assert out.usage.prompt_tokens == len(steering.chat_input_ids(embedded[1], chat))  # nothing added to the prompt
    plain = ask(client, max_tokens=3)
    assert plain.usage.prompt_tokens == len(steering.chat_input_ids(embedded[1], PROMPT))


def test_automatic_tool_calls_need_vllms_flags(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        ask(client, max_tokens=4, tools=tools, tool_choice="auto")
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        ask(client, max_tokens=4, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})


def test_vllm_endpoints_answer(server):
    url = server[1]
    for path in ("/health", "/version", "/metrics", "/v1/models"):
        assert httpx.get(url + path, headers=AUTH, timeout=10).status_code == 200, path
    tok = httpx.post(f"{url}/tokenize", json={"model": "default", "prompt": "hello world"}, timeout=10).json()
    assert tok["count"] >= 2
    done = httpx.post(f"{url}/v1/completions", json={"model": "default", "prompt": "Once upon", "max_tokens": 3},
                      headers=AUTH, timeout=60).json()
    assert done["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------
# No request bypasses the checks: media types, the reserved key, authentication, stalls
# ---------------------------------------------------------------------------


def post(url: str, body: dict | bytes, content_type: str = "application/json", path: str = "/v1/chat/completions",
         headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": content_type, **AUTH, **(headers or {})},
                      timeout=120)


def chat_body(**fields) -> dict:
    return {"model": "default", "messages": PROMPT, "temperature": 0, "max_tokens": 12, **fields}


def test_a_media_type_in_another_case_steers_as_the_canonical_one(client, server):
    canonical = ask(client, max_tokens=12, extra_body={"steering": SPEC}).choices[0].message.content
    for content_type in ("Application/JSON", "APPLICATION/JSON; charset=UTF-8", "application/json ;charset=utf-8"):
        resp = post(server[1], chat_body(steering=SPEC), content_type)
        if resp.status_code == 200:
            assert resp.json()["choices"][0]["message"]["content"] == canonical, content_type
        else:
            assert 400 <= resp.status_code < 500, (content_type, resp.status_code, resp.text[:300])


def raw_record(size: int) -> str:
    """What a client could write as the reserved key: the old decimal-text record with a vector of `size` entries."""
    return json.dumps({"components": [{"layer": 3, "vector": [1.0] * size, "strength": 5.0, "op": "add", "cap_min": None,
                                       "cap_max": None, "scale": 0.0, "name": "x"}], "steer_prompt": True})


def forged_record() -> str:
    from llm_steering.backends.vllm.wire import SteeringRecord, WireComponent

    record = SteeringRecord((WireComponent(3, "add", 5.0, name="x", vector=WireComponent.encode_vector([1.0] * 576)),))
    return "0" * 64 + "." + record.payload()  # well formed, but not signed by the server


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/vnd.api+json",
                                          "text/plain", "APPLICATION/JSON;charset=utf-8"])
def test_the_reserved_key_is_a_4xx_by_every_route_and_the_server_goes_on(client, server, content_type):
    ask(client, max_tokens=2, extra_body={"steering": SPEC})  # the workers' hooks are installed by now
    plain = ask(client, max_tokens=4).choices[0].message.content
    for path in ("/v1/chat/completions", "/v1/completions"):
        for value in (raw_record(3), raw_record(576), forged_record()):
            body = chat_body(vllm_xargs={"llm_steering": value})
            if path == "/v1/completions":
                body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "Once upon a time"}
            resp = post(server[1], body, content_type, path)
            assert 400 <= resp.status_code < 500, (path, content_type, resp.status_code, resp.text[:300])
    assert ask(client, max_tokens=4).choices[0].message.content == plain  # alive, and no poisoned cache


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/vnd.api+json"])
def test_auto_the_server_cannot_answer_is_a_one_line_400(client, server, content_type):
    """auto answers chats with steering: anything else is told what to change (never a fixed strength after
    vLLM drops the unknown field), in every JSON media type, before any engine work."""
    cases = [
        (chat_body(steering=SPEC, auto=True) | {"prompt": "Once upon a time"}, "/v1/completions", "answers chats"),
        (chat_body(vllm_xargs={"steering": json.dumps(SPEC), "auto": "true"}) | {"prompt": "x"}, "/v1/completions",
         "answers chats"),
        (chat_body(auto=True), "/v1/chat/completions", "send the steering with it"),
        (chat_body(steering=SPEC, auto=True, logprobs=True), "/v1/chat/completions", "with auto this server takes"),
        (chat_body(steering=SPEC, auto=True, n=2), "/v1/chat/completions", "n must be 1"),
        (chat_body(steering=SPEC, auto="ocean"), "/v1/chat/completions", "not one of this steering's features"),
        (chat_body(steering=SPEC, auto=[1]), "/v1/chat/completions", "auto must be true or the name"),
        (chat_body(steering=SPEC, auto=True, messages=[{"role": "user", "content": "hi " * 2000}]), "/v1/chat/completions",
         "server's context is 1024 tokens"),
    ]
    for body, path, expected in cases:
        body = {k: v for k, v in body.items() if k != "messages"} if path == "/v1/completions" else body
        resp = post(server[1], body, content_type, path)
        assert resp.status_code == 400, (content_type, path, resp.status_code, resp.text[:300])
        message = resp.json()["error"]["message"]
        assert expected in message and "\n" not in message, message
    assert ask(client, max_tokens=4, extra_body={"steering": SPEC}).choices[0].message.content


def auto_reference(embedded, key: str, chat: list, n: int):
    """calibrate.auto_answer on the hooks backend, with the candidates the server (and the app) gives the feature
    at its default: the reference a server's auto answer must equal token for token (both float32, greedy)."""
    from llm_steering import calibrate
    from llm_steering.catalog import catalog_for_vectors

    catalog = catalog_for_vectors(steering.load_vectors(ROOT / "steering_vectors.pt"), file_only=True)
    feature = catalog.resolve(key)
    comp = feature.component(feature.default_fraction, feature.default_op)
    cands = calibrate.auto_candidates(comp, catalog.auto_max_multiplier(feature, feature.default_fraction),
                                      learned=calibrate.learned_direction(comp))
    spec = {**SPEC, "features": [{"key": key, "fraction": feature.default_fraction}]}
    return spec, calibrate.auto_answer(*embedded, chat, comp, max_new_tokens=n, candidates=cands)


def test_auto_on_the_server_chooses_and_answers_as_the_library_does(client, embedded):
    """`"auto": true` on the server, streamed: the candidates as parallel engine requests, the steering scores
    recorded by the workers, the answers read back through prompt_logprobs, the same picker; then the chosen
    answer goes on with its steering let go after the judged words. Checked token for token against
    calibrate.auto_answer on the hooks backend, and every candidate's signals. (A release that lets go inside the
    judged words, and vectors carried instead of named: the console on vLLM, tests/test_demo.py.)"""
    n = 52
    job = [{"role": "user", "content": "Give me three tips for a job interview."}]
    spec, ref = auto_reference(embedded, "ocean", job, n)
    assert ref.let_go_at == 48 and ref.chosen.components  # the case is what it says
    stream = client.chat.completions.create(model="default", messages=job, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"steering": spec, "auto": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    summary = chunks[0].model_extra["steering_auto"]
    assert text == ref.answer and summary["chosen"] == ref.label
    assert summary["let_go_at"] == 48 and summary["setting"].endswith("let go after its first 48 tokens")
    assert [c["label"] for c in summary["candidates"]] == [r.candidate.label for r in ref.table]
    for got, want in zip(summary["candidates"], ref.table, strict=True):  # the signals, read through vLLM
        assert got["nll_ratio"] == pytest.approx(want.nll_ratio, abs=1e-3)
        assert got["concept_score"] == pytest.approx(want.concept_score, abs=1e-3)
        assert got["on_question"] == want.on_question
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n


def engine_counts(url: str) -> dict[str, float]:
    """From vLLM's /metrics: requests running or waiting now, and requests finished (by stop or length) so far."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    return {"busy": total(r'^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)'),
            "finished": total(r'^vllm:request_success_total\{[^}]*finished_reason="(?:length|stop)"[^}]*\} (\S+)')}


def test_a_client_that_leaves_while_auto_chooses_stops_its_candidates(client, server):
    """A client that goes away while auto's candidates run (seconds of engine work) takes them with it: the
    engine aborts them, none runs to its length, no read-back or continuation starts, and the engine is idle
    at once. Before, they ran on to the end for nobody."""
    _, url = server
    spec = {**SPEC, "features": [{"key": "coffee", "fraction": 0.15}]}
    chat = [{"role": "user", "content": "How do I fry an egg?"}]
    # the feature's steering scores measured first (a short auto answer), so what runs below is the candidates
    client.chat.completions.create(model="default", messages=chat, max_tokens=1, extra_body={"steering": spec, "auto": True})
    body = json.dumps({"model": "default", "messages": chat, "max_tokens": 64, "steering": spec, "auto": True}).encode()
    wait_for_idle = time.monotonic() + 60
    while engine_counts(url)["busy"] and time.monotonic() < wait_for_idle:
        time.sleep(0.1)
    before = engine_counts(url)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while engine_counts(url)["busy"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine_counts(url)["busy"] >= 2, "the candidates never ran"
    left = time.monotonic()  # the client is gone
    while engine_counts(url)["busy"] and time.monotonic() - left < 60:
        time.sleep(0.05)
    after = engine_counts(url)
    assert after["busy"] == 0
    assert after["finished"] == before["finished"], "candidates, read-backs or the continuation ran on for nobody"
    # and the server answers the next request as before
    assert client.chat.completions.create(model="default", messages=chat, max_tokens=4).choices[0].message.content


def test_without_the_key_every_request_is_a_401_that_names_no_feature(server):
    url = server[1]
    bodies = [chat_body(steering={**SPEC, "features": [{"key": "no_such_feature", "fraction": 0.5}]}),
              chat_body(seed="abc"), chat_body(seed=True), chat_body(steering={**SPEC, "features": [{"key": "pirate",
                                                                                                  "fraction": 99}]}),
              deep_spec_body(), chat_body(messages=[{"role": "user", "content": "x" * 20_000_000}]),
              chat_body(vllm_xargs={"llm_steering": raw_record(3)})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for body in bodies:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            resp = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                              headers={"Content-Type": "application/json", **headers})
            assert resp.status_code == 401, (headers, resp.status_code, resp.text[:200])
            assert not any(name in resp.text for name in ("pirate", "eiffel", "feature", "seed")), resp.text[:200]


def test_a_stalled_body_is_a_408_within_the_bound(server):
    host, port = server[1].removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=STALL_BOUND + 10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"".encode())
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < STALL_BOUND + 5


def test_unfinished_headers_are_closed_within_the_bound(server):
    host, port = server[1].removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=STALL_BOUND + 10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n".encode())
        assert sock.recv(4096) == b""  # closed by the server, not by our timeout (which would raise)
    assert time.monotonic() - start < STALL_BOUND + 5


# ---------------------------------------------------------------------------
# Random mutations of valid requests (seeded, bounded, 127.0.0.1 only)
# ---------------------------------------------------------------------------

FUZZ_COUNT = 60
ODD_VALUES = [None, True, -1, 0, 2**63, 1e308, -0.5, "", "x" * 5000, [], [[[[[]]]]], {}, {"a": {"b": {"c": []}}}, "NaN",
              "pirate", [1.0, 2.0, 3.0], {"key": "pirate"}]
MEDIA_TYPES = ["application/json", "Application/JSON", "APPLICATION/JSON; charset=utf-8", "application/JSON",
               "application/x+json", "text/plain", ""]


def mutate(rng, body: dict) -> dict:
    """One to three random changes to a valid body: a field of the body, of its steering or of one of
    its features removed, retyped, resized or nested; vllm_xargs bent (the reserved key included)."""
    body = json.loads(json.dumps(body))
    for _ in range(rng.randrange(1, 4)):
        spec = body.get("steering") if isinstance(body.get("steering"), dict) else None
        features = spec.get("features") if spec and isinstance(spec.get("features"), list) else []
        target = rng.choice([body, body, *([spec] if spec else []), *[f for f in features if isinstance(f, dict)]])
        key = rng.choice([*target, "n", "seed", "stop", "logit_bias", "cache_salt", "steering", "auto"])
        op = rng.randrange(6)
        if op == 0:
            target.pop(key, None)
        elif op == 1:
            target[key] = rng.choice(ODD_VALUES)
        elif op == 2:
            target[key] = [target.get(key)] * rng.randrange(1, 50)
        elif op == 3:
            nested = target.get(key)
            for _ in range(rng.randrange(1, 200)):
                nested = [nested]
            target[key] = nested
        elif op == 4:
            target[key] = rng.choice(["x" * rng.randrange(1, 200_000), rng.uniform(-1e6, 1e6), rng.randrange(-10**9, 10**9)])
        else:
            body["vllm_xargs"] = rng.choice([{"llm_steering": raw_record(3)}, {"llm_steering": raw_record(3)},
                                             {"llm_steering": raw_record(576)}, {"LLM_STEERING": "x"},
                                             {"steering": json.dumps(SPEC)}, rng.choice(ODD_VALUES)])
    return body


def test_random_mutations_of_valid_requests_never_5xx_and_never_kill_the_engine(client, server):
    import random

    rng = random.Random(29)
    reference = ask(client, max_tokens=6).choices[0].message.content
    statuses: dict[int, int] = {}
    for i in range(FUZZ_COUNT):
        base = chat_body(max_tokens=2, steering={**SPEC, "features": [{"key": "pirate", "fraction": 0.3},
                                                                        {"key": "ocean", "fraction": 0.1, "op": "add"}]})
        if rng.random() < 0.2:  # auto, answered by the middleware itself (2 tokens: cheap)
            base["auto"] = rng.choice(["pirate", "ocean", True])
        body = mutate(rng, base)
        path = "/v1/chat/completions"
        if rng.random() < 0.25:
            path = "/v1/completions"
            body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "Once upon a time"}
        content_type = rng.choice(MEDIA_TYPES)
        auth = rng.choice([AUTH, AUTH, {"Authorization": f"bearer {KEY}"}, {}])
        resp = httpx.post(server[1] + path, content=json.dumps(body).encode(), timeout=120,
                          headers={"Content-Type": content_type, **auth} if content_type else dict(auth))
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (i, path, content_type, json.dumps(body)[:400], resp.text[:400])
    assert httpx.get(server[1] + "/health", timeout=10).status_code == 200
    assert ask(client, max_tokens=6).choices[0].message.content == reference  # nothing leaked into the cache
    assert statuses.get(400) and statuses.get(401), statuses  # the mutations reached the checks past authentication
    log = (ROOT / "tests" / ".serve_test.log").read_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log  # refused, never crashed


def test_sigterm_cuts_a_stream_visibly_and_leaves_no_process_behind(server):  # last: it ends the module's server
    proc, url = server
    family = session_processes(proc.pid)
    assert len(family) >= 2  # the server and at least the engine core
    events, cut = [], False
    body = chat_body(max_tokens=900, stream=True, ignore_eos=True)
    # A client that hears nothing for 20 s gives up (a cut it sees): after SIGTERM the server stops its engine at
    # once but holds the connection open, silent; the test waited out a 60 s read timeout there.
    timeout = httpx.Timeout(60, read=20)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=timeout) as resp:
        lines = resp.iter_lines()
        try:
            for line in lines:
                events += [line[5:].strip()] if line.startswith("data:") else []
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
        except httpx.HTTPError:
            cut = True  # the connection broke off: a client sees that too
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    finished = any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks)
    told = any("error" in c for c in chunks)
    assert finished or told or cut, events[-3:]
    proc.wait(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        time.sleep(0.5)
    assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
