"""LoopPipe: a Connection's wire format read and written on the event loop, against a plain
multiprocessing Connection at the other end."""

from __future__ import annotations

import asyncio
import socket
import threading
from multiprocessing.connection import Connection

from rillet.engine.loop_pipe import READ_CHUNK, LoopPipe


def _pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def test_messages_both_ways_in_order_whatever_their_size():
    ours, theirs = _pair()
    big = bytes(range(256)) * (3 * READ_CHUNK // 256)  # several reads, and more than a socket buffer
    sent_to_us = [("small", i) for i in range(200)] + [big, {"after": "big"}]
    sent_to_them = [("cmd", i) for i in range(50)] + [big, "last"]

    async def main() -> tuple[list[object], list[object], list[str], int]:
        loop = asyncio.get_running_loop()
        got: list[object] = []
        closed: list[str] = []
        all_in, eof = asyncio.Event(), asyncio.Event()

        def on_message(obj: object) -> None:
            got.append(obj)
            if len(got) == len(sent_to_us):
                all_in.set()

        def on_closed() -> None:
            closed.append("eof")
            eof.set()

        pipe = LoopPipe(ours, loop, on_message, on_closed)
        for obj in sent_to_us[:3]:  # before reading starts: they wait in the socket
            theirs.send(obj)
        pipe.start()
        received: list[object] = []
        reader = threading.Thread(target=lambda: received.extend(theirs.recv() for _ in sent_to_them))
        reader.start()
        for obj in sent_to_them:  # the big one cannot go out at once: the rest follows as it drains
            pipe.send(obj)
        writer = threading.Thread(target=lambda: [theirs.send(obj) for obj in sent_to_us[3:]])
        writer.start()
        await asyncio.wait_for(all_in.wait(), 30)
        await asyncio.to_thread(reader.join, 30)
        await asyncio.to_thread(writer.join, 30)
        theirs.close()
        await asyncio.wait_for(eof.wait(), 30)
        return got, received, closed, len(got)

    got, received, closed, count = asyncio.run(main())
    assert got == sent_to_us
    assert received == sent_to_them
    assert closed == ["eof"] and count == len(sent_to_us)


def test_stop_ends_delivery_at_once_and_later_sends():
    ours, theirs = _pair()

    async def main() -> list[object]:
        got: list[object] = []
        pipe: LoopPipe

        def on_message(obj: object) -> None:
            got.append(obj)
            if obj == "final":
                pipe.stop()

        pipe = LoopPipe(ours, asyncio.get_running_loop(), on_message, lambda: got.append("closed"))
        for obj in ("a", "final", "never"):
            theirs.send(obj)
        pipe.start()  # reads what the socket holds at once: all three, delivered up to "final"
        pipe.send("ignored")  # stopped for good
        return list(got)

    assert asyncio.run(main()) == ["a", "final"]
    assert not theirs.poll(0)
