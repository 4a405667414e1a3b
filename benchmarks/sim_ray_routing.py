"""Scale simulation of rillet's Ray Serve routing: 16-64 fake engine replicas, no model.

The router is the real one: `rillet.deploy.ray.PrefixAffinityRouter` (Ray Serve's
RequestRouter subclass, fed fake RunningReplica objects whose queue lengths the simulation
sets) when Ray is installed, else the plain `PrefixAffinityPolicy` it wraps. Each request's
routing text comes from its JSON body through `routing_text`, as in the ingress.

Each fake replica has a real prefix cache model: an LRU of 16-token KV blocks named by
chained hashes (as the engine's block manager names them), `cache_blocks` of them; a prompt
hits on its longest run of leading blocks present. Time is simulated: `slots` requests run at
once per replica, a prompt costs `prefill_ms` per uncached token, every output token
`decode_ms`. TTFT = wait for a slot + uncached prefill + one decode step.

Workload (skewed, multi-turn): conversations pick one of `system_prompts` system prompts by a
Zipf law (s=1.1); each has 1-8 turns; a turn's prompt is the system prompt, every earlier turn
and its answer, and a new question; the next turn comes a think time after the answer ends.

Policies: cache-aware (the rillet router), power-of-two (Ray Serve's default), random,
round-robin. Writes benchmarks/results/sim_ray_routing.json (CPU and commit named) and
docs/sim_ray_routing.png.

    .venv/bin/python -m benchmarks.sim_ray_routing [--replicas 16 32 64] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from rillet.bench.machine import machine_info
from rillet.deploy.routing import PrefixAffinityPolicy, routing_text

ROOT = Path(__file__).resolve().parent.parent
CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16
WORDS = ("river stone light water field cloud story number market garden engine reason window "
         "history paper music winter signal harbor forest").split()


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    total = 0
    while total < chars:
        words.append(rng.choice(WORDS))
        total += len(words[-1]) + 1
    return " ".join(words)[:chars]


# ------------------------------------------------------------------ fake replicas


class FakeReplica:
    """Prefix cache (LRU of chained block hashes) + slots; also a RunningReplica for Ray's router."""

    def __init__(self, index: int, cache_blocks: int, slots: int, replica_id: object = None):
        self.index = index
        self.replica_id = replica_id if replica_id is not None else f"r{index}"
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.cache_blocks = cache_blocks
        self.slots = slots
        self.running = 0
        self.waiting: list[Request] = []
        # what Ray's router reads off a RunningReplica
        self.max_ongoing_requests = 4 * slots
        self.node_id = ""
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.routing_stats: dict[str, object] = {}

    @property
    def queue_len(self) -> int:
        return self.running + len(self.waiting)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    @staticmethod
    def block_hashes(text: str) -> list[int]:
        chars = BLOCK_TOKENS * CHARS_PER_TOKEN
        hashes, previous = [], 0
        for start in range(0, len(text) // chars * chars, chars):
            previous = hash((previous, text[start:start + chars]))
            hashes.append(previous)
        return hashes

    def cached_blocks(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        return n

    def insert(self, hashes: list[int]) -> None:
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)


@dataclass
class Request:
    conversation: int
    turn: int
    body: dict
    text: str
    output_tokens: int
    arrival: float
    ttft: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Conversation:
    system: str
    turns_left: int
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------ routers


class Router:
    name = ""

    def choose(self, request: Request, replicas: list[FakeReplica]) -> FakeReplica:
        raise NotImplementedError


class RandomRouter(Router):
    name = "random"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choose(self, request, replicas):
        return self.rng.choice(replicas)


class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self) -> None:
        self.counter = itertools.count()

    def choose(self, request, replicas):
        return replicas[next(self.counter) % len(replicas)]


def _first_with_room(ranks: list[list[FakeReplica]], replicas: list[FakeReplica]) -> FakeReplica:
    """Ray's step after choose_replicas: the shortest queue with room in the first rank that has one."""
    for rank in ranks:
        room = [r for r in rank if r.queue_len < r.max_ongoing_requests]
        if room:
            return min(room, key=lambda r: r.queue_len)
    return min(replicas, key=lambda r: r.queue_len)  # all full: Ray would back off and retry


class PowerOfTwoRouter(Router):
    name = "power-of-two"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choose(self, request, replicas):
        return _first_with_room([self.rng.sample(replicas, 2)], replicas)


