"""rillet on Ray Serve: N engine replicas behind Ray's HTTP proxy, routed by prefix cache.

Two deployments, as Ray's own LLM serving has (an OpenAI ingress over LLM server replicas):

  proxy ─► RilletIngress (FastAPI, no engine) ─handle─► RilletEngine × N (AsyncEngine + create_app)
                             ▲ PrefixAffinityRouter picks the replica (in the ingress process)

- The ingress reads each request, derives its routing text (chat messages / prompt), and
  forwards it whole (`TunnelRequest`) through a streaming deployment handle. The replica
  runs it through the same `create_app` app as `rillet serve`, so routes, errors and
  framing are identical; chunks stream back as the engine makes them, those of each
  `stream_interval_ms` (50) sent through Ray as one item (a token per item costs the hops more
  CPU than the engine spends making it).
- `PrefixAffinityRouter` is a Ray Serve `RequestRouter`: the replica holding the longest
  matched prompt prefix when its queue is within a threshold of the least loaded, else power
  of two choices by queue length (Ray probes the queues of each rank and takes the shortest).
- A replica that dies mid-stream: the ingress ends that stream with a terminal error event in
  its framing; a request whose replica died before answering is sent again (it had not
  started). Ray's controller restarts the replica; the router drops it meanwhile.
- The client disconnecting cancels the ingress's relay, which cancels the handle's
  generator; the replica's app gets `http.disconnect` and aborts the engine request.
- /health and /metrics fan out to every replica (by id, through the same router), the
  metrics labelled `replica="<id>"`.

Start it with `serve run rillet.deploy.ray:app num_replicas=2 model=...`, with
`rillet serve --ray --replicas N`, or `serve deploy docs/ray/serve_config.yaml`.
"""

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.responses import JSONResponse, Response, StreamingResponse

from rillet.config import EngineConfig, ServerConfig
from rillet.deploy.routing import PrefixAffinityPolicy, routing_text
from rillet.deploy.tunnel import ResponseStart, TunnelRequest, error_event, is_stream, merge_metrics, run_asgi

__all__ = ["PrefixAffinityRouter", "RilletEngine", "RilletIngress", "app", "build_app", "connect", "serve_forever"]

logger = logging.getLogger("rillet.deploy")

REPLICA_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
MAX_RESENDS = 3  # a request whose replica died before answering is sent again, this many times
FANOUT_TIMEOUT_S = 3.0  # /health and /metrics: how long one replica may take
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"date", b"server"}


def _routing_module() -> Any:
    """rillet.deploy.routing from sys.modules: its LIVE_REPLICAS and ROUTING_SECONDS are shared
    by the router and the ingress in one process. Not this module's globals: Serve ships both
    classes by value, each with its own copy of them."""
    return importlib.import_module("rillet.deploy.routing")


def _live_replicas() -> dict[str, list[str]]:
    """App name -> live replica ids, kept by the router, read by /health and /metrics."""
    return _routing_module().LIVE_REPLICAS


def _router_metrics() -> str:
    samples = sorted(_routing_module().ROUTING_SECONDS)
    lines = ["# HELP rillet:router_choose_seconds Time the prefix-affinity router took per routing decision "
             "(ingress process, last 10000).", "# TYPE rillet:router_choose_seconds summary"]
    for q in (0.5, 0.99):
        if samples:
            lines.append(f'rillet:router_choose_seconds{{quantile="{q}"}} {samples[int(q * (len(samples) - 1))]:.9f}')
    lines.append(f"rillet:router_choose_seconds_count {len(samples)}")
    return "\n".join(lines) + "\n"


