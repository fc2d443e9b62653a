"""The console chat's slash commands: one table (name -> usage, help, handler); /help is made from it.

A handler gets the running `demo.Console`, the command's words and the rest of the line.
Names shown to people are the features' human names (Feature.title, "Eiffel Tower"), with
the key (eiffel_tower) that commands take beside them.

    >>> COMMANDS["/steer"].run(console, "pirate 0.2 clamp")
    >>> COMMANDS["/temperature"].run(console, "0.7")
    >>> print(help_text())
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_steering import control_vector
from llm_steering.backends import check_backend
from llm_steering.chat_history import HISTORY_MODES
from llm_steering.config import FEATURE_OPS, save_steering_spec
from llm_steering.console.cli import BACKENDS, STEER_USAGE
from llm_steering.core import format_fraction, format_strength
from llm_steering.models import embedded_gguf_path

# ---------------------------------------------------------------------------
# Input words
# ---------------------------------------------------------------------------


def parse_fraction(text: str) -> float:
    """A strength typed by the user: a finite number (the catalog checks the feature's range)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"strength {text!r} is not a number: give a fraction of the layer's typical norm, e.g. 0.5") from None
    if not math.isfinite(value):
        raise ValueError(f"strength {text} is not a finite number: give a fraction of the layer's typical norm, e.g. 0.5")
    return value


def parse_op(text: str) -> str:
    op = text.lower()
    if op not in FEATURE_OPS:
        raise ValueError(f"unknown op {text!r}: use add or clamp")
    return op


def parse_steer_words(words: list[str]) -> tuple[str, float | None, str | None]:
    """`--steer NAME [STRENGTH] [add|clamp]`'s words: (key, fraction or None for the feature's default,
    op or None for the feature's own)."""
    if len(words) not in (1, 2, 3):
        raise ValueError(f"--steer takes {STEER_USAGE}, got {' '.join(words)!r}")
    try:
        return (words[0], *strength_and_op(words[1:]))
    except ValueError as exc:
        raise ValueError(f"--steer {' '.join(words)}: {exc}") from None


def strength_and_op(words: list[str]) -> tuple[float | None, str | None]:
    """The words after a feature's name: [STRENGTH] [add|clamp], each optional (None: the feature's own)."""
    if len(words) == 2:
        return parse_fraction(words[0]), parse_op(words[1])
    if len(words) == 1:
        return (None, parse_op(words[0])) if words[0].lower() in FEATURE_OPS else (parse_fraction(words[0]), None)
    if words:
        raise ValueError(f"takes {STEER_USAGE}")
    return None, None


def parse_temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {text!r}")
    return value


def parse_max_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"max tokens must be a whole number >= 1 (the longest answer, in tokens), got {text!r}")
    return value


