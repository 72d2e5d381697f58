#!/usr/bin/env bash
# The accelerator check (issue 30): the environment, the tests of the accelerator code paths, the sampler and update
# benchmarks and a short GRPO run of the embedded default, each under its own time limit (480 s in all); figures in
# DIR/check.json, each stage's output in DIR/<stage>.log (scripts/accelerator_check.py, the driver).
#
#   bash scripts/gpu/check.sh [--out DIR] [--only env,tests,bench_sampler,bench_train,grpo] [--dry-run] [--allow-cpu]
#
# DIR defaults to $OUT, else runs/accelerator_check. Python: $PYTHON, else .venv/bin/python, else python3. Wheels in
# .whl/ (packages the host lacks, e.g. grain) are installed into /tmp/site first, which goes on PYTHONPATH with the
# repository. docs/development.md#accelerator-check says how to prepare them.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
if [[ -n "${PYTHON:-}" ]]; then
  python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi
dry=0
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    dry=1
  fi
done
site=/tmp/site
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
path="$root"
if [[ ${#wheels[@]} -gt 0 ]]; then
  install=("$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}")
  if [[ "$dry" == 1 ]]; then
    printf '%q ' "${install[@]}"
    printf '\n'
  elif ! "${install[@]}"; then
    echo "check.sh: installing .whl/ into $site failed; going on without it" >&2
  fi
  path="$site:$path"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" scripts/accelerator_check.py --platform "${MEDIX_CHECK_PLATFORM:-gpu}" "$@"
