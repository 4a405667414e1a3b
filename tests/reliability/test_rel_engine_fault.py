"""Engine faults, injected with the RILLET_FAULT_INJECT test hook (src/rillet/server/faults.py):

- one failed forward step ends the requests of that batch with a terminal error event (or a 503
  for a non-streaming request) and the engine carries on serving new requests;
- a fault it cannot get past (every step fails: after 3 failed steps in a row the engine loop
  dies) turns /health to 503 "dead" and the process exits with status 1, so a supervisor
  restarts it. Never a hang: every request gets an answer."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from rillet.bench import reliability as rh


@pytest.fixture(scope="module")
def fault_servers():
    """Both servers load at once: "once" fails the 7th forward step, "always" every step."""
    once = rh.RilletServer("--kv-cache-gib", "0.25", env={"RILLET_FAULT_INJECT": "step:once@6"})
    always = rh.RilletServer("--kv-cache-gib", "0.25", env={"RILLET_FAULT_INJECT": "step:always"})
    try:
        yield once.wait_ready(), always.wait_ready()
    finally:
        once.stop()
        always.stop()


def run(coro):
    return asyncio.run(coro)


def test_one_failed_step_ends_its_requests_and_the_engine_carries_on(fault_servers):
    server, _ = fault_servers
    assert "TEST HOOK ACTIVE" in server.log_tail(20000)
    hit = run(rh.http_request(server.url, "/v1/completions",
                              rh.completion_body("Count: one, two,", 30, ignore_eos=True, temperature=0)))
    assert hit.status == 200 and hit.error is not None, hit.events[-3:]
    assert hit.error["error"]["code"] == "engine_error" and "InjectedFault" in hit.error["error"]["message"]
    assert hit.events[-1] is hit.error and "[DONE]" not in hit.events  # the error event is the last word
    assert 1 <= len(hit.token_times) <= 6, hit.text  # some tokens, then the fault at step 7
    # the engine carries on: streaming and non-streaming requests, both APIs
    chat = run(rh.http_request(server.url, "/v1/chat/completions", rh.chat_body("Say hi.", 12, temperature=0)))
    assert chat.status == 200 and chat.error is None and chat.done and chat.finish_reason in ("stop", "length")
    full = run(rh.http_request(server.url, "/api/generate", {"prompt": "The sky is", "stream": False,
                                                              "options": {"num_predict": 6}}))
    assert full.status == 200 and full.body["done"] is True, full.body
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ready"
    metrics = rh.get_metrics(server.url)
    assert rh.metric(metrics, "rillet:request_error_total") == 1
    assert server.proc.poll() is None


def test_an_unrecoverable_fault_turns_health_503_and_exits_nonzero(fault_servers):
    _, server = fault_servers
    # every step fails: the first two requests end with an error; the third failure kills the loop
    first = run(rh.http_request(server.url, "/v1/chat/completions", rh.chat_body("Hello?", 10)))
    assert first.status == 200 and first.error["error"]["code"] == "engine_error", first.events
    second = run(rh.http_request(server.url, "/v1/completions", rh.completion_body("Hello?", 10, stream=False)))
    assert second.status == 503 and second.error["error"]["code"] == "engine_error", second.body
    assert "InjectedFault" in second.error["error"]["message"]
    t_dead = time.monotonic()
    third = run(rh.http_request(server.url, "/api/chat", rh.ollama_body("Hello?", 10)))
    assert third.status == 200 and third.error is not None and third.events[-1]["done"] is True, third.events
    assert "steps failed in a row" in third.error["error"]

    seen: list[object] = []

    def exited() -> bool:
        if server.proc.poll() is not None:
            return True
        try:
            r = httpx.get(server.url + "/health", timeout=5)
            seen.append((r.status_code, r.json().get("status")))
        except httpx.HTTPError as exc:
            seen.append(type(exc).__name__)
        return False

    rh.poll_until(exited, 30, "the server to exit after its engine died", interval_s=0.05)
    exit_after = time.monotonic() - t_dead
    assert server.proc.returncode == 1, (server.proc.returncode, server.log_tail())
    statuses = [s for s in seen if isinstance(s, tuple)]
    assert all(s == (503, "dead") for s in statuses), seen  # never "ready" again once dead
    log = server.log_tail(20000)
    assert "the engine died" in log and "exiting with status 1" in log, log
    print(f"engine death -> exit 1 after {exit_after:.1f}s; /health answers while exiting: {seen[:5]}")
    assert exit_after < 15
