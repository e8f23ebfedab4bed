#!/usr/bin/env bash
# Run (or continue) the ListOps reproduction, one mechanism after another:
#   bash configs/lra/run-listops.sh [softmax nystrom linear performer gated_deltanet]
# Each run checkpoints every 50 steps; started again, this script resumes unfinished runs
# (`formerlab train --resume`) and skips finished ones (their RUN_DIR/test.json exists).
set -euo pipefail
cd "$(dirname "$0")/../.."
# batches of varying length fragment glibc's heap (the process grew by ~1.5 GB an hour);
# allocations from 64 KiB up then come from mmap and go back to the system when freed
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-65536}
FORMERLAB=${FORMERLAB:-.venv/bin/formerlab}
for label in "${@:-linear nystrom performer softmax gated_deltanet}"; do
  for name in $label; do
    run=$(ls -d runs/lra/listops-"$name"-* 2>/dev/null | tail -n 1 || true)
    if [[ -n "$run" && -f "$run/test.json" ]]; then
      echo "listops-$name: finished in $run"
    elif [[ -n "$run" && -d "$run/checkpoint" ]]; then
      echo "listops-$name: resuming $run"
      "$FORMERLAB" train --resume "$run" --no-progress
    else
      echo "listops-$name: starting"
      "$FORMERLAB" train "configs/lra/listops-$name.yaml" --no-progress
    fi
  done
done
