"""A streaming request read on a thread of its own, for tests that do something to the server
(a signal, a killed process) while the stream is open."""

from __future__ import annotations

import threading

import httpx


class BackgroundStream:
    """POSTs `body` to `url` and keeps every SSE `data:` payload in `events`; `started` is set
    at the first one. The thread ends when the response does. A response that is not a stream
    keeps its `status` and `body`, and a request that fails its `error`: `wait_started` says which
    at once instead of waiting out its timeout."""

    def __init__(self, url: str, body: dict, headers: dict[str, str] | None = None, timeout: float = 120) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self.status: int | None = None
        self.body = ""
        self.error: Exception | None = None
        self._settled = threading.Event()  # the first event, or the end of the request
        self._thread = threading.Thread(target=self._read, args=(url, body, headers or {}, timeout), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict, headers: dict[str, str], timeout: float) -> None:
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as res:
                self.status = res.status_code
                if res.status_code != 200:
                    self.body = res.read().decode(errors="replace")[:2000]
                    return
                for line in res.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
                        self._settled.set()
        except Exception as exc:  # kept for wait_started's message; the test decides what it means
            self.error = exc
        finally:
            self._settled.set()

    def wait_started(self, timeout: float) -> bool:
        """Whether the first event came within `timeout` seconds. Raises AssertionError, with
        the status and body or the error, if the request ended without one."""
        self._settled.wait(timeout)
        if not self.started.is_set() and self._settled.is_set():
            raise AssertionError(f"the stream ended before its first event: status {self.status}, "
                                 f"error {self.error!r}, body {self.body!r}")
        return self.started.is_set()

    def join(self, timeout: float) -> bool:
        """Whether the stream ended within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
