"""The torch-free bottom of the library: one-line errors, bounded reprs, atomic writes, names and keys.

Everything here imports only the standard library, so the console's `--help`, the config
reader and the spec format can use it without loading torch.

    >>> one_line(ValueError("bad strength\\nmore detail"))
    'bad strength'
    >>> parse_layer_index("15:21576"), parse_layer_index("L15F21576"), parse_layer_index("pirate")
    ((15, 21576), (15, 21576), None)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import reprlib
import tempfile
from pathlib import Path
from typing import Any

FILE_VERSION = 1  # the version of the vectors file format (vectors.py)
SPEC_VERSION = 1  # the version of the steering spec format (config.py); the two change independently
ERROR_LIMIT = 300  # characters of a one-line error at most
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
LAYER_INDEX_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*|L(\d+)F(\d+)")


def one_line(exc: BaseException, limit: int = ERROR_LIMIT) -> str:
    """The first line of an exception's message (its type's name when empty), cut at `limit` characters:
    the one way the project turns an exception into the line a user reads."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_header(data: Any, fmt: str, version: int, what: str) -> None:
    """A one-line ValueError unless `data` is a mapping of format `fmt` at `version` (a file or spec header)."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"not a {what}: expected a mapping with format {fmt!r}")
    if data.get("version") != version:
        raise ValueError(f"unsupported {what} version {short_repr(data.get('version'))} (this code reads version {version})")


def is_finite_number(value: Any) -> bool:
    """A real int or float (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() for error messages, bounded whatever the input: deep or huge values are cut with '...'."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset, r.maxstring, r.maxother = 2, 4, 4, 4, 4, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit + 10 else text[: limit + 7] + "..."


def parse_layer_index(key: Any) -> tuple[int, int] | None:
    """(layer, index) for an SAE feature key "15:21576" (or its name "L15F21576"), else None.

    The one key grammar of the project: a key is a vector name or "layer:index".
    """
    match = LAYER_INDEX_RE.fullmatch(key) if isinstance(key, str) else None
    if not match:
        return None
    layer, index = (g for g in match.groups() if g is not None)
    return int(layer), int(index)


def check_name(name: Any, what: str) -> str:
    """`name` if it is a valid vector/feature name, else a one-line ValueError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{what}: name {name!r} is not valid: use letters, digits and '_', starting with a letter")
    return name


def human_name(key: str) -> str:
    """The name a newcomer reads for a feature key: "eiffel_tower" -> "Eiffel Tower",
    "15:21576" -> "Feature 15:21576"."""
    if ":" in key or re.fullmatch(r"\d+x\d+", key or ""):
        return f"Feature {key}"
    words = re.split(r"[_\s]+", key.strip())
    return " ".join(w[:1].upper() + w[1:] for w in words if w) or key


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(tmp_path)`, then move the temp file over `path`; nothing is left behind on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


FRACTION_DECIMALS = 3  # the one rounding rule of strengths (fractions of a layer's typical norm)


def round_fraction(fraction: float) -> float:
    """A strength as the project keeps it: rounded to 3 decimals (0.2549 -> 0.255), the same for
    the display, the tags, the summary, export and import, so a file re-imports exactly."""
    return round(float(fraction), FRACTION_DECIMALS) + 0.0  # + 0.0: no "-0.0"


def format_strength(fraction: float, norm: float) -> str:
    """An absolute strength as every front end writes it: the rounded fraction (the one in force,
    `round_fraction`) times the layer's typical norm, one decimal (0.2046 x 250.0 -> "51.1")."""
    return f"{round_fraction(fraction) * norm:.1f}"


def format_fraction(fraction: float) -> str:
    """A strength as the pages write it: `round_fraction`, at least two decimals ("0.20", "0.255")."""
    text = f"{round_fraction(fraction):.{FRACTION_DECIMALS}f}".rstrip("0")
    return text + "0" * max(0, 2 - len(text.split(".")[1]))


SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)|\n")  # a sentence's end, or a line's
NEAR_END, NEAR_CHARS = 0.35, 80  # a cut answer ends at its last sentence end when at most this share of it
                                 # (or this many characters) comes after that end


def cut_at_sentence(text: str, near: float = NEAR_END) -> str:
    """A text cut by a length limit, ended at its last sentence (or line) end when that is near its
    end (at most `near` of it, or NEAR_CHARS characters, after it); else as it is, with " …" to show
    it was cut mid-sentence.
    A list item's number ("2.") is not a sentence end.

        >>> cut_at_sentence("Paris is lovely. It has many")
        'Paris is lovely.'
    """
    body = text.rstrip()
    ends = [m.end() for m in SENTENCE_END.finditer(body)
            if not re.fullmatch(r"\s*\d+\.", body[body.rfind("\n", 0, m.start()) + 1 : m.end()])]
    if ends and ends[-1] >= len(body):
        return body
    if ends and len(body) - ends[-1] <= max(near * len(body), NEAR_CHARS):
        return body[: ends[-1]].rstrip()
    return body + " …"

