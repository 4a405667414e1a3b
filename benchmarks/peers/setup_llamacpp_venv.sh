#!/usr/bin/env bash
# Make the separate virtual environment that benchmarks/bench_peers.py runs llama.cpp from
# (llama-cpp-python's OpenAI server, `python -m llama_cpp.server`). Like vLLM it is never a
# dependency of rillet. PyPI has only its source: pip compiles llama.cpp (a C/C++ compiler and
# cmake are needed; ~10-20 min on 2 cores).
#
#   bash benchmarks/peers/setup_llamacpp_venv.sh [VENV_DIR]                  # AVX2 build, /opt/llamacpp-venv
#   BUILD=native bash benchmarks/peers/setup_llamacpp_venv.sh /opt/llamacpp-native-venv
#   BUILD=avx512 bash benchmarks/peers/setup_llamacpp_venv.sh /opt/llamacpp-native-venv    # CPUs with AMX
#
# BUILD=avx2 (default): llama.cpp's x86 kernels for AVX2 alone (no AVX-512, whatever this CPU has),
#   for the AVX2 stand-in comparison (bench_peers.py --rillet-isa avx2) or an AVX2-only CPU.
# BUILD=native: -DGGML_NATIVE=ON, everything this CPU has (AVX-512, VNNI, BF16...): llama.cpp at its
#   best for the AVX512-BF16 comparison. bench_peers.py records the build's flags
#   (llama_print_system_info) and warns when they do not match the run's ISA.
# BUILD=avx512: AVX-512 with VNNI, BF16 and VBMI, but no AMX: on a 2-core Xeon with AMX the native
#   build (0.3.36) crashed with a segfault on its first prompt of more than a few tokens.
set -euo pipefail
VENV="${1:-/opt/llamacpp-venv}"
BUILD="${BUILD:-avx2}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
case "$BUILD" in
    avx2) CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
    native) CMAKE_ARGS="-DGGML_NATIVE=ON" ;;
    avx512) CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
            CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON"
            CMAKE_ARGS="$CMAKE_ARGS -DGGML_AVX512_BF16=ON" ;;
    *) echo "BUILD must be avx2, native or avx512, not $BUILD" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
"$VENV/bin/python" -c "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
echo "ready: .venv/bin/python benchmarks/bench_peers.py --llamacpp-python $VENV/bin/python"
