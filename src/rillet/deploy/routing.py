"""Prefix-cache-aware replica choice, as a plain class (no Ray): testable and simulable alone.

A request's routing text (its system prompt, then each chat turn) is cut into fixed-size
character blocks, each hashed with the one before it (as vLLM hashes KV blocks: block i's
hash names the whole prefix up to it). The table remembers which replicas were sent which
block hashes, so the replica that already prefilled a prefix, and so holds it in its prefix
cache, is found by walking the new request's hashes until they stop matching.

Choice, per request (`rank`):
  1. the replicas holding the longest matched prefix, the least loaded first, if that one's
     queue is within `imbalance_threshold` of the least loaded replica's;
  2. else (and as the fallback rank) power of two choices: two random replicas, the shorter
     queue first.
Ray Serve's router takes the ranks in order and sends to the first replica in a rank whose
queue has room; `pick` does the same here for the simulation and the unit tests.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["PrefixAffinityPolicy", "prefix_block_hashes", "routing_text"]

# Ray's router, per app, fills these in its process (rillet.deploy.ray): the live replica ids,
# and the seconds each routing decision took (the ingress's /metrics reports their quantiles).
LIVE_REPLICAS: dict[str, list[str]] = {}
ROUTING_SECONDS: deque[float] = deque(maxlen=10_000)
DEFAULT_BLOCK_CHARS = 128
DEFAULT_MAX_BLOCKS = 64


def prefix_block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS,
                        max_blocks: int = DEFAULT_MAX_BLOCKS) -> list[int]:
    """Chained hashes of the text's full blocks (a partial last block is not a cacheable prefix)."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        previous = hash((previous, text[start:start + block_chars]))
        hashes.append(previous)
    return hashes


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def routing_text(path: str, body: Mapping[str, Any]) -> str:
    """The prompt text of an OpenAI or Ollama request body, in the order it reaches the model:
    the chat messages (role then content), or the system prompt then the prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(f"<{m.get('role', '')}>{_content_text(m.get('content'))}\n"
                       for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list):  # /v1/completions: a batch (or token ids): route on the first
        prompt = prompt[0] if prompt else ""
    text = _content_text(prompt) if not isinstance(prompt, list) else ",".join(map(str, prompt))
    system = body.get("system")
    return (f"<system>{system}\n" if isinstance(system, str) else "") + text


class PrefixAffinityPolicy:
    """Which replica holds which prefix, and how to rank replicas for a new request.

    Replica ids are any hashable (Ray's ReplicaID, or a string). `max_entries` bounds the
    table (least recently used block hashes go first): the replicas' own caches evict too,
    so an old entry is only a hint.
    """

    def __init__(self, *, block_chars: int = DEFAULT_BLOCK_CHARS, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 imbalance_threshold: int = 4, max_entries: int = 200_000, seed: int | None = None):
        if block_chars < 1 or max_blocks < 1 or imbalance_threshold < 0 or max_entries < 1:
            raise ValueError("block_chars, max_blocks and max_entries must be >= 1, imbalance_threshold >= 0")
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.imbalance_threshold = imbalance_threshold
        self.max_entries = max_entries
        self._owners: OrderedDict[int, set[Hashable]] = OrderedDict()
        self._random = random.Random(seed)
        self.num_routed = 0
        self.num_affine = 0  # requests whose first rank was a replica holding their prefix

    def hashes(self, text: str) -> list[int]:
        return prefix_block_hashes(text, self.block_chars, self.max_blocks)

    def match(self, hashes: Sequence[int], candidates: Iterable[Hashable]) -> tuple[int, list[Hashable]]:
        """(blocks matched, the candidates holding all of them) for the longest held prefix."""
        alive = set(candidates)
        matched, holders = 0, set[Hashable]()
        for h in hashes:
            owners = self._owners.get(h)
            if not owners:
                break
            common = owners & alive
            if not common:
                break
            matched, holders, alive = matched + 1, common, common
        return matched, list(holders)

    def rank(self, hashes: Sequence[int], candidates: Sequence[Hashable],
             queue_lens: Mapping[Hashable, int | None]) -> list[list[Hashable]]:
        """Ranks of candidates, most preferred first. Unknown queue lengths count as 0."""
        if not candidates:
            return []

        def qlen(r: Hashable) -> int:
            return queue_lens.get(r) or 0

        if len(candidates) == 1:
            pair = list(candidates)
        else:
            pair = sorted(self._random.sample(list(candidates), 2), key=qlen)
        self.num_routed += 1
        matched, holders = self.match(hashes, candidates)
        if matched:
            best = sorted(holders, key=qlen)
            least = min(qlen(r) for r in candidates)
            if qlen(best[0]) - least <= self.imbalance_threshold:
                self.num_affine += 1
                return [best, pair]
        return [pair]

    def pick(self, hashes: Sequence[int], candidates: Sequence[Hashable],
             queue_lens: Mapping[Hashable, int | None], capacity: int | None = None) -> Hashable | None:
        """The replica Ray would send to: the first in rank order with room (None: all full)."""
        for rank in self.rank(hashes, candidates, queue_lens):
            for replica in rank:
                if capacity is None or (queue_lens.get(replica) or 0) < capacity:
                    return replica
        return None

    def record(self, hashes: Sequence[int], replica: Hashable) -> None:
        """`replica` was sent this prompt: it will hold these blocks."""
        owners_by_hash = self._owners
        for h in hashes:
            owners = owners_by_hash.get(h)
            if owners is None:
                owners_by_hash[h] = {replica}
            else:
                owners.add(replica)
                owners_by_hash.move_to_end(h)
        while len(owners_by_hash) > self.max_entries:
            owners_by_hash.popitem(last=False)

    def remove_replica(self, replica: Hashable) -> None:
        """A replica died or was scaled down: its cache is gone."""
        for h in [h for h, owners in self._owners.items() if replica in owners]:
            owners = self._owners[h]
            owners.discard(replica)
            if not owners:
                del self._owners[h]

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forget every replica not in `replicas` (the live set after a change)."""
        live = set(replicas)
        gone = {r for owners in self._owners.values() for r in owners} - live
        for replica in gone:
            self.remove_replica(replica)

    def __len__(self) -> int:
        return len(self._owners)
