"""MKL's vector math, set up on one thread before torch's first parallel cos, computes every
thread's share to float32's last bit (models/vector_math.py). Without that set-up, about one
fresh process in ten had the main thread's half of a rotary cos table off by ~1e-4 (the
engine's first parallel cos raced MKL's set-up), and the same server answered the same greedy
request differently from one start to the next."""

import subprocess
import sys

# A fresh process each: the rotary table's ops as rope_tables runs them (an outer product by
# matmul, then cos over 8192 x 64 on 2 threads), after init_vector_math.
CODE = """
import torch
torch.set_num_threads(2)
from rillet.models.vector_math import init_vector_math
init_vector_math()
inv_freq = 1.0 / (100000 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
angles = (inv_freq[:, None] @ torch.arange(8192, dtype=torch.float32)[None, :]).T
angles = torch.cat((angles, angles), -1)
print((angles.cos().double() - angles.double().cos()).abs().max().item())
"""
PROCESSES = 12  # without the set-up, all 12 pass about one time in five
TOLERANCE = 1e-6  # float32's ulp at 1 is 1.2e-7; a raced share was off by up to 1.5e-4


def test_fresh_processes_compute_cos_to_the_last_bit():
    errors = []
    for _ in range(PROCESSES):  # one at a time: a second busy core makes the race rarer
        run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        errors.append(float(run.stdout))
    assert max(errors) < TOLERANCE, errors


def test_rope_tables_sets_vector_math_up_first(monkeypatch):
    import rillet.models.llama as llama
    from transformers import LlamaConfig

    calls = []
    monkeypatch.setattr(llama, "init_vector_math", lambda: calls.append("init"))
    llama.rope_tables(LlamaConfig(hidden_size=64, num_attention_heads=1), 4)
    assert calls == ["init"]
