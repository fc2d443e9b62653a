"""The console chat: talk to a steered model in a terminal.

    python demo.py                                      # interactive chat, demo.yaml's default profile
    python demo.py --prompt "Tell me about Paris" --steer eiffel_tower 0.5 --temperature 0 --max-new-tokens 48
    python demo.py --prompt "Tell me about Paris" --steer eiffel_tower 0.5 --compare
    python demo.py --profile llama31_8b --steer 15:21576 0.5    # an SAE feature, extracted on demand

A strength is a fraction of the layer's typical residual norm (0.5 = half of it), the
unit of the app's slider. In the chat, type /help for the commands; exit, quit or
Ctrl-D end it, Ctrl-C stops an answer. With --prompt it prints only the answer and
exits (0, or 2 for bad input, with one line saying why).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import steering

DEFAULT_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
BACKENDS = ("hf", "nnsight")
MODES = ("add", "clamp")
MAX_FRACTION = 10.0  # |strength| above this is almost surely a typo (50 meant as 50 %)
LAYER_INDEX = re.compile(r"(\d+):(\d+)|L(\d+)F(\d+)")
EXIT_WORDS = ("exit", "quit", "/exit", "/quit")

HELP = """\
Commands (strengths are fractions of the layer's typical residual norm: 0.5 = half):
  /steer <name|layer:index> [strength] [add|clamp]   steer with a feature (default strength and mode from /features)
  /unsteer <name|layer:index>                        stop steering with one feature
  /clear                                             stop all steering
  /features                                          the features of this profile, with descriptions
  /active                                            what is steered now
  /compare [message]                                 answer the next message twice: unsteered, then steered
  /backend [hf|nnsight]                              show or switch the backend (hf streams, nnsight prints when done)
  /reset                                             forget the conversation (steering stays)
  /save FILE                                         save the steering (.json, .yaml or .yml), as the app exports it
  /load FILE                                         load steering saved here or exported from the app
  /help                                              this list
exit, quit or Ctrl-D end the chat; Ctrl-C stops an answer."""


# ---------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------

COLOURS = {
    "user": "\033[1;32m",  # bold green
    "unsteered": "\033[36m",  # cyan
    "steered": "\033[35m",  # magenta
    "notice": "\033[33m",  # yellow
    "error": "\033[31m",  # red
}
RESET = "\033[0m"


def colour_enabled(stream: TextIO) -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Painter:
    """Wraps text in the ANSI colour of its kind, or leaves it alone when colours are off.

    >>> Painter(False)("steered", "text")
    'text'
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, kind: str, text: str) -> str:
        return f"{COLOURS[kind]}{text}{RESET}" if self.enabled and text else text

    def start(self, kind: str) -> str:
        return COLOURS[kind] if self.enabled else ""

    def reset(self) -> str:
        return RESET if self.enabled else ""


# ---------------------------------------------------------------------------
# Features: names and layer:index keys resolved to vectors and norms
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """A steerable direction with what is needed to turn a fraction into a strength."""

    key: str  # as saved in a steering spec: a name, or "L:I" for a raw SAE feature
    vector: Any  # steering.SteeringVector
    norm: float  # typical residual norm after vector.layer
    default_fraction: float
    default_mode: str
    description: str

    def component(self, fraction: float, mode: str) -> steering.SteeringComponent:
        return steering.SteeringComponent(
            layer=self.vector.layer,
            vector=self.vector.vector,
            strength=fraction * self.norm,
            op=mode,
            name=self.vector.name,
        )


def parse_layer_index(key: str) -> tuple[int, int] | None:
    """(layer, index) for "15:21576" or "L15F21576", else None."""
    match = LAYER_INDEX.fullmatch(key)
    if not match:
        return None
    groups = [g for g in match.groups() if g is not None]
    return int(groups[0]), int(groups[1])


