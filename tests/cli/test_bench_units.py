"""Pure parts of rillet.bench: percentiles, aggregation, dataset loading, reports (no server)."""

from __future__ import annotations

import json

import pytest

from rillet.bench import loadgen, report
from rillet.bench.loadgen import RequestRecord


def test_percentile_interpolates():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0], 99) == 3.0
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    assert loadgen.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)


def test_summarize_counts_tokens_errors_and_replacement_chars():
    ok = RequestRecord(ok=True, ttft=0.1, e2e=0.5, chunk_times=[0.1, 0.2, 0.5], output_tokens=5,
                       tokens_from_usage=True, prompt_tokens=7, fffd=1, finish_reason="length")
    chunky = RequestRecord(ok=True, ttft=0.2, e2e=0.4, chunk_times=[0.2, 0.3, 0.4], output_tokens=3,
                           finish_reason="stop")
    bad = RequestRecord(ok=False, error="http_429", error_message="busy", e2e=0.01)
    level = loadgen.summarize([ok, chunky, bad], 2.0, concurrency=2, max_tokens=5)
    assert (level["completed"], level["failed"], level["errors"]) == (2, 1, {"http_429": 1})
    assert level["total_output_tokens"] == 8 and level["output_token_throughput"] == 4.0
    assert level["request_throughput"] == 1.0 and level["tokens_counted_from"] == "mixed"
    assert level["replacement_chars"] == 1 and level["finish_reasons"] == {"length": 1, "stop": 1}
    assert level["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert level["tpot_ms"]["mean"] == pytest.approx((0.4 / 4 + 0.2 / 2) / 2 * 1000)
    assert level["itl_ms"]["max"] == pytest.approx(300.0)
    assert level["sample_error"] == "http_429: busy"


def test_load_prompts_accepts_common_shapes(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"plain"\n\n{"prompt": "p"}\n{"text": "t"}\n{"messages": [{"role": "user", "content": "m"}]}\n'
                    '{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"}]}\n')
    assert loadgen.load_prompts(path) == ["plain", "p", "t", [{"role": "user", "content": "m"}], "h"]
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        loadgen.load_prompts(path)


def test_sampling_params_force_the_output_length():
    assert loadgen._sampling_params("openai", 8, True, None, None, None) == {"max_tokens": 8, "ignore_eos": True}
    assert loadgen._sampling_params("openai", 8, False, 2, 0.0, None) == {
        "max_tokens": 8, "temperature": 0.0, "logit_bias": {"2": -100}}


def test_reports_render_and_round_trip(tmp_path):
    level = loadgen.summarize([RequestRecord(ok=True, ttft=0.1, e2e=0.3, chunk_times=[0.1, 0.3], output_tokens=2)],
                              1.0, concurrency=1, max_tokens=2)
    result = report.make_result([level], label="a")
    path = tmp_path / "a.json"
    report.write_json(result, path)
    assert report.load_result(path)["levels"][0]["completed"] == 1
    assert "ttft p99" in report.table([level])
    text = report.compare_table([(str(path), report.load_result(path)), ("b.json", report.make_result([level]))])
    assert "a" in text and "b" in text
    report.plot([("a", result)], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError):
        report.load_result(tmp_path / "bad.json")


def _fake_level(**_: object) -> dict:
    return loadgen.summarize([RequestRecord(ok=True, ttft=0.1, e2e=0.3, chunk_times=[0.1, 0.3], output_tokens=2)],
                             1.0, concurrency=1, max_tokens=2)


@pytest.mark.parametrize("compare", [False, True])
def test_plot_without_matplotlib_is_refused_before_any_request(monkeypatch, tmp_path, capsys, compare):
    """Issue 14: `rillet bench --plot` after `make serve` (no matplotlib) ran the whole benchmark, then
    ended in a ModuleNotFoundError traceback. Now it stops before sending anything, naming the extra."""
    from rillet.cli import main

    sent = []

    async def run_level(url, **kwargs):
        sent.append(url)
        return _fake_level()

    monkeypatch.setattr(loadgen, "run_level", run_level)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = tmp_path / "a.json"
    report.write_json(report.make_result([_fake_level()], label="a"), result)
    argv = (["bench", "--compare", str(result)] if compare else
            ["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1", "--requests", "1",
             "--no-progress"])
    rc = main(argv + ["--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "matplotlib" in err and "pip install 'rillet[bench]'" in err and "Traceback" not in err
    assert sent == []
    assert not (tmp_path / "p.png").exists()


def test_output_paths_in_missing_directories_are_refused_up_front(monkeypatch, tmp_path, capsys):
    from rillet.cli import main

    sent = []

    async def run_level(url, **kwargs):
        sent.append(url)
        return _fake_level()

    monkeypatch.setattr(loadgen, "run_level", run_level)
    rc = main(["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1", "--requests", "1",
               "--no-progress", "--json", str(tmp_path / "missing" / "a.json")])
    assert rc == 2 and "--json" in capsys.readouterr().err and sent == []
    rc = main(["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1", "--requests", "1",
               "--no-progress", "--json", str(tmp_path / "a.json")])
    assert rc == 0 and sent == ["http://127.0.0.1:9"] * 2 and (tmp_path / "a.json").exists()  # warm-up, level


def test_warm_up_on_another_prompt_then_measure_unique_prompts(monkeypatch, capsys):
    """Issue 14: without a warm-up the first level pays the server's start-up; with the same prompts
    at every level a server with a prefix cache answers later levels from it."""
    from rillet.cli import main

    calls = []

    async def run_level(url, **kwargs):
        calls.append(kwargs)
        return _fake_level()

    monkeypatch.setattr(loadgen, "run_level", run_level)
    base = ["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1,4", "--requests", "2",
            "--no-progress"]
    assert main(base) == 0
    warmup, *levels = calls
    assert warmup["prompts"] == [loadgen.WARMUP_PROMPT] and warmup.get("tag") is None
    assert loadgen.WARMUP_PROMPT not in loadgen.DEFAULT_PROMPTS
    tags = [level["tag"] for level in levels]
    assert len(tags) == 2 and len(set(tags)) == 2 and all(tags)
    calls.clear()
    assert main(base + ["--warmup", "0", "--no-unique-prompts"]) == 0
    assert len(calls) == 2 and all(call.get("tag") is None for call in calls)


def test_tagged_prompts_differ_from_their_first_word():
    assert loadgen.tagged("Explain rain.", "x-1") == "[x-1] Explain rain."
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = loadgen.tagged(messages, "x-2")
    assert out == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[x-2] Hi"}]
    assert messages[1]["content"] == "Hi"  # the dataset's own prompt is left as it was
