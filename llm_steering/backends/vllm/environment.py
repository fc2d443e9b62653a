"""What must hold before vLLM is imported: its logs' level and stream, a torchvision that loads."""

from __future__ import annotations

import importlib.util
import os

from llm_steering.core import one_line

UNINSTALL = "pip uninstall torchvision torchaudio torchcodec"


def torchvision_problem() -> str | None:
    """A torchvision built for another torch breaks every vLLM start ("Could not import module
    'LlamaConfig'"): say what to uninstall instead."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return (f"the installed torchvision does not work with this torch ({one_line(exc)[:120]}); "
                f"text models do not need it: run `{UNINSTALL}`")
    return None


def quiet_vllm_logs(verbose: bool) -> None:
    """vLLM's logs to stderr (stdout is the answer's), and only errors unless `verbose`.
    Read when vLLM is first imported, in this process and in the engine's (they inherit it)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