def parse_fraction(text: str) -> float:
    """A strength typed by the user: a finite fraction of the layer's typical norm."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"strength {text!r} is not a number: give a fraction of the layer's typical norm, e.g. 0.5"
        ) from None
    if not math.isfinite(value) or abs(value) > MAX_FRACTION:
        raise ValueError(
            f"strength {text} is out of range: it is a fraction of the layer's typical norm "
            f"(0.5 = half); use a number from {-MAX_FRACTION:g} to {MAX_FRACTION:g}"
        )
    return value


def parse_mode(text: str) -> str:
    mode = text.lower()
    if mode not in MODES:
        raise ValueError(f"unknown mode {text!r}: use add or clamp")
    return mode


class Catalog:
    """The features a profile can steer with: its vectors file, plus SAE features extracted on demand.

    >>> catalog = Catalog(profile, vectors); catalog.attach(model, tok)
    >>> catalog.resolve("eiffel_tower").component(0.5, "clamp")
    """

    def __init__(self, profile: Any, vectors: Any) -> None:
        self.profile = profile
        self.vectors = vectors
        self.model: Any = None
        self.tokenizer: Any = None
        self._extracted: dict[tuple[int, int], Any] = {}
        self._norms: dict[int, float] = {}

    def attach(self, model: Any, tokenizer: Any) -> None:
        """Give the catalog the model (for layer checks and for measuring norms)."""
        if steering.hidden_size(model) != self.vectors.hidden_size:
            raise ValueError(
                f"{self.profile.vectors_path()} holds vectors of size {self.vectors.hidden_size}, but "
                f"{steering.model_id_of(model)} has hidden size {steering.hidden_size(model)}: "
                "rebuild the vectors file for this model"
            )
        self.model, self.tokenizer = model, tokenizer

    def check(self, key: str) -> None:
        """Raise ValueError now for a key that cannot resolve, without the model if possible."""
        if self._in_file(key) is None:
            self._refuse_or_defer(key)

    def resolve(self, key: str) -> Feature:
        """The feature a name or layer:index names; ValueError in one line if there is none."""
        key = key.strip()
        vector = self._in_file(key)
        layer_index = parse_layer_index(key)
        if vector is None:
            layer_index = self._refuse_or_defer(key)
            vector = self._extract(*layer_index)
        spec = self._spec_for(vector)
        norm = self._norm(vector.layer)
        if spec is not None:
            default_fraction, mode, description = spec.strength / norm, spec.mode, spec.description
        else:
            default_fraction, mode, description = 0.5, "clamp", vector.description
        canonical = f"{layer_index[0]}:{layer_index[1]}" if layer_index else vector.name
        return Feature(canonical, vector, norm, default_fraction, mode, description)

    def listing(self) -> list[str]:
        """One line per feature of the profile, for /features."""
        lines = []
        for spec in self.profile.features:
            try:
                fraction = f"{spec.strength / self._norm(spec.layer):.2f}"
            except ValueError:
                fraction = "?"
            where = f"layer {spec.layer}" + (f", SAE feature {spec.index}" if spec.index is not None else "")
            lines.append(f"  {spec.name:<18} {where}; default {fraction} {spec.mode}. {spec.description}")
        if self.profile.sae_source:
            lines.append(f"  layer:index (e.g. 15:21576) steers any feature of the SAEs in {self.profile.sae_source}")
        return lines

    # -- helpers ---------------------------------------------------------------

    def _in_file(self, key: str) -> Any:
        try:
            return self.vectors.get(key)
        except ValueError:
            return None

    def _refuse_or_defer(self, key: str) -> tuple[int, int]:
        layer_index = parse_layer_index(key)
        names = ", ".join(v.name for v in self.vectors.vectors) or "none"
        if layer_index is None:
            raise ValueError(f"unknown feature {key!r}: use one of {names}")
        if not self.profile.sae_source:
            raise ValueError(
                f"feature {key} is not in {self.profile.vectors_path().name} and profile {self.profile.name!r} "
                f"has no SAE to extract it from: use one of {names}"
            )
        if self.model is not None:
            n_layers = steering.num_layers(self.model)
            if layer_index[0] >= n_layers:
                raise ValueError(
                    f"layer {layer_index[0]} is out of range: this model has {n_layers} layers (0-{n_layers - 1})"
                )
        return layer_index

    def _extract(self, layer: int, index: int) -> Any:
        if (layer, index) not in self._extracted:
            from extract_steering_vectors import extract_sae_features

            found = extract_sae_features(self.profile.sae_source, [(layer, index)], self.profile.sae_format)
            self._extracted[(layer, index)] = found[0]
        return self._extracted[(layer, index)]

    def _spec_for(self, vector: Any) -> Any:
        for spec in self.profile.features:
            if spec.name == vector.name or (
                vector.index is not None and spec.index == vector.index and spec.layer == vector.layer
            ):
                return spec
        return None

    def _norm(self, layer: int) -> float:
        if layer in self._norms:
            return self._norms[layer]
        try:
            return self.vectors.norm(layer)
        except ValueError:
            if self.model is None:
                raise
        self._norms.update(steering.measure_layer_norms(self.model, self.tokenizer, [layer]))
        return self._norms[layer]


# ---------------------------------------------------------------------------
# The chat
# ---------------------------------------------------------------------------


class Stopped(Exception):
    """The user pressed Ctrl-C during an answer."""


@contextmanager
def ctrl_c_stops() -> Iterator[None]:
    """Inside the block the first Ctrl-C raises KeyboardInterrupt; later ones are ignored
    so that the clean-up (closing the generator, removing hooks) is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = [False]

    def handler(signum: int, frame: Any) -> None:
        if not pressed[0]:
            pressed[0] = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Console:
    """One chat: the model, the steering in force, the conversation, and how to print.

    >>> console = Console(model, tok, catalog, Settings(...), out=sys.stdout, info=sys.stdout, interactive=True)
    >>> console.steer("eiffel_tower", 0.5)
    >>> console.ask("Tell me about Paris")
    """

    def __init__(self, model: Any, tokenizer: Any, catalog: Catalog, settings: Settings,
                 out: TextIO, info: TextIO, interactive: bool) -> None:
        self.model, self.tokenizer, self.catalog, self.settings = model, tokenizer, catalog, settings
        self.out, self.info, self.interactive = out, info, interactive
        self.paint = Painter(colour_enabled(out))
        self.paint_info = Painter(colour_enabled(info))
        self.active: dict[str, tuple[Feature, float, str]] = {}  # vector name -> (feature, fraction, mode)
        self.steer_prompt = True
        self.history: list[dict[str, str]] = []
        self.compare_next = False
        self._background: threading.Event | None = None  # set when a stopped nnsight answer ends

    # -- printing --------------------------------------------------------------

    def notice(self, text: str) -> None:
        self.info.write(self.paint_info("notice", text) + "\n")
        self.info.flush()

    def error(self, text: str) -> None:
        self.info.write(self.paint_info("error", f"error: {text}") + "\n")
        self.info.flush()

    # -- steering --------------------------------------------------------------

    def steer(self, key: str, fraction: float | None = None, mode: str | None = None) -> Feature:
        """Steer with a feature at a fraction of its layer's norm (None: the feature's default)."""
        feature = self.catalog.resolve(key)
        fraction = feature.default_fraction if fraction is None else fraction
        mode = feature.default_mode if mode is None else mode
        comp = feature.component(fraction, mode)
        steering.validate_components(self.model, [comp])
        self.active[feature.vector.name] = (feature, fraction, mode)
        return feature

    def unsteer(self, key: str) -> str:
        for name, (feature, _, _) in self.active.items():
            if key in (name, feature.key):
                del self.active[name]
                return feature.key
        try:
            name = self.catalog.resolve(key).vector.name
        except ValueError:
            name = None
        if name in self.active:
            return self.active.pop(name)[0].key
        listed = ", ".join(f.key for f, _, _ in self.active.values()) or "nothing is steered"
        raise ValueError(f"{key!r} is not steered now ({listed})")

    def components(self) -> list[steering.SteeringComponent]:
        return [feature.component(fraction, mode) for feature, fraction, mode in self.active.values()]

    def describe_active(self) -> list[str]:
        if not self.active:
            return ["nothing is steered"]
        lines = []
        for feature, fraction, mode in self.active.values():
            strength = fraction * feature.norm
            lines.append(
                f"  {feature.key:<18} {fraction:.3g} x norm {feature.norm:.1f} = {strength:.1f} at layer "
                f"{feature.vector.layer}, {mode}"
            )
        if not self.steer_prompt:
            lines.append("  (the prompt is not steered, only the answer)")
        return lines

    def spec(self) -> Any:
        features = tuple(
            steering.ActiveFeature(key=feature.key, fraction=fraction, mode=mode)
            for feature, fraction, mode in self.active.values()
        )
        return steering.SteeringSpec(
            model_id=steering.model_id_of(self.model), features=features, steer_prompt=self.steer_prompt
        )

    def save(self, path: str) -> None:
        steering.save_steering_spec(self.spec(), path)

    def load(self, path: str) -> None:
        """Replace the steering with a spec file's; nothing changes if any part of it is bad."""
        spec = steering.load_steering_spec(path)
        model_id = steering.model_id_of(self.model)
        if spec.model_id != model_id:
            raise ValueError(
                f"{path} is steering for {spec.model_id}, but this chat runs {model_id}: "
                "choose the profile for that model with --profile"
            )
        active: dict[str, tuple[Feature, float, str]] = {}
        for item in spec.features:
            feature = self.catalog.resolve(item.key)
            steering.validate_components(self.model, [feature.component(item.fraction, item.mode)])
            active[feature.vector.name] = (feature, item.fraction, item.mode)
        self.active, self.steer_prompt = active, spec.steer_prompt

    # -- answering -------------------------------------------------------------

    def ask(self, text: str, compare: bool = False) -> str | None:
        """Answer a user message (twice with `compare`); the steered answer joins the history.

        Returns the answer, or None when the user stopped it with Ctrl-C.
        """
        text = self._cut(text)
        chat = self._chat(text)
        comps = self.components()
        if compare and not comps:
            self.notice("nothing is steered: one answer only (use /steer first)")
            compare = False
        if compare:
            if self._answer(chat, [], "unsteered", labelled=True) is None:
                return None
        answer = self._answer(chat, comps, "steered" if comps else "unsteered", labelled=compare)
        if answer is not None:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def _cut(self, text: str) -> str:
        """The message, cut to max_input_tokens tokens (with a notice)."""
        limit = self.settings.max_input_tokens
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        self.notice(f"your message is {len(ids)} tokens: cut to the first {limit} (max_input_tokens)")
        return self.tokenizer.decode(ids[:limit])

    def _chat(self, text: str) -> list[dict[str, str]]:
        """System prompt, history and the new message; the oldest exchanges go if it is too long."""
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        message = [{"role": "user", "content": text}]
        dropped = 0
        while self.history and len(
            steering.chat_input_ids(self.tokenizer, system + self.history + message)
        ) > self.settings.max_input_tokens:
            self.history = self.history[2:]
            dropped += 1
        if dropped:
            self.notice(f"the conversation is too long: forgot the oldest {dropped} exchange(s)")
        return system + self.history + message

    def _answer(self, chat: list[dict], comps: list, kind: str, labelled: bool = False) -> str | None:
        """Print one answer in `kind`'s colour; its text, or None if the user stopped it."""
        if self.settings.backend == "nnsight":
            try:
                self._wait_for_background()
            except Stopped:
                self.notice("(stopped)")
                return None
        labelled = labelled or self.interactive
        if labelled:
            label = f"{kind}> " if self.interactive else f"[{kind}]\n"
            self.out.write(self.paint(kind, label))
        self.out.write(self.paint.start(kind))
        self.out.flush()
        pieces: list[str] = []
        stopped = False
        try:
            if self.settings.backend == "hf":
                self._stream_hf(chat, comps, pieces)
            else:
                pieces.append(self._whole_nnsight(chat, comps))
                self.out.write(pieces[-1])
        except Stopped:
            stopped = True
        finally:
            self.out.write(self.paint.reset() + "\n")
            self.out.flush()
        if stopped:
            self.notice("(stopped: this exchange is not kept in the conversation)")
            return None
        return "".join(pieces)

    def _generation_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {
            "max_new_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "repetition_penalty": s.repetition_penalty,
            "steer_prompt": self.steer_prompt,
        }

    def _stream_hf(self, chat: list[dict], comps: list, pieces: list[str]) -> None:
        stream = steering.stream_steered_answer_hf(self.model, self.tokenizer, chat, comps, **self._generation_kwargs())
        with ctrl_c_stops():
            try:
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                raise Stopped from None
            finally:
                stream.close()  # stops the generation thread and removes the hooks

    def _whole_nnsight(self, chat: list[dict], comps: list) -> str:
        """The nnsight answer, computed in a worker thread so that Ctrl-C returns at once."""
        result: dict[str, Any] = {}
        done, cancel = threading.Event(), threading.Event()

        def work() -> None:
            try:
                result["answer"] = steering.generate_steered_answer(
                    self.model, self.tokenizer, chat, comps, cancel=cancel, **self._generation_kwargs()
                )
            except BaseException as exc:  # handed to the main thread below
                result["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="nnsight-answer", daemon=True).start()
        # Wait on an Event, not Thread.join: a Ctrl-C inside join(timeout) can mark a
        # running thread as finished (CPython bpo-45274).
        try:
            with ctrl_c_stops():
                while not done.wait(0.1):
                    pass
        except KeyboardInterrupt:
            cancel.set()  # the run ends after its current token
            self._background = done
            raise Stopped from None
        if "error" in result:
            raise result["error"]
        return result["answer"]

    def _wait_for_background(self) -> None:
        if self.busy():
            self.notice("waiting for the stopped nnsight answer to finish...")
            try:
                with ctrl_c_stops():
                    while not self._background.wait(0.1):
                        pass
            except KeyboardInterrupt:
                raise Stopped from None
        self._background = None

    def busy(self) -> bool:
        """Whether a stopped nnsight answer is still running in the background."""
        return self._background is not None and not self._background.is_set()

    # -- the interactive loop --------------------------------------------------

    def command(self, line: str) -> bool:
        """Run one slash command; False when the chat should end."""
        parts = line.split()
        name, args = parts[0].lower(), parts[1:]
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.notice(HELP)
        elif name == "/steer":
            if not 1 <= len(args) <= 3:
                raise ValueError("usage: /steer <name|layer:index> [strength] [add|clamp]")
            fraction = parse_fraction(args[1]) if len(args) >= 2 else None
            mode = parse_mode(args[2]) if len(args) == 3 else None
            feature = self.steer(args[0], fraction, mode)
            _, fraction, mode = self.active[feature.vector.name]
            self.notice(
                f"steering with {feature.key} at {fraction:.3g} x norm ({fraction * feature.norm:.1f} at layer "
                f"{feature.vector.layer}), {mode}"
            )
        elif name == "/unsteer":
            if len(args) != 1:
                raise ValueError("usage: /unsteer <name|layer:index> (see /active)")
            self.notice(f"no longer steering with {self.unsteer(args[0])}")
        elif name == "/clear":
            self.active.clear()
            self.notice("steering cleared: answers are unsteered")
        elif name == "/features":
            self.notice(f"features of profile {self.catalog.profile.name!r} (default strength, mode):")
            self.notice("\n".join(self.catalog.listing()))
        elif name == "/active":
            self.notice("\n".join(self.describe_active()))
        elif name == "/compare":
            if args:
                self.ask(line.split(None, 1)[1], compare=True)
            else:
                self.compare_next = True
                self.notice("the next answer comes twice: unsteered, then steered")
        elif name == "/backend":
            if args:
                if len(args) != 1 or args[0] not in BACKENDS:
                    raise ValueError(f"usage: /backend {'|'.join(BACKENDS)}")
                self.settings.backend = args[0]
            self.notice(f"backend: {self.settings.backend}")
        elif name == "/reset":
            self.history.clear()
            self.notice("conversation forgotten (steering stays; /clear removes it)")
        elif name in ("/save", "/load"):
            if len(args) != 1:
                raise ValueError(f"usage: {name} FILE (.json, .yaml or .yml)")
            if name == "/save":
                self.save(args[0])
                self.notice(f"saved the steering to {args[0]}")
            else:
                self.load(args[0])
                self.notice(f"loaded the steering from {args[0]}:")
                self.notice("\n".join(self.describe_active()))
        else:
            raise ValueError(f"unknown command {name}: type /help for the list")
        return True

    def loop(self, read: Any = input) -> None:
        """Read and answer messages until exit, quit or Ctrl-D."""
        prompt = self._prompt()
        while True:
            try:
                line = read(prompt)
            except EOFError:
                self.out.write(self.paint.reset() + "\n")
                return
            except KeyboardInterrupt:
                self.out.write(self.paint.reset() + "\n")
                self.notice("(Ctrl-C stops an answer; exit, quit or Ctrl-D end the chat)")
                continue
            finally:
                self.out.write(self.paint.reset())
            line = line.strip()
            if not line:
                continue
            try:
                if line.lower() in EXIT_WORDS:
                    return
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    compare, self.compare_next = self.compare_next or self.settings.compare, False
                    self.ask(line, compare=compare)
            except KeyboardInterrupt:  # pressed outside the answer itself (just before or after it)
                self.out.write(self.paint.reset() + "\n")
                self.notice("(stopped)")
            except ValueError as exc:
                self.error(one_line(exc))
            except Exception as exc:  # never a traceback in the chat
                self.error(f"{type(exc).__name__}: {one_line(exc)}")

    def _prompt(self) -> str:
        if not self.paint.enabled:
            return "you> "
        # \001 and \002 tell readline that the colour codes take no room on the screen
        return f"\001{COLOURS['user']}\002you> \001{RESET}{COLOURS['user']}\002"


@dataclass
class Settings:
    """Generation settings of a chat (from the profile's defaults and the command line)."""

    backend: str
    temperature: float
    max_new_tokens: int
    repetition_penalty: float
    system: str
    max_input_tokens: int
    compare: bool = False


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad command-line arguments."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message, and no exit here
        raise UsageError(f"{message} (see python demo.py --help)")


def build_parser() -> Parser:
    parser = Parser(
        prog="demo.py",
        description="Chat with a steered model in the terminal, or answer one prompt with --prompt.",
        epilog="Strengths are fractions of the layer's typical residual norm (0.5 = half), as on the app's slider.",
    )
    parser.add_argument("--prompt", help="answer this one message, print only the answer and exit")
    parser.add_argument(
        "--steer", nargs=2, action="append", default=[], metavar=("NAME_OR_LAYER:INDEX", "STRENGTH"),
        help="steer with a feature of the profile (or an SAE feature layer:index); STRENGTH is a fraction of "
             "the layer's typical residual norm (0.5 = half); repeatable",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="hf: forward hooks, streams the answer (default); nnsight: prints it when done")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: the profile's)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the profile's)")
    parser.add_argument("--repetition-penalty", type=float, help="1 is off (default: the profile's)")
    parser.add_argument("--system", help="system prompt ('' for none; default: the profile's)")
    parser.add_argument("--compare", action="store_true",
                        help="print the unsteered answer, then the steered one, each labelled (in the chat: every answer)")
    parser.add_argument("--profile", help="model profile in the config (default: its default profile)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo config (default: demo.yaml here)")
    return parser


