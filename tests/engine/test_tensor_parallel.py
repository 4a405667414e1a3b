"""Tensor parallelism on CPU processes over gloo (the same code as on GPUs over NCCL):

- the shard plan cuts each checkpoint tensor so that the ranks' pieces put back together are the
  tensor (KV heads replicated where there are fewer than ranks, the vocabulary zero-padded);
- a TP=2 engine gives TP=1's greedy tokens, token for token in float32, on random-initialised
  models: grouped KV heads, one KV head shared by both ranks with tied embeddings and an odd
  vocabulary, and Qwen2's QKV biases;
- prefix-cache hits, preemption and an abort (rank 0's scheduling alone) leave every other
  request with its TP=1 tokens, and no KV block in use;
- models and options that cannot split are refused before any worker starts, naming why;
- a worker that dies mid-stream ends the stream with an error event; /health turns 503 and
  `rillet serve` exits with status 1 (never a hang on a collective).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from rillet.engine.llm_engine import LLMEngine
from rillet.models.resolve import resolve_model
from rillet.parallel.shard import Shard, ShardPlan, check_shardable
from rillet.sampling_params import SamplingParams
from support.sse_stream import BackgroundStream

PROMPTS = ["The river flows", "Count: one, two, three,", "你好，世界"]
MODELS = {  # name: (config class, model class, config overrides)
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-one-kv-head-tied-odd-vocab": ("LlamaConfig", "LlamaForCausalLM",
                                         {"num_key_value_heads": 1, "tie_word_embeddings": True,
                                          "vocab_size": 49153}),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def build_checkpoint(path: Path, config_name: str, model_name: str, overrides: dict) -> Path:
    import transformers

    options = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_name)(**{**options, **overrides})
    torch.manual_seed(7)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger than the default init, so that every layer matters to the logits
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif param.dim() == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    for f in resolve_model(None).path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_checkpoint(tmp_path_factory.mktemp(name), *MODELS[name])
        return built[name]

    return get


def greedy(engine: LLMEngine, max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.token_ids
    return [tokens[f"r{i}"] for i in range(len(PROMPTS))]


# ---- the shard plan -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 4])
def test_the_ranks_pieces_put_back_together_are_the_checkpoint_tensors(size):
    config = SimpleNamespace(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8,
                             vocab_size=10, head_dim=4)
    plans = [ShardPlan.of(config, Shard(rank, size)) for rank in range(size)]
    full = {
        "layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
        "layers.0.self_attn.q_proj.bias": torch.randn(16),
        "layers.0.self_attn.k_proj.weight": torch.randn(8, 16),
        "layers.0.self_attn.o_proj.weight": torch.randn(16, 16),
        "layers.0.mlp.gate_proj.weight": torch.randn(8, 16),
        "layers.0.mlp.down_proj.weight": torch.randn(16, 8),
        "embed_tokens.weight": torch.randn(10, 16),
        "norm.weight": torch.randn(16),
    }
    pieces = {name: [plan.take(name, t) for plan in plans] for name, t in full.items()}
    assert torch.equal(torch.cat(pieces["layers.0.self_attn.q_proj.weight"]), full["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(torch.cat(pieces["layers.0.self_attn.q_proj.bias"]), full["layers.0.self_attn.q_proj.bias"])
    assert torch.equal(torch.cat(pieces["layers.0.self_attn.o_proj.weight"], dim=1),
                       full["layers.0.self_attn.o_proj.weight"])
    assert torch.equal(torch.cat(pieces["layers.0.mlp.gate_proj.weight"]), full["layers.0.mlp.gate_proj.weight"])
    assert torch.equal(torch.cat(pieces["layers.0.mlp.down_proj.weight"], dim=1), full["layers.0.mlp.down_proj.weight"])
    k = full["layers.0.self_attn.k_proj.weight"]
    for rank, piece in enumerate(pieces["layers.0.self_attn.k_proj.weight"]):
        # 2 KV heads: split at size 2; at size 4, ranks 0-1 keep head 0 and ranks 2-3 head 1 (their queries')
        head = rank if size == 2 else rank // 2
        assert torch.equal(piece, k[head * 4:(head + 1) * 4])
        first_query_head = rank * 4 // size
        assert first_query_head // 2 == head  # query heads 0-1 use KV head 0, 2-3 use 1
    vocab = torch.cat(pieces["embed_tokens.weight"])
    assert vocab.shape[0] == -(-10 // size) * size
    assert torch.equal(vocab[:10], full["embed_tokens.weight"]) and not vocab[10:].any()
    assert all(torch.equal(p, full["norm.weight"]) for p in pieces["norm.weight"])


def test_a_rank_reads_only_its_piece_from_a_safetensors_slice(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = SimpleNamespace(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8,
                             vocab_size=10, head_dim=4)
    full = {"layers.0.self_attn.o_proj.weight": torch.randn(16, 16), "embed_tokens.weight": torch.randn(10, 16)}
    save_file(full, str(tmp_path / "w.safetensors"))
    plan = ShardPlan.of(config, Shard(1, 4))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        for name, tensor in full.items():
            assert torch.equal(plan.take(name, f.get_slice(name)), plan.take(name, tensor))


def test_a_model_that_cannot_split_is_refused_naming_why():
    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    with pytest.raises(ValueError, match="9 attention heads are not divisible by 2"):
        check_shardable(config, 2)
    check_shardable(config, 3)
    with pytest.raises(ValueError, match="9 attention heads are not divisible by 6"):
        check_shardable(SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536), 6)
    with pytest.raises(ValueError, match="4 ranks are not a multiple of the 3 KV heads"):
        check_shardable(SimpleNamespace(num_attention_heads=12, num_key_value_heads=3, intermediate_size=64), 4)
    # the embedded SmolLM2-135M has 9 heads: refused before any worker process starts
    started = time.monotonic()
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not fit this model: 9 attention heads"):
        LLMEngine(dtype="float32", device="cpu", tensor_parallel_size=2)
    assert time.monotonic() - started < 30


def test_quantized_weights_are_refused(checkpoints):
    with pytest.raises(ValueError, match="float weights, not --quantization int8"):
        LLMEngine(model=str(checkpoints("llama-gqa")), device="cpu", quantization="int8", tensor_parallel_size=2)


# ---- TP=2 against TP=1 --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_tp2_gives_tp1_greedy_tokens_float32(name, checkpoints):
    path = str(checkpoints(name))
    options = dict(model=path, dtype="float32", device="cpu", max_model_len=256, kv_cache_gib=0.05)
    single = LLMEngine(**options)
    want = greedy(single)
    engine = LLMEngine(**options, tensor_parallel_size=2)
    try:
        assert engine.model.num_heads == 2 and engine.model.layers[0].mlp.intermediate == 128
        workers = engine.workers
        assert workers is not None and len(workers.pids) == 1
        got = greedy(engine)
        assert engine.block_manager.num_used_blocks == 0
    finally:
        engine.close()
    assert got == want
    assert all(not os.path.exists(f"/proc/{pid}") or _is_zombie(pid) for pid in workers.pids)


def test_prefix_hits_preemption_and_aborts_under_tp2_keep_tp1_tokens(checkpoints):
    """The scheduler's work (prefix cache, preemption, abort) is rank 0's alone; the workers only
    see the batches. 10 requests sharing a long prefix in a 1 MiB KV cache (87 blocks a rank at
    TP=2, fewer than they need, so some are preempted and recomputed), one aborted after 5 steps:
    every other request gives its TP=1 tokens (float32: recomputation gives the same tokens)."""
    shared = "The river flows past the mill, the meadow and the old stone bridge. " * 8
    prompts = [f"{shared} Part {i}:" for i in range(10)]
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)

    def run(size: int) -> tuple[dict[str, list[int]], LLMEngine]:
        engine = LLMEngine(model=str(checkpoints("llama-gqa")), dtype="float32", device="cpu", max_model_len=512,
                           kv_cache_gib=0.001, tensor_parallel_size=size)
        tokens: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        steps = 0
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
            steps += 1
            if steps == 5:
                engine.abort("r3")
        return tokens, engine

    want, _ = run(1)
    got, engine = run(2)
    try:
        stats = engine.stats()
        assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0, stats
        assert engine.block_manager.num_used_blocks == 0
    finally:
        engine.close()
    del want["r3"], got["r3"]
    assert got == want


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---- a worker's death, through a real server ----------------------------------------------------

def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _worker_pid(server_pid: int) -> int | None:
    for pid in _descendants(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc (Linux)")
def test_a_dead_worker_ends_the_stream_with_an_error_and_the_server_exits_1(checkpoints):
    from rillet.bench import reliability as rh

    server = rh.RilletServer("--model", str(checkpoints("llama-gqa")), "--device", "cpu", "--dtype", "float32",
                             "--tensor-parallel-size", "2", "--max-model-len", "512", "--kv-cache-gib", "0.05",
                             api_key=None)
    try:
        server.wait_ready()
        assert 'tensor_parallel_size="2"' in httpx.get(server.url + "/metrics", timeout=10).text
        worker = rh.poll_until(lambda: _worker_pid(server.pid), 30, "the rank-1 worker process")
        stream = BackgroundStream(server.url + "/v1/completions",
                                  rh.completion_body("The river flows", 480, ignore_eos=True, temperature=0), timeout=60)
        assert stream.wait_started(60), server.log_tail()
        os.kill(worker, signal.SIGKILL)
        assert stream.join(60), "the stream hung after its worker died"
        events = stream.events
        assert '"error"' in events[-1] and "tensor-parallel worker rank 1 exited" in events[-1], events[-3:]
        assert "[DONE]" not in events

        def exited_or_dead() -> bool:
            if server.proc.poll() is not None:
                return True
            try:
                return httpx.get(server.url + "/health", timeout=5).status_code == 503
            except httpx.HTTPError:
                return False

        rh.poll_until(exited_or_dead, 30, "/health 503 or the server's exit")
        rh.poll_until(lambda: server.proc.poll() is not None, 30, "the server to exit")
        assert server.proc.returncode == 1, server.log_tail()
    finally:
        server.stop()
