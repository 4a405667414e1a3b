"""TEST HOOK: fault injection into the engine's forward step, for the reliability tests.

Off unless the environment variable RILLET_FAULT_INJECT is set when the server starts (it is
deliberately not a `rillet serve` flag, so it never shows in --help). Values:

  step:once       the first forward step raises (its batch's requests end with an error event;
                  the engine carries on with new requests)
  step:always     every forward step raises (after 3 failed steps in a row the engine dies:
                  /health answers 503 "dead" and the server exits with status 1)
  step:once@N     / step:always@N: the first N forward steps run normally first

The hook is `LLMEngine.before_forward`, installed by `install_in_core`, which `create_app`
passes to AsyncEngine as its public `core_setup` argument: the engine calls it on the LLMEngine
it builds, in whichever thread or process runs the core (the environment is inherited). The
hook runs there, and alone touches the counter. A server started with it logs a warning so it
cannot go unnoticed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ENV_VAR", "FaultSpec", "InjectedFault", "install_hook", "install_in_core", "parse_fault_spec"]

logger = logging.getLogger("rillet.server")

ENV_VAR = "RILLET_FAULT_INJECT"
_SPEC_RE = re.compile(r"step:(once|always)(?:@(\d+))?")


class InjectedFault(RuntimeError):
    """Raised by the test hook inside a forward step."""


@dataclass
class FaultSpec:
    mode: str  # "once" | "always"
    after: int = 0  # forward steps that pass before the fault

    def hook(self) -> Callable[[Any], None]:
        steps = 0
        fired = False

        def before_forward(batch: Any) -> None:
            nonlocal steps, fired
            steps += 1
            if steps <= self.after or (self.mode == "once" and fired):
                return
            fired = True
            raise InjectedFault(f"injected fault in forward step {steps} ({ENV_VAR}={self})")

        return before_forward

    def __str__(self) -> str:
        return f"step:{self.mode}" + (f"@{self.after}" if self.after else "")


def parse_fault_spec(text: str) -> FaultSpec:
    match = _SPEC_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{ENV_VAR} must be step:once, step:always, step:once@N or step:always@N, got {text!r}")
    return FaultSpec(match.group(1), int(match.group(2) or 0))


def install_in_core(llm_engine: Any) -> None:
    """AsyncEngine `core_setup`: install the hook named by RILLET_FAULT_INJECT, if it is set."""
    install_hook(llm_engine)


def install_hook(llm_engine: Any, environ: dict[str, str] | None = None) -> FaultSpec | None:
    """Install the hook named by RILLET_FAULT_INJECT (in `environ`, default the process
    environment) as the LLMEngine's `before_forward`; the spec installed, or None."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not text:
        return None
    spec = parse_fault_spec(text)
    llm_engine.before_forward = spec.hook()
    logger.warning("TEST HOOK ACTIVE: %s=%s; forward steps will fail on purpose", ENV_VAR, spec)
    return spec
