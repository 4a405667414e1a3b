"""Fixtures of the GPU tests: random-weight models of the Llama-3.2-1B shape, transformers
references on the same weights, and rillet engines on CUDA.

Run on a CUDA machine (the tokenizer directory defaults to the embedded SmolLM2 model's):

    RILLET_GPU_TOKENIZER_DIR=DIR PYTHONPATH=src python -m pytest tests/gpu -q -rs

Everything here is skipped, with the reason, where torch sees no CUDA GPU.

No weights reach the GPU machine, so the models are random-initialised from the real config
(`benchmarks.bench_cuda.LLAMA_32_1B`, seed 0): the full 16 layers, and a 4-layer cut of the same
shape for tests about the engine path rather than the whole model. Prompts are token ids; the
SmolLM2 tokenizer (49,152 ids) only serves the detokenizer, the model's vocabulary is 128,256.

Greedy comparisons in float32 are token for token, with one allowance: where two runs part, the
float32 transformers reference, given the tokens both agree on, must see a near-tie (the two
tokens' logits within FP32_TIE) there, as summation order alone (cuBLAS picks kernels by row count)
can then flip the argmax; the comparison stops at that point. Without such a tie a divergence fails.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
SKIP_REASON = "tests/gpu need a CUDA GPU (torch.cuda.is_available() is False)"

FP32_TIE = 1e-3  # |logit difference| under which two float32 greedy choices count as a tie
SMALL_LAYERS = 4  # layers of the cut-down model for engine-path tests


def pytest_collection_modifyitems(config, items):
    """Skip every test under tests/gpu when there is no CUDA GPU (this hook sees all items)."""
    if CUDA:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def _free_cuda() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# ---- model directories ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    env = os.environ.get("RILLET_GPU_TOKENIZER_DIR")
    if env:
        return Path(env)
    try:  # the embedded default model's converted directory (converted on first use)
        from rillet.models.resolve import resolve_model

        return resolve_model(None).path
    except Exception as exc:  # noqa: BLE001 - any failure means: no tokenizer here
        pytest.skip(f"no tokenizer: set RILLET_GPU_TOKENIZER_DIR ({type(exc).__name__}: {exc})")


def build_model_dir(tokenizer_dir: Path, dtype: torch.dtype, **overrides) -> Path:
    """A random Llama-3.2-1B-shaped model (seed 0) with `overrides` to its config, saved with the
    tokenizer's files; the full shape comes from benchmarks.bench_cuda.make_model_dir."""
    from benchmarks.bench_cuda import LLAMA_32_1B, make_model_dir

    if not overrides:
        return make_model_dir(tokenizer_dir, dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(tempfile.mkdtemp(prefix="rillet-gpu-test-"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA_32_1B, **overrides})).to(dtype).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def model_dirs(tokenizer_dir):
    """model_dirs(shape, dtype) -> Path: "1b" (16 layers) or "small" (4 layers), float32 or
    bfloat16 weights on disk; each built once per session, removed at its end."""
    built: dict[tuple[str, torch.dtype], Path] = {}

    def get(shape: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (shape, dtype)
        if key not in built:
            overrides = {"num_hidden_layers": SMALL_LAYERS} if shape == "small" else {}
            built[key] = build_model_dir(tokenizer_dir, dtype, **overrides)
        return built[key]

    yield get
    for path in built.values():
        shutil.rmtree(path, ignore_errors=True)


# ---- transformers reference ---------------------------------------------------------------------

class Reference:
    """transformers' LlamaForCausalLM on the GPU: greedy generation and next-token logits."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()

    @torch.inference_mode()
    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        x = torch.tensor([ids], device="cuda")
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[0, len(ids):].tolist()

    @torch.inference_mode()
    def forced_logits(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] float32 logits, row i predicting tokens[i] after prompt + tokens[:i]."""
        x = torch.tensor([prompt + tokens[:-1]], device="cuda")
        return self.model(x).logits[0, len(prompt) - 1:].float()

    @torch.inference_mode()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device="cuda")
        return self.model(x, logits_to_keep=1).logits[0, -1].float()

    def gap(self, ids: list[int], a: int, b: int) -> float:
        """|logit(a) - logit(b)| for the token after `ids`."""
        logits = self.next_logits(ids)
        return abs(float(logits[a] - logits[b]))


