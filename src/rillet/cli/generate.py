"""`rillet generate`: one-shot generation, streamed to stdout (or one JSON object with --json).

    rillet generate "Write a haiku about rivers"               # in-process, default model
    echo "Why is the sky blue?" | rillet generate --url http://127.0.0.1:8000 --max-tokens 64
    rillet generate --json --seed 1 --temperature 0 "Hello"
    rillet generate --json-schema person.schema.json "Invent a person"   # output valid for the schema
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rillet.cli.backends import add_backend_arguments, make_backend, sampling_params, stream_answer
from rillet.client import RilletError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="one-shot generation streamed to stdout", conflict_handler="resolve",
        description="Generate one answer to PROMPT (or to stdin) and stream it to stdout: against a server "
                    "with --url, else in-process (--model, default the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads it from stdin")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, finish_reason, usage, timings) instead of streaming")
    parser.add_argument("--raw", action="store_true",
                        help="plain text completion of the prompt, without the chat template (--system ignored)")
    parser.add_argument("--json-schema", metavar="FILE", type=Path,
                        help="constrain the answer to this JSON schema (a JSON file); the answer always parses "
                             "and validates, unless cut short by --max-tokens")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no stats line on stderr")
    add_backend_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def json_schema_format(path: Path) -> dict[str, Any]:
    """OpenAI's `response_format` for the JSON schema in `path` (named after the file)."""
    schema = json.loads(path.read_text())
    if not isinstance(schema, (dict, bool)):
        raise ValueError("a JSON schema must be a JSON object")
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.name.split(".")[0])[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty() and prompt is None:
            print("rillet generate: error: give a prompt, or pipe one on stdin", file=sys.stderr)
            return 2
        prompt = sys.stdin.read()
    if not prompt.strip():
        print("rillet generate: error: the prompt is empty", file=sys.stderr)
        return 2
    if args.raw:
        request: str | list[dict] = prompt
    else:
        request = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
    params = sampling_params(args)
    if args.json_schema is not None:
        try:
            params["response_format"] = json_schema_format(args.json_schema)
        except (OSError, ValueError) as exc:
            print(f"rillet generate: error: --json-schema {args.json_schema}: {exc}", file=sys.stderr)
            return 2
    try:
        backend = make_backend(args, progress=not args.quiet)
    except (RilletError, OSError) as exc:
        print(f"rillet generate: error: {exc}", file=sys.stderr)
        return 1
    try:
        answer = stream_answer(backend, request, params, None if args.json else sys.stdout)
    except RilletError as exc:
        if not args.json:
            sys.stdout.write("\n")
        print(f"rillet generate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    if args.json:
        usage = answer.usage
        result = {
            "model": backend.model,
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                                 "completion_tokens": usage.completion_tokens,
                                                 "total_tokens": usage.total_tokens},
            "num_tokens": answer.num_tokens,
            "ttft_s": None if answer.ttft_s is None else round(answer.ttft_s, 4),
            "duration_s": round(answer.duration_s, 4),
            "tokens_per_s": None if answer.tokens_per_s is None else round(answer.tokens_per_s, 2),
            "interrupted": answer.interrupted,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(answer.stats(), file=sys.stderr)
    return 130 if answer.interrupted else 0
