"""Eager vs torch.compile (inductor) step time of the demo decoder's training step and of
the Nyström attention module.

    .venv/bin/python benchmarks/bench_compile.py --threads 1 --repeats 5

The same as ``formerlab bench compile``; the logic lives in ``formerlab.bench.compile``.
"""

from __future__ import annotations

import argparse

import torch

from formerlab.bench.compile import TARGETS, compare, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--n", type=int, default=4096, help="N of the nystrom target")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [compare(t, n=args.n, repeats=args.repeats, device=args.device) for t in args.targets]
    print(markdown_table(rows, args.threads))


if __name__ == "__main__":
    main()
