"""Packed vs padded training on SST-2 and a small ListOps: the same model, the same steps,
the same examples, interleaved step by step (``formerlab.bench.packing``).

    .venv/bin/python benchmarks/bench_packing.py --threads 1,2 --steps 40

Prints, per task and thread count, real tokens per second of both, the padding fraction,
the speed-up packed / padded and both loss curves. The same as
``formerlab bench packing --threads 1,2 --steps 40``.
"""

from __future__ import annotations

import argparse

import torch

from formerlab.bench.packing import curve_table, run_benchmark, summary_table
from formerlab.bench.threads import parse_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--listops-size", type=int, default=400)
    parser.add_argument("--listops-max-len", type=int, default=128)
    parser.add_argument("--only", nargs="+", default=["sst2", "listops"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    threads = parse_threads(args.threads)
    print(
        f"thread counts {threads}; torch {torch.__version__}; {args.steps} steps, "
        f"batch {args.batch_size}, width {args.dim}, depth {args.depth}, {args.clock} clock"
    )
    results = run_benchmark(
        tasks=tuple(args.only),
        threads=threads,
        steps=args.steps,
        batch_size=args.batch_size,
        dim=args.dim,
        depth=args.depth,
        options={"listops": {"train_size": args.listops_size, "max_len": args.listops_max_len}},
        progress=print,
        clock=args.clock,
    )
    print()
    print(summary_table(results))
    for result in results:
        print(f"\nloss curves, {result.task}, {result.threads} thread(s)")
        print(curve_table(result))


if __name__ == "__main__":
    main()
