"""The console chat: the REPL, its turns and its one-shot form (usage: demo.py's docstring, `python demo.py --help`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llm_steering import steering
from llm_steering.backends import Backend, GenerationSettings, backend_entry, check_backend, get_backend
from llm_steering.catalog import Catalog, Feature
from llm_steering.chat_history import chat_export, same_steering, unsteered_chat, visible_chat
from llm_steering.chat_input import fit_chat
from llm_steering.concepts import catalog_for
from llm_steering.config import load_config, load_steering_spec
from llm_steering.console import cli as console_cli
from llm_steering.console.cli import COLOURS, RESET, Painter, UsageError, build_parser, colour_enabled, one_line
from llm_steering.console.commands import COMMANDS, export_gguf, parse_fraction, parse_steer_words  # noqa: F401  (parse_fraction: re-exported)
from llm_steering.console.ctrl_c import Stopped, ctrl_c_stops
from llm_steering.console.own_concepts import load_user_concepts
from llm_steering.control_vector import check_path
from llm_steering.core import atomic_write, format_fraction, format_strength, round_fraction
from llm_steering.vectors import SteeringVectorSet

DEFAULT_CONFIG = console_cli.DEFAULT_CONFIG
EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


# ---------------------------------------------------------------------------
# The chat
# ---------------------------------------------------------------------------


class Console:
    """One chat: the model, the steering in force, the conversation, and how to print.

    The conversation is `turns`: each finished exchange with the steering its answer was made
    with ({user, answer, spec, unsteered}, see chat_history.py); what the model reads of them
    depends on the steering now and on `history_mode` ("same" or "all").

    >>> console = Console(model, tok, catalog, Settings(...), out=sys.stdout, info=sys.stdout, interactive=True)
    >>> console.steer("eiffel_tower", 0.5)
    >>> console.ask("Tell me about Paris")
    """

    def __init__(self, model: Any, tokenizer: Any, catalog: Catalog, settings: Settings,
                 out: TextIO, info: TextIO, interactive: bool, concepts_file: Path | None = None) -> None:
        self.model, self.tokenizer, self.catalog, self.settings = model, tokenizer, catalog, settings
        self.concepts_file = concepts_file  # the user's own concepts (/concept), None: kept for this chat only
        self.out, self.info, self.interactive = out, info, interactive
        self.paint = Painter(colour_enabled(out))
        self.paint_info = Painter(colour_enabled(info))
        self.active: dict[str, tuple[Feature, float, str]] = {}  # feature key -> (feature, fraction, op)
        self.auto: set[str] = set()  # keys whose strength is calibrated per answer
        self.steer_prompt = True
        self.turns: list[dict[str, Any]] = []  # {user, answer, spec (SteeringSpec), unsteered (str | None)}
        self.history_mode = "same"  # what the model reads of turns made with other steering: chat_history.py
        self.compare_next = False
        self._backends: dict[str, Backend] = {}  # started on first use (backends/: the registry)

    # -- printing --------------------------------------------------------------

    def notice(self, text: str) -> None:
        self.info.write(self.paint_info("notice", text) + "\n")
        self.info.flush()

    def error(self, text: str) -> None:
        self.info.write(self.paint_info("error", f"error: {text}") + "\n")
        self.info.flush()

    # -- steering --------------------------------------------------------------

    def steer(self, key: str, fraction: float | None = None, op: str | None = None, auto: bool = False) -> Feature:
        """Steer with a feature at a fraction of its layer's norm (None: the feature's default);
        with `auto`, each answer's strength is calibrated (calibrate.py) before it is generated."""
        feature = self.catalog.resolve(key)
        self.auto.discard(feature.key)
        if auto:
            if self.settings.temperature > 0:
                self.notice("auto strength compares greedy answers; the answer itself keeps your temperature")
            for other in self.auto:  # one feature is chosen for at a time: the one before keeps its strength
                self.notice(f"auto picks for one feature at a time: {self.catalog.resolve(other).title} stays at "
                            f"{format_fraction(self.active[other][1])} x norm, fixed")
            self.auto = {feature.key}
        fraction = round_fraction(self.catalog.check_fraction(feature, feature.default_fraction if fraction is None else fraction))
        op = op or feature.default_op
        steering.validate_components(self.model, [feature.component(fraction, op)])
        self.active[feature.key] = (feature, fraction, op)
        return feature

    def unsteer(self, key: str) -> str:
        self.auto.discard(key)
        if key not in self.active:
            try:
                key = self.catalog.resolve(key).key
            except ValueError:
                pass
        if key in self.active:
            return self.active.pop(key)[0].key
        listed = ", ".join(self.active) or "nothing is steered"
        raise ValueError(f"{key!r} is not steered now ({listed})")

    def components(self) -> list[steering.SteeringComponent]:
        return [feature.component(fraction, op) for feature, fraction, op in self.active.values()]

    def describe_active(self) -> list[str]:
        if not self.active:
            return ["nothing is steered"]
        lines = [
            f"  {feature.title} ({feature.key}): {format_fraction(fraction)} x norm {feature.norm:.1f} = "
            f"{format_strength(fraction, feature.norm)} at layer {feature.layer}, {op}"
            + (", auto (the way to steer is picked for each answer, from this strength)" if key in self.auto else "")
            for key, (feature, fraction, op) in self.active.items()
        ]
        if not self.steer_prompt:
            lines.append("  (the prompt is not steered, only the answer)")
        return lines

    def spec(self) -> Any:
        return self.catalog.spec({k: (f, op) for k, (_, f, op) in self.active.items()}, self.steer_prompt)

    def load(self, path: str) -> None:
        """Replace the steering with a spec file's; nothing changes if any part of it is bad."""
        spec = load_steering_spec(path)
        catalog = catalog_for(self.catalog, spec)  # the concepts it carries, rebuilt from their recipes
        active = catalog.active(spec)
        steering.validate_components(self.model, [f.component(frac, op) for f, frac, op in active.values()])
        self.catalog, self.active, self.steer_prompt = catalog, active, spec.steer_prompt

    # -- the conversation --------------------------------------------------------

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation as chat messages: each turn's message and its (steered, if any) answer."""
        return [m for t in self.turns for m in ({"role": "user", "content": t["user"]},
                                                {"role": "assistant", "content": t["answer"]})]

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        """Start from these user/assistant messages, as if answered with the steering in force now."""
        spec = self.spec()
        self.turns = [
            {"user": u["content"], "answer": a["content"], "spec": spec, "unsteered": None}
            for u, a in zip(messages[::2], messages[1::2], strict=False)
            if u.get("role") == "user" and a.get("role") == "assistant"
        ]

    def what_the_model_sees(self) -> str:
        """One line: which earlier turns the next answer reads, with this steering and history mode."""
        n, seen = len(self.turns), visible_chat(self.turns, self.spec(), self.history_mode)
        everything = "the earlier turn" if n == 1 else f"all {n} earlier turns"
        if seen.other_steering:  # history all
            other = "answered with other steering" if n == 1 else f"{seen.other_steering} of them answered with other steering"
            return f"the next answer sees {everything}, {other} (/history same: only those answered with this steering)"
        if len(seen.used) == n:
            return f"the next answer sees {everything}, answered with this steering"
        if not seen.used:
            which = "the earlier turn was not" if n == 1 else f"none of the {n} earlier turns was"
            return (f"the next answer starts afresh: {which} answered with this steering "
                    f"(/history all: it reads {'it' if n == 1 else 'them'} anyway)")
        return (f"the next answer sees {len(seen.used)} of the {n} earlier turns, those answered with this steering "
                "(/history all: all of them)")

    def save_chat(self, path: str) -> int:
        """Write the conversation as JSON, each turn with its steering (chat_history.chat_export); its turn count."""
        import json

        if Path(path).suffix.lower() in (".yaml", ".yml"):
            raise ValueError("a chat is saved as JSON: name the file .json")
        data = chat_export(self.turns, self.catalog.vectors.model_id, self.settings.system, self.history_mode)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return len(self.turns)

    def _fit(self, messages: list[dict], text: str, shown: list[str]) -> Any:
        """fit_chat on these earlier messages, printing each notice not shown yet."""
        fitted = fit_chat(self.tokenizer, self.settings.system, messages, text, self.settings.max_input_tokens)
        for line in fitted.notices:
            if line not in shown:
                shown.append(line)
                self.notice(line)
        return fitted

    # -- answering -------------------------------------------------------------

    def ask(self, text: str, compare: bool = False) -> str | None:
        """Answer a user message (twice with `compare`); the turn joins the conversation with its steering.

        The answer reads the earlier turns chat_history.visible_chat allows (history_mode);
        compare's unsteered answer reads only unsteered turns (chat_history.unsteered_chat).
        Returns the answer, or None when the user stopped it with Ctrl-C.
        """
        seen = visible_chat(self.turns, self.spec(), self.history_mode)
        shown: list[str] = []
        fitted = self._fit(seen.messages, text, shown)
        if fitted.dropped_messages:  # the oldest turns read no longer fit: forget them (and any older)
            dropped = (fitted.dropped_messages + 1) // 2
            self.turns = self.turns[seen.used[dropped - 1] + 1:]
        if seen.other_steering:
            self.notice(f"(earlier answers were made with other steering: the model reads {seen.other_steering} of "
                        "them too; /history same leaves them out)")
        auto = next((k for k in self.active if k in self.auto), None)
        comps = self.components()
        if compare and not comps:
            self.notice("nothing is steered: one answer only (use /steer first)")
            compare = False
        unsteered = None
        if compare:
            plain = self._fit(unsteered_chat(self.turns).messages, text, shown)
            unsteered = self._answer(plain.chat, [], "unsteered", labelled=True)
            if unsteered is None:
                return None
        if auto is not None:
            answer = self._auto_answer(auto, fitted.chat, labelled=compare)
        else:
            answer = self._answer(fitted.chat, comps, "steered" if comps else "unsteered", labelled=compare)
        if answer is not None:
            self.turns.append({"user": fitted.message, "answer": answer, "spec": self.spec(), "unsteered": unsteered})
        return answer

    def _auto_answer(self, key: str, chat: list[dict], labelled: bool = False) -> str | None:
        """Auto for `key` (calibrate.stream_auto_answer): the candidates compared on the first greedy
        words, a line saying which was kept, then its answer as it comes; None if the user stopped it."""
        from llm_steering import calibrate

        feature, fraction, op = self.active[key]
        others = [f.component(frac, o) for k, (f, frac, o) in self.active.items() if k != key]
        component = feature.component(fraction, op)
        candidates = calibrate.auto_candidates(component, self.catalog.auto_max_multiplier(feature, fraction),
                                               calibrate.learned_direction(component, self.catalog.vectors))
        n = len(candidates)
        learned = any(c.vector for c in candidates)
        self.notice(f"auto: trying {feature.title} {n} ways on the first words (strengths, answer only, letting go once "
                    f"it names the concept{', its learned direction' if learned else ''}; one greedy batch), keeping one "
                    "that still answers")
        cancel = threading.Event()
        backend = self.backend()
        if hasattr(backend, "auto_stream"):  # vLLM: the candidates as parallel requests on its engine
            stream = backend.auto_stream(chat, component, others, self.generation_settings(), candidates, cancel)
        else:
            stream = calibrate.stream_auto_answer(self.model, self.tokenizer, chat, component, others,
                                                  self.settings.max_new_tokens, self.settings.repetition_penalty,
                                                  self.settings.temperature, cancel, candidates=candidates)
        pieces: list[str] = []
        started = False
        with ctrl_c_stops():
            try:
                for piece in stream:
                    if not started:
                        started = True
                        cand = stream.choice.chosen
                        how = ("unsteered: no way of steering kept the answer on the question" if not cand.components else
                               f"{cand.components[0].op} {format_fraction(fraction * cand.multiplier)} x norm"
                               + (f", its learned direction ({cand.vector})" if cand.vector else "")
                               + (", answer only, let go once it named the concept" if cand.release else
                                  ", answer only" if not cand.steer_prompt else "")
                               + (f", let go after its first {stream.let_go_at} tokens" if stream.let_go_at else ""))
                        self.notice(f"auto: {feature.title} {how} (compared {len(stream.choice.table)} in "
                                    f"{stream.choice.seconds:.1f} s)")
                        self._begin("steered" if cand.components or others else "unsteered", labelled)
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                cancel.set()
                return self._end(None)
        return self._end(pieces)

    def _begin(self, kind: str, labelled: bool) -> None:
        """An answer's label (when compared, or in an interactive chat) and its colour."""
        if labelled or self.interactive:
            self.out.write(self.paint(kind, f"{kind}> " if self.interactive else f"[{kind}]\n"))
        self.out.write(self.paint.start(kind))
        self.out.flush()

    def _end(self, pieces: list[str] | None) -> str | None:
        """Close an answer's colour; its text, or None (with a notice) when the user stopped it."""
        self.out.write(self.paint.reset() + "\n")
        if pieces is None:
            self.notice("(stopped: this exchange is not kept in the conversation)")
            return None
        self.out.flush()
        return "".join(pieces)

    def _answer(self, chat: list[dict], comps: list, kind: str, labelled: bool = False) -> str | None:
        """Print one answer in `kind`'s colour; its text, or None if the user stopped it."""
        backend = self.backend()
        self._begin(kind, labelled)
        pieces: list[str] = []
        try:
            self._stream(backend, chat, comps, pieces)
        except Stopped:
            return self._end(None)
        return self._end(pieces)

    def generation_settings(self) -> GenerationSettings:
        s = self.settings
        return GenerationSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                  repetition_penalty=s.repetition_penalty, steer_prompt=self.steer_prompt)

    def _stream(self, backend: Backend, chat: list[dict], comps: list, pieces: list[str]) -> None:
        """Print the answer as it comes; Ctrl-C ends the generation (within a token) and raises Stopped."""
        stream = backend.stream(chat, comps, self.generation_settings())
        with ctrl_c_stops():
            try:
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
            except KeyboardInterrupt:
                raise Stopped from None
            finally:
                stream.close()  # ends the generation and removes its hooks

    def backend(self) -> Backend:
        """The backend now chosen (settings.backend), started on first use."""
        name = self.settings.backend
        if name not in self._backends:
            note = backend_entry(name).start_note
            if note:
                self.notice(note)
            self._backends[name] = get_backend(name, self.model, self.tokenizer, self.catalog.profile.model_id,
                                               verbose=self.settings.verbose)
        return self._backends[name]

    def close(self) -> None:
        """Stop every backend started (an engine's processes)."""
        backends, self._backends = self._backends, {}
        for backend in backends.values():
            backend.close()

    # -- the interactive loop --------------------------------------------------

    def command(self, line: str) -> bool:
        """Run one slash command; False when the chat should end."""
        name, _, rest = line.strip().partition(" ")
        name = name.lower()
        if name in ("/exit", "/quit"):
            return False
        if name not in COMMANDS:
            raise ValueError(f"unknown command {name}: type /help for the list")
        before = self.spec()
        COMMANDS[name].run(self, rest.strip())
        if self.turns and not same_steering(before, self.spec()):  # the steering changed: say what is read
            self.notice(self.what_the_model_sees())
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
    verbose: bool = False  # a backend's own logs (vLLM's), on stderr
    auto: bool = False  # a feature steered without a strength is steered by auto (the profile's generation.auto)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


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
        verbose=getattr(args, "verbose", False),
        auto=gen.auto,
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
    args = build_parser(argv).parse_args(argv)
    steers = [parse_steer_words(words) for words in args.steer]
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give a message to answer")
    if args.prompt is not None and args.compare and not steers:
        raise UsageError("--compare needs at least one --steer NAME [STRENGTH] [add|clamp] to compare with")
    if args.export_gguf is not None:
        check_path(args.export_gguf)  # a bad file name fails before the model loads
        if args.prompt is not None or not steers:
            raise UsageError("--export-gguf FILE writes the --steer steering and exits: give --steer NAME [STRENGTH] add, no --prompt")
    profile = load_config(args.config).profile(args.profile)
    settings = settings_from(args, profile)
    check_backend(settings.backend)  # before the model loads: vLLM missing, or a torchvision that breaks it
    concepts_file = console_cli.user_concepts_path(profile.name)
    if profile.vectors_path().is_file():  # unknown names fail before the model loads
        precheck, _ = load_user_concepts(Catalog(profile, SteeringVectorSet.load(profile.vectors_path())), concepts_file)
        for key, _, _ in steers:
            precheck.check(key)

    interactive = args.prompt is None and args.export_gguf is None
    info = sys.stdout if interactive else sys.stderr
    if interactive:  # printed already when demo.py runs as a program, before torch was imported
        console_cli.announce(args.config, args.profile, info)
    quiet_libraries()
    model, tokenizer = steering.load_model(profile.model_id)
    catalog = Catalog.open(profile, model, tokenizer)  # a missing SAE profile file: its features extracted now
    catalog, note = load_user_concepts(catalog, concepts_file)
    console = Console(model, tokenizer, catalog, settings, out=sys.stdout, info=info, interactive=interactive,
                      concepts_file=concepts_file)
    if note and interactive:
        console.notice(note)
    for key, fraction, op in steers:
        console.steer(key, fraction, op, auto=fraction is None and settings.auto)

    if args.export_gguf is not None:
        export_gguf(console, args.export_gguf)
        code = 0
    elif not interactive:
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
    console.close()
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