def settings_from(args: argparse.Namespace, profile: Any) -> Settings:
    gen = profile.generation
    settings = Settings(
        backend=args.backend,
        temperature=gen.temperature if args.temperature is None else args.temperature,
        max_new_tokens=gen.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        repetition_penalty=gen.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty,
        system=gen.system_prompt if args.system is None else args.system,
        max_input_tokens=gen.max_input_tokens,
        compare=args.compare,
    )
    if not math.isfinite(settings.temperature) or settings.temperature < 0:
        raise UsageError(f"--temperature must be a number >= 0 (0 is greedy), got {settings.temperature}")
    if settings.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {settings.max_new_tokens}")
    if not math.isfinite(settings.repetition_penalty) or settings.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be a number > 0 (1 is off), got {settings.repetition_penalty}")
    return settings


def quiet_libraries() -> None:
    """No progress bars or library warnings in the console: only the chat and our notices."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run(argv: Sequence[str] | None = None, read: Any = input) -> int:
    """The program: parse, load, then one answer (--prompt) or the chat. Returns the exit code."""
    args = build_parser().parse_args(argv)
    steers = [(key, parse_fraction(value)) for key, value in args.steer]
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give a message to answer")
    if args.prompt is not None and args.compare and not steers:
        raise UsageError("--compare needs at least one --steer NAME STRENGTH to compare with")
    config = steering.load_config(args.config)
    profile = config.profile(args.profile)
    settings = settings_from(args, profile)
    vectors = steering.SteeringVectorSet.load(profile.vectors_path())
    catalog = Catalog(profile, vectors)
    for key, _ in steers:
        catalog.check(key)  # unknown names fail before the model loads

    interactive = args.prompt is None
    info = sys.stdout if interactive else sys.stderr
    if interactive:
        print(Painter(colour_enabled(info))("notice", f"loading {profile.model_id or steering.EMBEDDED_MODEL_ID}..."),
              file=info, flush=True)
    quiet_libraries()
    model, tokenizer = steering.load_model(profile.model_id)
    catalog.attach(model, tokenizer)
    console = Console(model, tokenizer, catalog, settings, out=sys.stdout, info=info, interactive=interactive)
    if vectors.model_id != steering.model_id_of(model):
        console.notice(f"note: {profile.vectors_path().name} was made for {vectors.model_id}, "
                       f"this chat runs {steering.model_id_of(model)}")
    for key, fraction in steers:
        console.steer(key, fraction)

    if not interactive:
        answer = console.ask(args.prompt, compare=args.compare)
        code = 0 if answer is not None else 130
    else:
        console.notice(f"profile {profile.name!r}, backend {settings.backend}. Type /help for the commands.")
        if console.active:
            console.notice("\n".join(console.describe_active()))
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        console.loop(read)
        code = 0
    if console.busy():  # a stopped nnsight run: do not wait for it, and do not crash at shutdown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; any error is one line on stderr (exit 2 for bad input), never a traceback."""
    try:
        return run(argv)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as exc:
        print(Painter(colour_enabled(sys.stderr))("error", f"error: {one_line(exc)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
