"""The prefix-affinity policy and the tunnel, without Ray."""

import asyncio
import random

import pytest

from rillet.deploy.routing import PrefixAffinityPolicy, prefix_block_hashes, routing_text
from rillet.deploy.tunnel import ResponseStart, TunnelRequest, error_event, is_stream, merge_metrics, run_asgi

SYSTEM = "You are a careful assistant who answers in one short paragraph. " * 6  # ~390 chars: 3 blocks


def test_block_hashes_chain_and_drop_the_partial_block():
    a = prefix_block_hashes("x" * 300, block_chars=128)
    assert len(a) == 2
    assert prefix_block_hashes("x" * 256 + "yyy", block_chars=128) == a
    b = prefix_block_hashes("y" + "x" * 299, block_chars=128)
    assert a[0] != b[0] and a[1] != b[1]  # a different first block changes every later hash


def test_routing_text_covers_openai_and_ollama_bodies():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert routing_text("/v1/chat/completions", chat) == "<system>S\n<user>U\n"
    assert routing_text("/v1/completions", {"prompt": ["P", "Q"]}) == "P"
    assert routing_text("/api/generate", {"system": "S", "prompt": "P"}) == "<system>S\nP"
    assert routing_text("/api/embed", {"input": "x"}) == ""


def test_same_prefix_goes_to_its_holder():
    policy = PrefixAffinityPolicy(seed=1)
    replicas = ["a", "b", "c", "d"]
    idle = dict.fromkeys(replicas, 0)
    first = policy.hashes(SYSTEM + "question one")
    chosen = policy.pick(first, replicas, idle)
    policy.record(first, chosen)
    for i in range(20):
        hashes = policy.hashes(SYSTEM + f"another question {i}")
        assert policy.pick(hashes, replicas, idle) == chosen
    assert policy.num_affine == 20


def test_multi_turn_chat_follows_its_longest_prefix():
    policy = PrefixAffinityPolicy(seed=2, block_chars=16)
    turns = "".join(f"<user>turn {i} with some words\n<assistant>reply {i}\n" for i in range(6))
    policy.record(policy.hashes(turns[:100]), "a")
    policy.record(policy.hashes(turns[:40]), "b")  # b holds only the start
    assert policy.pick(policy.hashes(turns), ["a", "b", "c"], {"a": 0, "b": 0, "c": 0}) == "a"


def test_a_swamped_holder_is_passed_over_for_power_of_two():
    policy = PrefixAffinityPolicy(seed=3, imbalance_threshold=4)
    hashes = policy.hashes(SYSTEM)
    policy.record(hashes, "a")
    queues = {"a": 9, "b": 1, "c": 2}
    ranks = policy.rank(hashes, list(queues), queues)
    assert len(ranks) == 1 and ranks[0][0] != "a"  # power of two only, the shorter queue first
    assert policy.pick(hashes, list(queues), queues) in ("b", "c")
    queues["a"] = 5  # within the threshold of the least loaded: affinity wins again
    assert policy.pick(hashes, list(queues), queues) == "a"


def test_power_of_two_spreads_unrelated_prompts():
    policy = PrefixAffinityPolicy(seed=4)
    replicas = [f"r{i}" for i in range(8)]
    queues = dict.fromkeys(replicas, 0)
    rng = random.Random(0)
    for _ in range(400):
        hashes = policy.hashes("".join(rng.choice("abcdef") for _ in range(300)))
        chosen = policy.pick(hashes, replicas, queues)
        queues[chosen] += 1
    assert max(queues.values()) - min(queues.values()) <= 2  # least loaded of two, every time


def test_dead_replicas_are_forgotten():
    policy = PrefixAffinityPolicy(seed=5)
    hashes = policy.hashes(SYSTEM)
    policy.record(hashes, "a")
    policy.remove_replica("a")
    assert policy.match(hashes, ["a", "b"]) == (0, [])
    policy.record(hashes, "b")
    policy.record(hashes, "c")
    policy.retain(["c"])
    assert policy.match(hashes, ["b", "c"]) == (len(hashes), ["c"])
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(block_chars=0)