class PolicyRouter(Router):
    """The plain policy (when Ray is not installed)."""

    name = "cache-aware"

    def __init__(self, seed: int):
        self.policy = PrefixAffinityPolicy(seed=seed)

    def choose(self, request, replicas):
        text = routing_text("/v1/chat/completions", request.body)
        hashes = self.policy.hashes(text)
        by_id = {r.replica_id: r for r in replicas}
        ranks = self.policy.rank(hashes, list(by_id), {r.replica_id: r.queue_len for r in replicas})
        chosen = _first_with_room([[by_id[i] for i in rank] for rank in ranks], replicas)
        self.policy.record(hashes, chosen.replica_id)
        return chosen


class RayRouter(Router):
    """rillet.deploy.ray.PrefixAffinityRouter itself, in Ray Serve's RequestRouter machinery."""

    name = "cache-aware"

    def __init__(self, seed: int, replicas: list[FakeReplica], deployment_id: object):
        from ray.serve._private.common import DeploymentHandleSource

        from rillet.deploy.ray import PrefixAffinityRouter

        random.seed(seed)
        self.router = PrefixAffinityRouter(deployment_id=deployment_id, handle_source=DeploymentHandleSource.UNKNOWN,
                                           use_replica_queue_len_cache=True)
        self.router.initialize_state()
        self.router.policy = PrefixAffinityPolicy(seed=seed)
        self.loop = asyncio.new_event_loop()

        async def attach() -> None:  # Ray's router binds to the running loop
            self.router.update_replicas(replicas)
        self.loop.run_until_complete(attach())

    def choose(self, request, replicas):
        from ray.serve._private.common import RequestMetadata
        from ray.serve.request_router import PendingRequest

        from rillet.deploy.tunnel import TunnelRequest

        cache = self.router.replica_queue_len_cache
        for r in replicas:
            cache.update(r.replica_id, r.queue_len)
        body = json.dumps(request.body).encode()
        tunnel = TunnelRequest("POST", "/v1/chat/completions", body=body,
                               prompt=routing_text("/v1/chat/completions", json.loads(body)))
        pending = PendingRequest(args=[tunnel], kwargs={}, metadata=RequestMetadata("r", "r"))
        ranks = self.loop.run_until_complete(self.router.choose_replicas(replicas, pending))
        chosen = _first_with_room(ranks, replicas)
        self.router.on_request_routed(pending, chosen.replica_id, None)
        return chosen


# ------------------------------------------------------------------ simulation


@dataclass
class Params:
    replicas: int
    requests: int = 20000
    system_prompts_per_replica: int = 4
    system_chars: tuple[int, int] = (400, 1600)
    question_chars: tuple[int, int] = (100, 600)
    output_tokens: tuple[int, int] = (32, 160)
    max_turns: int = 10
    think_s: float = 3.0
    cache_blocks: int = 1500  # 24k tokens of KV per replica
    slots: int = 8
    prefill_ms: float = 0.5  # per uncached prompt token
    decode_ms: float = 15.0  # per output token (fixed, whatever the batch)
    load: float = 0.75  # offered load as a fraction of the fleet's decode capacity
    seed: int = 0


