"""rillet on a local Ray Serve cluster: streaming through the proxy, prefix affinity, a replica
killed mid-stream, client disconnects. 2 CPU replicas of the default model on 2 cores."""

import json
import re
import time

import pytest
import requests

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rillet[ray]')")

pytestmark = pytest.mark.timeout(240)

SYSTEM = ("You are rillet's test assistant. Answer every question briefly and politely, in plain English, "
          "without lists. ") * 4  # > 3 routing blocks of 128 characters


def _metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_health_and_metrics_cover_every_replica(ray_app):
    health = requests.get(f"{ray_app}/health", timeout=30).json()
    assert health["status"] == "ready" and len(health["replicas"]) == 2
    assert all(r["status"] == "ready" for r in health["replicas"].values())
    metrics = requests.get(f"{ray_app}/metrics", timeout=30).text
    assert metrics.count("# TYPE rillet:num_requests_running gauge") == 1
    for replica in health["replicas"]:
        assert f'rillet:num_requests_running{{replica="{replica}"}}' in metrics


def test_openai_sdk_streams_through_the_proxy(ray_app):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0)
    assert streamed and streamed == whole.choices[0].message.content  # greedy: same on either replica


def test_the_articles_ndjson_loop_works_unchanged(ray_app):
    response = requests.post(f"{ray_app}/api/chat", json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say hello."}],
        "options": {"num_predict": 10, "temperature": 0}}, stream=True, timeout=60)
    assert response.headers["content-type"].startswith("application/x-ndjson")
    pieces, last = [], None
    for line in response.iter_lines():
        if line:
            last = json.loads(line)
            pieces.append(last["message"]["content"])
    assert last["done"] is True and "".join(pieces)


def test_the_same_system_prompt_lands_on_the_same_replica(ray_app):
    seen = set()
    for i in range(6):
        response = requests.post(f"{ray_app}/v1/chat/completions", json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 2,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]},
            timeout=60)
        assert response.status_code == 200
        seen.add(response.headers["x-rillet-replica"])
    assert len(seen) == 1
    other = {requests.post(f"{ray_app}/v1/completions", json={
        "model": "SmolLM2-135M-Instruct", "prompt": f"{i} unrelated " * 60, "max_tokens": 1},
        timeout=60).headers["x-rillet-replica"] for i in range(16)}
    assert len(other) == 2  # prompts without a shared prefix spread over both
    metrics = requests.get(f"{ray_app}/metrics", timeout=30).text
    p50 = float(re.search(r'^rillet:router_choose_seconds\{quantile="0.5"\} (\S+)$', metrics, re.M).group(1))
    print(f"router p50 {p50 * 1e6:.0f} us over {_metric_sum(metrics, 'rillet:router_choose_seconds_count'):.0f}")
    assert p50 < 0.002  # the bar: <= 2 ms per request


def _wait_idle(base: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        if _metric_sum(metrics, "rillet:num_requests_running") == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def test_client_disconnect_aborts_the_request_on_its_replica(ray_app):
    before = _metric_sum(_wait_idle(ray_app), "rillet:request_aborted_total")
    with requests.post(f"{ray_app}/v1/completions", json={
            "model": "SmolLM2-135M-Instruct", "prompt": "Write a long story about a river.", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
    started = time.monotonic()
    metrics = _wait_idle(ray_app)
    assert _metric_sum(metrics, "rillet:num_requests_running") == 0
    assert _metric_sum(metrics, "rillet:request_aborted_total") == before + 1
    assert time.monotonic() - started < 10  # not 2000 tokens later


def test_killing_a_replica_mid_stream_ends_the_stream_with_an_error_then_others_serve(ray_app):
    with requests.post(f"{ray_app}/v1/chat/completions", json={
            "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}, stream=True, timeout=60) as response:
        replica = response.headers["x-rillet-replica"]
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].endswith(f"#RilletEngine#{replica}"))
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
        started = time.monotonic()
        events = [line for line in lines if line.startswith(b"data: ")]
    assert time.monotonic() - started < 30
    assert events and json.loads(events[-1][6:])["error"]["code"] == "replica_died"
    assert b"[DONE]" not in events[-1]
    for i in range(20):
        answer = requests.post(f"{ray_app}/v1/chat/completions", json={
            "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": f"Hi {i}"}],
            "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-rillet-replica"] != replica
