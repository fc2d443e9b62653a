"""The vLLM backend's wire record, admission check, worker parsing and the server middleware's helpers.

Quick tier: no engine, no server (those are tests/test_vllm.py and tests/test_serve.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

from llm_steering.backends.vllm.wire import EXTRA_KEY, RecordError, SteeringRecord, WireComponent
from llm_steering.serving import middleware

import pytest
import torch


def vector(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    return WireComponent.encode_vector((v / v.norm()).tolist())


def record(n: int = 4, **kw) -> SteeringRecord:
    comp = WireComponent(**{"layer": 1, "op": "clamp", "strength": 2.5, "name": "x", "vector": vector(n), **kw})
    return SteeringRecord((comp,))


# ---------------------------------------------------------------------------
# wire.py
# ---------------------------------------------------------------------------


def test_a_signed_record_round_trips_and_a_forged_one_is_refused():
    rec = record()
    assert SteeringRecord.verify(rec.sign()) == rec == SteeringRecord.read(rec.sign())
    mac, _, text = rec.sign().partition(".")
    for forged in ("0" * 64 + "." + text, text, json.dumps({"components": []}), 3, None, [1], mac + "." + text + " "):
        with pytest.raises(RecordError, match="reserved"):
            SteeringRecord.verify(forged)


def test_the_vector_travels_as_float32_bytes_not_decimal_text():
    rec = record(4096)
    assert len(rec.sign()) < 4096 * 4 * 4 / 3 + 500  # base64 of 16 KB, where decimal text was ~80 KB
    values = rec.components[0].vector_values()
    assert len(values) == 4096 and abs(math.fsum(x * x for x in values) - 1) < 1e-5


@pytest.mark.parametrize("change, message", [
    ({"layer": 30}, "out of range"),
    ({"layer": True}, "non-negative integer"),
    ({"layer": -1}, "non-negative integer"),
    ({"op": "explode"}, "unknown op"),
    ({"strength": float("nan")}, "finite"),
    ({"strength": "5"}, "finite"),
    ({"cap_min": float("inf"), "op": "cap"}, "finite"),
    ({"op": "cap"}, "needs cap_min"),
    ({"vector": vector(3)}, "3 values, but this model's hidden size is 4"),
    ({"vector": "not base64!"}, "not base64"),
    ({"vector": WireComponent.encode_vector([0.0] * 4)}, "non-zero"),
    ({"vector": WireComponent.encode_vector([float("nan")] * 4)}, "finite"),
    ({"feature": "pirate"}, "either a feature name or a vector"),
])
def test_check_refuses_what_does_not_fit_the_model(change, message):
    with pytest.raises(RecordError, match=message):
        record(**change).check(num_layers=30, hidden_size=4)


def test_parse_refuses_unknown_fields_and_too_many_components():
    good = json.loads(record().payload())
    for bad in ({**good, "extra": 1}, {**good, "components": [{**good["components"][0], "eval": 1}]},
                {**good, "components": good["components"] * 65}, {**good, "steer_prompt": "yes"}, [], "x"):
        with pytest.raises(RecordError):
            SteeringRecord.parse(json.dumps(bad))


def test_auto_fields_round_trip_and_are_checked():
    """What the server's auto adds to a record (serving/auto.py): where steering starts, where a releasing
    component lets go, the tokens that let it go, a scored request's key."""
    rec = SteeringRecord((WireComponent(1, "add", 2.0, name="x", vector=vector(4), release=True),), steer_from=3,
                         let_go_at=9, release_ids=(5, 7), score=None)
    assert SteeringRecord.verify(rec.sign()) == rec
    assert '"release"' not in record().payload()  # a component that never lets go says nothing of it
    scored = SteeringRecord((), score="k", score_from=2)
    assert SteeringRecord.verify(scored.sign()) == scored and scored.cache_salt() == "k"
    comp = rec.components[0]
    for bad, message in [({"let_go_at": -1}, "let_go_at must be a non-negative integer"),
                         ({"steer_from": True}, "steer_from must be a non-negative integer"),
                         ({"release_ids": (1, -2)}, "release_ids"), ({"release_ids": (True,)}, "release_ids"),
                         ({"release_ids": tuple(range(5000))}, "release_ids"), ({"score": ""}, "score must be a key"),
                         ({"trace": "t"}, "traced record cannot let go")]:
        with pytest.raises(RecordError, match=message):
            SteeringRecord((comp,), **{"steer_from": 3, **bad}).check()
    with pytest.raises(RecordError, match="release must be true or false"):
        SteeringRecord((WireComponent(1, "add", 2.0, name="x", vector=vector(4), release="yes"),)).check()
    with pytest.raises(RecordError, match="release_ids"):
        SteeringRecord.parse(json.dumps({**json.loads(rec.payload()), "release_ids": "5"}))


