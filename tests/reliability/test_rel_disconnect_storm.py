"""Disconnect storm: streams dropped at random points (right after the request, mid-body, during
prefill, mid-stream) leave nothing behind, and a well-behaved stream running through the storm
finishes with exactly the text it has alone. scripts/soak.py --scenario storm runs 200 streams."""

from __future__ import annotations

import asyncio

from rillet.bench import reliability as rh

NUM_STREAMS = 48


def test_disconnect_storm_leaves_nothing_behind(main_server):
    server, headers = main_server, main_server.headers
    ref = asyncio.run(rh.http_request(server.url, rh.REFERENCE_PATH, rh.reference_body(), headers=headers))
    assert ref.status == 200 and ref.done and ref.finish_reason == "length", ref
    # warm-up: a small storm first, so allocator pools and caches reach their working size
    warm = asyncio.run(rh.disconnect_storm(server.url, n=12, headers=headers, seed=1, reference=ref))
    assert warm["well_behaved_ok"], warm
    rh.wait_engine_idle(server.url, headers)
    rss_before = rh.rss_bytes(server.proc.pid)
    aborted_before = rh.engine_gauges(server.url, headers)["aborted"]

    report = asyncio.run(rh.disconnect_storm(server.url, n=NUM_STREAMS, headers=headers, seed=2, reference=ref))

    good = report["well_behaved"]
    assert good.status == 200 and good.error is None, good
    assert good.text == ref.text and good.done and good.finish_reason == "length", (good.text, ref.text)
    assert not report["client_errors"], report["client_errors"]
    assert set(report["statuses"]) <= {"200"}, report["statuses"]
    gauges = rh.wait_engine_idle(server.url, headers, timeout_s=60)
    assert gauges["aborted"] - aborted_before >= NUM_STREAMS // 3, (gauges, report["modes"])
    rss_after = rh.rss_bytes(server.proc.pid)
    growth = rh.pct(rss_before, rss_after)
    print(f"storm of {NUM_STREAMS}: {report['modes']} in {report['seconds']}s; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MB ({growth:+.1f}%); aborted {gauges['aborted'] - aborted_before:.0f}")
    assert abs(growth) <= 5.0, (rss_before, rss_after)
    # and the server still serves: the same greedy answer as before the storm
    again = asyncio.run(rh.http_request(server.url, rh.REFERENCE_PATH, rh.reference_body(), headers=headers))
    assert again.text == ref.text
