"""tests/client/rillet_proc.py, loaded once under one module name, so that tests/client, tests/cli,
tests/server and tests/reliability (and scripts/soak.py) share its helpers and session server.
Each suite puts tests/ on sys.path and imports `rillet_proc` from here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_NAME = "rillet_tests_rillet_proc"


def _load():
    if MODULE_NAME not in sys.modules:
        path = Path(__file__).resolve().parent / "client" / "rillet_proc.py"
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[MODULE_NAME]


rillet_proc = _load()
