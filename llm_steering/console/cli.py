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
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "demo.yaml"  # the checkout: beside demo.py
BACKENDS = ("hf", "nnsight", "vllm")
STEER_USAGE = "NAME STRENGTH [add|clamp]"


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


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
    """--steer NAME STRENGTH [add|clamp], repeatable: two or three words each."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if len(values) not in (2, 3):
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
             "STRENGTH is a fraction of the layer's typical residual norm (0.5 = half, negative steers away); "
             "add or clamp chooses the op (default: the feature's own). Repeatable, e.g. "
             "--steer eiffel_tower 0.5 clamp --steer pirate 0.2",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="hf",
                        help="hf: forward hooks, streams the answer (default); nnsight: prints it when done; "
                             "vllm: the vLLM engine (requirements-vllm.txt), streams")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: the profile's)")
    parser.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default: the profile's)")
    parser.add_argument("--repetition-penalty", type=float, help="1 is off (default: the profile's)")
    parser.add_argument("--system", help="system prompt ('' for none; default: the profile's)")
    parser.add_argument("--compare", action="store_true",
                        help="print the unsteered answer, then the steered one, each labelled (in the chat: every answer)")
    parser.add_argument("--profile", help="model profile in the config (default: its default profile)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo config (default: demo.yaml here)")
    return parser


# ---------------------------------------------------------------------------
# The profile, read cheaply (for --help and the first line)
# ---------------------------------------------------------------------------


def human_name(key: str) -> str:
    """The name a newcomer reads for a feature key; the same as config.human_name (which imports
    torch through its modules; tests/test_demo.py checks the two agree)."""
    if ":" in key or re.fullmatch(r"\d+x\d+", key or ""):
        return f"Feature {key}"
    words = re.split(r"[_\s]+", key.strip())
    return " ".join(w[:1].upper() + w[1:] for w in words if w) or key


def light_profile(config: str | os.PathLike, name: str | None) -> dict[str, Any]:
    """A profile of demo.yaml as plain data, without validating it (demo.py's load_config does that
    later): name, model_id, sae_source, other profiles, and its features with their human names,
    descriptions, default fractions (None when the vectors file has no norm for the layer) and ops.
    A ValueError when the file cannot be read."""
    import yaml

    path = Path(config)
    try:
        if path.stat().st_size > 1_000_000:
            raise ValueError(f"{path} is too large for a config file")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        profiles = data["profiles"]
        key = name or data.get("default_profile") or next(iter(profiles))
        raw = profiles[key]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {one_line(exc)}") from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, StopIteration):
        which = f"no profile {name!r}" if name else "no default profile"
        raise ValueError(f"{path} has {which} that can be read here") from None
    vectors_file = os.environ.get("STEERING_VECTORS") or raw.get("vectors_file") or ""
    norms = read_layer_norms(path.resolve().parent / vectors_file) if vectors_file else {}
    features = []
    for feat in raw.get("features") or []:
        try:
            layer, _, strength = feat["feature"]
            strength = float(strength) * (layer if raw.get("reduced_strengths") else 1)
            norm = norms.get(layer)
            features.append({
                "key": str(feat["name"]), "title": (feat.get("label") or "").strip() or human_name(str(feat["name"])),
                "description": str(feat.get("description", "")), "layer": layer, "strength": strength,
                "fraction": strength / norm if norm else None, "op": feat.get("op", feat.get("mode", "clamp")),
            })
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue  # load_config reports it when the chat starts
    return {"name": key, "model_id": os.environ.get("STEERING_MODEL") or raw.get("model_id"),
            "sae_source": os.environ.get("STEERING_SAE_SOURCE") or raw.get("sae_source"),
            "profiles": [str(p) for p in profiles], "features": features}


class _NormsOnly(pickle.Unpickler):
    """Reads a torch vectors file's pickle without torch: tensors become None, nothing else is allowed."""

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


def read_layer_norms(path: Path) -> dict[int, float]:
    """The layer norms recorded in a vectors file (a torch zip), or {} when they cannot be read cheaply."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            if archive.getinfo(pkl).file_size > 10_000_000:
                return {}
            data = _NormsOnly(io.BytesIO(archive.read(pkl))).load()
        return {int(k): float(v) for k, v in (data.get("layer_norms") or {}).items()}
    except Exception:  # missing, not a zip, an old format: --help shows absolute strengths instead
        return {}


def help_epilog(config: str, profile: str | None) -> str:
    """--help's list of the profile's features: key, human name, description, default strength and op."""
    try:
        prof = light_profile(config, profile)
    except ValueError as exc:
        return f"(the features are not listed: {one_line(exc)})"
    lines = [f"Features of profile {prof['name']!r} ({Path(config).name}); NAME is the first word:"]
    width = max([len(f["key"]) for f in prof["features"]] + [4])
    for f in prof["features"]:
        default = (f"{f['fraction']:.3g}" if f["fraction"] is not None else f"{f['strength']:g} absolute")
        described = f"{f['title']}: {f['description']}" if f["description"] else f["title"]
        lines.append(f"  {f['key']:<{width}}  {described} (default {default}, {f['op']})")
    if not prof["features"]:
        lines.append("  (none listed)")
    if prof["sae_source"]:
        lines.append(f"  layer:index (e.g. 15:21576) steers any feature of the SAEs in {prof['sae_source']}")
    if any(f["fraction"] is None for f in prof["features"]):
        lines.append("  (absolute: the vectors file has no norm for that layer yet, so no fraction to show)")
    others = [p for p in prof["profiles"] if p != prof["name"]]
    name = prof["features"][0]["key"] if prof["features"] else "NAME"
    lines += [
        "",
        "Strengths are fractions of the layer's typical residual norm (0.5 = half), as on the app's slider.",
        "Examples:",
        f"  python demo.py --steer {name} 0.5 --temperature 0      # chat, already steered",
        f'  python demo.py --prompt "Tell me about Paris" --steer {name} 0.5 clamp --compare',
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
        prof = light_profile(config, profile)
        what = f"{prof['model_id'] or 'the embedded model'} (profile {prof['name']})"
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
    if args.prompt is None:
        announce(args.config, args.profile, sys.stdout)
