"""`rillet serve` flags and RILLET_* env vars come from the config declarations."""

from __future__ import annotations

import subprocess
import sys

from rillet.cli import build_parser
from rillet.cli.options import config_from_args
from rillet.config import EngineConfig, ServerConfig


def test_serve_flags_and_env():
    args = build_parser().parse_args(["serve", "--port", "9001", "--max-num-seqs", "4", "--api-key", "k",
                                      "--allowed-origins", "http://a,http://b", "--max-waiting", "3"])
    server = config_from_args(ServerConfig, args, environ={"RILLET_DRAIN_TIMEOUT_S": "7"})
    engine = config_from_args(EngineConfig, args, environ={"RILLET_QUEUE_TIMEOUT_S": "9"})
    assert (server.port, server.api_key, server.allowed_origins, server.drain_timeout_s) == \
        (9001, "k", ["http://a", "http://b"], 7.0)
    assert (engine.max_num_seqs, engine.max_waiting, engine.queue_timeout_s) == (4, 3, 9.0)
    assert args.func.__module__ == "rillet.cli.serve"


def test_serve_help_lists_flags_and_env_vars():
    out = subprocess.run([sys.executable, "-m", "rillet.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model", "--host", "--port", "--api-key", "--max-num-seqs", "--max-waiting",
                 "--allowed-origins", "--drain-timeout-s", "RILLET_API_KEY"):
        assert flag in out, flag


def test_bad_config_is_a_plain_error():
    res = subprocess.run([sys.executable, "-m", "rillet.cli", "serve", "--port", "70000"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "port must be <=" in res.stderr and "Traceback" not in res.stderr
