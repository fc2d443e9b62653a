"""The Space's model side: the loaded App, the GPU functions, errors for visitors, and main() (usage:
app.py's docstring). The handlers are in handlers.py, the page in layout.py."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import spaces  # before torch: on a ZeroGPU Space it must come first (a no-op elsewhere)
from spaces.config import Config

from llm_steering import steering
from llm_steering.backends import Backend, GenerationSettings, Stream, check_backend, get_backend
from llm_steering.catalog import CONCEPT_BUILDER, Catalog, Feature
from llm_steering.concepts import make_concept
from llm_steering.config import ModelProfile, load_config
from llm_steering.core import one_line
from llm_steering.lens import TokenLens, feature_tokens
from llm_steering.recipe import ConceptRecipe
from llm_steering.steering import SteeringComponent, SteeringTrace
from llm_steering.web.panel import ControlPanel
from llm_steering.web.stop_flags import StopFlags
from llm_steering.web.views import CSS, theme

import gradio as gr
import torch

# ---------------------------------------------------------------------------
# Constants (the texts the page shows are in views.py; the handlers are in handlers.py, the page in layout.py)
# ---------------------------------------------------------------------------

HERE = Path(__file__).resolve().parents[2]  # the checkout: demo.yaml beside app.py
CONFIG_PATH = Path(os.environ.get("STEERING_CONFIG") or HERE / "demo.yaml")
PROFILE_NAME = os.environ.get("STEERING_PROFILE") or None  # None = demo.yaml's default_profile
CONCURRENCY = int(os.environ.get("STEERING_CONCURRENCY") or 4)
BACKEND = os.environ.get("STEERING_BACKEND") or "hf"  # hf: forward hooks on the model; vllm: the vLLM engine
ON_ZERO_GPU = Config.zero_gpu  # a ZeroGPU Space: CUDA only inside the @spaces.GPU function
MAX_UPLOAD = "64kb"  # an imported steering file is a few hundred bytes
MAX_NEW_TOKENS = 1024  # the slider's end, and the API's limit
MAX_LINK = 8000  # characters of a shared link's query read at most
NO_PRESET = "None"

log = logging.getLogger("app")


# ---------------------------------------------------------------------------
# The model and its catalog: loaded once, by main()
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """What the handlers need: the profile, the model, its tokenizer and the feature catalog."""

    profile: ModelProfile
    model: Any
    tokenizer: Any
    catalog: Catalog
    backend: Backend | None = None  # STEERING_BACKEND's, from the registry (None: the hooks backend)

    def __post_init__(self) -> None:
        if self.backend is None:
            object.__setattr__(self, "backend", get_backend("hf", self.model, self.tokenizer))

    def stream(self, chat: list[dict], components: list[SteeringComponent], settings: GenerationSettings,
               cancel: threading.Event) -> Stream:
        """One answer from the configured backend: its text pieces, then `.result` (ids, finish, trace)."""
        return self.backend.stream(chat, components, settings, cancel)

    @functools.cached_property
    def panel(self) -> ControlPanel:
        """The steering controls for this catalog's features (their widgets are made by layout.py)."""
        return ControlPanel(self.features, auto=self.profile.generation.auto)

    @property
    def model_id(self) -> str:
        return steering.model_id_of(self.model)

    @property
    def features(self) -> list[Feature]:
        return self.catalog.features

    @property
    def presets(self) -> dict[str, Any]:
        return {p.name: p for p in self.profile.presets}


def load_app(config_path: str | os.PathLike = CONFIG_PATH, profile_name: str | None = PROFILE_NAME) -> App:
    """Config, model, tokenizer and catalog (every feature and preset checked); ValueError in one line."""
    profile = load_config(config_path).profile(profile_name)
    if ON_ZERO_GPU:  # no CUDA work outside @spaces.GPU: measure on the CPU, then hand the weights over
        model, tokenizer = steering.load_model(profile.model_id, device="cpu", dtype=torch.bfloat16)
        catalog = Catalog.open(profile, model, tokenizer)
        for feature in catalog.features:  # the cards' tokens (lens.py caches them per vector), on the CPU now
            catalog.feature_tokens(feature.key)
        CONCEPT_BUILDER[:] = [lambda _catalog, recipe: concept_on_gpu(recipe)[0]]  # share links, imports
        model.to("cuda")
    else:
        model, tokenizer = steering.load_model(profile.model_id)
        catalog = Catalog.open(profile, model, tokenizer)
    try:
        check_backend(BACKEND)
    except ValueError as exc:
        raise ValueError(f"STEERING_BACKEND={BACKEND}: {exc}") from None
    # the catalog measures norms and effects.py scores answers on the transformers model, whatever the backend
    return App(profile, model, tokenizer, catalog, get_backend(BACKEND, model, tokenizer, profile.model_id))


