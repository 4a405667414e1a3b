"""Several engine requests answered as one: a /v1/completions request with a list of prompts.

Each prompt is its own engine request (scheduled, cached and batched like any other); the
answer numbers their choices one after another, prompt i's choice j as i * n + j (the order
OpenAI and vLLM use), streams their outputs as they come, and sums their usage. `HandleGroup`
has what the serving code uses of a `RequestHandle`, so one answer's code serves both.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque

from rillet.engine.outputs import RequestOutput
from rillet.protocol import openai as oa
from rillet.server.serving import RequestHandle, usage_of

__all__ = ["HandleGroup"]


class HandleGroup:
    def __init__(self, handles: list[RequestHandle]) -> None:
        assert handles
        self.handles = handles
        self.request_id = handles[0].request_id  # the answer's id, as the first request's
        self.n = sum(h.n for h in handles)
        self._first_index = [sum(h.n for h in handles[:i]) for i in range(len(handles))]
        self._next: dict[asyncio.Task[RequestOutput], int] = {}  # each live request's awaited output
        self._ready: deque[RequestOutput] = deque()
        self._live = set(range(len(handles)))

    def __aiter__(self) -> HandleGroup:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._ready:
            for i in self._live - set(self._next.values()):
                self._next[asyncio.ensure_future(self.handles[i].__anext__())] = i
            if not self._next:
                raise StopAsyncIteration
            done, _ = await asyncio.wait(self._next, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._next.__getitem__):  # in prompt order when several are in
                i = self._next.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    self._live.discard(i)
                    continue
                if self._first_index[i]:
                    out = dataclasses.replace(out, index=self._first_index[i] + out.index)
                self._ready.append(out)
        return self._ready.popleft()

    def usage(self) -> oa.Usage:
        handles = self.handles
        return usage_of(sum(h.num_prompt_tokens for h in handles), sum(h.num_generated_tokens for h in handles),
                        sum(h.num_cached_tokens for h in handles))

    async def aclose(self) -> None:
        """Idempotent: every request not finished is aborted, and each records its outcome."""
        pending, self._next = list(self._next), {}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for handle in self.handles:
            await handle.aclose()
