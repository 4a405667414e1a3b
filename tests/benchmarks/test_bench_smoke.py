"""The seed-design baseline server (benchmarks.baselines.seed_server) still answers streams.

Starts it as a subprocess on a free loopback port and reads its OpenAI SSE, its NDJSON
/api/chat and the article's own /api route with `requests.post(stream=True).iter_lines()`,
the article's client loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rillet.bench.servers import ServerProcess, free_port

from benchmarks.baselines.seed_server import seed_server_command

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 6

pytestmark = pytest.mark.timeout(300)  # the first run converts the GGUF model (~20 s on a quiet machine)


@pytest.fixture(scope="module")
def seed_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("seed") / "seed_server.log"
    server = ServerProcess(seed_server_command(port, "bfloat16"), f"http://127.0.0.1:{port}", log_path=log,
                           cwd=REPO, start_timeout_s=240)
    with server:
        yield server.url


def test_models_lists_one_model(seed_url):
    data = requests.get(seed_url + "/v1/models", timeout=10).json()["data"]
    assert len(data) == 1 and data[0]["id"]


def test_openai_sse_stream_is_forced_to_max_tokens(seed_url):
    body = {"model": "x", "messages": [{"role": "user", "content": "写一篇800字的作文"}], "stream": True,
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream_options": {"include_usage": True}}
    events = []
    with requests.post(seed_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        r.raise_for_status()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith(b"data: ")
                events.append(line[len(b"data: "):].decode("utf-8"))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == MAX_TOKENS and usage["prompt_tokens"] > 0


def test_ndjson_chat_with_the_article_client_loop(seed_url):
    body = {"messages": [{"role": "user", "content": "Say hello."}],
            "options": {"num_predict": MAX_TOKENS, "ignore_eos": True}}
    lines = []
    with requests.post(seed_url + "/api/chat", json=body, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:  # skip keep-alive blank lines, as the article does
                lines.append(json.loads(line.decode("utf-8")))
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == MAX_TOKENS and lines[-1]["done_reason"] == "length"
    assert "".join(x["message"]["content"] for x in lines).strip()


def test_article_route_streams_cumulative_answers(seed_url):
    contents = []
    with requests.post(seed_url + "/api", json={"max_new_tokens": MAX_TOKENS, "ignore_eos": True}, stream=True,
                       timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                contents.append(json.loads(line.decode("utf-8"))["content"])
    assert contents and contents[-1].strip()
    assert all(b.startswith(a) for a, b in zip(contents, contents[1:]))  # each line is the answer so far
