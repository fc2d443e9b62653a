"""Shared fixtures: tiny random-config Llama models (seconds), the real embedded model, and the expensive
things the tests only read, made once for the session (the app, shipped and greedy; the vLLM engine)
or for a module (a browser).

Tests by cost: a test is `slow` when it, or a fixture it uses, calls one of STARTS (it starts a process,
an engine or a browser, or loads a model), or it is marked so itself; `bash tests/run.sh --fast`
(pytest -m "not slow") runs every other test: each module's quick ones.

tests/run.sh runs the suite on two pytest-xdist workers (`--dist loadgroup`). A test that uses an
expensive fixture shared beyond one test (the shipped app, the engine, a module's server) is put in that
fixture's xdist group, so each is made once, in one worker; everything else goes to whichever worker is free
(PER_WORKER: what each worker makes for itself, the greedy app among them)."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

from llm_steering import steering

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# vLLM's CPU build pins each engine's worker to one core ("auto": core 0 on a 2-core machine, the other kept
# for its server). Made for one engine on a machine of its own; the suite runs two or three engines beside
# apps and browsers, and every engine pinned to the same core waited on the others (a 0.5 s weight load took
# 38 s). Unpinned, the kernel spreads them. The TP=2 test binds its two workers itself.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def build_tiny_llama(num_layers: int = 4, hidden: int = 32, seed: int = 0):
    """A random-weight LlamaForCausalLM small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per test session."""
    return steering.load_model()


@pytest.fixture(scope="session")
def default_app(tmp_path_factory):
    """(url, log path) of `python app.py` on the shipped demo.yaml, started once for the session."""
    from browser import running_app

    log_path = tmp_path_factory.mktemp("app") / "server.log"
    with running_app(log_path) as url:
        yield url, log_path


@pytest.fixture(scope="session")
def greedy_app(tmp_path_factory):
    """(url, log path) of the app on demo.yaml with greedy decoding and short answers (browser.greedy_config),
    started once for the session in each worker that runs its tests (PER_WORKER): answers are repeatable."""
    from browser import greedy_config, running_app

    tmp = tmp_path_factory.mktemp("greedy")
    with running_app(tmp / "server.log", STEERING_CONFIG=str(greedy_config(tmp))) as url:
        yield url, tmp / "server.log"


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium for a module (a second or two to start); each test opens its own context
    (browser.open_page). Not for the session: Playwright's sync API keeps an event loop running in the
    thread while it is open, and a later test's asyncio.run() then fails."""
    from browser import chromium

    with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def vllm_engine():
    """One float32 vLLM engine on the embedded model for the session (its start takes 20-60 s), with a
    small token budget per step (`max_num_batched_tokens=16`), so every prompt is prefilled in several
    chunks mixed with other requests' decode rows. Skipped when vLLM cannot run here."""
    from llm_steering.backends import backend_names, get_backend
    from llm_steering.backends.vllm import vllm_unavailable

    reason = vllm_unavailable() if "vllm" in backend_names() else "not registered"
    if reason:
        pytest.skip(f"backend vllm: {reason}")
    backend = get_backend("vllm", None, None, None, dtype="float32", max_num_batched_tokens=16, max_num_seqs=16,
                          max_model_len=1024)
    yield backend.engine
    backend.close()


STARTS = re.compile(r"\b(spawn|run_one_shot|start_one_shot|run_demo|running_app|app_page|chromium|VLLMEngine|load_model|"
                    r"load_app|get_backend)\(|\bsubprocess\.")


