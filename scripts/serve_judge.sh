#!/usr/bin/env bash
# Start the LLM judge as a vLLM OpenAI-compatible server beside training (docs/reference.md#rewards).
#   scripts/serve_judge.sh [MODEL_PATH] [PORT] [MAX_MODEL_LEN] [GPU_MEMORY_FRACTION]
# Defaults follow the reference: Qwen3-4B-Instruct-2507, max length 2048. MODEL_PATH is a local directory or a hub
# id your machine can download. Then train with  rewards.judge.url=http://HOST:PORT/v1
# The per-request access log is off: at thousands of judge calls a step it costs the server real CPU.
# vLLM lives in its own environment (its pins differ from ours): VLLM_PYTHON=/path/to/vllm-env/bin/python
set -euo pipefail
model="${1:-Qwen/Qwen3-4B-Instruct-2507}"
port="${2:-8000}"
max_len="${3:-2048}"
gpu_fraction="${4:-0.85}"
python_bin="${VLLM_PYTHON:-python}"
exec "$python_bin" -m vllm.entrypoints.openai.api_server \
  --model "$model" \
  --served-model-name "$model" \
  --host "${HOST:-127.0.0.1}" \
  --port "$port" \
  --max-model-len "$max_len" \
  --gpu-memory-utilization "$gpu_fraction" \
  --disable-uvicorn-access-log \
  --dtype auto
