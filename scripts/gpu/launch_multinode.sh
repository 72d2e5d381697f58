#!/usr/bin/env bash
# Multi-node GPU training: one process per node, every GPU of the node in that process.
#
#   On every node:  MEDIX_COORDINATOR_ADDRESS=node0:12355 MEDIX_NUM_PROCESSES=2 MEDIX_PROCESS_ID=<0|1> \
#                   scripts/gpu/launch_multinode.sh --config configs/qwen2_5_vl_7b_gspo.yaml [key=value ...]
#   Under SLURM:    srun --nodes=2 --ntasks-per-node=1 scripts/gpu/launch_multinode.sh --config ...
#                   (JAX reads the job from SLURM's variables; nothing to set)
#
# Use a mesh whose dcn_* sizes span the nodes, e.g. 2 nodes x 8 GPUs: mesh.fsdp=8 mesh.dcn_data=2.
# --dry-run prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/../.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
if [[ -z "${SLURM_JOB_ID:-}" && -n "${MEDIX_NUM_PROCESSES:-}" ]]; then
  : "${MEDIX_COORDINATOR_ADDRESS:?set MEDIX_COORDINATOR_ADDRESS=host:port of process 0}"
  : "${MEDIX_PROCESS_ID:?set MEDIX_PROCESS_ID to the index of this node, 0..$((MEDIX_NUM_PROCESSES - 1))}"
fi
command=(.venv/bin/python -m medix_jax.train "$@")
if [[ "$dry" == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  exec "${command[@]}"
fi