# ---------------------------------------------------------------------------
# Slash commands: one table, /help is made from it
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A slash command: its arguments (for usage lines), what it does, and its handler."""

    args: str
    help: str
    handler: Callable[[Any, list[str], str], None]
    nargs: tuple[int, int] = (0, 0)

    def run(self, console: Any, rest: str) -> None:
        args = rest.split()
        if not self.nargs[0] <= len(args) <= self.nargs[1]:
            raise ValueError(f"usage: {self.usage_of()}")
        self.handler(console, args, rest)

    def usage_of(self) -> str:
        name = next(k for k, v in COMMANDS.items() if v is self)
        return f"{name} {self.args}".strip()


def _steer(c: Any, args: list[str], rest: str) -> None:
    auto = len(args) >= 2 and args[1].lower() == "auto"
    if auto:
        fraction, op = None, parse_op(args[2]) if len(args) == 3 else None
    else:  # a strength, an op, both or neither (the feature's default and own op)
        fraction, op = strength_and_op(args[1:])
        auto = fraction is None and c.settings.auto  # no strength: auto, where the profile makes it the default
    feature = c.steer(args[0], fraction, op, auto=auto)
    _, fraction, op = c.active[feature.key]
    name = f"{feature.title} ({feature.key})"
    if auto:
        c.notice(f"steering with {name}, {op}, auto: the way to steer is picked for each answer, from its default "
                 f"{format_fraction(fraction)} x norm ({format_strength(fraction, feature.norm)} at layer {feature.layer}); "
                 f"/steer {feature.key} {format_fraction(fraction)} for that strength, fixed")
    else:
        c.notice(f"steering with {name} at {format_fraction(fraction)} x norm ({format_strength(fraction, feature.norm)} "
                 f"at layer {feature.layer}), {op}")


def _unsteer(c: Any, args: list[str], rest: str) -> None:
    key = c.unsteer(args[0])
    c.notice(f"no longer steering with {c.catalog.resolve(key).title} ({key})")


def _clear(c: Any, args: list[str], rest: str) -> None:
    c.active.clear()
    c.notice("steering cleared: answers are unsteered")


def _features(c: Any, args: list[str], rest: str) -> None:
    if args:  # /features NAME: what it does
        from llm_steering.console.own_concepts import feature_details

        feature = c.catalog.resolve(args[0])
        c.notice("\n".join(feature_details(c.catalog, feature, c.catalog.feature_tokens(feature.key))))
        return
    c.notice(f"features of profile {c.catalog.profile.name!r} (key to type, name: description; layer, default "
             "strength and op):")
    lines = [f"  {f.key:<18} {f.title}: {f.description}; layer {f.layer}, default {format_fraction(f.default_fraction)} {f.default_op}"
             if f.description else f"  {f.key:<18} {f.title}; layer {f.layer}, default {format_fraction(f.default_fraction)} {f.default_op}"
             for f in c.catalog.features]
    if c.catalog.profile.sae_source:
        lines.append(f"  layer:index (e.g. 15:21576) steers any feature of the SAEs in {c.catalog.profile.sae_source}")
    lines.append("/features NAME shows what one does (the tokens its steering raises and lowers); /concept makes your own")
    c.notice("\n".join(lines))


def _concept(c: Any, args: list[str], rest: str) -> None:
    from llm_steering.concepts import parse_concept_line
    from llm_steering.console.own_concepts import make_and_keep, templates_text

    if not rest:
        c.notice(templates_text())
        return
    recipe = parse_concept_line(rest)
    feature, c.catalog, seconds, kept = make_and_keep(c.catalog, recipe, c.concepts_file)
    c.steer(feature.key)
    c.notice(f"made your concept {feature.title} ({feature.key}) from {len(recipe.sentences)} sentences in {seconds:.1f} s "
             f"({kept}); steering with it at its default {format_fraction(feature.default_fraction)} x norm, {feature.default_op}, "
             f"layer {feature.layer}")
    doing, where = _words(c, feature.key)
    c.notice(f"{doing} ({where}; /features {feature.key} for more; "
             f"/steer {feature.key} 0.4 for stronger, /unsteer {feature.key} to stop)")


def _words(c: Any, key: str, n: int = 8) -> tuple[str, str]:
    """What a feature does (catalog.feature_tokens) and where that comes from: ("it raises: ocean, sea, ...",
    "measured at its default") or ("it pushes up: ...", "logit lens")."""
    from llm_steering.lens import token_words

    lens = c.catalog.feature_tokens(key)
    return (f"it {lens.verbs[0]}: {', '.join(token_words(lens.promoted[:n]))}",
            "measured at its default" if lens.measured else "logit lens")


def _active(c: Any, args: list[str], rest: str) -> None:
    c.notice("\n".join(c.describe_active()))


def _compare(c: Any, args: list[str], rest: str) -> None:
    if rest:
        c.ask(rest, compare=True)
    else:
        c.compare_next = True
        c.notice("the next answer comes twice: unsteered, then steered")


def _backend(c: Any, args: list[str], rest: str) -> None:
    if args:
        if args[0] not in BACKENDS:
            raise ValueError(f"usage: /backend {'|'.join(BACKENDS)}")
        check_backend(args[0])  # refused at once when it cannot run here (vLLM not installed)
        c.settings.backend = args[0]
    c.notice(f"backend: {c.settings.backend}")


def _reset(c: Any, args: list[str], rest: str) -> None:
    c.turns.clear()
    c.notice("conversation forgotten (steering stays; /clear removes it)")


def _save(c: Any, args: list[str], rest: str) -> None:
    save_steering_spec(c.spec(), args[0])
    c.notice(f"saved the steering to {args[0]}")


def export_gguf(c: Any, path: str) -> None:
    """Write the steering in force as a llama.cpp control vector (add only: control_vector.py says why). A
    feature on auto is written at the strength /active shows (its default), as the app's export does."""
    written = control_vector.export_for_model(c.model, c.components(), path, steer_prompt=c.steer_prompt)
    for key in c.auto:
        feature, fraction, _ = c.active[key]
        c.notice(f"{feature.title} is on auto, picked per answer; a file holds one strength: the file has "
                 f"{format_fraction(fraction)} x norm, its default (/steer {key} 0.4 for another)")
    model = embedded_gguf_path() if c.catalog.profile.model_id is None else "MODEL.gguf"
    c.notice(f"wrote {path}, a llama.cpp control vector: {control_vector.describe(written)}. "
             f"Run it with: llama-cli -m {model} --control-vector {path}")


