"""Against a real `rillet serve` process with the default model, driven by real clients:
the openai SDK (sync and async), the ollama package and the seed article's requests loop."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import ollama
import openai
import pytest
import requests
from support import rillet_proc

KEY = rillet_proc.API_KEY
PROMPTS = [f"Write one short sentence about the number {i}." for i in range(16)]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def oa_client(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(oa_client):
    (card,) = oa_client.models.list().data
    return card.id


def test_openai_sdk_sync_chat_and_completions(oa_client, model):
    res = oa_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=12, temperature=0)
    assert res.choices[0].message.content
    assert res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.completion_tokens <= 12 and res.usage.prompt_tokens > 0

    stream = oa_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                               max_tokens=12, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == res.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # token by token

    comp = oa_client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                        temperature=0, logprobs=2)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    assert len(comp.choices[0].logprobs.tokens) == 5


def test_a_list_of_prompts_answers_each_as_alone(oa_client, model):
    """vLLM's batched /v1/completions: prompt i's choices are i * n .. i * n + n - 1, each the
    greedy text that prompt gets alone; streamed, the same texts come interleaved."""
    prompts = ["The capital of France is", "One, two, three,", "def add(a, b):"]
    answers = [oa_client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0) for p in prompts]
    alone = [answer.choices[0].text for answer in answers]
    both = oa_client.completions.create(model=model, prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in both.choices] == list(range(6))
    assert [c.text for c in both.choices] == [text for text in alone for _ in range(2)]
    assert both.usage.completion_tokens == 2 * sum(answer.usage.completion_tokens for answer in answers)
    assert both.usage.prompt_tokens == sum(answer.usage.prompt_tokens for answer in answers)
    stream = oa_client.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    texts = ["", "", ""]
    finished = []
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.append(c.index)
    assert texts == alone and sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == both.usage.completion_tokens // 2
    assert chunks[-1].usage.prompt_tokens == both.usage.prompt_tokens


def test_a_stop_string_cuts_the_streamed_text_before_it(oa_client, model):
    # The core sends token ids; the server process decodes them and finds the stop string.
    messages = [{"role": "user", "content": "Write two sentences about the sea."}]
    full = oa_client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    stop = next(text[i:i + 4] for i in range(len(text) // 2, len(text) - 4) if text[i:i + 4].strip()
                and text.index(text[i:i + 4]) == i)
    stream = oa_client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                               stop=[stop], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[:text.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert 0 < chunks[-1].usage.completion_tokens < full.usage.completion_tokens

    # vLLM's extras: the stop string kept; a stop string before min_tokens does not end the answer
    kept = oa_client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                             stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == text[:text.index(stop) + len(stop)]
    held = oa_client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                             stop=[stop], extra_body={"min_tokens": 40})
    assert held.choices[0].message.content.startswith(text) and held.usage.completion_tokens == 40
    with pytest.raises(openai.BadRequestError, match="min_tokens must be at most max_tokens"):
        oa_client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body={"min_tokens": 5})

    with pytest.raises(openai.NotFoundError):
        oa_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        oa_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=-3)


def test_a_prefilled_answer_continues_with_vllms_chat_template_fields(oa_client, model):
    question = [{"role": "user", "content": "Say hello."}]
    prefilled = question + [{"role": "assistant", "content": "Hello, my name"}]
    fresh = oa_client.chat.completions.create(model=model, messages=prefilled, max_tokens=6, temperature=0)
    goes_on = oa_client.chat.completions.create(
        model=model, messages=prefilled, max_tokens=6, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "chat_template_kwargs": {"enable_thinking": False}})  # a variable SmolLM2's template ignores
    # the turn is left open: fewer prompt tokens (no end of turn, no new assistant header)
    assert goes_on.usage.prompt_tokens < fresh.usage.prompt_tokens and goes_on.choices[0].message.content
    for extra, param in [({"continue_final_message": True}, "continue_final_message"),
                         ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")]:
        with pytest.raises(openai.BadRequestError) as refused:
            oa_client.chat.completions.create(model=model, messages=prefilled, max_tokens=2, extra_body=extra)
        assert refused.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="assistant's"):
        oa_client.chat.completions.create(model=model, messages=question, max_tokens=2, extra_body={
            "continue_final_message": True, "add_generation_prompt": False})
    # template variables beside tools (Qwen3's enable_thinking with a function list) were a 400
    tools = [{"type": "function", "function": {"name": "greet", "parameters": {"type": "object"}}}]
    both = oa_client.chat.completions.create(model=model, messages=question, max_tokens=2, tools=tools,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    alone = oa_client.chat.completions.create(model=model, messages=question, max_tokens=2, tools=tools)
    assert both.usage.prompt_tokens == alone.usage.prompt_tokens  # the tools are in the prompt either way


def test_tokenize_counts_what_a_request_feeds_the_model_and_detokenize_inverts_it(real_server, oa_client, model):
    """vLLM's /tokenize and /detokenize: a chat's count is the prompt_tokens its request is billed."""
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        return httpx.post(real_server.url + path, json=body, headers=auth, timeout=60)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river in Europe."}]
    chat = oa_client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    counted = post("/tokenize", {"model": model, "messages": messages}).json()
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens and counted["max_model_len"] > 0
    text = "The capital of France is"
    completion = oa_client.completions.create(model=model, prompt=text, max_tokens=2, temperature=0)
    plain = post("/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert plain["count"] == completion.usage.prompt_tokens and len(plain["token_strs"]) == plain["count"]
    assert post("/detokenize", {"tokens": plain["tokens"]}).json() == {"prompt": text}
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                              ("/tokenize", {"messages": messages, "continue_final_message": True},
                               "continue_final_message"),
                              ("/detokenize", {"tokens": [-1]}, "tokens")]:
        refused = post(path, body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert post("/tokenize", {"model": "no-such-model", "prompt": "x"}).status_code == 404


def test_openai_sdk_async_streaming(real_server, model):
    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        full = await client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=10, temperature=0)
        stream = await client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=10, temperature=0,
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return full.choices[0].text, text

    full, streamed = asyncio.run(main())
    assert streamed == full and full


def test_chinese_streams_without_replacement_characters(real_server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "用中文回答：中国的首都是哪里？"}],
            "options": {"temperature": 0, "num_predict": 40}}
    deltas = []
    with requests.post(real_server.url + "/api/chat", json=body, stream=True, headers=real_server.headers,
                       timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                part = json.loads(line.decode("utf-8"))
                deltas.append(part["message"]["content"])
    text = "".join(deltas)
    assert not any("\ufffd" in d for d in deltas), deltas
    assert re.search(r"[\u4e00-\u9fff]", text), text
    full = requests.post(real_server.url + "/api/chat", json={**body, "stream": False}, headers=real_server.headers,
                         timeout=120).json()
    assert full["message"]["content"] == text


def test_article_requests_loop_against_api_chat(real_server, model):
    url_api = real_server.url + "/api/chat"
    payload = {"model": model, "messages": [{"role": "user", "content": "Name three colors."}],
               "options": {"num_predict": 16}}
    lines = []
    with requests.post(url_api, json=payload, stream=True, headers=real_server.headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line.decode("utf-8")))
    assert len(lines) > 2
    assert all(not x["done"] for x in lines[:-1])
    final = lines[-1]
    assert final["done"] and final["done_reason"] in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(final[key], int)
    assert final["eval_count"] <= 16


def test_ollama_package(real_server, model):
    client = ollama.Client(host=real_server.url, headers=real_server.headers)
    res = client.chat(model=model, messages=[{"role": "user", "content": "Say hi."}],
                      options={"temperature": 0, "num_predict": 8})
    assert res.message.content and res.done and res.eval_count <= 8
    parts = list(client.chat(model=model, messages=[{"role": "user", "content": "Say hi."}], stream=True,
                             options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.message.content for p in parts) == res.message.content
    assert parts[-1].done_reason in ("stop", "length")
    gen = client.generate(model=model, prompt="The sky is", options={"temperature": 0, "num_predict": 6})
    assert gen.response and gen.done
    streamed = "".join(p.response for p in client.generate(model=model, prompt="The sky is", stream=True,
                                                           options={"temperature": 0, "num_predict": 6}))
    assert streamed == gen.response
    assert [m.model for m in client.list().models] == [model]
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 404


def test_missing_or_wrong_api_key_is_401(real_server):
    r = httpx.post(real_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(real_server.url + "/api/tags", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert httpx.get(real_server.url + "/health").status_code == 200
    assert httpx.get(real_server.url + "/metrics").status_code == 200


def test_health_stays_fast_while_streams_generate(real_server, model):
    stop = threading.Event()

    def stream():
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", real_server.url + "/v1/completions", json=body, headers=real_server.headers,
                          timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    threads = [threading.Thread(target=stream) for _ in range(32)]
    for t in threads:
        t.start()
    try:
        rillet_proc.poll_until(lambda: metric(real_server.metrics(), "rillet:num_requests_running") >= 16, 60,
                               "streams to run")
        worst = 0.0
        for _ in range(10):
            t0 = time.perf_counter()
            assert httpx.get(real_server.url + "/health", timeout=10).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.5, worst
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def test_disconnect_aborts_the_request(real_server, model):
    before = real_server.abort_count()
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", real_server.url + "/v1/chat/completions", json=body, headers=real_server.headers,
                      timeout=120) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 4:
                break  # leaving the block closes the connection mid-stream
    real_server.wait_abort_count_above(before)
    rillet_proc.poll_until(lambda: metric(real_server.metrics(), "rillet:num_requests_running") == 0, 30,
                           "the engine to drop the aborted request")


# ---- dedicated processes: overload (429) and SIGTERM drain


def test_overload_is_429_with_retry_after_and_queue_timeout_503():
    server = rillet_proc.RilletServer("--max-num-seqs", "1", "--max-waiting", "1", "--queue-timeout-s", "0.5",
                                      api_key=None)
    try:
        server.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True}
                # The running request must outlast the 0.5 s queue timeout by far (at ~6 ms a
                # token, 100 tokens did not always).
                first = asyncio.create_task(client.post("/v1/completions", json={**body, "max_tokens": 1000}))
                await asyncio.to_thread(rillet_proc.poll_until, lambda: metric(
                    server.metrics(), "rillet:num_requests_running") == 1, 60, "the first request to run")
                rest = await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(5)])
                return [await first, *rest]

        t0 = time.perf_counter()
        responses = asyncio.run(main())
        statuses = [r.status_code for r in responses]
        # one runs, one waits and times out after 0.5 s (a clear 503), the rest are refused at once
        assert statuses[0] == 200 and statuses.count(429) >= 3 and statuses.count(503) >= 1, statuses
        assert set(statuses) <= {200, 429, 503}
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
            if r.status_code == 503:
                assert "waited more than" in r.json()["error"]["message"]
        assert 'rillet:request_rejected_total{reason="queue_full"}' in server.metrics()
        assert time.perf_counter() - t0 < 120
    finally:
        server.stop()


DRAIN_S = 6.0


@pytest.fixture(scope="module")
def f32_server():
    """float32, so greedy answers do not depend on the batch they were computed in (bfloat16 rounding
    can flip a near-tie between two tokens when the batch changes). test_sigterm_drains_then_exits_0,
    the last test of this file, ends this process."""
    server = rillet_proc.RilletServer("--dtype", "float32", "--drain-timeout-s", str(DRAIN_S), api_key=None)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_16_concurrent_greedy_streams_match_their_non_streaming_answers(real_server):
    """The default server (bfloat16 here, prefix caching on): each answer alone first, then all 16
    streaming at once, their prompts now partly cached. Token for token the same (see the
    README's "Batch invariance")."""
    async def main():
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        (card,) = (await client.models.list()).data

        async def full(prompt):
            res = await client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=20, temperature=0)
            return res.choices[0].message.content

        async def streamed(prompt):
            stream = await client.chat.completions.create(
                model=card.id, messages=[{"role": "user", "content": prompt}], max_tokens=20, temperature=0,
                stream=True)
            deltas = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
            return "".join(deltas), len(deltas)

        answers = [await full(p) for p in PROMPTS]  # each alone
        streams = await asyncio.gather(*[streamed(p) for p in PROMPTS])  # all at once
        again = await client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                     max_tokens=20, temperature=0)
        await client.close()
        assert again.choices[0].message.content == answers[0]
        assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
        return answers, streams

    answers, streams = asyncio.run(main())
    for prompt, answer, (text, num_deltas) in zip(PROMPTS, answers, streams):
        assert text == answer, prompt
        assert num_deltas > 1
    metrics = httpx.get(real_server.url + "/metrics").text
    assert 0 < metric(metrics, "rillet:prefix_cache_hits_total") < metric(metrics, "rillet:prefix_cache_queries_total")


def test_sigterm_drains_then_exits_0(f32_server):
    drain_s = DRAIN_S
    server = f32_server
    try:
        results: dict[str, list] = {"short": [], "long": []}
        started = {k: threading.Event() for k in results}

        def stream(kind: str, max_tokens: int):
            body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        results[kind].append(data if data == "[DONE]" else json.loads(data))
                        started[kind].set()

        threads = [threading.Thread(target=stream, args=("short", 8)),
                   threading.Thread(target=stream, args=("long", 1500))]
        for t in threads:
            t.start()
        for e in started.values():
            assert e.wait(60)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=drain_s + 30)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(10)
        assert code == 0, server.log_tail()
        assert elapsed < drain_s + 15, elapsed
        short, long = results["short"], results["long"]
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        assert "shutting down" in long[-1]["error"]["message"], long[-3:]
    finally:
        server.stop()
