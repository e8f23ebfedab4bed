#!/usr/bin/env bash
# The GPU checks of the README's GPU section, as one script for a machine with a GPU:
# the cuda-marked tests, then bench nystrom / causal / generate with --device cuda.
# Each output goes to $OUT (default ./gpu-results) as well as the screen. Estimated at ten
# minutes or less on a recent GPU (not yet run on one); SIZES, CAUSAL_SIZES and TOKENS
# shorten it.
#
#   benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#   DEVICE=cpu SIZES="1024" CAUSAL_SIZES="1024" TOKENS=64 benchmarks/gpu_check.sh   # a dry run
set -uo pipefail

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-results}
SIZES=${SIZES:-"8192 32768"}
CAUSAL_SIZES=${CAUSAL_SIZES:-"4096 16384"}
TOKENS=${TOKENS:-2048}
mkdir -p "$OUT"

sizes() { for n in $1; do printf -- "--size %s " "$n"; done; }
run() {  # run NAME COMMAND...: tee the output to $OUT/NAME.txt, keep going on failure
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.txt"
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"

if [ "$DEVICE" = cuda ]; then
    run tests python -m pytest -p no:cacheprovider tests/cuda -rs -q
fi
# shellcheck disable=SC2046  # the size options are meant to split
run bench-nystrom formerlab bench nystrom --device "$DEVICE" $(sizes "$SIZES") --repeats 5 --markdown
# shellcheck disable=SC2046
run bench-causal formerlab bench causal --device "$DEVICE" $(sizes "$CAUSAL_SIZES") --repeats 5 --markdown
run bench-generate formerlab bench generate --device "$DEVICE" --tokens "$TOKENS" \
    --at $((TOKENS / 2)) --at "$TOKENS" --markdown
echo "results in $OUT/"
