"""rillet's engine on a CUDA GPU with random weights of a real model shape (Llama-3.2-1B).

No weights can reach the GPU machine, so the model is random-initialised from the real
config; output lengths are forced (ignore_eos). Reports:
  - a greedy parity check against transformers' generate on the same random weights;
  - the decode step time at batch 1 and 32 (median of timed steps, after warm-up).

    PYTHONPATH=src python benchmarks/bench_cuda.py --tokenizer-dir DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA_32_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)


def make_model_dir(tokenizer_dir: Path, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(tempfile.mkdtemp(prefix="rillet-llama1b-"))
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_32_1B)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def step_times(engine, batch: int, steps: int) -> list[float]:
    from rillet.sampling_params import SamplingParams

    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", list(range(100 + i, 164 + i)),
                           SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0))
    engine.step()  # prefill
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    for rid in list(engine.requests):
        engine.abort(rid)
    return times


def parity(engine, model_dir: Path, dtype: torch.dtype, new_tokens: int = 24) -> dict:
    from transformers import AutoModelForCausalLM

    from rillet.sampling_params import SamplingParams

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    prompts = [list(range(1000, 1032)), list(range(5000, 5010)), list(range(20000, 20050))]
    matches = []
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            want = ref.generate(torch.tensor([ids], device="cuda"), max_new_tokens=new_tokens, do_sample=False,
                                min_new_tokens=new_tokens, attention_mask=torch.ones(1, len(ids), device="cuda",
                                                                                     dtype=torch.long))
        want = want[0, len(ids):].tolist()
        engine.add_request(f"p{i}", None, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True),
                           prompt_token_ids=ids)
        got = []
        while engine.has_unfinished():
            for out in engine.step():
                got += out.token_ids
        first_diff = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        matches.append({"prompt": i, "equal": got == want, "first_difference": first_diff})
    del ref
    torch.cuda.empty_cache()
    return {"new_tokens": new_tokens, "results": matches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_cuda.json"))
    args = parser.parse_args()

    from rillet.engine.llm_engine import LLMEngine

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "model": "Llama-3.2-1B shape, random weights", "date": time.strftime("%Y-%m-%d")}
    import transformers
    result["transformers"] = transformers.__version__

    fp32_dir = make_model_dir(args.tokenizer_dir, torch.float32)
    engine32 = LLMEngine(model=str(fp32_dir), dtype="float32", device="cuda", max_model_len=2048, max_num_seqs=8)
    result["parity_float32"] = parity(engine32, fp32_dir, torch.float32)
    del engine32
    torch.cuda.empty_cache()

    engine = LLMEngine(model=str(fp32_dir), dtype="bfloat16", device="cuda", max_model_len=2048, max_num_seqs=32)
    result["dtype"] = "bfloat16"
    for batch in (1, 32):
        times = step_times(engine, batch, args.steps)
        result[f"decode_step_ms_batch{batch}"] = {
            "median": statistics.median(times) * 1e3, "p10": sorted(times)[len(times) // 10] * 1e3,
            "tokens_per_s": batch / statistics.median(times)}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
