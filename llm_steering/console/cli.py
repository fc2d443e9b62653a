"""The console's command line, kept light: no torch, no transformers, no model.

`demo.py` calls `before_loading(argv)` before its heavy imports, so `--help` (with the
profile's features read straight from demo.yaml) and the chat's first line come at once;
a cold first start spends seconds importing torch and loading the model after that line.

    >>> parser = build_parser(["--profile", "llama31_8b"])   # --help lists that profile's features
    >>> args = parser.parse_args(["--steer", "pirate", "-0.3", "add"])
    >>> args.steer
    [['pirate', '-0.3', 'add']]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from llm_steering.config import FeatureConfig, ModelProfile, load_config
from llm_steering.core import format_fraction, human_name, one_line  # noqa: F401  (one_line: re-exported for the console)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "demo.yaml"  # the checkout: beside demo.py
BACKENDS = ("hf", "nnsight", "vllm")
STEER_USAGE = "NAME [STRENGTH] [add|clamp]"
DATA_ENV = "STEERING_DATA_DIR"  # where the user's own concepts are kept (one vectors file per profile)


def user_concepts_path(profile: str) -> Path:
    """The user's vectors file of their own concepts for a profile: $STEERING_DATA_DIR, else
    $XDG_DATA_HOME/llm-steering, else ~/.local/share/llm-steering; named after the profile."""
    base = os.environ.get(DATA_ENV) or str(Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
                                           / "llm-steering")
    return Path(base).expanduser() / f"{profile}-concepts.pt"


# ---------------------------------------------------------------------------
# Colours and one-line errors
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
# The parser
# ---------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad command-line arguments."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, not printed) and an epilog made only when --help asks."""

    epilog_source: tuple[str, str | None] | None = None  # (config path, profile) whose features --help lists

    def error(self, message: str) -> None:  # one line, not usage + message, and no exit here
        raise UsageError(f"{message} (see python demo.py --help)")

    def format_help(self) -> str:
        if self.epilog_source is not None:
            self.epilog = help_epilog(*self.epilog_source)
        return super().format_help()


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "steer":
            return STEER_USAGE  # argparse would write NAME [STRENGTH ...] for nargs="+"
        return super()._format_args(action, default_metavar)


class _SteerAction(argparse.Action):
    """--steer NAME [STRENGTH] [add|clamp], repeatable: one to three words each."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if len(values) not in (1, 2, 3):
            parser.error(f"--steer takes {STEER_USAGE}, got {' '.join(values)!r}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), list(values)])


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The command-line parser; `argv` only picks the config and profile whose features --help lists."""
    scan = argparse.ArgumentParser(add_help=False)
    scan.add_argument("--config", default=str(DEFAULT_CONFIG))
    scan.add_argument("--profile")
    try:
        known, _ = scan.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit:  # e.g. --config without a value: the real parser says so
        known = argparse.Namespace(config=str(DEFAULT_CONFIG), profile=None)

    parser = Parser(
        prog="demo.py", formatter_class=_Formatter,
        description="Chat with a steered model in the terminal, or answer one prompt with --prompt.\n"
                    "In the chat, /help lists the commands (steering, compare, temperature, history, saving).",
    )
    parser.epilog_source = (known.config, known.profile)
    parser.add_argument("--prompt", help="answer this one message, print only the answer and exit")
    parser.add_argument(
        "--steer", nargs="+", action=_SteerAction, default=[],
        help="steer with a feature of the profile (NAME as listed below) or an SAE feature (layer:index); "
             "STRENGTH is a fraction of the layer's typical residual norm (0.5 = half, negative steers away; "
             "default: auto, the way to steer picked for each answer, where the profile says so (generation.auto), else the "
             "feature's own, listed below); add or clamp chooses the op (default: the feature's own). "
             "Repeatable: --steer NAME --steer NAME 0.1 add steers with two features.",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="hf: forward hooks, streams the answer (default); nnsight: prints it when done; "
                             "vllm: the vLLM engine (requirements-vllm.txt), streams")
    parser.add_argument("--verbose", action="store_true", help="show the backend's own logs (vLLM's), on stderr")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: the profile's)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the profile's)")
    parser.add_argument("--repetition-penalty", type=float, help="1 is off (default: the profile's)")
    parser.add_argument("--system", help="system prompt ('' for none; default: the profile's)")
    parser.add_argument("--compare", action="store_true",
                        help="print the unsteered answer, then the steered one, each labelled (in the chat: every answer)")
    parser.add_argument("--export-gguf", metavar="FILE",
                        help="write the --steer steering as a llama.cpp control vector (FILE.gguf, for llama.cpp's "
                             "--control-vector; add only) and exit without chatting")
    parser.add_argument("--profile", help="model profile in the config (default: its default profile)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo config (default: demo.yaml here)")
    return parser


# ---------------------------------------------------------------------------
# The profile, read cheaply (for --help and the first line)
# ---------------------------------------------------------------------------


