"""A bound on how long a connection may take to send its request headers (uvicorn has none).

uvicorn closes idle keep-alive connections, but a connection that sends part of its headers and
then stalls (slowloris) holds a socket forever. `install_header_timeout` makes both of uvicorn's
HTTP protocols close a connection whose request headers are not complete `seconds` after it
opened or after its previous response ended. Stalled bodies are the middleware's (a 408).
"""

from __future__ import annotations

import os
from typing import Any

HEADER_TIMEOUT_ENV = "LLM_STEERING_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 30.0


def install_header_timeout(seconds: float | None = None) -> float:
    """Patch uvicorn's h11 and httptools protocols (once per process); return the bound in seconds."""
    seconds = float(seconds if seconds is not None else os.environ.get(HEADER_TIMEOUT_ENV) or DEFAULT_HEADER_TIMEOUT)
    from uvicorn.protocols.http.h11_impl import H11Protocol

    protocols: list[Any] = [H11Protocol]
    for module, name in (("httptools_impl", "HttpToolsProtocol"), ("zttp_impl", "ZttpProtocol")):
        try:  # optional parsers: present when their package is installed
            protocols.append(getattr(__import__(f"uvicorn.protocols.http.{module}", fromlist=[name]), name))
        except ImportError:
            pass
    for cls in protocols:
        _patch(cls)
        cls.llm_steering_header_timeout = seconds
    return seconds


def _patch(cls: Any) -> None:
    if getattr(cls, "_llm_steering_patched", False):
        return
    made, complete, lost = cls.connection_made, cls.on_response_complete, cls.connection_lost

    def arm(self: Any) -> None:
        disarm(self)
        self._llm_steering_header_timer = self.loop.call_later(self.llm_steering_header_timeout, expire, self)

    def disarm(self: Any) -> None:
        timer = getattr(self, "_llm_steering_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._llm_steering_header_timer = None

    def expire(self: Any) -> None:
        self._llm_steering_header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request whose headers are complete
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self)

    def on_response_complete(self: Any) -> None:
        complete(self)
        if not self.transport.is_closing():
            arm(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    cls.connection_made, cls.on_response_complete, cls.connection_lost = connection_made, on_response_complete, connection_lost
    cls._llm_steering_patched = True
