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
    scale = parser.add_argument_group("scale-out (needs rillet[ray])")
    scale.add_argument("--ray", action="store_true",
                       help="Serve through Ray Serve: --replicas engine replicas behind Ray's HTTP proxy at "
                            "--host/--port, routed by prefix cache. Joins RAY_ADDRESS, else a Ray cluster "
                            "running here, else starts a local one.")
    scale.add_argument("--replicas", type=int, default=2, metavar="N",
                       help="With --ray: engine replicas (each gets cores/N CPU threads). [default 2]")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    engine_config = config_from_args(EngineConfig, args)
    server_config = config_from_args(ServerConfig, args)
    if getattr(args, "ray", False):
        if args.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if server_config.api_servers is not None:
            raise ValueError("--api-servers does not apply with --ray: Ray Serve's proxy is the HTTP front end")
        try:
            from rillet.deploy.ray import serve_forever
        except ImportError as exc:
            raise ValueError(f"--ray needs Ray Serve: pip install 'rillet[ray]' ({exc})") from None
        return serve_forever(engine_config, server_config, args.replicas)
    from rillet.server import serve  # heavy imports only when serving

    return serve(server_config, engine_config)
