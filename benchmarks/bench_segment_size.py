"""Accuracy of causal_nystrom against exact causal softmax for fixed segment sizes.

    .venv/bin/python benchmarks/bench_segment_size.py                  # N = 128, 512, 2048
    .venv/bin/python benchmarks/bench_segment_size.py --sizes 256 --segments 4 8 16

Relative output error (float64, B = 1, H = 4, D = 32) on three input families, for each
fixed s, the old length-derived s = ⌈√N⌉ and local-only attention: the measurement behind
the default segment size (README, "Decoders"). The logic lives in
``formerlab.bench.segment_size``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.measure import markdown_table
from formerlab.bench.segment_size import SEGMENTS, SIZES, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--segments", type=int, nargs="+", default=list(SEGMENTS))
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = measure(args.sizes, args.segments, head_dim=args.head_dim, seed=args.seed)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