def simulate(params: Params, policy: str) -> dict:
    rng = random.Random(params.seed)  # the same workload for every policy
    deployment_id = None
    if policy == "cache-aware":
        try:
            from ray.serve._private.common import DeploymentID, ReplicaID

            deployment_id = DeploymentID(name="RilletEngine", app_name="sim")
        except ImportError:
            pass
    replicas = [FakeReplica(i, params.cache_blocks, params.slots,
                            ReplicaID(unique_id=f"r{i}", deployment_id=deployment_id) if deployment_id else None)
                for i in range(params.replicas)]
    router: Router
    if policy == "cache-aware":
        router = RayRouter(params.seed, replicas, deployment_id) if deployment_id else PolicyRouter(params.seed)
    elif policy == "power-of-two":
        router = PowerOfTwoRouter(params.seed)
    elif policy == "random":
        router = RandomRouter(params.seed)
    else:
        router = RoundRobinRouter()

    n_system = params.replicas * params.system_prompts_per_replica
    systems = [_text(random.Random(1000 + i), rng.randint(*params.system_chars)) for i in range(n_system)]
    zipf = [1 / (k + 1) ** 1.1 for k in range(n_system)]
    mean_out = sum(params.output_tokens) / 2
    per_request_s = mean_out * params.decode_ms / 1000
    rate = params.load * params.replicas * params.slots / per_request_s / ((1 + params.max_turns) / 2)  # per conversation

    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    conversations: dict[int, Conversation] = {}
    done: list[Request] = []
    overhead_s: list[float] = []
    issued = 0

    def new_turn(cid: int, now: float) -> None:
        nonlocal issued
        conv = conversations[cid]
        question = _text(rng, rng.randint(*params.question_chars))
        messages = [{"role": "system", "content": conv.system}, *conv.history, {"role": "user", "content": question}]
        body = {"model": "sim", "messages": messages, "stream": True}
        text = routing_text("/v1/chat/completions", body)
        conv.history.append({"role": "user", "content": question})
        request = Request(cid, len(conv.history) // 2, body, text, rng.randint(*params.output_tokens), now)
        issued += 1
        heapq.heappush(events, (now, next(seq), "arrive", request))

    def start(replica: FakeReplica, request: Request, now: float) -> None:
        hashes = FakeReplica.block_hashes(request.text)
        request.prompt_tokens = len(request.text) // CHARS_PER_TOKEN
        request.cached_tokens = min(request.prompt_tokens, replica.cached_blocks(hashes) * BLOCK_TOKENS)
        prefill_s = (request.prompt_tokens - request.cached_tokens) * params.prefill_ms / 1000
        replica.insert(hashes)
        replica.running += 1
        request.ttft = now - request.arrival + prefill_s + params.decode_ms / 1000
        finish = now + prefill_s + request.output_tokens * params.decode_ms / 1000
        heapq.heappush(events, (finish, next(seq), "finish", (replica, request)))

    next_cid = 0
    now = 0.0
    heapq.heappush(events, (0.0, next(seq), "conversation", None))
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "conversation":
            if issued < params.requests:
                cid, next_cid = next_cid, next_cid + 1
                system = systems[rng.choices(range(n_system), zipf)[0]]
                conversations[cid] = Conversation(system, rng.randint(1, params.max_turns))
                new_turn(cid, now)
                heapq.heappush(events, (now + rng.expovariate(rate), next(seq), "conversation", None))
        elif kind == "arrive":
            request = payload
            t0 = time.perf_counter()
            replica = router.choose(request, replicas)
            overhead_s.append(time.perf_counter() - t0)
            if replica.running < replica.slots:
                start(replica, request, now)
            else:
                replica.waiting.append(request)
        elif kind == "finish":
            replica, request = payload
            replica.running -= 1
            answer = _text(rng, request.output_tokens * CHARS_PER_TOKEN)
            replica.insert(FakeReplica.block_hashes(request.text + f"<assistant>{answer}\n"))
            done.append(request)
            conv = conversations[request.conversation]
            conv.history.append({"role": "assistant", "content": answer})
            conv.turns_left -= 1
            if conv.turns_left > 0 and issued < params.requests:
                heapq.heappush(events, (now + rng.expovariate(1 / params.think_s), next(seq), "turn",
                                        request.conversation))
            if replica.waiting:
                start(replica, replica.waiting.pop(0), now)
        elif kind == "turn":
            if issued < params.requests:
                new_turn(payload, now)

    ttfts = sorted(r.ttft for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    overhead = sorted(overhead_s)
    return {
        "replicas": params.replicas, "policy": policy, "router": type(router).__name__,
        "requests": len(done), "simulated_s": round(now, 1),
        "prefix_hit_rate": round(sum(r.cached_tokens for r in done) / prompt, 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4), "ttft_p99_s": round(ttfts[int(0.99 * len(ttfts))], 4),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "router_overhead_p50_us": round(overhead[len(overhead) // 2] * 1e6, 1),
        "router_overhead_p99_us": round(overhead[int(0.99 * len(overhead))] * 1e6, 1),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in results):
        rows = [r for r in results if r["policy"] == policy]
        xs = [r["replicas"] for r in rows]
        axes[0].plot(xs, [r["prefix_hit_rate"] for r in rows], marker="o", label=policy)
        axes[1].plot(xs, [r["ttft_p99_s"] * 1000 for r in rows], marker="o", label=policy)
    axes[0].set(title="prefix cache hit rate (prompt tokens)", xlabel="replicas", ylim=(0, 1))
    axes[1].set(title="p99 TTFT (ms)", xlabel="replicas", yscale="log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["replicas"] for r in results}), [str(x) for x in sorted({r["replicas"] for r in results})])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Routing a skewed multi-turn workload over fake replicas (simulated time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--load", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sim_ray_routing.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/sim_ray_routing.png")
    args = parser.parse_args()
    results = []
    for n in args.replicas:
        for policy in ("cache-aware", "power-of-two", "random", "round-robin"):
            started = time.perf_counter()
            row = simulate(Params(replicas=n, requests=args.requests, load=args.load), policy)
            row["wall_s"] = round(time.perf_counter() - started, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"benchmark": "sim_ray_routing", "machine": machine_info(),
              "params": {k: v for k, v in vars(Params(replicas=0, requests=args.requests, load=args.load)).items()
                         if k != "replicas"},
              "command": "python benchmarks/sim_ray_routing.py " + " ".join(
                  f"--replicas {' '.join(map(str, args.replicas))} --requests {args.requests} --load {args.load}".split()),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
