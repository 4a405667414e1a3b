"""The in-thread transport: the EngineCore loop on a thread of the caller's process.

The default for an AsyncEngine in your own program. Commands go through a list guarded by a
condition (the loop sleeps on it while idle); outputs come back through the callback, called
on the loop's thread.
"""

from __future__ import annotations

import threading

from rillet.engine.core import Command, CoreClientBase, CoreInfo, CoreOutputs, EngineCore

__all__ = ["CoreThread"]


class CoreThread(CoreClientBase):
    """A CoreClient whose core runs on a thread named rillet-engine."""

    def _init_transport(self) -> None:
        self._cv = threading.Condition()
        self._inbox: list[Command] = []
        self._thread: threading.Thread | None = None

    # ---- the front end's side (CoreClient)

    def start(self) -> CoreInfo:
        core = EngineCore(self.config, self._setup)
        info = core.info()  # before the loop starts: nothing else touches the LLMEngine then
        self._thread = threading.Thread(target=core.run, args=(self,), name="rillet-engine", daemon=True)
        self._thread.start()
        return info

    def send(self, command: Command) -> None:
        with self._cv:
            self._inbox.append(command)
            self._cv.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the core's side (CoreTransport)

    def receive(self, wait: bool, gather: bool = True) -> list[Command]:  # nothing to gather: sends are instant
        with self._cv:
            while wait and not self._inbox:
                self._cv.wait()
            commands, self._inbox = self._inbox, []
        return commands

    def publish(self, outputs: CoreOutputs) -> None:
        self._on_outputs(outputs)

    def die(self, reason: str) -> None:
        self._on_dead(reason)
