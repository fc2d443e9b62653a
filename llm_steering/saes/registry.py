"""The SAE formats: each module in `llm_steering/saes/formats/` registers one `SAEFormat`.

Adding a format is one module there, named after the format (an `SAEFormat` subclass decorated
with `@register(name, pattern, looks_like)`), and one test file; `SAE_FORMATS`, `--sae-format`'s choices, demo.yaml's
`sae_format` check and format detection all come from this registry. (llm_steering/config.py is
torch-free and may not import this package: it lists the same names from the module files.)
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from llm_steering.saes.base import SAEFormat

FORMATS: dict[str, SAEFormat] = {}


def register(name: str, pattern: str, looks_like: str, takes_trainer: bool = False):
    """Class decorator: make a format known by its `name`, with the `pattern` its SAE files' paths match
    and the file names shown when a format cannot be told (`looks_like`)."""

    def add(cls: type[SAEFormat]) -> type[SAEFormat]:
        if cls.__module__.rsplit(".", 1)[-1] != name or name in FORMATS:
            raise RuntimeError(f"SAE format {name!r} must be the only one in formats/{name}.py")
        cls.name, cls.pattern, cls.looks_like, cls.takes_trainer = name, re.compile(pattern), looks_like, takes_trainer
        FORMATS[name] = cls()
        return cls

    return add


def get_format(name: str) -> SAEFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown SAE format {name!r}: use one of {', '.join(SAE_FORMATS)}")
    return FORMATS[name]


def _discover() -> None:
    from llm_steering.saes import formats

    for info in sorted(pkgutil.iter_modules(formats.__path__), key=lambda m: m.name):
        importlib.import_module(f"{formats.__name__}.{info.name}")


_discover()
SAE_FORMATS: tuple[str, ...] = tuple(FORMATS)
