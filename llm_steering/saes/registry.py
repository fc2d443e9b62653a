"""The SAE formats: each module in `llm_steering/saes/formats/` registers one `SAEFormat`.

Adding a format is one module there, named after the format (an `SAEFormat` subclass decorated
with `@register`), and one test file; `SAE_FORMATS`, `--sae-format`'s choices, demo.yaml's
`sae_format` check and format detection all come from this registry. (llm_steering/config.py is
torch-free and may not import this package: it lists the same names from the module files.)
"""

from __future__ import annotations

import importlib
import pkgutil

from llm_steering.saes.base import SAEFormat

FORMATS: dict[str, SAEFormat] = {}


def register(cls: type[SAEFormat]) -> type[SAEFormat]:
    """Class decorator: make a format known by its `name`."""
    if cls.__module__.rsplit(".", 1)[-1] != cls.name or cls.name in FORMATS:
        raise RuntimeError(f"SAE format {cls.name!r} must be the only one in formats/{cls.name}.py")
    FORMATS[cls.name] = cls()
    return cls


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
