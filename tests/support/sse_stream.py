"""A streaming request read on a thread of its own, for tests that do something to the server
(a signal, a killed process) while the stream is open."""

from __future__ import annotations

import threading

import httpx


class BackgroundStream:
    """POSTs `body` to `url` and keeps every SSE `data:` payload in `events`; `started` is set
    at the first one. The thread ends when the response does."""

    def __init__(self, url: str, body: dict, headers: dict[str, str] | None = None, timeout: float = 120) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body, headers or {}, timeout), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict, headers: dict[str, str], timeout: float) -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as res:
            for line in res.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.started.set()

    def join(self, timeout: float) -> bool:
        """Whether the stream ended within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