def test_the_cache_salt_follows_the_steering_and_traces_never_share():
    assert record().cache_salt() == record().cache_salt()
    assert record().cache_salt() != record(strength=2.6).cache_salt()
    assert SteeringRecord(record().components, trace="abc").cache_salt() == "abc"


def test_the_admission_check_is_a_value_error_for_vllm():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from llm_steering.backends.vllm.validator import SteeringValidator

    SteeringValidator.validate_params(SimpleNamespace(extra_args=None))
    SteeringValidator.validate_params(SimpleNamespace(extra_args={EXTRA_KEY: record().sign()}))
    with pytest.raises(ValueError, match="reserved"):
        SteeringValidator.validate_params(SimpleNamespace(extra_args={EXTRA_KEY: record().payload()}))



def test_what_only_the_middleware_reads_is_refused_if_it_reaches_the_engine_unread():
    """`steering` and `auto` in vllm_xargs are the middleware's to read; arriving at admission, they came by a
    route it did not parse, and vLLM's worker would ignore them: a one-line ValueError (vLLM's 400)."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from llm_steering.backends.vllm.validator import SteeringValidator

    with pytest.raises(ValueError, match="reached the engine unread: send it in a JSON body"):
        SteeringValidator.validate_params(SimpleNamespace(extra_args={"steering": '{"features": []}'}))
    for value in (True, "true", 1):
        with pytest.raises(ValueError, match="^auto .* answers chats: send it in a JSON body to /v1/chat/completions"):
            SteeringValidator.validate_params(SimpleNamespace(extra_args={EXTRA_KEY: record().sign(), "auto": value}))
    SteeringValidator.validate_params(SimpleNamespace(extra_args={EXTRA_KEY: record().sign(), "other": 1}))


# ---------------------------------------------------------------------------
# worker.py: nothing a request carries raises in the worker
# ---------------------------------------------------------------------------


class FakeRunner:
    """Just what WorkerSteering reads of vLLM's model runner: 3 layers of width 4."""

    def __init__(self) -> None:
        self.model = torch.nn.Module()
        self.model.model = torch.nn.Module()
        self.model.model.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.model_config = SimpleNamespace(get_hidden_size=lambda: 4)
        self.query_start_loc = None
        self.requests: dict = {}

    def _prepare_inputs(self) -> None:
        pass

    def execute_model(self) -> None:
        pass


@pytest.mark.parametrize("value", [
    json.dumps({"components": [{"layer": 1, "vector": [1.0, 2.0, 3.0], "strength": 5.0, "op": "add", "cap_min": None,
                                "cap_max": None, "scale": 0.0, "name": "x"}], "steer_prompt": True}),  # the old decimal record
    "garbage", 17, {"components": "x"},
    record(3).sign(), record(layer=3).sign(),
    "0." + record().payload().replace('"strength":2.5', '"strength":NaN'),
    SteeringRecord((WireComponent(1, "add", 1.0, name="f", feature="pirate"),), vectors_file="/nonexistent",
                   vectors_digest="0").sign(),
])
def test_the_worker_refuses_a_bad_record_without_raising(value):
    from llm_steering.backends.vllm.worker import WorkerSteering

    runner = FakeRunner()
    runner.requests["r"] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={EXTRA_KEY: value}),
                                           num_prompt_tokens=5)
    assert WorkerSteering(runner)._parse("r") is None


def test_the_worker_builds_a_good_record():
    from llm_steering.backends.vllm.worker import WorkerSteering

    runner = FakeRunner()
    runner.requests["r"] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={EXTRA_KEY: record().sign()}),
                                           num_prompt_tokens=5)
    req = WorkerSteering(runner)._parse("r")
    (idx, comps, vectors), = req.layers.values()
    assert comps[0].op == "clamp" and comps[0].strength == 2.5 and vectors[0].shape == (4,)


def test_a_releasing_component_lets_go_where_the_record_says_and_the_others_stay_on():
    """The worker's hook steers a chunk's positions before `let_go_at` with every component and those from it
    on only with the ones that do not let go; a generated token among `release_ids` lets go from its own
    position (calibrate.scheduled_steering's rule), a prompt token does not."""
    from llm_steering.backends.vllm.worker import WorkerSteering

    runner = FakeRunner()
    e0, e1 = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    comps = (WireComponent(1, "add", 2.0, name="goes", vector=WireComponent.encode_vector(e0), release=True),
             WireComponent(1, "add", 3.0, name="stays", vector=WireComponent.encode_vector(e1)))
    runner.requests["r"] = SimpleNamespace(num_prompt_tokens=3, sampling_params=SimpleNamespace(
        extra_args={EXTRA_KEY: SteeringRecord(comps, let_go_at=5, release_ids=(7,)).sign()}))
    worker = WorkerSteering(runner)
    req = worker._parse("r")
    worker.plan = {1: [(0, 4, 3, req)]}  # rows 0-3 are positions 3-6
    hidden, residual = torch.zeros(4, 4), torch.zeros(4, 4)
    out, _ = worker._make_hook(1)(None, None, (hidden, residual))
    assert out[:, 0].tolist() == [2.0, 2.0, 0.0, 0.0]  # let go from position 5
    assert out[:, 1].tolist() == [3.0] * 4  # the other component stays on

    req.stop = None
    worker.releases = [(0, 3, 2, req)]  # positions 2-4: the prompt's last token (7, not generated), then 9, 7
    worker._read_fed_tokens(None, (torch.tensor([7, 9, 7]),))
    assert req.stop == 4


