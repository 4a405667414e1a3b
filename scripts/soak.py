#!/usr/bin/env python3
"""Long reliability runs against real `rillet serve` processes (the fast variants are in
tests/reliability and run under `make test`; this is `make soak`).

Scenarios (default: all three, one after the other, each on its own server):

  storm     200 streams dropped at random points (right after the request, mid-body, during
            prefill, mid-stream), a well-behaved greedy stream running through it; afterwards
            no request runs or waits, the KV cache is empty, RSS is within 5% of before.
  overload  500 connections at once against --max-num-seqs 4 --max-waiting 4: the excess get
            429 quickly, every accepted request finishes, no 5xx, bounded RSS.
  soak      --minutes of mixed traffic at --concurrency: streaming (OpenAI chat/completions,
            Ollama), non-streaming, aborted mid-stream and invalid requests; reports requests
            served, outcomes by kind, p50/p99 TTFT and inter-token latency, RSS at start and end.

  make soak                                     # all, with a 10-minute soak
  make soak SOAK_ARGS="--scenario soak --minutes 3"
  .venv/bin/python scripts/soak.py --scenario storm --streams 200 --json out.json

Exit status 0 when every scenario held its bar, 1 otherwise. docs/RELIABILITY.md records runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rillet.bench import reliability as rh


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Server:
    """A `rillet serve` subprocess (or, with --url, an already running server: no RSS figures)."""

    def __init__(self, args: argparse.Namespace, *flags: str) -> None:
        self.url = args.url
        self.proc = None
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.flags = flags
        self.args = args

    def __enter__(self) -> Server:
        if self.url is None:
            log(f"starting rillet serve {' '.join(self.flags)}")
            self.proc = rh.RilletServer(*self.flags).wait_ready()
            self.url = self.proc.url
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.proc.pid if self.proc is not None else self.args.pid

    def rss_mb(self) -> float | None:
        return round(rh.rss_bytes(self.pid) / 2**20, 1) if self.pid else None


def run_storm(args: argparse.Namespace) -> dict[str, Any]:
    with Server(args, "--dtype", "float32", "--kv-cache-gib", "1") as server:
        ref = asyncio.run(rh.http_request(server.url, rh.REFERENCE_PATH, rh.reference_body(), headers=server.headers))
        rss_cold = server.rss_mb()
        # warm-up: the same storm once first, so the KV-cache pages and allocator pools it needs
        # are already resident; the RSS bar applies to the second, identical storm
        log(f"storm: warm-up storm of {args.streams} streams (RSS {rss_cold} MB)")
        warm = asyncio.run(rh.disconnect_storm(server.url, n=args.streams, headers=server.headers,
                                               seed=args.seed + 1, max_in_flight=64, reference=ref))
        rh.wait_engine_idle(server.url, server.headers, timeout_s=120)
        before = rh.engine_gauges(server.url, server.headers)
        rss_before = server.rss_mb()
        log(f"storm: {args.streams} streams (after the warm-up storm, RSS {rss_before} MB)")
        report = asyncio.run(rh.disconnect_storm(server.url, n=args.streams, headers=server.headers,
                                                 seed=args.seed, max_in_flight=64, reference=ref))
        t_idle = time.perf_counter()
        after = rh.wait_engine_idle(server.url, server.headers, timeout_s=120)
        idle_s = time.perf_counter() - t_idle
        rss_after = server.rss_mb()
    good = report.pop("well_behaved")
    report.update({
        "warm_up_ok": warm["well_behaved_ok"],
        "well_behaved": {"tokens": len(good.token_times), "finish_reason": good.finish_reason,
                         "matches_reference": report.pop("well_behaved_ok"),
                         "itl": rh.summarize_ms(good.itls)},
        "engine_after": {k: after[k] for k in ("running", "waiting", "kv_cache_usage")},
        "idle_within_s": round(idle_s, 2),
        "engine_aborts": after["aborted"] - before["aborted"],
        "rss_mb": {"cold": rss_cold, "before": rss_before, "after": rss_after,
                   "change_pct": rh.pct(rss_before, rss_after) if rss_before else None},
    })
    ok = (report["well_behaved"]["matches_reference"] and not report["client_errors"]
          and after["running"] == 0 and after["waiting"] == 0 and after["kv_cache_usage"] == 0
          and (rss_before is None or abs(report["rss_mb"]["change_pct"]) <= 5.0))
    report["held"] = bool(ok)
    return report


def run_overload(args: argparse.Namespace) -> dict[str, Any]:
    limit = rh.raise_nofile(4 * args.connections + 512)
    with Server(args, "--max-num-seqs", "4", "--max-waiting", "4", "--kv-cache-gib", "0.25") as server:
        asyncio.run(rh.overload(server.url, n=8, headers=server.headers))  # warm-up
        rh.wait_engine_idle(server.url, server.headers)
        rss_before = server.rss_mb()
        log(f"overload: {args.connections} connections at once (RLIMIT_NOFILE {limit})")
        report = asyncio.run(rh.overload(server.url, n=args.connections, headers=server.headers, pid=server.pid,
                                         seed=args.seed, max_num_seqs=4))
        rh.wait_engine_idle(server.url, server.headers, timeout_s=120)
    report["rss_mb_before"] = rss_before
    ok = (report["server_5xx"] == 0 and report["no_response"] == 0 and report["accepted_unfinished"] == 0
          and report["retry_after_missing"] == 0 and report.get("max_queued_seen", 0) <= 4
          and (report["refusal_latency"]["p99_ms"] or 0) < 5000
          and (rss_before is None or report["rss_mb"]["peak"] - rss_before < 200))
    report["held"] = bool(ok)
    return report


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    with Server(args) as server:
        asyncio.run(rh.http_request(server.url, "/v1/completions", rh.completion_body("Warm up", 8, stream=False),
                                    headers=server.headers))
        before = rh.engine_gauges(server.url, server.headers)
        log(f"soak: {args.minutes:g} min of mixed traffic at concurrency {args.concurrency}")
        report = asyncio.run(rh.mixed_soak(server.url, duration_s=args.minutes * 60, concurrency=args.concurrency,
                                           headers=server.headers, pid=server.pid, seed=args.seed,
                                           progress_every_s=30))
        after = rh.wait_engine_idle(server.url, server.headers, timeout_s=120)
    report["engine_after"] = {k: after[k] for k in ("running", "waiting", "kv_cache_usage")}
    report["server_counters"] = {k: after[k] - before[k] for k in ("success", "aborted", "errors", "rejected")}
    outcomes = report["outcomes"]
    bad = {k: v for k, v in outcomes.items()
           if not (k == "ok" or k == "aborted" or k in ("invalid->400", "invalid->422"))}
    report["unexpected_outcomes"] = bad
    rss = report.get("rss_mb")
    report["held"] = bool(not bad and after["running"] == 0 and after["kv_cache_usage"] == 0
                          and (rss is None or rss["end"] - rss["after_warmup"] < max(50, 0.05 * rss["after_warmup"])))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("all", "storm", "overload", "soak"), default="all")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the mixed soak (default 10)")
    parser.add_argument("--concurrency", type=int, default=16, help="soak clients at once (default 16)")
    parser.add_argument("--streams", type=int, default=200, help="streams in the disconnect storm (default 200)")
    parser.add_argument("--connections", type=int, default=500, help="overload connections (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="use this running server instead of starting one per scenario")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS figures")
    parser.add_argument("--api-key", help="with --url: the server's API key")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    scenarios = ("storm", "overload", "soak") if args.scenario == "all" else (args.scenario,)
    runners = {"storm": run_storm, "overload": run_overload, "soak": run_soak}
    reports: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "command": " ".join(["scripts/soak.py", *(argv or sys.argv[1:])])}}
    held = True
    for name in scenarios:
        t0 = time.perf_counter()
        report = runners[name](args)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        reports[name] = report
        held = held and report["held"]
        log(f"{name}: {'HELD' if report['held'] else 'FAILED'}\n{json.dumps(report, indent=2, default=str)}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2, default=str) + "\n")
    log("all held" if held else "SOME SCENARIO FAILED")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
