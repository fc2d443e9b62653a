"""Stop requests that cross a process boundary (ZeroGPU's forked GPU worker).

    >>> stops = StopFlags()                      # before any worker is forked
    >>> stops.request(session_key)               # the Stop button, in the main process
    >>> stops.watch(session_key, since, cancel, done)   # a thread in the worker: sets `cancel`
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path


class StopFlags:
    """Stop requests, as files in a folder made before any GPU worker is forked.

    On ZeroGPU, `@spaces.GPU` runs the generator in a forked worker and checks its own stop
    event only after the generator's next yield, and only when the handler is closed. The
    Stop button instead touches `<folder>/<session key>`; a thread in the worker watches
    for it and ends the generation at the next layer, whatever the handler does.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="steering-stop-"))

    def request(self, key: str) -> None:
        if key and key.isalnum() and len(key) <= 64:
            (self.folder / key).touch()

    def is_set(self, key: str, since: float) -> bool:
        try:
            return bool(key) and (self.folder / key).stat().st_mtime >= since
        except OSError:
            return False

    def watch(self, key: str, since: float, cancel: threading.Event, done: threading.Event) -> None:
        """Set `cancel` once a stop for `key` newer than `since` appears (until `done`)."""
        while not done.wait(0.05):
            if self.is_set(key, since):
                cancel.set()
                return
