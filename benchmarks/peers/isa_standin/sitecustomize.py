"""AVX2 stand-in for a peer server that asks torch which CPU it runs on (vLLM).

bench_peers.py puts this directory on PYTHONPATH of vLLM's server, with
RILLET_BENCH_MAX_ISA=avx2, when a run stands an AVX-512 machine in for an AVX2-only one
(--peers-isa avx2, or --rillet-isa avx2 with the default --peers-isa same). ATEN_CPU_CAPABILITY
and ONEDNN_MAX_CPU_ISA hold torch's own kernels, torch.compile's generated code and oneDNN to
AVX2, but vLLM chooses its own C++ kernels (`vllm._C` for AVX512-BF16, `vllm._C_AVX512`,
`vllm._C_AVX2`) and its attention ISA from torch.cpu's hardware probes, which read CPUID and
ignore those variables. Here the probes answer as an AVX2-only CPU's would, so vLLM loads
`_C_AVX2`, as it does on such a CPU. Python runs this file at start-up in every process that
has it on its path (vLLM's API server, engine core and workers alike); it does nothing unless
RILLET_BENCH_MAX_ISA is avx2 or generic.
"""

import os

if os.environ.get("RILLET_BENCH_MAX_ISA", "").strip().lower() in ("avx2", "generic"):
    try:
        import torch.cpu as _cpu
    except Exception:  # noqa: BLE001 - no torch here: nothing to hold back
        _cpu = None
    if _cpu is not None:
        for _name in ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
                      "_is_amx_tile_supported", "_is_amx_fp16_supported"):
            if hasattr(_cpu, _name):
                setattr(_cpu, _name, lambda: False)