@pytest.fixture(scope="session")
def reference(model_dirs):
    """reference(shape, dtype=float32, weights=dtype) -> Reference computing in `dtype` on
    model_dirs(shape, weights)'s weights (built once)."""
    cache: dict[tuple[str, torch.dtype, torch.dtype], Reference] = {}

    def get(shape: str, dtype: torch.dtype = torch.float32, weights: torch.dtype | None = None) -> Reference:
        key = (shape, dtype, weights or dtype)
        if key not in cache:
            cache[key] = Reference(model_dirs(shape, weights or dtype), dtype)
        return cache[key]

    yield get
    cache.clear()
    _free_cuda()


# ---- rillet engines and helpers -----------------------------------------------------------------

def _engines():
    """A factory make(model_dir, **options) -> LLMEngine on CUDA (float32, max_model_len 512, 32
    sequences, a 1 GiB KV cache and no prefix caching unless given); at its end every engine is
    checked idle and freed."""
    from rillet.engine.llm_engine import LLMEngine

    engines = []

    def make(model_dir: Path, **options) -> LLMEngine:
        opts = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=32, kv_cache_gib=1.0,
                    enable_prefix_caching=False)
        opts.update(options)
        engine = LLMEngine(model=str(model_dir), **opts)
        engines.append(engine)
        return engine

    yield make
    leftover = [rid for engine in engines for rid in engine.requests]
    for engine in engines:
        for rid in list(engine.requests):
            engine.abort(rid)
    engines.clear()
    _free_cuda()
    assert not leftover, f"requests left unfinished: {leftover}"


@pytest.fixture
def make_engine():
    yield from _engines()


@pytest.fixture(scope="module")
def make_module_engine():
    yield from _engines()


def generate(engine, requests: dict, *, on_step=None) -> dict[str, list[int]]:
    """Add `requests` ({request_id: (prompt ids, SamplingParams)}), step until none is left and
    return {request_id: output token ids}. `on_step(step_number, engine, outputs)` runs after each
    step (it may add or abort requests)."""
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, None, params, prompt_token_ids=list(ids))
    step = 0
    while engine.has_unfinished():
        outputs = engine.step()
        for out in outputs:
            assert out.error is None, (out.request_id, out.error)
            got.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
        if on_step is not None:
            on_step(step, engine, outputs)
    return got


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_greedy_equal(got: list[int], want: list[int], prompt: list[int], ref: Reference | None = None,
                        what: str = "", tie: float = FP32_TIE) -> None:
    """Token for token, but for a near-tie (gap <= `tie` for `ref`) at the first divergence (see
    the module doc); with tie=0 the reference's gap only goes into the failure message."""
    assert len(got) == len(want), f"{what}: {len(got)} tokens, expected {len(want)}"
    d = first_divergence(got, want)
    if d is None:
        return
    gap = ref.gap(prompt + want[:d], want[d], got[d]) if ref is not None else None
    if gap is not None and gap <= tie and tie > 0:
        return
    raise AssertionError(f"{what}: first difference at token {d} of {len(want)}: got {got[d]}, expected {want[d]} "
                         f"(float32 reference logit gap between them: {gap})\n got  {got}\n want {want}")


def fidelity(ref32: Reference, prompt: list[int], tokens: list[int]) -> list[float]:
    """For each token, how far under the float32 reference's best logit it lies (0: its argmax)."""
    logits = ref32.forced_logits(prompt, tokens)
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return (logits.max(dim=1).values - chosen).tolist()


def argmax_rate(gaps: list[float]) -> float:
    """The share of tokens that were the float32 reference's argmax (gap 0; see fidelity)."""
    return sum(g == 0 for g in gaps) / len(gaps)


@pytest.fixture(scope="session")
def gpu():
    """The helpers above, for the test modules (gpu.generate, gpu.first_divergence, ...)."""
    return SimpleNamespace(generate=generate, first_divergence=first_divergence,
                           assert_greedy_equal=assert_greedy_equal, free_cuda=_free_cuda, fidelity=fidelity,
                           argmax_rate=argmax_rate)