# Shared fixtures each worker makes for itself rather than putting their tests in one group: made in seconds
# (the model, a browser), or used by so many long browser tests (the greedy app: over 30 of them, most 10-50 s)
# that one worker running them all would be the run's critical path; two app starts cost less than that.
PER_WORKER = {"embedded", "browser", "greedy_app"}
# Tests that start a vLLM engine of their own (a minute or more each on 2 cores): sent out first, so that no
# worker starts one while the other has nothing left to do.
ENGINE = re.compile(r"vllm|VLLMEngine|gpu_check|serve\.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the embedded model or starts a process, app, browser or "
                                       "engine (left out by `bash tests/run.sh --fast`)")
    if not hasattr(config, "workerinput") and not config.getoption("collectonly"):
        # On a new machine the embedded model's float32 copy is made here, once (about 25 s), before the workers
        # start: else both workers and every app, console and engine they start at once each convert it.
        from llm_steering import models

        try:
            models.embedded_model_dir()
        except ValueError:  # not installed: the tests that need it say so
            pass


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    starts: dict = {}

    def costly(function) -> bool:
        if function not in starts:
            try:
                starts[function] = bool(STARTS.search(inspect.getsource(function)))
            except (OSError, TypeError):  # pytest's own fixtures
                starts[function] = False
        return starts[function]

    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in (info.name2fixturedefs.values() if info else ()) for d in ds]
        if any(costly(f) for f in [getattr(item, "function", None), *(d.func for d in defs)] if f is not None):
            item.add_marker(pytest.mark.slow)
        shared = sorted(f"{d.baseid}::{d.argname}" if d.scope == "module" else d.argname for d in defs
                        if d.scope in ("module", "session") and d.argname not in PER_WORKER and costly(d.func))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "vllm" in params.values():  # test_backends' conformance suite on vLLM wraps the session's engine
            shared = ["vllm_engine"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
            if getattr(config.option, "loadgroup", False):  # set in xdist's workers under --dist loadgroup
                in_group(item, shared[0])
    if getattr(config.option, "loadgroup", False):
        # xdist sends the groups out first (the largest first), then single tests in this order: those that start
        # an engine, the other slow ones, the quick ones last, so the run ends on short tests in both workers.
        def weight(item) -> int:
            if not item.get_closest_marker("slow"):
                return 2
            function = getattr(item, "function", None)
            return 0 if function is not None and costly(function) and ENGINE.search(inspect.getsource(function)) else 1

        items.sort(key=weight)  # stable: each weight keeps the files' order


def in_group(item, group: str) -> None:
    """Put the group into the item's id as xdist's loadgroup reads it (`nodeid@group`). xdist 3.8 writes it to
    `item._nodeid`, which pytest 9.2 no longer reads (the id is `item._id`, a NodeId): without this every worker
    made its own apps, engines and servers, and tests that share one ran in both workers."""
    import dataclasses

    ident = getattr(item, "_id", None)
    if ident is None or "@" in str(ident):
        return
    tagged = dataclasses.replace(ident)  # the same path, names and parameters; only its text carries the group
    object.__setattr__(tagged, "_str_cache", f"{ident}@{group}")
    item._id = tagged


def unit(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def hooks_on(model) -> int:
    """How many forward hooks are registered anywhere on the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def write_small_saelens_sae(root, layer: int, d_model: int, d_sae: int, seed: int = 0) -> torch.Tensor:
    """A SAELens-layout SAE on blocks.{layer}.hook_resid_post under `root` (cfg.json in the 5.x form,
    tied random weights); returns W_dec [d_sae, d_model]. For tests of the on-demand paths; the
    layout tests themselves (tests/test_saes.py) use files written by sae_lens."""
    import json

    from safetensors.torch import save_file

    folder = root / f"blocks.{layer}.hook_resid_post"
    folder.mkdir(parents=True)
    w_dec = torch.randn(d_sae, d_model, generator=torch.Generator().manual_seed(seed))
    save_file({"W_dec": w_dec, "W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_model, "d_sae": d_sae, "hook_name": f"blocks.{layer}.hook_resid_post"}))
    return w_dec


def comps_for(case: str) -> list:
    """The steering cases both backends' equality tests run on the embedded model (hidden size 576)."""
    from llm_steering.steering import SteeringComponent

    v, w = unit(576, 100), unit(576, 101)
    return {
        "add": [SteeringComponent(layer=10, vector=v, strength=40.0, name="v")],
        "clamp": [SteeringComponent(layer=12, vector=v, strength=60.0, op="clamp")],
        "cap": [SteeringComponent(layer=14, vector=w, op="cap", cap_min=-2.0, cap_max=2.0)],
        "ablate": [SteeringComponent(layer=8, vector=w, op="ablate", scale=0.0)],
        "add_keepnorm": [SteeringComponent(layer=10, vector=v, strength=40.0, op="add_keepnorm")],
        "clamp_keepnorm": [SteeringComponent(layer=12, vector=v, strength=60.0, op="clamp_keepnorm")],
        "multi": [
            SteeringComponent(layer=3, vector=v, strength=6.0, op="clamp"),
            SteeringComponent(layer=10, vector=w, strength=30.0),
            SteeringComponent(layer=10, vector=v, op="cap", cap_min=0.0, cap_max=20.0),
            SteeringComponent(layer=20, vector=w, op="ablate", scale=0.5),
        ],
    }[case]


def pytest_runtest_logreport(report):
    """With STEERING_TEST_TIMELINE=FILE, each phase of each test as a line of JSON (worker, id, phase, start,
    stop): which worker ran what when, to find a run's critical path (docs/testing.md)."""
    path = os.environ.get("STEERING_TEST_TIMELINE")
    node = getattr(report, "node", None)  # set in xdist's controller; without xdist there is one worker
    if not path or (node is None and os.environ.get("PYTEST_XDIST_WORKER")):
        return
    import json

    worker = getattr(getattr(node, "gateway", None), "id", "main")
    with open(path, "a") as f:
        f.write(json.dumps({"worker": worker, "id": report.nodeid, "when": report.when, "start": report.start,
                            "stop": report.stop, "outcome": report.outcome}) + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran against an app server (default_app, greedy_app) carries the end of that server's
    log: a browser test that timed out on CI once said only what it waited for, not what the app did."""
    report = yield
    if report.failed and call.when == "call":
        for name in ("greedy_app", "default_app"):
            value = item.funcargs.get(name)
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Path) and value[1].is_file():
                report.sections.append((f"{name}'s log, last lines", value[1].read_text(errors="replace")[-4000:]))
    return report
