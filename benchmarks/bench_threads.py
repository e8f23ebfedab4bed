"""Thread scaling of the Nyström module, the causal kernels and the DEQ solvers, each
side by side with its peers (nystrom-attention, exact SDPA, torchdeq).

    .venv/bin/python benchmarks/bench_threads.py --threads 1,2 --n 8192 --repeats 5

Every round visits every thread count and every method (one pass each); times are the
minimum over rounds (``formerlab.bench.threads``). The same as
``formerlab bench nystrom|causal|deq --threads 1,2``.
"""

from __future__ import annotations

import argparse

import torch

from formerlab.bench import causal, deq, nystrom
from formerlab.bench.threads import parse_threads, scaling_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--n", type=int, default=8192, help="N of the nystrom and causal cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=["nystrom", "causal", "deq"])
    args = parser.parse_args()
    threads = parse_threads(args.threads)
    print(f"thread counts {threads}; torch {torch.__version__}; min of {args.repeats} rounds")
    if "nystrom" in args.only:
        print(f"\nnystrom module, N={args.n}")
        print(scaling_table(nystrom.thread_scaling(args.n, threads, repeats=args.repeats),
                            reference="nystrom"))
    if "causal" in args.only:
        print(f"\ncausal kernels, N={args.n}")
        print(scaling_table(causal.thread_scaling(args.n, threads, repeats=args.repeats),
                            reference="softmax"))
    if "deq" in args.only:
        print("\nDEQ solves, d=256, N=128, B=8, gain 1")
        print(scaling_table(deq.thread_scaling(threads, repeats=args.repeats), label="solver"))


if __name__ == "__main__":
    main()
