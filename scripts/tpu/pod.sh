#!/usr/bin/env bash
# TPU VM pod slices (v5p, v6e) for medix_jax: create, set up, launch training on every worker, follow logs, delete.
#
#   scripts/tpu/pod.sh create --name NAME --zone ZONE --type v5p-64 [--project P] [--spot] [--dry-run]
#   scripts/tpu/pod.sh setup  --name NAME --zone ZONE [--project P] [--dry-run]     # copies HEAD, runs setup.sh
#   scripts/tpu/pod.sh launch --name NAME --zone ZONE [--project P] [--dry-run] -- --config FILE [key=value ...]
#   scripts/tpu/pod.sh logs   --name NAME --zone ZONE [--project P] [--worker N] [--dry-run]
#   scripts/tpu/pod.sh delete --name NAME --zone ZONE [--project P] [--dry-run]
#
# --dry-run prints every cloud command instead of running it. `launch` starts `python -m medix_jax.train` with the
# same arguments on all workers; JAX finds the other hosts of the slice itself (no coordinator to configure).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 1 ]] || usage
action="$1"
shift
name="" zone="" type="" project="" spot=0 dry=0 worker=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "pod.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ -n "$name" ]] || { echo "pod.sh: --name is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "pod.sh: --zone is required" >&2; exit 2; }

# Print (with --dry-run) or run one command, quoted so that it can be pasted back into a shell.
run() {
  if [[ "$dry" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

runtime_for() {
  case "$1" in
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "pod.sh: --type must be a v5p-N or v6e-N slice, got '$1'" >&2; return 2 ;;
  esac
}

case "$action" in
  create)
    [[ -n "$type" ]] || { echo "pod.sh: create needs --type (e.g. v5p-64, v6e-64)" >&2; exit 2; }
    runtime="$(runtime_for "$type")"
    extra=()
    [[ "$spot" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$type" \
      --version="$runtime" "${extra[@]}"
    ;;
  setup)
    archive="$(mktemp -t medix_jax.XXXXXX.tar.gz)"
    run git archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$name:medix_jax.tar.gz" "${common[@]}" --worker=all
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
      --command="rm -rf medix_jax && mkdir medix_jax && tar -xzf medix_jax.tar.gz -C medix_jax && cd medix_jax && MEDIX_EXTRAS=tpu bash scripts/setup.sh"
    ;;
  launch)
    [[ ${#train_args[@]} -gt 0 ]] || { echo "pod.sh: launch needs training arguments after --, e.g. -- --config configs/qwen2_5_vl_3b_grpo.yaml --config configs/mesh/tpu_v5p_64_3b.yaml" >&2; exit 2; }
    quoted="$(printf '%q ' "${train_args[@]}")"
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
      --command="cd medix_jax && nohup .venv/bin/python -m medix_jax.train ${quoted}> train.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$worker" \
      --command="tail -n 200 -F medix_jax/train.log"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    ;;
  *)
    echo "pod.sh: unknown action '$action' (create, setup, launch, logs, delete)" >&2
    exit 2
    ;;
esac
