"""The two ways the CLI talks to a model, shared by `rillet chat` and `rillet generate`:
`RemoteBackend` (rillet.Client against any OpenAI- or Ollama-compatible server) and
`LocalBackend` (an AsyncEngine running in this process, on its own event-loop thread), with the
flags that choose between them and the streaming of one answer."""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from rillet.client import Delta, RilletError, StreamError, Usage

__all__ = ["Answer", "Backend", "LocalBackend", "RemoteBackend", "add_backend_arguments", "make_backend",
           "sampling_params", "stream_answer"]

# ----------------------------------------------------------------------------- backends


class DeltaStream(Protocol):
    def __iter__(self) -> Iterator[Delta]: ...
    def close(self) -> None: ...


class Backend(Protocol):
    model: str | None

    def stream(self, prompt: str | list[dict], params: dict[str, Any]) -> DeltaStream:
        """Stream an answer: `prompt` is a list of chat messages, or a string for a raw completion."""

    def close(self) -> None: ...


class RemoteBackend:
    """Talks to a server through rillet.Client."""

    def __init__(self, url: str, *, model: str | None = None, api: str = "openai", api_key: str | None = None,
                 timeout: float = 600.0) -> None:
        from rillet.client import Client

        self.client = Client(url, api=api, api_key=api_key, model=model, timeout=timeout)
        self.model = model

    def connect(self) -> None:
        """Check the server answers (and the key is right); learn the model name if none was given."""
        if self.model is None:
            self.model = self.client.resolve_model(None)
        else:
            self.client.health()

    def stream(self, prompt: str | list[dict], params: dict[str, Any]) -> DeltaStream:
        if isinstance(prompt, str):
            stream = self.client.complete(prompt, stream=True, **params)
        else:
            stream = self.client.chat(prompt, stream=True, **params)
        self.model = self.client.model
        return stream

    def close(self) -> None:
        self.client.close()


_END = object()


class _LocalStream:
    """Deltas of one in-process request, read from the engine thread through a queue."""

    def __init__(self, backend: LocalBackend, prompt: str | list[dict], params: Any) -> None:
        self._backend = backend
        self.request_id = f"cli-{uuid.uuid4().hex[:16]}"
        self._queue: queue.Queue[Any] = queue.Queue()
        self.finished = False
        self.closed = False
        self._future = asyncio.run_coroutine_threadsafe(self._pump(prompt, params), backend.loop)

    async def _pump(self, prompt: str | list[dict], params: Any) -> None:
        try:
            async for output in self._backend.engine.generate(prompt, params, self.request_id):
                self._queue.put(output)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._queue.put(exc)
        finally:
            self._queue.put(_END)

    def __iter__(self) -> Iterator[Delta]:
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    self.finished = True
                    if isinstance(item, RilletError):
                        raise item
                    raise RilletError(str(item) or type(item).__name__) from item
                if item.finish_reason == "error":
                    self.finished = True
                    raise StreamError(item.error or "the engine failed this request")
                usage = None
                if item.finish_reason:
                    usage = Usage(item.num_prompt_tokens, item.num_output_tokens,
                                  item.num_prompt_tokens + item.num_output_tokens)
                yield Delta(text=item.text, finish_reason=item.finish_reason, usage=usage, index=item.index)
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request in the engine if it has not finished."""
        if self.closed:
            return
        self.closed = True
        if not self.finished and self._backend.loop.is_running():
            abort = asyncio.run_coroutine_threadsafe(self._backend._abort(self.request_id), self._backend.loop)
            try:
                abort.result(timeout=10)
            except Exception:  # noqa: BLE001 - best effort; the pump is cancelled below anyway
                pass
            self._future.cancel()


def _loading_label(model: str | None) -> str:
    """What the first start will do: convert a GGUF file (slow, once) or load cached weights."""
    try:
        from pathlib import Path

        from rillet.models import resolve

        if model in (None, "", "default"):
            gguf: Path | None = resolve.default_gguf_path()
        else:
            gguf = Path(model).expanduser() if str(model).endswith(".gguf") else None
        if gguf is not None and not (resolve.gguf_cache_dir(gguf) / "rillet-converted.json").is_file():
            return "converting the model's weights (first start only), then loading"
    except Exception:  # noqa: BLE001 - only a label; the engine reports real errors
        pass
    return "loading model"


def _structured(response_format: dict | None) -> Any:
    """The engine's constraint for an OpenAI-style `response_format` (what RemoteBackend sends)."""
    from rillet.structured import StructuredOutputs

    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return StructuredOutputs(json_object=True)
    return StructuredOutputs.from_schema(response_format["json_schema"]["schema"])