def _tunnel_request(pending: PendingRequest | None) -> TunnelRequest | None:
    if pending is None:
        return None
    for arg in pending.args:
        if isinstance(arg, TunnelRequest):
            return arg
    return None


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router over `PrefixAffinityPolicy` (the policy holds all the logic).

    Not FIFO: each routing task serves the request it was started for, so the prefix it was
    chosen by is the prefix that is sent."""

    policy = PrefixAffinityPolicy()  # replaced per router by initialize_state

    def initialize_state(self, block_chars: int = 128, imbalance_threshold: int = 4, **kwargs: Any) -> None:
        self.policy = PrefixAffinityPolicy(block_chars=block_chars, imbalance_threshold=imbalance_threshold,
                                           **kwargs)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        started = time.perf_counter()
        request = _tunnel_request(pending_request)
        if pending_request is not None:  # no locality ranks here: back off between full rounds
            pending_request.routing_context.should_backoff = True
        if request is not None and request.target_replica is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == request.target_replica]]
        by_id = {r.replica_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queue_lens = {rid: cache.get(rid) for rid in by_id}
        hashes = self.policy.hashes(request.prompt) if request is not None else []
        ranks = [[by_id[rid] for rid in rank] for rank in self.policy.rank(hashes, list(by_id), queue_lens)]
        _routing_module().ROUTING_SECONDS.append(time.perf_counter() - started)
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = _tunnel_request(pending_request)
        if request is not None and request.target_replica is None and request.prompt:
            self.policy.record(self.policy.hashes(request.prompt), replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.remove_replica(replica_id)
        ids = _live_replicas().get(self.app_name, [])
        _live_replicas()[self.app_name] = [i for i in ids if i != replica_id.unique_id]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.retain(r.replica_id for r in replicas)
        _live_replicas()[self.app_name] = sorted(r.replica_id.unique_id for r in replicas)


# ------------------------------------------------------------------ the engine replica


class RilletEngine:
    """One AsyncEngine (its thread count fitted to the replica's CPUs) and its rillet app."""

    async def __init__(self, engine_options: dict[str, Any], server_options: dict[str, Any],
                       stream_interval_ms: float = 0.0):
        from rillet.engine.async_engine import AsyncEngine
        from rillet.server.app import create_app

        self.replica_id = serve.get_replica_context().replica_tag
        self.stream_interval_s = stream_interval_ms / 1000
        self.engine = AsyncEngine(EngineConfig(**engine_options))
        await self.engine.start()
        self.app = create_app(ServerConfig(**server_options), engine=self.engine)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        logger.info("replica %s ready: %s", self.replica_id, self.engine.model_name)

    async def handle(self, request: TunnelRequest) -> AsyncIterator[ResponseStart | bytes]:
        async for item in run_asgi(self.app, request, self.replica_id, self.stream_interval_s):
            yield item

    async def check_health(self) -> None:
        """Ray restarts a replica whose engine loop died."""
        if self.engine.health == "dead":
            raise RuntimeError(f"the engine died: {getattr(self.engine, 'dead_reason', None)}")

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting}

    async def __del__(self) -> None:
        try:
            await self._lifespan.__aexit__(None, None, None)
        except Exception:  # noqa: BLE001 (shutting down anyway)
            logger.exception("replica shutdown failed")


# ------------------------------------------------------------------ the ingress

ingress_app = FastAPI(title="rillet on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status, headers={"Retry-After": "1"})


def _headers(start: ResponseStart) -> dict[str, str]:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k.lower() not in _HOP_HEADERS}
    headers["x-rillet-replica"] = start.replica  # which engine replica answered
    return headers


