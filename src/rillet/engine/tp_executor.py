"""Tensor parallelism's processes: the driver's handle on its worker ranks, and the workers' loop.

    LLMEngine (rank 0: scheduler, sampler, its own shard) ──pipe──► worker rank 1..N-1 (a shard each)
                       └──────────── all-reduce / gather (parallel/group.py) ────────────┘

The scheduler runs once, on rank 0, as in vLLM. Rank 0's model mirrors each forward pass (its
token ids, positions and attention metadata) and each logits call to every worker over a pipe
before it runs its own (`CausalLM.forward`, `compute_logits`); the workers run the same calls on
their shards, so every rank meets the same collectives in the same order. The logits of the
vocabulary slices are gathered on rank 0, which samples.

Failure is all or nothing: a collective cannot go on without every rank. A worker that dies (or
raises: it then exits) makes `WorkerDiedError` (an EngineDeadError) the outcome of the step in
flight, and the watchdog reports it to the engine core at once, even while the core is idle or
blocked in a collective, so that streams end with an error event and /health turns 503. A
worker exits when rank 0's process goes away (its pipe closes; on Linux also by PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, cast

import torch

from rillet.engine.errors import EngineDeadError
from rillet.models.backend import Backend
from rillet.parallel import shm_allreduce
from rillet.parallel.shard import Shard

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel worker is gone; the engine cannot run another step."""


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to load its shard and build its runner, the same on every rank."""
    model_path: str
    backend: Backend
    max_positions: int  # rotary table length
    shard: Shard
    init_file: str  # the process group's rendezvous
    num_threads: int  # torch CPU threads of this rank
    block_size: int
    max_num_seqs: int
    enforce_eager: bool
    shm_capacity: int = 0  # CPU ranks: bytes of each rank's shared-memory all-reduce slot (0: gloo only)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: GPU r (of those CUDA_VISIBLE_DEVICES shows), or the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", rank % max(1, torch.cuda.device_count()))


def check_devices(device: torch.device, size: int) -> None:
    """Raise ValueError where the GPUs cannot hold `size` ranks (rank r takes GPU r)."""
    if device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise ValueError(f"with tensor_parallel_size {size} rank r takes GPU r: use --device cuda and choose the "
                         f"GPUs with CUDA_VISIBLE_DEVICES, not --device {device}")
    if torch.cuda.device_count() < size and not os.environ.get("RILLET_TP_BACKEND"):
        raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; torch sees {torch.cuda.device_count()}")


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (dataclass fields, lists, tuples) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..size-1: started, fed each mirrored call, watched, stopped."""

    def __init__(self, spec: RankSpec) -> None:
        self.size = spec.shard.size
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # memory, not disk, behind the mapped file
        self._dir = tempfile.mkdtemp(prefix="rillet-tp-", dir=shm_dir)
        self.init_file = str(Path(self._dir) / "rendezvous")
        self.spec = dataclasses.replace(spec, init_file=self.init_file)
        if spec.shm_capacity:
            shm_allreduce.create(shm_path(self.spec), self.size, spec.shm_capacity)
        self.dead_reason: str | None = None
        self.on_death: Callable[[str], None] | None = None  # the engine core's: tells the front end at once
        self._closing = False
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the workers
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._processes: list[Any] = []
        for rank in range(1, self.size):
            ours, theirs = context.Pipe()
            rank_spec = dataclasses.replace(self.spec, shard=Shard(rank, self.size))
            process = context.Process(target=worker_main, args=(rank_spec, theirs), name=f"rillet-tp-rank{rank}",
                                      daemon=True)
            process.start()
            theirs.close()
            self._conns.append(ours)
            self._processes.append(process)
        self._watchdog = threading.Thread(target=self._watch, name="rillet-tp-watchdog", daemon=True)
        self._watchdog.start()
        atexit.register(self.close)  # before multiprocessing's own exit hook terminates the workers

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def _watch(self) -> None:
        """Wait for any worker to exit; unless we are stopping them, that is the engine's death."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._processes, start=1)}
        ready = wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[ready[0]]
        process = self._processes[rank - 1]
        process.join(0.1)
        self.dead_reason = f"tensor-parallel worker rank {rank} exited (status {process.exitcode})"
        logger.error("%s; the engine cannot go on", self.dead_reason)
        if self.on_death is not None:
            self.on_death(self.dead_reason)
        if self.spec.backend.device.type == "cuda":  # NCCL would wait for the dead rank: make it raise
            from torch.distributed import distributed_c10d

            abort = getattr(distributed_c10d, "_abort_process_group", None)
            if abort is not None and distributed_c10d.is_initialized():
                abort()

    def failure(self, exc: BaseException) -> WorkerDiedError:
        """The error a failed step raises: a worker's death where one died (waiting briefly, as a
        broken collective can report before the process is reaped), else the step's own error,
        fatal all the same, since the ranks' collectives are out of step."""
        self._watchdog.join(2.0)
        reason = self.dead_reason or f"a tensor-parallel step failed on rank 0 ({type(exc).__name__}: {exc})"
        return WorkerDiedError(reason)

    def send(self, *message: Any) -> None:
        """One call for every worker to run: tensors travel on the CPU."""
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        # Plain pickle: multiprocessing's own would move each tensor through a shared-memory file
        # descriptor, which costs the receiver milliseconds a step.
        payload = pickle.dumps(to_device(message, torch.device("cpu")), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._conns:
                conn.send_bytes(payload)
        except OSError as exc:
            raise self.failure(exc) from exc

    def wait_joining(self) -> None:
        """Block until every worker is about to join the process group (so that rank 0's own join
        cannot wait out the rendezvous timeout for a worker that failed to start); raise what failed."""
        self._expect("joining")

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard and built its runner; raise what failed."""
        self._expect("ready")

    def _expect(self, word: str) -> None:
        pending = {conn: rank for rank, conn in enumerate(self._conns, start=1)}
        while pending:
            for ready in wait(list(pending)):
                conn = cast(Connection, ready)
                rank = pending[conn]
                try:
                    message = conn.recv()
                except EOFError:  # it exited without a word: killed, or out of memory
                    process = self._processes[rank - 1]
                    process.join(STOP_TIMEOUT_S)
                    raise RuntimeError(f"tensor-parallel worker rank {rank} exited while starting "
                                       f"(status {process.exitcode})") from None
                if message[0] != word:  # ("failed", why)
                    raise RuntimeError(f"tensor-parallel worker rank {rank} failed to start: {message[1]}")
                del pending[conn]

    def close(self) -> None:
        """Stop every worker (they leave the process group) and remove the rendezvous file."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        for process in self._processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def shm_path(spec: RankSpec) -> Path:
    """The shared-memory all-reduce's file, beside the rendezvous (rank 0 makes both)."""
    return Path(spec.init_file).parent / "allreduce"


def shm_group(spec: RankSpec) -> shm_allreduce.ShmAllReduce | None:
    """This rank's side of the shared-memory all-reduce, where the spec has one."""
    if not spec.shm_capacity:
        return None
    from rillet.parallel.group import COLLECTIVE_TIMEOUT_S

    return shm_allreduce.ShmAllReduce(shm_path(spec), spec.shard.rank, spec.shard.size, spec.shm_capacity,
                                      COLLECTIVE_TIMEOUT_S)


def _exit_with_parent() -> None:
    """Linux: SIGKILL this worker when rank 0's process dies, however it dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_main(spec: RankSpec, conn: Connection) -> None:
    """A worker rank: join the group, load the shard, build the runner, then run what rank 0 sends."""
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 decides
    root = logging.getLogger("rillet")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.shard.rank}]: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    torch.set_num_threads(spec.num_threads)
    try:
        runner = _start_rank(spec, conn)
        conn.send(("ready",))
    except BaseException as exc:
        logger.exception("tensor-parallel worker failed to start")
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)
    model, device = runner.model, runner.device
    try:
        with torch.inference_mode():
            while True:
                try:
                    message = pickle.loads(conn.recv_bytes())
                except EOFError:  # rank 0 is gone
                    break
                if message[0] == "forward":
                    _, ids, positions, meta = message
                    model(ids.to(device), positions.to(device), runner.kv_caches, to_device(meta, device))
                elif message[0] == "logits":
                    model.compute_logits(message[1].to(device))
                elif message[0] == "graph":  # a decode step replayed as a CUDA graph (engine/cuda_graphs.py)
                    _, size, inputs, tables = message
                    runner.graphs.replay_mirrored(size, inputs, tables)
                else:  # ("stop",)
                    break
    except BaseException:
        logger.exception("tensor-parallel worker failed; the engine cannot go on")
        os._exit(1)  # no clean-up that could block on a collective
    from rillet.parallel.group import leave_group

    leave_group()


def _start_rank(spec: RankSpec, conn: Connection) -> Any:
    """Join the group, load this rank's shard, then build its runner once rank 0 has sized the KV
    cache (("runner", num_blocks, max_model_len)). Rank 0 does the same in LLMEngine."""
    from rillet.engine.runners import make_runner
    from rillet.models.backend import prepare_model
    from rillet.models.loader import load_model
    from rillet.parallel.group import TensorParallelGroup, init_group

    device = rank_device(spec.backend.device, spec.shard.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = dataclasses.replace(spec.backend, device=device)
    conn.send(("joining",))
    init_group(spec.shard, device, spec.init_file)
    loaded = load_model(Path(spec.model_path), backend.dtype, device, max_positions=spec.max_positions,
                        shard=spec.shard)
    model = loaded.model
    model.use_tensor_parallel(TensorParallelGroup(spec.shard, loaded.config.vocab_size, shm_group(spec)))
    path = prepare_model(model, backend, batch_hint=spec.max_num_seqs)
    _, num_blocks, max_model_len = pickle.loads(conn.recv_bytes())
    if max_model_len > spec.max_positions:
        model.set_rope_positions(max_model_len)
    return make_runner(model, path, num_blocks, block_size=spec.block_size, max_num_seqs=spec.max_num_seqs,
                       max_model_len=max_model_len, enforce_eager=spec.enforce_eager, tensor_parallel=True)[0]