# ---------------------------------------------------------------------------
# middleware.py helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type, json_", [
    (b"application/json", True), (b"Application/JSON", True), (b"APPLICATION/JSON; charset=UTF-8", True),
    (b" application/json ;charset=utf-8", True), (b"application/vnd.api+json", True), (b"text/plain", False),
    (b"application/jsonx", False), (b"text/json", False), (None, False), (b"", False),
])
def test_the_media_type_is_read_as_http_says(content_type, json_):
    assert middleware.is_json(content_type) is json_


def run_stream(events: list[bytes]) -> bytes:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def go() -> None:
        checked = middleware.finish_streams(send)
        await checked({"type": "http.response.start", "status": 200,
                       "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        for body in events:
            await checked({"type": "http.response.body", "body": body, "more_body": True})

    asyncio.run(go())
    return b"".join(m.get("body", b"") for m in sent)


def chunk(finish: str | None = None, index: int = 0) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": index, "delta": {"content": "a"},
                                                "finish_reason": finish}]}).encode() + b"\n\n"


def test_a_stream_cut_before_its_finish_reason_ends_with_an_error_event():
    out = run_stream([chunk(), chunk(), b"data: [DONE]\n\n"])
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and b'"error"' in events[-2] and b"503" in events[-2]


def test_a_finished_stream_is_left_as_it_was():
    events = [chunk(), chunk("stop") + b"data: [DONE]\n\n"]
    assert run_stream(events) == b"".join(events)
    two = [chunk(index=0), chunk(index=1), chunk("stop", 0), chunk("length", 1), b"data: [DONE]\n\n"]
    assert run_stream(two) == b"".join(two)
    assert b"error" in run_stream([chunk(index=0), chunk(index=1), chunk("stop", 0), b"data: [DONE]\n\n"])


def test_a_stalled_body_is_a_408_after_the_bound():
    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {}

    async def go() -> None:
        await middleware.read_body({"headers": []}, receive, 100, 0.2)

    with pytest.raises(middleware.RequestError) as info:
        asyncio.run(asyncio.wait_for(go(), 5))
    assert info.value.status == 408


def test_an_auto_request_is_read_with_autos_own_penalty_and_the_models_sampling_defaults():
    """serving/auto.py: `auto` by either route; repetition penalty 1.1 (what auto was chosen with) unless the
    request says, whatever the model's generation config says; its temperature and top_p the model's defaults."""
    from llm_steering.config import SteeringSpec
    from llm_steering.serving import auto

    spec = SteeringSpec.from_dict({"format": "llm-steering/spec", "version": 1, "model_id": "m", "steer_prompt": True,
                                   "features": [{"key": "pirate", "fraction": 0.2}]})
    body = {"messages": [{"role": "user", "content": "Hi"}], "vllm_xargs": {"auto": "true"}}
    value = auto.take_auto(body)
    assert value is True and "vllm_xargs" not in body
    defaults = {"repetition_penalty": 1.0, "temperature": 0.6, "top_p": 0.9}
    req = auto.auto_request(body, spec, value, defaults)
    assert (req.repetition_penalty, req.temperature, req.top_p, req.stream) == (1.1, 0.6, 0.9, False)
    req = auto.auto_request({**body, "repetition_penalty": 1.3, "temperature": 0}, spec, value, defaults)
    assert (req.repetition_penalty, req.temperature) == (1.3, 0.0)
    for bad, message in [({"temperature": float("nan")}, "temperature must be"), ({"seed": "1"}, "seed must be"),
                         ({"max_tokens": 0}, "max_tokens must be"), ({"messages": []}, "messages must be"),
                         ({"messages": [{"role": "user", "content": " "}]}, "no user message"),
                         ({"tools": []}, "not tools: drop it"), ({"stream": "yes"}, "stream must be true or false"),
                         ({"model": 3}, "model must be text")]:
        with pytest.raises(auto.RequestError, match=message):
            auto.auto_request({**body, **bad}, spec, value, defaults)
    with pytest.raises(auto.RequestError, match="send auto once"):
        auto.take_auto({"auto": True, "vllm_xargs": {"auto": True}})
