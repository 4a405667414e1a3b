"""The seed article's design, in-process: one thread per request running `model.generate`
with a `TextIteratorStreamer`, and a consumer reading the streamer.

This is the baseline rillet is measured against. It is deliberately faithful to the
article (sections 4-5 of benchmarks/../seeds): no batching, no shared scheduler, every
request its own `generate()` call in its own `threading.Thread`; the threads share the
model and fight over the cores. The only additions are bookkeeping (token counts, times)
and ending the streamer if `generate` raises, so a failed request cannot hang a benchmark.

    python -m benchmarks.baselines.seed_engine --concurrency 4 --max-tokens 16

`run_concurrent(engine, concurrency=C, num_requests=N, max_tokens=T)` returns the same
metric dict as the HTTP benchmarks (`rillet.bench.loadgen.summarize`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from threading import Thread
from typing import Any, Iterator, Sequence

from rillet.bench.loadgen import RequestRecord, summarize
from rillet.bench.report import log
from rillet.bench.workload import prompt_cycle

DEFAULT_STREAMER_TIMEOUT_S = 60.0  # the article's TextIteratorStreamer(timeout=60.0)


def load_hf_model(model: str | None, dtype: str) -> tuple[Any, Any, str]:
    """(tokenizer, model, served name), loaded the plain transformers way, as the article does, from
    the weights rillet's resolver gives (the GGUF dequantised once and cached as safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rillet.models.cpu_isa import has_native_bf16
    from rillet.models.resolve import resolve_model

    resolved = resolve_model(model)
    if dtype == "auto":
        dtype = "bfloat16" if has_native_bf16() else "float32"
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    hf_model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=getattr(torch, dtype))
    hf_model.eval()
    return tokenizer, hf_model, resolved.name


@dataclass
class SeedRequest:
    """One in-flight request: the article's streamer + thread, plus what we count."""

    streamer: Any
    thread: Thread
    num_prompt_tokens: int
    max_new_tokens: int
    num_output_tokens: int | None = None  # known once generate() returns
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __iter__(self) -> Iterator[str]:
        return iter(self.streamer)

    @property
    def finish_reason(self) -> str:
        if self.error:
            return "error"
        return "length" if self.num_output_tokens is not None and self.num_output_tokens >= self.max_new_tokens else "stop"


class SeedEngine:
    """Loads the model the plain transformers way and starts one generate thread per request."""

    def __init__(self, model: str | None = None, dtype: str = "bfloat16",
                 streamer_timeout: float | None = DEFAULT_STREAMER_TIMEOUT_S,
                 tokenizer: Any = None, hf_model: Any = None, name: str | None = None) -> None:
        if hf_model is None:
            tokenizer, hf_model, name = load_hf_model(model, dtype)
        self.tokenizer = tokenizer
        self.model = hf_model
        self.name = name or "seed"
        self.dtype = str(hf_model.dtype).replace("torch.", "")
        self.streamer_timeout = streamer_timeout

    def prompt_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def start(self, messages: list[dict] | str, max_new_tokens: int = 1024, *, ignore_eos: bool = False,
              temperature: float | None = None, top_p: float | None = None) -> SeedRequest:
        """The article's handler body: streamer, generation kwargs, Thread(target=model.generate), start."""
        from transformers import TextIteratorStreamer

        text = messages if isinstance(messages, str) else self.prompt_text(messages)
        model_inputs = self.tokenizer([text], return_tensors="pt").to(self.model.device)
        # skip_prompt / skip_special_tokens drop the prompt and <|im_start|>-style markers, as in the article.
        streamer = TextIteratorStreamer(self.tokenizer, timeout=self.streamer_timeout, skip_prompt=True,
                                        skip_special_tokens=True)
        generation_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "streamer": streamer,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        }
        if ignore_eos:  # forced length: EOS is masked until max_new_tokens are out
            generation_kwargs["min_new_tokens"] = max_new_tokens
        if temperature is not None and temperature > 0:
            generation_kwargs.update(do_sample=True, temperature=temperature)
            if top_p is not None:
                generation_kwargs["top_p"] = top_p
        else:
            generation_kwargs["do_sample"] = False
        prompt_len = int(model_inputs["input_ids"].shape[1])
        request = SeedRequest(streamer=streamer, thread=None, num_prompt_tokens=prompt_len,  # type: ignore[arg-type]
                              max_new_tokens=max_new_tokens)

        def generate() -> None:  # Thread(target=model.generate, kwargs=...) plus a token count
            try:
                output = self.model.generate(**model_inputs, **generation_kwargs)
                request.num_output_tokens = int(output.shape[1]) - prompt_len
            except Exception as exc:  # noqa: BLE001 - end the stream instead of hanging the reader
                request.error = f"{type(exc).__name__}: {exc}"
                streamer.end()
            finally:
                request.done.set()

        request.thread = Thread(target=generate, daemon=True)
        request.thread.start()
        return request


def consume(engine: SeedEngine, messages: list[dict], max_tokens: int, *, ignore_eos: bool = True,
            keep_text: bool = False) -> RequestRecord:
    """Send one request and read its streamer to the end, timing every piece."""
    record = RequestRecord(keep_text=keep_text)
    start = time.perf_counter()
    try:
        request = engine.start(messages, max_tokens, ignore_eos=ignore_eos)
        for piece in request:
            record.add_text(time.perf_counter() - start, piece)
        request.thread.join()
        record.e2e = time.perf_counter() - start
        record.num_chunks = len(record.chunk_times)
        record.tokens_from_usage = request.num_output_tokens is not None
        record.prompt_tokens = request.num_prompt_tokens
        record.output_tokens = request.num_output_tokens or 0
        record.finish_reason = request.finish_reason
        record.ok = request.error is None
        record.error = request.error
    except Exception as exc:  # noqa: BLE001 - e.g. queue.Empty when the streamer timed out
        record.error = f"{type(exc).__name__}: {exc}"
        record.e2e = time.perf_counter() - start
    return record


def run_concurrent(engine: SeedEngine, *, concurrency: int, num_requests: int, max_tokens: int,
                   ignore_eos: bool = True, prompts: Sequence[str | list[dict]] | None = None) -> dict:
    """`concurrency` client threads, each sending requests one after another until `num_requests` are done.

    Each request is its own generate thread (the seed design), so at most `concurrency`
    generate() calls run at once. Returns the common metric dict.
    """
    work = prompt_cycle(num_requests, prompts)
    lock = threading.Lock()
    records: list[RequestRecord] = []
    keep = concurrency == 1

    def client() -> None:
        while True:
            with lock:
                if not work:
                    return
                messages = work.pop(0)
            record = consume(engine, messages, max_tokens, ignore_eos=ignore_eos, keep_text=keep)
            with lock:
                records.append(record)

    start = time.perf_counter()
    clients = [Thread(target=client, daemon=True) for _ in range(min(concurrency, num_requests))]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    duration = time.perf_counter() - start
    # One client: records are in prompt order, so the texts can be compared with rillet's.
    result = summarize(records, duration, concurrency=concurrency, max_tokens=max_tokens, keep_texts=keep)
    result["system"] = "seed"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=None, help="default: --concurrency")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    log("loading model")
    engine = SeedEngine(args.model, args.dtype, streamer_timeout=None)
    consume(engine, prompt_cycle(1)[0], 4)  # warm-up
    result = run_concurrent(engine, concurrency=args.concurrency, num_requests=args.num_requests or args.concurrency,
                            max_tokens=args.max_tokens)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
