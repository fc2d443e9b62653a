"""Ctrl-C in the console chat: the first press stops the answer, later ones cannot cut its clean-up short.

    >>> with ctrl_c_stops():
    ...     for piece in stream: ...        # KeyboardInterrupt here on the first Ctrl-C
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Stopped(Exception):
    """The user pressed Ctrl-C during an answer."""


@contextmanager
def ctrl_c_stops() -> Iterator[None]:
    """Inside the block the first Ctrl-C raises KeyboardInterrupt; later ones are ignored
    so that the clean-up (closing the generator, removing hooks) is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = [False]

    def handler(signum: int, frame: Any) -> None:
        if not pressed[0]:
            pressed[0] = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
