"""The GPU path's runner (engine/cuda_runner.py) and forward (models/llama_cuda.py), eagerly, on any
machine: without a GPU the Triton kernels run under the interpreter (tests/conftest.py), on the
real default model in float32, and must give the torch path's greedy tokens, token for token,
for a batch that mixes prompt chunks, cached prefixes and decodes. CUDA graphs need a GPU:
tests/gpu."""

from __future__ import annotations

from support.triton_kernels import require_triton

require_triton()

from rillet.engine.cuda_runner import CudaModelRunner  # noqa: E402
from rillet.engine.llm_engine import LLMEngine  # noqa: E402
from rillet.models.backend import KernelPath  # noqa: E402
from rillet.sampling_params import SamplingParams  # noqa: E402

SHARED = ("You are a helpful assistant who answers questions about geography, history and science "
          "briefly and accurately.")
FIRST = SHARED + " What is the capital of France?"
THEN = [SHARED + " Name the longest river in Europe.", "def fibonacci(n):"]


def greedy(engine: LLMEngine, max_tokens: int) -> list[list[int]]:
    """FIRST alone, then THEN together: a prompt chunked in pieces, a prefix read from the cache
    while another prompt prefills and then decodes beside it."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = engine.add_request("first", FIRST, params)
    while engine.has_unfinished():
        engine.step()
    for i, prompt in enumerate(THEN):
        seqs += engine.add_request(f"then{i}", prompt, params)
    while engine.has_unfinished():
        engine.step()
    return [seq.output_token_ids for seq in seqs]


def make_engine() -> LLMEngine:
    # 16-token chunks: FIRST is prefilled in pieces
    return LLMEngine(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
                     num_threads=2)


def test_gpu_kernel_path_matches_torch_path():
    want = greedy(make_engine(), 4)
    engine = make_engine()
    path = KernelPath(engine.runner.path.backend, None, False, gpu_kernels=True)
    engine.runner = CudaModelRunner(engine.model, engine.block_manager.num_blocks, engine.config.block_size, path,
                                    max_num_seqs=4, max_model_len=engine.max_model_len, enforce_eager=True)
    assert greedy(engine, 4) == want
    assert engine.stats().prefix_cache_hits_total >= 16  # the cached-prefix read was exercised


def test_flat_batch_lays_the_sequences_end_to_end():
    """A prompt chunk that does not sample yet, a whole prompt, and a decode fed its last output."""
    from rillet.engine.block_manager import BlockManager
    from rillet.engine.prompt_graphs import flat_batch
    from rillet.engine.scheduler import ScheduledBatch
    from rillet.engine.sequence import Sequence

    bm = BlockManager(16, 4)
    chunk = Sequence("a", 0, list(range(100, 110)), SamplingParams())
    whole = Sequence("b", 0, list(range(200, 205)), SamplingParams())
    decode = Sequence("c", 0, [7, 8, 9], SamplingParams(), output_token_ids=[11, 12])
    for seq, n in ((chunk, 10), (whole, 5), (decode, 5)):
        bm.grow(seq, n)
    decode.num_computed_tokens = 4
    flat = flat_batch(ScheduledBatch([chunk, whole, decode], [6, 5, 1]), bm)
    assert flat.tokens[0].tolist() == [100, 101, 102, 103, 104, 105, 200, 201, 202, 203, 204, 12]
    assert flat.tokens[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 4]
    positions = [(chunk, range(6)), (whole, range(5)), (decode, [4])]
    assert flat.tokens[2].tolist() == [bm.slot(seq, p) for seq, ps in positions for p in ps]
    assert flat.seqs.tolist() == [[0, 6, 11], [6, 5, 1], [6, 5, 5]]
    assert flat.logit_rows == [10, 11] and flat.sampling == [1, 2]
