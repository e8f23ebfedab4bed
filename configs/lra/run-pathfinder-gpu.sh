#!/usr/bin/env bash
# The full Pathfinder-32 protocol on a GPU, one mechanism after another, resumable:
#   bash configs/lra/run-pathfinder-gpu.sh [softmax nystrom linear performer]
# Generates the 200k images once (runs/cache, minutes on a CPU), then trains each run with
# train.device=cuda and bf16; started again it resumes unfinished runs and skips finished
# ones (their RUN_DIR/test.json exists). Results: in each
# RUN_DIR/test.json and RUN_DIR/checkpoint/state.json (validation curve).
set -euo pipefail
cd "$(dirname "$0")/../.."
FORMERLAB=${FORMERLAB:-.venv/bin/formerlab}
DEVICE=${DEVICE:-cuda}
for name in ${@:-softmax nystrom linear performer}; do
  run=$(ls -d runs/lra/pathfinder-"$name"-* 2>/dev/null | tail -n 1 || true)
  if [[ -n "$run" && -f "$run/test.json" ]]; then
    echo "pathfinder-$name: finished in $run"
  elif [[ -n "$run" && -d "$run/checkpoint" ]]; then
    echo "pathfinder-$name: resuming $run"
    "$FORMERLAB" train --resume "$run" --no-progress
  else
    echo "pathfinder-$name: starting"
    "$FORMERLAB" train "configs/lra/pathfinder-$name.yaml" --no-progress \
      --set train.device="$DEVICE" --set train.bf16=true
  fi
done