class LocalBackend:
    """Runs an AsyncEngine in this process, on an event loop in a background thread."""

    def __init__(self, config: Any, *, progress: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rillet-engine", daemon=True)
        self._thread.start()
        self.engine: Any = None
        self.model = config.served_model_name or config.model or "default"
        try:
            self._wait(self._start(config), _loading_label(config.model) if progress else None)
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, config: Any) -> None:
        from rillet.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(config)
        await self.engine.start()  # loads (and on first use converts) the weights off the loop
        self.model = self.engine.model_name

    async def _abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def _wait(self, coro: Any, label: str | None) -> Any:
        """Run `coro` on the engine loop; show an elapsed-time bar on stderr meanwhile."""
        import concurrent.futures

        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if label is None:
            return future.result()
        start = time.perf_counter()
        if not sys.stderr.isatty():  # logs and pipes: two plain lines instead of a redrawn bar
            print(f"{label} ...", file=sys.stderr, flush=True)
            result = future.result()
            print(f"model ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            return result
        from tqdm import tqdm

        import shutil

        columns = shutil.get_terminal_size().columns or 80  # a terminal of unknown size (0) hides tqdm
        with tqdm(desc=label, bar_format="{desc}: {elapsed} elapsed", file=sys.stderr, leave=False,
                  ncols=columns) as bar:
            while True:
                try:
                    return future.result(timeout=0.25)
                except concurrent.futures.TimeoutError:
                    bar.refresh()

    def stream(self, prompt: str | list[dict], params: dict[str, Any]) -> DeltaStream:
        from rillet.sampling_params import SamplingParams

        params = dict(params)
        try:
            structured = _structured(params.pop("response_format", None))
            sampling = SamplingParams(**params, structured=structured)
        except (TypeError, ValueError) as exc:
            raise RilletError(str(exc)) from None
        return _LocalStream(self, prompt, sampling)

    def close(self) -> None:
        try:
            if self.engine is not None and self.loop.is_running():
                asyncio.run_coroutine_threadsafe(self.engine.shutdown(), self.loop).result(timeout=60)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------- shared CLI plumbing


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--url/--api/--api-key, sampling flags, and the engine flags of the in-process mode."""
    from rillet.cli.options import add_config_arguments
    from rillet.config import EngineConfig

    # The engine group brings --model (in-process model, or the served model's name with --url)
    # and an engine --seed that the per-request --seed below replaces (conflict_handler="resolve").
    add_config_arguments(parser, EngineConfig, "engine (in-process mode, without --url)")
    remote = parser.add_argument_group("server (with --url)")
    remote.add_argument("--url", help="talk to a server at this base URL instead of running the model in-process; "
                                      "--model then names the served model (default: its first)")
    remote.add_argument("--api", choices=("openai", "ollama"), default="openai",
                        help="wire API with --url: OpenAI SSE or Ollama NDJSON")
    remote.add_argument("--api-key", default=os.environ.get("RILLET_API_KEY"),
                        help="bearer token for servers started with --api-key [env RILLET_API_KEY]")
    remote.add_argument("--timeout", type=float, default=600.0, help="request timeout in seconds")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate per answer")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass")
    sampling.add_argument("--seed", dest="sampling_seed", type=int, default=None, metavar="SEED",
                          help="seed of this request's sampling (reproducible answers)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None,
                          help="keep generating past the end-of-sequence token, up to --max-tokens")
    sampling.add_argument("--system", default=None, help="system prompt")


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "seed": args.sampling_seed, "ignore_eos": args.ignore_eos}
    return {k: v for k, v in params.items() if v is not None}


def make_backend(args: argparse.Namespace, *, progress: bool = True) -> Backend:
    if args.url:
        return RemoteBackend(args.url, model=getattr(args, "model", None), api=args.api, api_key=args.api_key,
                             timeout=args.timeout)
    from rillet.cli.options import config_from_args
    from rillet.config import EngineConfig

    return LocalBackend(config_from_args(EngineConfig, args), progress=progress)


@dataclass
class Answer:
    """What streaming one answer measured."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    num_chunks: int = 0
    ttft_s: float | None = None
    duration_s: float = 0.0
    interrupted: bool = False

    @property
    def num_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else self.num_chunks

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.ttft_s is None or self.num_tokens < 2 or self.duration_s <= self.ttft_s:
            return None
        return (self.num_tokens - 1) / (self.duration_s - self.ttft_s)

    def stats(self) -> str:
        parts = [f"{self.num_tokens} tokens"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        parts.append(f"{self.duration_s:.2f} s")
        if self.usage is not None and self.usage.total_tokens:
            parts.append(f"context {self.usage.total_tokens} tokens")
        if self.interrupted:
            parts.append("stopped")
        elif self.finish_reason and self.finish_reason != "stop":
            parts.append(f"finish: {self.finish_reason}")
        return "[" + ", ".join(parts) + "]"


def stream_answer(backend: Backend, prompt: str | list[dict], params: dict[str, Any], out: Any = None) -> Answer:
    """Stream one answer to `out` (None: don't print). Ctrl-C stops it: the request is aborted and
    the partial answer returned with `interrupted` set."""
    answer = Answer()
    start = time.perf_counter()
    try:
        stream = backend.stream(prompt, params)
    except KeyboardInterrupt:  # stopped before the answer began: nothing to close
        answer.interrupted = True
        answer.duration_s = time.perf_counter() - start
        return answer
    try:
        for delta in stream:
            if delta.text:
                if answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - start
                answer.num_chunks += 1
                answer.text += delta.text
                if out is not None:
                    out.write(delta.text)
                    out.flush()
            if delta.finish_reason:
                answer.finish_reason = delta.finish_reason
            if delta.usage is not None:
                answer.usage = delta.usage
    except KeyboardInterrupt:
        answer.interrupted = True
    finally:
        stream.close()  # closes the connection (or aborts in-process) if the answer is unfinished
        answer.duration_s = time.perf_counter() - start
    return answer