def read_layer_norms(path: Path) -> dict[int, float]:
    """The layer norms recorded in a vectors file (a torch zip), or {} when they cannot be read cheaply.

    --help shows each feature's default as a fraction of its layer's norm, and must not import
    torch for it: the file's pickle is read with an unpickler that builds no tensor and allows
    nothing but the OrderedDict of the format."""
    try:
        return {int(k): float(v) for k, v in (read_light(path).get("layer_norms") or {}).items()}
    except Exception:  # missing, not a zip, an old format: --help shows absolute strengths instead
        return {}


def read_light(path: Path) -> dict:
    """A vectors file's data without its tensors (each vector None), or {} when it cannot be read cheaply."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            if archive.getinfo(pkl).file_size > 10_000_000:
                return {}
            data = _NormsOnly(io.BytesIO(archive.read(pkl))).load()
        return data if isinstance(data, dict) else {}
    except Exception:  # missing, not a zip, an old format
        return {}


def user_concept_lines(profile: str) -> list[str]:
    """--help's lines for the user's own concepts of a profile (read without torch), each with its default."""
    lines = []
    for item in read_light(user_concepts_path(profile)).get("vectors") or []:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), str):
            continue
        fraction, op = meta.get("default_fraction"), meta.get("default_op", "add")
        default = format_fraction(fraction) if isinstance(fraction, (int, float)) else "?"
        lines.append(f"  {item.get('name')}  {human_name(str(item.get('name')))}: {item.get('description', '')} "
                     f"(default {default}, {op}; your concept)")
    return lines


class _NormsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("torch", "torch._utils"):
            return _nothing
        raise pickle.UnpicklingError(f"{module}.{name} is not read here")

    def persistent_load(self, pid: Any) -> None:
        return None


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def features_with_fractions(prof: ModelProfile) -> list[tuple[FeatureConfig, float | None]]:
    """The profile's features, each with its default as a fraction of its layer's norm (None when
    the vectors file records no norm for the layer)."""
    norms = read_layer_norms(prof.vectors_path())
    return [(f, f.strength / norms[f.layer] if norms.get(f.layer) else None) for f in prof.features]


def help_epilog(config: str, profile: str | None) -> str:
    """--help's list of the profile's features: key, human name, description, default strength and op."""
    try:
        cfg = load_config(config)
        prof = cfg.profile(profile)
    except ValueError as exc:
        return f"(the features are not listed: {one_line(exc)})"
    features = features_with_fractions(prof)
    lines = [f"Features of profile {prof.name!r} ({Path(config).name}); NAME is the first word:"]
    width = max([len(f.name) for f in prof.features] + [4])
    for f, fraction in features:
        default = format_fraction(fraction) if fraction is not None else f"{f.strength:g} absolute"
        title = f.label or human_name(f.name)
        described = f"{title}: {f.description}" if f.description else title
        lines.append(f"  {f.name:<{width}}  {described} (default {default}, {f.op})")
    mine = user_concept_lines(prof.name)
    lines += mine
    if not features and not mine:
        lines.append("  (none listed)")
    if prof.sae_source:
        lines.append(f"  layer:index (e.g. 15:21576) steers any feature of the SAEs in {prof.sae_source}")
    if any(fraction is None for _, fraction in features):
        lines.append("  (absolute: the vectors file has no norm for that layer yet, so no fraction to show)")
    others = [p for p in cfg.profiles if p != prof.name]
    name = prof.features[0].name if prof.features else "NAME"
    lines += [
        "",
        "Strengths are fractions of the layer's typical residual norm (0.5 = half), as on the app's slider.",
        "Without a STRENGTH, --steer takes the feature's default (above).",
        "Examples:",
        f"  python demo.py --steer {name} --temperature 0      # chat, already steered at the default",
        f'  python demo.py --prompt "Tell me about Paris" --steer {name} --compare',
        f"  python demo.py --steer {name} add --export-gguf {name}.gguf   # for llama.cpp's --control-vector",
        "Your own concept, from a few sentences: in the chat, /concept NAME: sentence | sentence | ...",
    ]
    if others:
        lines.append(f"Other profiles: {', '.join(others)} (--profile NAME --help lists their features).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The first line
# ---------------------------------------------------------------------------

_announced = False


def announce(config: str, profile: str | None, stream: TextIO) -> None:
    """The chat's first line, once: what is being loaded, and that a first start takes a few seconds."""
    global _announced
    if _announced:
        return
    _announced = True
    try:
        prof = load_config(config).profile(profile)
        what = f"{prof.model_id or 'the embedded model'} (profile {prof.name})"
    except ValueError:
        what = "the model"
    text = f"loading {what}: the first start takes a few seconds..."
    print(Painter(colour_enabled(stream))("notice", text), file=stream, flush=True)


def before_loading(argv: Sequence[str]) -> None:
    """Run before demo.py's heavy imports: --help prints and exits here, and the chat says what it loads.

    Bad arguments are left to demo.main, which reports them in one line after its imports.
    """
    try:
        args = build_parser(argv).parse_args(argv)
    except UsageError:
        return
    if args.prompt is None and args.export_gguf is None:
        announce(args.config, args.profile, sys.stdout)