def _export_gguf(c: Any, args: list[str], rest: str) -> None:
    export_gguf(c, rest.strip())


def _save_chat(c: Any, args: list[str], rest: str) -> None:
    n = c.save_chat(args[0])
    c.notice(f"saved the chat ({n} turn{'s' if n != 1 else ''}, each with its steering) to {args[0]}")


def _temperature(c: Any, args: list[str], rest: str) -> None:
    if args:
        c.settings.temperature = parse_temperature(args[0])
    t = c.settings.temperature
    c.notice(f"temperature: {t:g}" + (" (greedy)" if t == 0 else ""))


def _max_tokens(c: Any, args: list[str], rest: str) -> None:
    if args:
        c.settings.max_new_tokens = parse_max_tokens(args[0])
    c.notice(f"max tokens: {c.settings.max_new_tokens}")


def _settings(c: Any, args: list[str], rest: str) -> None:
    s = c.settings
    c.notice(f"settings: temperature {s.temperature:g}, max tokens {s.max_new_tokens}, repetition penalty "
             f"{s.repetition_penalty:g}, backend {s.backend}, history {c.history_mode}, "
             f"compare {'every answer' if s.compare else 'off'}, max input {s.max_input_tokens} tokens")
    c.notice(f"system prompt: {s.system!r}" if s.system else "system prompt: none")


def _history(c: Any, args: list[str], rest: str) -> None:
    if args:
        if args[0].lower() not in HISTORY_MODES:
            raise ValueError(f"usage: /history {'|'.join(HISTORY_MODES)}")
        c.history_mode = args[0].lower()
    if c.history_mode == "same":
        c.notice("history same: the model reads only the earlier turns answered with the steering in force")
    else:
        c.notice("history all: the model reads every earlier turn, whatever steering made its answer")
    if c.turns:
        c.notice(c.what_the_model_sees())


def _load(c: Any, args: list[str], rest: str) -> None:
    c.load(args[0])
    c.notice(f"loaded the steering from {args[0]}:")
    c.notice("\n".join(c.describe_active()))


def _find(c: Any, args: list[str], rest: str) -> None:
    if not c.catalog.profile.sae_source:
        raise ValueError(f"profile {c.catalog.profile.name!r} has no SAE to search for features; make your own "
                         "concept from a few sentences instead: /concept NAME: sentence | sentence | ... "
                         "(/concept alone shows how)")
    layers = [int(args[0])] if args[0].isdigit() and len(args) > 1 else None
    text = rest.split(None, 1)[1] if layers else rest
    found = c.catalog.find(text, layers)
    if not found:
        c.notice("no feature fires on that text")
        return
    c.notice(f"features that fire most on that text (steer one with /steer {found[0].key}):")
    c.notice("\n".join(f"  {f.key:<12} mean {f.mean:8.3f}  max {f.max:8.3f}  {f.url or ''}".rstrip()
                        + "\n      {} ({})".format(*_words(c, f.key, 6)) for f in found))


