"""Where SAE files come from: a local directory or a Hugging Face hub repository."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_steering.core import one_line

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SAESource:
    """A local directory or a hub repository of SAE files."""

    name: str
    files: list[str]
    local: Path | None = None

    @classmethod
    def open(cls, source: str) -> SAESource:
        path = Path(source).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"SAE source {source!r} is a file: give the directory (or hub repo) that holds the SAEs")
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = Path(root).relative_to(path)
                files += [(rel / n).as_posix() for n in names]
            return cls(name=str(path), files=sorted(files), local=path)
        if not _HUB_ID_RE.match(source):
            raise ValueError(f"SAE source {source!r} is neither a local directory nor a hub repo id (owner/name)")
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(source)
        except Exception as exc:  # offline, missing or gated repo
            raise ValueError(f"cannot list hub repo {source!r}: {one_line(exc)}") from None
        return cls(name=source, files=sorted(files))

    def fetch(self, rel: str) -> Path:
        """A local path for file `rel` (downloaded and cached for a hub repo)."""
        if self.local is not None:
            path = self.local / rel
            if not path.is_file():
                raise ValueError(f"{self.name}/{rel} not found")
            return path
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, rel))
        except Exception as exc:
            raise ValueError(f"cannot download {rel} from {self.name}: {one_line(exc)}") from None

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.fetch(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.name}/{rel} is not valid JSON ({one_line(exc)})") from None

    def beside(self, file: str, name: str) -> str:
        """The path of `name` in the folder of `file`."""
        return f"{file.rsplit('/', 1)[0]}/{name}" if "/" in file else name
