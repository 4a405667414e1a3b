"""Slow readers: a client that stops reading its stream does not slow other streams, and the
server does not buffer for it without bound: once a send has been blocked for
--stream-stall-timeout-s (3 s here) the stream is ended and its engine request aborted."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from rillet.bench import reliability as rh

from support.reliability import STALL_TIMEOUT_S


def stalled_stream(server) -> socket.socket:
    """A raw client with a tiny receive buffer that reads the response head, then nothing more.
    logprobs=20 makes each event ~1.5 KB, so the socket and transport buffers fill in seconds."""
    host, port = rh.split_url(server.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect((host, port))
    body = json.dumps(rh.completion_body("The history of the world, chapter one:", 1500, ignore_eos=True,
                                         logprobs=20)).encode()
    sock.sendall(rh.request_bytes("POST", "/v1/completions", body, server.headers))
    head = sock.recv(256)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def good_stream(server) -> rh.StreamResult:
    res = asyncio.run(rh.http_request(server.url, rh.REFERENCE_PATH, rh.reference_body(24), headers=server.headers))
    assert res.status == 200 and res.done and res.finish_reason == "length" and res.error is None, res
    return res


def test_stalled_reader_is_cut_off_and_does_not_slow_others(main_server):
    server = main_server
    rh.wait_engine_idle(server.url, server.headers)
    baseline = [itl for _ in range(2) for itl in good_stream(server).itls]
    before = rh.engine_gauges(server.url, server.headers)
    rss_before = rh.rss_bytes(server.proc.pid)
    log_offset = len(server.log_path.read_bytes())

    sock = stalled_stream(server)
    t_stall = time.monotonic()
    try:
        during: list[float] = []
        peak_rss = rss_before
        deadline = t_stall + 90
        # well-behaved streams keep running while the stalled one fills its buffers and is cut off
        while True:
            during += good_stream(server).itls
            peak_rss = max(peak_rss, rh.rss_bytes(server.proc.pid))
            g = rh.engine_gauges(server.url, server.headers)
            if g["aborted"] > before["aborted"] and g["running"] == 0:
                break
            assert time.monotonic() < deadline, "the stalled stream was never ended"
        cut_after = time.monotonic() - t_stall
        log = server.log_path.read_bytes()[log_offset:].decode(errors="replace")
        assert "has not read its stream" in log, log[-3000:]
        # the engine slot is free while the client is still connected and still not reading
        rh.wait_engine_idle(server.url, server.headers, timeout_s=30)
    finally:
        sock.close()
    base_p50, during_p50 = rh.median(baseline), rh.median(during)
    print(f"stalled reader cut after {cut_after:.1f}s; ITL p50 alone {base_p50 * 1000:.1f} ms, beside the "
          f"stalled stream {during_p50 * 1000:.1f} ms (max {max(during) * 1000:.0f} ms); RSS "
          f"{rss_before / 2**20:.0f} -> peak {peak_rss / 2**20:.0f} MB")
    assert cut_after < STALL_TIMEOUT_S + 60
    # the stalled request still generates (with logprobs 20) beside them until it is cut: some cost,
    # but nothing like the seconds-long gaps of a blocked event loop (the CPU is shared: a margin)
    assert during_p50 < 3.0 * base_p50 + 0.05, (base_p50, during_p50)
    assert max(during) < 2.0, max(during)
    assert peak_rss - rss_before < 64 * 2**20, (rss_before, peak_rss)
