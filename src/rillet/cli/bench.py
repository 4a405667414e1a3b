"""`rillet bench`: load-test any OpenAI-compatible server (or Ollama's NDJSON API).

    rillet bench --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 64 --max-tokens 128 \\
        --json results.json --plot results.png
    rillet bench --compare rillet.json vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import uuid


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible server",
        description="Send streaming chat requests at several concurrency levels and report throughput, "
                    "TTFT, TPOT, inter-token latency and end-to-end latency (p50/p90/p99).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000 (required unless --compare)")
    parser.add_argument("--model", help="model name to request (default: the first id from /v1/models)")
    parser.add_argument("--api", choices=("openai", "ollama"), default="openai",
                        help="wire API: OpenAI SSE (/v1/chat/completions) or Ollama NDJSON (/api/chat)")
    parser.add_argument("--api-key", help="bearer token for servers started with an API key")
    parser.add_argument("--concurrency", type=_concurrency_list, default=[1, 4, 16],
                        help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=_positive_int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=_positive_int, default=128, help="output tokens per request")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    parser.add_argument("--dataset", help="JSONL prompts: strings, {prompt}, {text}, {messages} or ShareGPT")
    parser.add_argument("--warmup", type=int, default=2, metavar="N",
                        help="first send N short requests with a prompt that no measured request uses (0: none)")
    parser.add_argument("--unique-prompts", action=argparse.BooleanOptionalAction, default=True,
                        help="start every measured prompt with a tag unique to this run, level and request, so "
                             "no answer comes from a prefix cache an earlier request filled")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the server to generate exactly --max-tokens tokens (vLLM/rillet 'ignore_eos')")
    parser.add_argument("--eos-token-id", type=int, default=None,
                        help="also send logit_bias {ID: -100} so servers without ignore_eos do the same work")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--label", help="name of this run in --compare tables and plots")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot throughput and TTFT against concurrency (needs matplotlib: "
                             "pip install 'rillet[bench]')")
    parser.add_argument("--compare", nargs="+", metavar="RESULT.json",
                        help="print a side-by-side table of earlier --json results (and --plot them) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _check_outputs(args: argparse.Namespace) -> str | None:
    """Refuse, before any request is sent, what would otherwise fail after the whole run."""
    from pathlib import Path

    from rillet.bench import report

    if args.plot:
        why = report.plot_available()
        if why:
            return why
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            return f"{flag} {path}: the directory {Path(path).parent} does not exist"
    return None


def _compare(args: argparse.Namespace) -> int:
    from rillet.bench import report

    results = [(path, report.load_result(path)) for path in args.compare]
    print(report.compare_table(results))
    if args.plot:
        report.plot(list(zip(report._labels(results), (result for _, result in results))), args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from rillet.bench import loadgen, report
    from rillet.client import RilletError

    problem = _check_outputs(args)
    if problem:
        print(f"rillet bench: error: {problem}", file=sys.stderr)
        return 2
    if args.compare:
        return _compare(args)
    if not args.url:
        print("rillet bench: error: --url is required (or --compare)", file=sys.stderr)
        return 2
    prompts = loadgen.load_prompts(args.dataset) if args.dataset else None

    async def main() -> list[dict]:
        from tqdm import tqdm

        model = args.model
        if model is None:
            from rillet.client import AsyncClient

            async with AsyncClient(args.url, api=args.api, api_key=args.api_key, timeout=args.timeout) as client:
                model = await loadgen.resolve_model(client)
            print(f"model: {model}", file=sys.stderr)
        if args.warmup > 0:
            await loadgen.run_level(args.url, model=model, concurrency=1, num_requests=args.warmup, max_tokens=8,
                                    api=args.api, prompts=[loadgen.WARMUP_PROMPT], api_key=args.api_key,
                                    timeout=args.timeout)
        run_id = uuid.uuid4().hex[:6]
        levels = []
        for concurrency in args.concurrency:
            bar = tqdm(total=args.requests, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr,
                       disable=args.no_progress, ncols=shutil.get_terminal_size().columns or 80)
            failed = 0

            def done(record: loadgen.RequestRecord) -> None:
                nonlocal failed
                failed += not record.ok
                bar.update(1)
                if failed:
                    bar.set_postfix(errors=failed)

            try:
                level = await loadgen.run_level(
                    args.url, model=model, concurrency=concurrency, num_requests=args.requests,
                    max_tokens=args.max_tokens, api=args.api, ignore_eos=args.ignore_eos, prompts=prompts,
                    api_key=args.api_key, eos_token_id=args.eos_token_id, temperature=args.temperature,
                    timeout=args.timeout, on_request_done=done,
                    tag=f"{run_id}-c{concurrency}" if args.unique_prompts else None)
            finally:
                bar.close()
            levels.append(level)
        return levels

    try:
        levels = asyncio.run(main())
    except RilletError as exc:
        print(f"rillet bench: error: {exc}", file=sys.stderr)
        return 1
    print(report.table(levels))
    for level in levels:
        if level.get("sample_error"):
            print(f"concurrency {level['concurrency']}: first error: {level['sample_error']}", file=sys.stderr)
    result = report.make_result(
        levels, url=args.url, model=levels[0].get("model") if levels else args.model, api=args.api,
        label=args.label, requests=args.requests, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
        eos_token_id=args.eos_token_id, dataset=args.dataset, concurrency=args.concurrency, warmup=args.warmup,
        unique_prompts=args.unique_prompts)
    if args.json:
        report.write_json(result, args.json)
        print(f"results written to {args.json}", file=sys.stderr)
    if args.plot:
        report.plot([(args.label or args.model or "run", result)], args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    total = sum(level["num_requests"] for level in levels)
    failed = sum(level["failed"] for level in levels)
    return 1 if total and failed == total else 0