def test_table_is_bounded():
    policy = PrefixAffinityPolicy(block_chars=4, max_entries=10)
    for i in range(50):
        policy.record(policy.hashes(f"{i:04d}" * 3), "a")
    assert len(policy) == 10


# ------------------------------------------------------------------ tunnel


def _app(chunks: int, started: list, ended: list):
    async def app(scope, receive, send):
        assert (await receive())["body"] == b"hi"
        started.append(scope["path"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        try:
            for i in range(chunks):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            ended.append("done")
    return app


def test_run_asgi_streams_start_then_chunks():
    async def main():
        started, ended = [], []
        items = [item async for item in run_asgi(_app(3, started, ended), TunnelRequest("POST", "/v1/x", body=b"hi"),
                                                 "r1")]
        assert isinstance(items[0], ResponseStart) and items[0].status == 200 and items[0].replica == "r1"
        assert is_stream(items[0])
        assert items[1:] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"] and ended == ["done"]
    asyncio.run(main())


def test_run_asgi_batches_the_chunks_of_each_interval():
    async def main():
        started, ended = [], []
        loop = asyncio.get_running_loop()
        stamped = []
        async for item in run_asgi(_app(12, started, ended), TunnelRequest("POST", "/v1/x", body=b"hi"),
                                   interval_s=0.05):
            stamped.append((loop.time(), item))
        items = [item for _, item in stamped]
        assert isinstance(items[0], ResponseStart)
        body = items[1:]
        assert body[0] == b"data: 0\n\n"  # the first chunk is not held back
        assert b"".join(body) == b"".join(f"data: {i}\n\n".encode() for i in range(12))  # nothing lost, in order
        assert 2 <= len(body) < 12  # 12 chunks 10 ms apart: batched, several per item
        gaps = [b[0] - a[0] for a, b in zip(stamped[1:], stamped[2:-1])]
        assert all(gap >= 0.045 for gap in gaps), gaps  # at most one item per interval (the last flushes at once)
        assert ended == ["done"]
    asyncio.run(main())


def test_closing_the_tunnel_disconnects_the_app():
    async def main():
        seen_disconnect = asyncio.Event()

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            assert (await receive())["type"] == "http.disconnect"  # like StreamingBody's watcher
            seen_disconnect.set()

        gen = run_asgi(app, TunnelRequest("POST", "/", body=b"hi"))
        assert isinstance(await gen.__anext__(), ResponseStart)
        assert await gen.__anext__() == b"x"
        await gen.aclose()
        assert seen_disconnect.is_set()
    asyncio.run(main())


def test_error_event_matches_the_stream_framing():
    sse = ResponseStart(200, [(b"content-type", b"text/event-stream; charset=utf-8")])
    ndjson = ResponseStart(200, [(b"content-type", b"application/x-ndjson")])
    assert error_event(sse, "gone").startswith(b'data: {"error": {"message": "gone"')
    assert error_event(sse, "gone").endswith(b"\n\n")
    assert error_event(ndjson, "gone") == b'{"error": "gone"}\n'


def test_merged_metrics_label_each_replica_and_keep_families_together():
    text = ("# HELP rillet:x X.\n# TYPE rillet:x counter\nrillet:x_total 3.0\n"
            "# HELP rillet:y Y.\n# TYPE rillet:y gauge\nrillet:y{kind=\"a\"} 1.0\n")
    merged = merge_metrics({"r1": text, "r2": text.replace("3.0", "4.0")})
    lines = merged.splitlines()
    assert lines.count("# TYPE rillet:x counter") == 1
    assert lines[2:4] == ['rillet:x_total{replica="r1"} 3.0', 'rillet:x_total{replica="r2"} 4.0']
    assert 'rillet:y{replica="r2",kind="a"} 1.0' in lines
