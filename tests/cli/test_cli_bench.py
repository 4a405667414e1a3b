"""`rillet bench` against the shared real server: valid JSON, a PNG, and --compare."""

from __future__ import annotations

import json

import pytest


def test_bench_writes_json_and_plot(server, run_cli, tmp_path):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    res = run_cli("bench", "--url", server.url, "--api-key", server.api_key, "--concurrency", "1,2",
                  "--requests", "3", "--max-tokens", "8", "--label", "rillet", "--json", str(out), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    assert "req/s" in res.stdout and "ttft p50" in res.stdout
    assert "concurrency 2" in res.stderr  # the progress bar
    result = json.loads(out.read_text())
    assert result["meta"]["label"] == "rillet" and result["meta"]["model"]
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["completed"] == 3 and level["failed"] == 0 and level["errors"] == {}
        assert level["total_output_tokens"] == 24  # ignore_eos by default: exactly max_tokens each
        assert level["tokens_counted_from"] == "usage"
        assert level["replacement_chars"] == 0
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert level[metric]["p50"] is not None and level[metric]["p99"] >= level[metric]["p50"]
        assert level["request_throughput"] > 0 and level["output_token_throughput"] > 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    compare_png = tmp_path / "compare.png"
    res = run_cli("bench", "--compare", str(out), str(out), "--plot", str(compare_png))
    assert res.returncode == 0, res.stderr
    assert "rillet#2" in res.stdout and "tok/s" in res.stdout
    assert compare_png.read_bytes().startswith(b"\x89PNG")


def test_bench_ollama_api_and_dataset_and_error_kinds(server, run_cli, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('"Say hi"\n{"prompt": "Count to three"}\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    out = tmp_path / "ollama.json"
    res = run_cli("bench", "--url", server.url, "--api-key", server.api_key, "--api", "ollama", "--concurrency",
                  "2", "--requests", "3", "--max-tokens", "4", "--dataset", str(dataset), "--json", str(out),
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    level = json.loads(out.read_text())["levels"][0]
    assert level["completed"] == 3 and level["total_output_tokens"] == 12

    bad = tmp_path / "bad.json"
    res = run_cli("bench", "--url", server.url, "--api-key", "wrong", "--model", "x", "--concurrency", "1",
                  "--requests", "2", "--max-tokens", "4", "--json", str(bad), "--no-progress")
    assert res.returncode == 1  # every request failed
    level = json.loads(bad.read_text())["levels"][0]
    assert level["errors"] == {"http_401": 2} and "401" in level["sample_error"]


def test_a_level_spread_over_client_processes_counts_every_request(server):
    """run_level_processes: 4 streams from 2 client processes, 6 requests of 8 forced tokens, each
    prompt its own; one summary over all of them, as run_level's."""
    from rillet.bench.loadgen import run_level_processes

    prompts = [f"Name a colour ({i})." for i in range(6)]
    result = run_level_processes(server.url, processes=2, model=None, concurrency=4, num_requests=6, max_tokens=8,
                                 prompts=prompts, temperature=0.0, api_key=server.api_key)
    assert (result["num_requests"], result["completed"], result["failed"]) == (6, 6, 0)
    assert result["total_output_tokens"] == 48 and result["tokens_counted_from"] == "usage"
    assert result["duration_s"] > 0 and result["output_token_throughput"] > 0
    assert result["ttft_ms"]["p50"] is not None and result["model"]
    with pytest.raises(RuntimeError, match="401"):  # a client process's failure, named
        run_level_processes(server.url, processes=2, model=None, concurrency=2, num_requests=2, max_tokens=4,
                            api_key="wrong")