@serve.ingress(ingress_app)
class RilletIngress:
    """Forwards every route to an engine replica; /health and /metrics cover them all."""

    def __init__(self, engine: DeploymentHandle):
        self.engine = engine.options(stream=True)
        self.app_name = serve.get_replica_context().app_name

    async def _open(self, request: TunnelRequest) -> tuple[DeploymentResponseGenerator, ResponseStart]:
        """Send to a replica and wait for its response start; resend if the replica died first."""
        for attempt in range(MAX_RESENDS + 1):
            gen = self.engine.handle.remote(request)
            try:
                return gen, await gen.__anext__()
            except REPLICA_ERRORS:
                gen.cancel()
                if attempt == MAX_RESENDS:
                    raise
                logger.warning("replica died before answering; resending (%d)", attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _collect(self, request: TunnelRequest, opened: tuple[DeploymentResponseGenerator, ResponseStart]
                       | None = None) -> tuple[ResponseStart, bytes]:
        """A whole (non-stream) response; nothing has reached the client yet, so resend on a death."""
        for attempt in range(MAX_RESENDS + 1):
            gen, start = opened or await self._open(request)
            opened = None
            try:
                return start, b"".join([chunk async for chunk in gen])  # type: ignore[misc]
            except REPLICA_ERRORS:
                if attempt == MAX_RESENDS:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _relay(gen: DeploymentResponseGenerator, start: ResponseStart) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in gen:
                yield chunk
            finished = True
        except (*REPLICA_ERRORS, ray.exceptions.RayError) as exc:
            logger.warning("replica %s failed mid-stream: %s", start.replica, type(exc).__name__)
            finished = True
            yield error_event(start, f"the replica serving this request failed ({type(exc).__name__}); "
                                     "retry the request")
        finally:
            if not finished:  # the client went away: abort the request on its replica
                gen.cancel()

    async def _fanout(self, path: str) -> dict[str, tuple[int, bytes] | None]:
        ids = _live_replicas().get(self.app_name)
        if not ids:  # the router has not started in this process yet: one untargeted call starts it
            await self._call(TunnelRequest("GET", path))
            for _ in range(20):
                if _live_replicas().get(self.app_name):
                    break
                await asyncio.sleep(0.1)
            ids = _live_replicas().get(self.app_name, [])
        # One at a time: Serve's router indexes pending requests by the internal id, which every
        # call made while serving one ingress request shares, so concurrent ones would collide.
        return {i: await self._call(TunnelRequest("GET", path, target_replica=i)) for i in ids}

    async def _call(self, request: TunnelRequest) -> tuple[int, bytes] | None:
        async def call() -> tuple[int, bytes]:
            start, content = await self._collect(request)
            return start.status, content
        try:
            return await asyncio.wait_for(call(), FANOUT_TIMEOUT_S)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return None

    @ingress_app.get("/health", include_in_schema=False)
    async def health(self) -> Response:
        replicas: dict[str, Any] = {}
        for rid, result in (await self._fanout("/health")).items():
            try:
                replicas[rid] = json.loads(result[1]) if result else {"status": "unreachable"}
            except ValueError:
                replicas[rid] = {"status": "unreachable"}
        ready = [r for r in replicas.values() if r.get("status") == "ready"]
        status = "ready" if replicas and len(ready) == len(replicas) else "degraded" if ready else "unavailable"
        body: dict[str, Any] = {"status": status, "replicas": replicas}
        if ready:
            body["model"] = ready[0].get("model")
        return JSONResponse(body, status_code=200 if ready else 503)

    @ingress_app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        texts = {rid: r[1].decode() for rid, r in (await self._fanout("/metrics")).items() if r and r[0] == 200}
        return Response(merge_metrics(texts) + _router_metrics(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"],
                           include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        text = ""
        if body and request.method == "POST":
            try:
                parsed = json.loads(body)
                text = routing_text(request.url.path, parsed) if isinstance(parsed, dict) else ""
            except (ValueError, UnicodeDecodeError):
                pass  # the replica answers the 400
        tunnel = TunnelRequest(request.method, request.url.path, request.url.query.encode(),
                               list(request.headers.raw), body,
                               (request.client.host, request.client.port) if request.client else None, text)
        try:
            gen, start = await self._open(tunnel)
            if is_stream(start):
                return StreamingResponse(self._relay(gen, start), status_code=start.status, headers=_headers(start))
            start, content = await self._collect(tunnel, (gen, start))
        except REPLICA_ERRORS as exc:
            return _error(503, f"no engine replica could serve the request ({type(exc).__name__})",
                          "replica_unavailable")
        return Response(content, status_code=start.status, headers=_headers(start))


# ------------------------------------------------------------------ application builder

STREAM_INTERVAL_MS = 50.0  # Ray Serve LLM's stream_batching_interval_ms default
DEPLOY_ARGS = {
    "num_replicas": "Engine replicas (without min/max_replicas: a fixed number).",
    "min_replicas": "Autoscaling: fewest engine replicas.",
    "max_replicas": "Autoscaling: most engine replicas.",
    "target_ongoing_requests": "Autoscaling: requests (running + queued) per replica to aim for.",
    "num_cpus": "CPUs per engine replica (default: the cores divided among the replicas); also its threads.",
    "num_gpus": "GPUs per engine replica (default 0).",
    "max_ongoing_requests": "Requests a replica takes at once before Ray queues them (default 2 x max_num_seqs).",
    "block_chars": "Routing: characters per prefix block hashed by the router.",
    "imbalance_threshold": "Routing: how many more queued requests the prefix holder may have than the "
                           "least loaded replica and still be chosen.",
    "stream_interval_ms": f"Streams: a replica sends the tokens of this many ms as one item through Ray "
                          f"(0: each as it comes; default {STREAM_INTERVAL_MS:g}, as Ray Serve LLM).",
}
OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store: streams pass small chunks only


def _coerce(field: dataclasses.Field[Any], value: Any) -> Any:
    if not isinstance(value, str):
        return value
    default = field.default if field.default is not dataclasses.MISSING else None
    kind = str(field.type)
    if value.lower() in ("none", "null", ""):
        return None
    if isinstance(default, bool) or kind.startswith("bool"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("list"):
        return [part.strip() for part in value.split(",") if part.strip()]
    for name, cast in (("int", int), ("float", float)):
        if kind.startswith(name):
            return cast(value)
    return value


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Ray Serve application; `args`: DEPLOY_ARGS and any EngineConfig / ServerConfig field
    (strings from `serve run ... key=value` are converted by the field's type)."""
    args = dict(args or {})
    deploy = {k: args.pop(k) for k in list(args) if k in DEPLOY_ARGS}
    fields = {f.name: (f, "engine") for f in dataclasses.fields(EngineConfig)}
    fields |= {f.name: (f, "server") for f in dataclasses.fields(ServerConfig)}
    options: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
    for key, value in args.items():
        if key not in fields:
            raise ValueError(f"unknown argument {key!r}: expected one of {', '.join([*DEPLOY_ARGS, *fields])}")
        field, which = fields[key]
        options[which][key] = _coerce(field, value)
    engine_options, server_options = options["engine"], options["server"]
    num_replicas = int(deploy.get("num_replicas", 1))
    num_cpus = float(deploy.get("num_cpus", max(1, (os.cpu_count() or 1) // max(1, num_replicas))))
    if engine_options.get("num_threads") is None:
        engine_options["num_threads"] = max(1, int(num_cpus))
    engine_options["engine_process"] = False  # the replica actor is the engine's process
    config = EngineConfig(**engine_options)  # a bad value fails here, not in every replica
    ServerConfig(**server_options)
    scaling: dict[str, Any] = {"num_replicas": num_replicas}
    if "min_replicas" in deploy or "max_replicas" in deploy:
        scaling = {"autoscaling_config": {
            "min_replicas": int(deploy.get("min_replicas", 1)),
            "initial_replicas": num_replicas,
            "max_replicas": int(deploy.get("max_replicas", max(num_replicas, int(deploy.get("min_replicas", 1))))),
            "target_ongoing_requests": float(deploy.get("target_ongoing_requests", config.max_num_seqs // 2)),
            "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}}
    router = RequestRouterConfig(
        request_router_class="rillet.deploy.ray.PrefixAffinityRouter",  # by path: one module, one registry
        request_router_kwargs={"block_chars": int(deploy.get("block_chars", 128)),
                               "imbalance_threshold": int(deploy.get("imbalance_threshold", 4))},
        request_routing_stats_period_s=2.0)
    engine = serve.deployment(
        RilletEngine, name="RilletEngine", **scaling,
        max_ongoing_requests=int(deploy.get("max_ongoing_requests", 2 * config.max_num_seqs)),
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": float(deploy.get("num_gpus", 0))},
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0,
        request_router_config=router)
    ingress = serve.deployment(RilletIngress, name="RilletIngress", num_replicas=1, max_ongoing_requests=2000,
                               ray_actor_options={"num_cpus": 0})
    interval_ms = float(deploy.get("stream_interval_ms", STREAM_INTERVAL_MS))
    if interval_ms < 0:
        raise ValueError(f"stream_interval_ms must be >= 0, got {interval_ms:g}")
    return ingress.bind(engine.bind(engine_options, server_options, interval_ms))


app = build_app  # `serve run rillet.deploy.ray:app num_replicas=2 model=...` calls it with the args


def connect(num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS, else a Ray cluster already running here, else start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
        return
    except ConnectionError:
        pass
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES)


def serve_forever(engine_config: EngineConfig, server_config: ServerConfig, replicas: int) -> int:
    """`rillet serve --ray --replicas N`: deploy on Ray Serve's proxy at --host/--port, until Ctrl-C."""
    connect()
    serve.start(http_options={"host": server_config.host, "port": server_config.port})
    args: dict[str, Any] = {"num_replicas": replicas}
    for config in (engine_config, server_config):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if value != field.default and field.name not in ("host", "port"):
                args[field.name] = value
    serve.run(build_app(args), name="rillet", route_prefix="/", blocking=False)
    print(f"rillet on Ray Serve: {replicas} engine replica(s) at http://{server_config.host}:{server_config.port}",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete("rillet")
    return 0
