"""The app's GPU function behind a process boundary built like ZeroGPU's (spaces 0.51.3).

On a ZeroGPU Space, `@spaces.GPU` forks a worker process, sends it the arguments through a
queue, iterates the generator there (`thread_wrapper` / `iterate` in spaces/zero/wrappers.py)
and sends every yield back pickled. The worker checks its own stop event only after the
generator's next yield, and that event is set only when the main process closes the
handler, which Gradio's cancel does not promise. Stop must reach the worker anyway: the
Stop button's flag (app.StopFlags) is watched by a thread inside the worker.
"""

from __future__ import annotations

import multiprocessing
import pickle
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from llm_steering import steering
from llm_steering.web import handlers

import pytest
import torch

FORK = multiprocessing.get_context("fork")  # what spaces uses


def spaces_worker(task, arg_queue, res_queue, stop_event) -> None:
    """spaces 0.51.3's thread_wrapper + iterate, reduced to what touches the generator."""
    (args, kwargs) = arg_queue.get()

    def iterate() -> None:
        gen = task(*args, **kwargs)
        while True:
            try:
                res = next(gen)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001
                res_queue.put(("error", repr(exc)))
                break
            if stop_event.is_set():
                gen.close()
                break
            res_queue.put(("ok", res))  # pickled across the process boundary

    with ThreadPoolExecutor() as executor:
        executor.submit(iterate)
    res_queue.put(("end", time.time()))


@pytest.fixture(scope="module")
def app_module():
    from llm_steering.web import app

    app.LOADED = app.LOADED or app.load_app()
    return app


def run_behind_boundary(app, chat, comps, max_new_tokens, stop_key):
    arg_queue, res_queue, stop_event = FORK.Queue(), FORK.Queue(), FORK.Event()
    args = (chat, comps, True, 0.0, 1.0, max_new_tokens, None, stop_key, time.time())
    proc = FORK.Process(target=spaces_worker, args=(app.generate, arg_queue, res_queue, stop_event), daemon=True)
    proc.start()
    arg_queue.put((args, {}))
    return proc, res_queue, stop_event


def test_stop_ends_the_workers_generation_within_seconds(app_module):
    app = app_module
    feature = app.LOADED.features[0]
    comps = [feature.component(feature.default_fraction)]
    chat = [{"role": "user", "content": "Write a very long story about a dog who travels the world."}]
    key = uuid.uuid4().hex
    proc, res_queue, stop_event = run_behind_boundary(app, chat, comps, 400, key)
    try:
        seen = []
        while len(seen) < 3:  # the answer is streaming in the worker
            kind, value = res_queue.get(timeout=120)
            assert kind == "ok", value
            seen.append(value)
        handlers.request_stop(key)  # what the Stop button does; the handler is NOT closed (stop_event stays clear)
        t_stop = time.time()
        results = []
        while True:
            kind, value = res_queue.get(timeout=30)
            if kind == "end":
                t_end = value
                break
            assert kind == "ok", value
            results.append(value)
        assert not stop_event.is_set()
        # about a token (0.1 s) on idle cores, 1.5 s seen on a loaded 2-core machine; the 400 tokens asked
        # for take over 30 s, so a bound of 5 s still tells a Stop that works from one that does not
        assert t_end - t_stop < 5.0, f"the worker generated for {t_end - t_stop:.2f} s after Stop"
        steered, unsteered, trace, stopped, effects = results[-1]
        assert stopped and unsteered is None and isinstance(trace, steering.SteeringTrace)
        assert len(effects) == len(trace.token_ids) - trace.prompt_len  # the stopped answer's effect view too
        assert len(trace.token_ids) - trace.prompt_len < 200  # far from the 400 asked for
        assert trace.components[0].before and trace.components[0].pending == []  # flushed before pickling
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_a_stop_from_before_the_answer_started_is_ignored(app_module):
    """A flag left by an earlier Stop in the same session must not cut the next answer short."""
    app = app_module
    key = uuid.uuid4().hex
    handlers.request_stop(key)
    time.sleep(0.05)
    chat = [{"role": "user", "content": "Say hi."}]
    proc, res_queue, _ = run_behind_boundary(app, chat, [], 6, key)
    try:
        results = []
        while True:
            kind, value = res_queue.get(timeout=120)
            if kind == "end":
                break
            results.append(value)
        assert results and results[-1][3] is False and results[-1][0].strip()
    finally:
        proc.join(10)


def _concept_worker(app, recipe, res_queue) -> None:
    """What spaces 0.51.3 does for a plain @spaces.GPU function (thread_wrapper / run_task): call it in a
    fresh thread of the forked worker (not its main thread, whose OpenMP pool died in the fork) and send
    back the result, pickled."""
    def run_task() -> None:
        try:
            res_queue.put(("ok", pickle.dumps(app.concept_on_gpu(recipe))))
        except Exception as exc:  # noqa: BLE001
            res_queue.put(("error", repr(exc)))

    with ThreadPoolExecutor() as executor:
        executor.submit(run_task)


def test_your_own_concept_is_made_in_the_gpu_worker_and_crosses_back(app_module):
    """On ZeroGPU the model runs only inside @spaces.GPU: the concept panel and share links make a concept
    there (app.concept_on_gpu, on the loaded catalog) and get back its feature and its tokens, pickled.
    (As spaces does, the worker runs it in a fresh thread: the forked main thread's OpenMP pool is dead, and
    a forward there hangs once the parent has run a threaded one, as the whole suite's earlier tests have.)"""
    from llm_steering import concepts, lens
    from llm_steering.recipe import ConceptRecipe

    app = app_module
    recipe = ConceptRecipe("my_tower", ("The Eiffel Tower stands in Paris.", "We climbed the Eiffel Tower at night.",
                                        "Gustave Eiffel built the iron tower in 1889."), "topic")
    res_queue = FORK.Queue()
    proc = FORK.Process(target=_concept_worker, args=(app, recipe, res_queue), daemon=True)
    proc.start()
    try:
        kind, value = res_queue.get(timeout=120)
    finally:
        proc.join(10)
    assert kind == "ok", value
    feature, tokens = pickle.loads(value)
    here = concepts.make_concept(app.LOADED.catalog, recipe)  # the same recipe, made in this process
    assert feature.key == "my_tower" and feature.layer == here.layer and feature.default_fraction == here.default_fraction
    assert torch.allclose(feature.vector.vector, here.vector.vector, atol=1e-5)
    expected = lens.feature_tokens(app.LOADED.model, app.LOADED.tokenizer, here)  # measured at its default
    assert tokens.how == expected.how == lens.MEASURED
    assert [t.id for t in tokens.promoted] == [t.id for t in expected.promoted]
    assert "my_tower" not in [f.key for f in app.LOADED.catalog.features]  # the shared catalog never lists it


def test_what_crosses_the_boundary_survives_pickling(app_module):
    """Arguments (components, chats) and every kind of yield round-trip through pickle."""
    app = app_module
    feature = app.LOADED.features[0]
    comp = feature.component(0.3, "clamp")
    back = pickle.loads(pickle.dumps(comp))
    assert (back.layer, back.op, back.strength, back.name) == (comp.layer, comp.op, comp.strength, comp.name)
    assert back.vector.equal(comp.vector)
    chat = [{"role": "user", "content": "Hi"}]
    pieces = list(app.generate(chat, [comp], True, 0.0, 1.0, 4, chat, "", 0.0))
    for piece in pieces:
        assert pickle.loads(pickle.dumps(piece)) == piece
    trace = pieces[-1][2]
    assert pickle.loads(pickle.dumps(trace)) == trace and trace.components[0].after

