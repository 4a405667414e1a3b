"""Overload: far more connections at once than the server admits (--max-num-seqs 4
--max-waiting 4): the excess get 429 with Retry-After quickly, every accepted request finishes,
nothing answers 5xx, memory stays bounded. scripts/soak.py --scenario overload runs 500."""

from __future__ import annotations

import asyncio

import pytest

from rillet.bench import reliability as rh

NUM_CONNECTIONS = 150


@pytest.fixture(scope="module")
def small_server():
    rh.raise_nofile(4 * NUM_CONNECTIONS + 256)  # the server inherits the limit
    server = rh.RilletServer("--max-num-seqs", "4", "--max-waiting", "4", "--kv-cache-gib", "0.25")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_overload_refuses_the_excess_quickly_and_finishes_the_rest(small_server):
    server = small_server
    # warm-up, so the RSS baseline already holds what a first request allocates
    warm = asyncio.run(rh.overload(server.url, n=8, max_tokens=8))
    assert warm["server_5xx"] == 0, warm
    rh.wait_engine_idle(server.url)
    rss_before = rh.rss_bytes(server.proc.pid)

    report = asyncio.run(rh.overload(server.url, n=NUM_CONNECTIONS, max_tokens=8, pid=server.proc.pid, seed=3,
                                     max_num_seqs=4))
    print("overload:", report)
    assert report["server_5xx"] == 0 and report["no_response"] == 0, report
    assert set(report["statuses"]) <= {"200", "429"}, report["statuses"]
    assert report["refused_429"] >= NUM_CONNECTIONS // 2, report
    assert report["accepted"] >= 8 and report["accepted_unfinished"] == 0, report
    assert report["retry_after_missing"] == 0
    assert report["max_queued_seen"] <= 4, report  # --max-waiting holds even while prompts are tokenized
    # refusals come at once, not after queueing: well under one generation's time
    assert report["refusal_latency"]["p99_ms"] < 3000, report["refusal_latency"]
    assert report["rss_mb"]["peak"] * 2**20 - rss_before < 100 * 2**20, (rss_before, report["rss_mb"])
    gauges = rh.wait_engine_idle(server.url)
    assert gauges["rejected"] >= report["refused_429"]
    again = asyncio.run(rh.http_request(server.url, "/v1/completions", rh.completion_body("Hi", 4, stream=False)))
    assert again.status == 200 and again.finish_reason == "length"
