"""`rillet serve`: the OpenAI- and Ollama-compatible HTTP server on uvicorn."""

from __future__ import annotations

import argparse

from rillet.cli.options import add_config_arguments, config_from_args
from rillet.config import EngineConfig, ServerConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="Serve the model over HTTP (OpenAI SSE, Ollama NDJSON, JSON).",
        description="Serve the model over HTTP: OpenAI-compatible /v1 routes (SSE), Ollama-compatible /api "
                    "routes (NDJSON), /health, /metrics and a chat page at /. Every flag can also be set "
                    "with its RILLET_* environment variable.")
    add_config_arguments(parser, EngineConfig, "engine")
    add_config_arguments(parser, ServerConfig, "server")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    engine_config = config_from_args(EngineConfig, args)
    server_config = config_from_args(ServerConfig, args)
    from rillet.server import serve  # heavy imports only when serving

    return serve(server_config, engine_config)
