"""The benchmark scripts' pure parts (metrics, ratios, tables): no model, milliseconds."""

from __future__ import annotations

from rillet.bench.loadgen import RequestRecord as Record
from rillet.bench.loadgen import summarize

from benchmarks import bench_engine, bench_serving  # the repository root is on sys.path (python -m pytest)


def _record(ttft: float, gaps: int, tokens: int) -> Record:
    times = [ttft + 0.1 * i for i in range(gaps + 1)]
    return Record(ok=True, ttft=ttft, e2e=times[-1], chunk_times=times, output_tokens=tokens, finish_reason="length")


def test_summarize_counts_tokens_and_latencies():
    records = [_record(0.2, 4, 5), _record(0.4, 4, 5), Record(ok=False, error="boom")]
    result = summarize(records, 2.0, concurrency=2, max_tokens=5)
    assert result["completed"] == 2 and result["failed"] == 1 and result["errors"] == {"boom": 1}
    assert result["output_token_throughput"] == 5.0
    assert result["ttft_ms"]["p50"] == 300.0
    assert abs(result["itl_ms"]["p50"] - 100.0) < 1e-6
    assert abs(result["tpot_ms"]["mean"] - 100.0) < 1e-6


def test_engine_rows_and_bars():
    seed = {1: summarize([_record(0.5, 4, 5)], 10.0, concurrency=1, max_tokens=5)}
    rillet = {1: summarize([_record(0.1, 4, 5)], 2.0, concurrency=1, max_tokens=5),
              32: summarize([_record(0.1, 4, 5)], 1.0, concurrency=32, max_tokens=5)}
    rows = bench_engine.build_rows([1, 32], seed, rillet)
    assert rows[0]["speedup"] == 5.0 and rows[0]["meets_bar"] is True
    assert rows[1]["speedup"] is None and rows[1]["meets_bar"] is None
    text, markdown = bench_engine.render(rows)
    assert "5.00x" in text and markdown.startswith("| concurrency |")


def test_serving_comparisons():
    def level(tps: float, ttft: float) -> dict:
        return {"output_token_throughput": tps, "ttft_ms": {"p50": ttft}}

    c = bench_serving.comparisons({"rillet serve": level(950.0, 100.0), "rillet in-process": level(1000.0, 90.0),
                                   "seed server": level(50.0, 800.0)})
    assert c["throughput_rillet_over_seed"] == 19.0 and c["throughput_meets_bar"]
    assert c["ttft_p50_seed_over_rillet"] == 8.0 and c["ttft_meets_bar"]
    assert c["http_overhead"] == 0.05 and c["http_overhead_meets_bar"]
    assert "MISSED" not in bench_serving.render_comparisons(c)