def _help(c: Any, args: list[str], rest: str) -> None:
    c.notice(help_text())


COMMANDS: dict[str, Command] = {
    "/steer": Command("<name|layer:index> [strength|auto] [add|clamp]",
                      "steer with a feature (no strength: auto where the profile says so, else the default of /features; auto: picked per answer)",
                      _steer, (1, 3)),
    "/unsteer": Command("<name|layer:index>", "stop steering with one feature", _unsteer, (1, 1)),
    "/clear": Command("", "stop all steering", _clear),
    "/features": Command("[name]", "the features of this profile, with descriptions; with a name: what it does "
                         "(its default, layer and the tokens its steering raises and lowers)", _features, (0, 1)),
    "/concept": Command("NAME [topic|style|persona]: sentence | ...", "make your own concept from a few example "
                        "sentences, kept in your concepts file and switched on at its default (/concept alone shows how)",
                        _concept, (0, 10**6)),
    "/active": Command("", "what is steered now", _active),
    "/compare": Command("[message]", "answer the next message twice: unsteered, then steered", _compare, (0, 10**6)),
    "/temperature": Command("[value]", "show or set the temperature (0 is greedy)", _temperature, (0, 1)),
    "/max-tokens": Command("[n]", "show or set the longest answer, in tokens", _max_tokens, (0, 1)),
    "/settings": Command("", "the generation settings now (temperature, max tokens, backend, history...)", _settings),
    "/backend": Command("[hf|nnsight|vllm]", "show or switch the backend (hf and vllm stream, nnsight prints when done)", _backend, (0, 1)),
    "/history": Command("[same|all]", "what the model reads of earlier turns made with other steering: same (default) "
                        "leaves them out, all keeps them", _history, (0, 1)),
    "/reset": Command("", "forget the conversation (steering stays)", _reset),
    "/save": Command("FILE", "save the steering (.json, .yaml or .yml), as the app exports it", _save, (1, 1)),
    "/save-chat": Command("FILE", "save the chat as JSON: each turn's message, answer and the steering it was made with",
                          _save_chat, (1, 1)),
    "/load": Command("FILE", "load steering saved here or exported from the app", _load, (1, 1)),
    "/export-gguf": Command("FILE", "save the steering as a llama.cpp control vector (FILE.gguf, add only), "
                            "for llama.cpp's --control-vector", _export_gguf, (1, 10**6)),
    "/find": Command("[layer] <text>", "the SAE features that fire most on a text (profiles with an SAE)", _find,
                     (1, 10**6)),
    "/help": Command("", "this list", _help),
}


def help_text(columns: int | None = None) -> str:
    """/help, made from COMMANDS, wrapped at the terminal's width (`columns`) with a hanging indent."""
    columns = max(60, columns or shutil.get_terminal_size((100, 24)).columns) - 1
    usages = {name: f"{name} {cmd.args}".strip() for name, cmd in COMMANDS.items()}
    width = max(len(u) for u in usages.values() if len(u) <= max(20, columns // 4))  # longer ones get a line of their own
    lines = _wrap("Commands (strengths are fractions of the layer's typical residual norm: 0.5 = half):", columns, "", "  ")
    for name, cmd in COMMANDS.items():
        usage = usages[name]
        head = f"  {usage:<{width}}   " if len(usage) <= width else f"  {usage}\n  {'':<{width}}   "
        *first, last = head.split("\n")
        lines += first + _wrap(last + cmd.help, columns, "", " " * len(last))
    lines += _wrap("Each answer keeps the steering it was made with; /compare's unsteered side reads only unsteered "
                   "turns.", columns, "", "  ")
    lines.append("exit, quit or Ctrl-D end the chat; Ctrl-C stops an answer.")
    return "\n".join(lines)


def _wrap(text: str, columns: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, columns, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         drop_whitespace=True) or [text]


