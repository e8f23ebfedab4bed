"""Decoder-safe kernels vs exact causal attention: forward + backward, time and peak memory.

    .venv/bin/python benchmarks/bench_causal.py                        # N = 1k, 4k, 16k, 32k
    .venv/bin/python benchmarks/bench_causal.py --sizes 1024 4096 --repeats 5
    .venv/bin/python benchmarks/bench_causal.py --max-exact-n 32768    # exact at 32k too (slow)
    .venv/bin/python benchmarks/bench_causal.py --threads 1 --rounds 3 # 3 interleaved rounds
    .venv/bin/python benchmarks/bench_causal.py --option causal_nystrom.segment_size=128

Every kernel runs with its defaults; ``--option METHOD.KEY=VALUE`` (repeatable, the value
read as YAML) changes one, and that method is then labelled with it in the table
(``causal_nystrom[segment_size=128]``).

B=1, H=4, D=64 by default; one fresh subprocess per case (time = median, peak memory =
peak resident set growth on CPU / max_memory_allocated on GPU). Prints a markdown table
with speed-ups over exact causal ``softmax`` (SDPA) and the per-token memory of each
method (constant = linear growth in N). The same as ``formerlab bench causal``; the logic
lives in ``formerlab.bench.causal``.
"""

from __future__ import annotations

import argparse

import torch

from formerlab.bench.causal import (
    METHODS,
    SIZES,
    memory_growth,
    parse_options,
    run_benchmark,
    summary_rows,
)
from formerlab.bench.measure import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-exact-n", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a non-default kernel option (repeatable); labels the method")
    args = parser.parse_args()
    try:
        options = parse_options(args.option)
    except ValueError as error:
        parser.error(str(error))
    threads = args.threads or torch.get_num_threads()
    print(f"causal forward + backward, B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"{args.device}, torch {torch.__version__}, {threads} thread(s) per case, "
          f"warmup {args.warmup}, median of {args.repeats} passes, median of {args.rounds} "
          f"interleaved round(s); kernels at their defaults unless labelled", flush=True)

    def progress(result):
        status = result.skipped or f"{result.time_s * 1e3:.0f} ms"
        print(f"  N={result.n:<6} {result.method:<15} {status}", flush=True)

    results = run_benchmark(
        sizes=tuple(args.sizes), methods=tuple(args.methods), batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads, device=args.device, max_exact_n=args.max_exact_n,
        progress=progress, options=options, rounds=args.rounds,
    )  # fmt: skip
    print()
    print(markdown_table(summary_rows(results)))
    print()
    for method in sorted({r.method for r in results}):
        points = memory_growth(results, method)
        if points:
            per_token = ", ".join(f"N={n}: {b / 1024:.1f} KiB" for n, b in points)
            print(f"peak memory per token, {method}: {per_token}")


if __name__ == "__main__":
    main()
