#!/usr/bin/env bash
# One-command set-up: creates .venv (Python 3.11) and installs medix_jax with its pinned stack and test extras.
# Needs only a Python package index. The CPU build of torch (torch==2.13.0+cpu) comes from PyTorch's CPU wheel
# index: if pip cannot find it, point PIP_EXTRA_INDEX_URL (or PIP_FIND_LINKS) at that index before running this.
# Accelerators: MEDIX_EXTRAS=tpu (or gpu) bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
extras="test${MEDIX_EXTRAS:+,$MEDIX_EXTRAS}"
.venv/bin/python -m pip install --quiet --progress-bar off -e ".[${extras}]"
.venv/bin/python -c "import jax, flax, transformers, torch; print('medix_jax set-up ok: jax', jax.__version__, '| flax', flax.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__, '| devices', jax.devices())"