LOADED: App | None = None  # set once by main() (or a test); the GPU function reads the model from here


STOPS = StopFlags()  # made at import, before ZeroGPU forks a worker: both sides see its folder


# ---------------------------------------------------------------------------
# The one GPU function: streams the steered answer (and the unsteered one in compare mode)
# ---------------------------------------------------------------------------


def gpu_seconds(chat: list[dict], components: list, steer_prompt: bool, temperature: float, repetition_penalty: float,
                max_new_tokens: int, unsteered_chat: list[dict] | None = None, stop_key: str = "", since: float = 0.0) -> int:
    """ZeroGPU time to ask for: about 10 tokens/s per answer at worst, two answers in compare mode."""
    return 20 + (max_new_tokens // 10) * (2 if unsteered_chat is not None else 1)


@spaces.GPU(duration=gpu_seconds)
def generate(
    chat: list[dict],
    components: list[SteeringComponent],
    steer_prompt: bool,
    temperature: float,
    repetition_penalty: float,
    max_new_tokens: int,
    unsteered_chat: list[dict] | None = None,
    stop_key: str = "",
    since: float = 0.0,
) -> Iterator[tuple[str, str | None, SteeringTrace | None, bool, list[float] | None]]:
    """Yield (steered text so far, unsteered text so far or None, None, False, None); last, with
    the trace, whether the answer was stopped, and each answer token's effect (effects.py:
    how much more likely the steering made it; None without steering).

    With `unsteered_chat`, the unsteered answer to it is generated at the same time. A Stop
    for `stop_key` after `since` (StopFlags) or closing this generator ends both generations at
    their next layer. Everything yielded is picklable: on ZeroGPU it crosses a process boundary.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  repetition_penalty=repetition_penalty, steer_prompt=steer_prompt, trace=True)
    cancel, done = threading.Event(), threading.Event()
    threading.Thread(target=STOPS.watch, args=(stop_key, since, cancel, done), daemon=True).start()
    streams = [LOADED.stream(chat, components, settings, cancel)]
    if unsteered_chat is not None:
        streams.append(LOADED.stream(unsteered_chat, [], replace(settings, steer_prompt=True, trace=False), cancel))
    texts = [""] * len(streams)
    running = list(range(len(streams)))
    finished = False
    try:
        while running:  # after a Stop too: every backend then ends within a token, and its last text comes
            for i in list(running):  # both generate in their own threads; take turns reading them
                piece = next(streams[i], None)
                if piece is None:
                    running.remove(i)
                else:
                    texts[i] += piece
            yield texts[0], texts[1] if unsteered_chat is not None else None, None, False, None
        finished = all(stream.result.finish_reason != "cancelled" for stream in streams)
    finally:  # also when Stop closes this generator (then nothing more is yielded)
        done.set()
        for stream in streams:
            stream.close()  # ends the generation thread at its next layer and removes its hooks
        if not finished:
            log.info("generation stopped after %d characters; generation threads ended", len(texts[0]))
    trace = streams[0].result.trace  # prompt and answer ids, also when stopped (every backend keeps them)
    token_effects = None
    if components and len(trace.token_ids) > trace.prompt_len:
        from llm_steering import effects

        token_effects = effects.token_effects(LOADED.model, trace.token_ids, trace.prompt_len, components,
                                              steer_from=0 if steer_prompt else trace.prompt_len)
    yield texts[0], texts[1] if unsteered_chat is not None else None, trace, not finished, token_effects


def auto_seconds(chat: list[dict], component: SteeringComponent, others: list[SteeringComponent], temperature: float,
                 repetition_penalty: float, max_new_tokens: int, unsteered_chat: list[dict] | None = None,
                 stop_key: str = "", since: float = 0.0, max_multiplier: float | None = None) -> int:
    """ZeroGPU time for auto: the candidates' batch, then the answer (and the unsteered one)."""
    return 30 + (max_new_tokens // 10) * (2 if unsteered_chat is not None else 1)


@spaces.GPU(duration=auto_seconds)
def auto_generate(
    chat: list[dict],
    component: SteeringComponent,
    others: list[SteeringComponent],
    temperature: float,
    repetition_penalty: float,
    max_new_tokens: int,
    unsteered_chat: list[dict] | None = None,
    stop_key: str = "",
    since: float = 0.0,
    max_multiplier: float | None = None,
) -> Iterator[dict | tuple[str, str | None, SteeringTrace | None, bool, list[float] | None]]:
    """"Auto" for one feature (`component`, at its default): first a dict saying what auto chose
    (calibrate.stream_auto_answer: the candidates compared on their first greedy words; none past
    `max_multiplier` times the component, the strength range), then what `generate` yields: the chosen
    answer goes on from those words, and with `unsteered_chat` the unsteered answer comes beside it. Stop
    and closing behave as in `generate`."""
    from llm_steering import calibrate, effects

    cancel, done = threading.Event(), threading.Event()
    threading.Thread(target=STOPS.watch, args=(stop_key, since, cancel, done), daemon=True).start()
    model, tok = LOADED.model, LOADED.tokenizer
    auto = calibrate.stream_auto_answer(model, tok, chat, component, others, max_new_tokens, repetition_penalty,
                                        temperature, cancel,
                                        candidates=calibrate.auto_candidates(
                                            component, max_multiplier, calibrate.learned_direction(component, LOADED.catalog.vectors)))
    pieces = iter(auto)
    plain = None
    text, other = "", None
    try:
        first = next(pieces, "")
        choice = auto.choice
        cand = choice.chosen
        yield {"label": cand.label, "multiplier": cand.multiplier, "op": cand.components[0].op if cand.components else None,
               "steer_prompt": cand.steer_prompt, "release": cand.release, "vector": cand.vector, "seconds": round(choice.seconds, 1),
               "tried": len(choice.table), "let_go_at": auto.let_go_at}
        if unsteered_chat is not None:
            settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                          repetition_penalty=repetition_penalty, steer_prompt=True)
            plain = LOADED.stream(unsteered_chat, [], settings, cancel)
            other = ""
        text = first
        running = [pieces] + ([plain] if plain is not None else [])
        while running:
            for it in list(running):
                piece = next(it, None)
                if piece is None:
                    running.remove(it)
                elif it is pieces:
                    text += piece
                else:
                    other += piece
            yield text, other, None, False, None
    finally:
        done.set()
        if plain is not None:
            plain.close()
        if cancel.is_set():
            log.info("generation stopped after %d characters; generation threads ended", len(text))
    result = auto.result
    prompt = steering.chat_input_ids(tok, chat)
    trace = SteeringTrace(prompt_len=len(prompt), token_ids=[*prompt, *result.token_ids])
    token_effects = None
    cand = result.chosen
    if cand.components and not cand.release and result.let_go_at is None and not others and len(result.token_ids):
        token_effects = effects.token_effects(model, trace.token_ids, trace.prompt_len, list(cand.components),
                                              steer_from=0 if cand.steer_prompt else trace.prompt_len)
    yield result.answer, other, trace, auto.stopped, token_effects


@spaces.GPU(duration=30)
def concept_on_gpu(recipe: ConceptRecipe, catalog: Catalog | None = None) -> tuple[Feature, TokenLens]:
    """Your own concept (concepts.make_concept) and what it does (lens.feature_tokens: the tokens its
    steering at its default raises and lowers, measured; the logit lens where that reads), made where the
    model may run: on a ZeroGPU Space only inside this function (its worker returns both pickled, so
    `catalog` is left out there: the loaded one is used); elsewhere in-process, on `catalog`."""
    catalog = catalog if catalog is not None else LOADED.catalog
    feature = make_concept(catalog, recipe)
    return feature, feature_tokens(catalog.model, catalog.tokenizer, feature)


# ---------------------------------------------------------------------------
# Errors: one place turns them into what the visitor sees
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def user_errors(what: str = "Generation failed") -> Iterator[None]:
    """ValueError (bad input) -> gr.Error with its one line; anything else -> logged, one short line."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as exc:
        raise gr.Error(one_line(exc), print_exception=False) from None
    except Exception as exc:
        log.exception(what.lower())
        raise gr.Error(f"{what}: {one_line(exc) if str(exc) else type(exc).__name__}", print_exception=False) from None


def main() -> None:
    global LOADED
    parser = argparse.ArgumentParser(description="Serve the steering chat (model profile: $STEERING_PROFILE).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to listen on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        LOADED = load_app()
    except ValueError as exc:
        sys.exit(f"app.py: {one_line(exc)}")
    from llm_steering.web.layout import build_demo

    build_demo(LOADED).queue(default_concurrency_limit=CONCURRENCY).launch(
        server_name=args.host, server_port=args.port, theme=theme(), css=CSS,
        footer_links=["api"], max_file_size=MAX_UPLOAD,
    )

