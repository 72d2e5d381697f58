#!/usr/bin/env bash
# The accelerator check on a TPU host: scripts/gpu/check.sh with the platform set to tpu (same options, same files).
#
#   bash scripts/tpu/check.sh [--out DIR] [--only env,tests,...] [--dry-run] [--allow-cpu]
set -euo pipefail
MEDIX_CHECK_PLATFORM=tpu exec bash "$(dirname "$0")/../gpu/check.sh" "$@"
