"""Nyström attention vs exact softmax vs the ``nystrom-attention`` package: forward +
backward of the whole module (projections included), time and peak memory.

    .venv/bin/python benchmarks/bench_nystrom.py                       # N = 1k … 32k
    .venv/bin/python benchmarks/bench_nystrom.py --sizes 1024 8192 --repeats 5

B=1, H=4, D=64, m=64, 6 pinv iterations, conv kernel 33 by default (the peer configured
as ``NystromAttention(dim=256, dim_head=64, heads=4, num_landmarks=64, pinv_iterations=6,
residual=True, residual_conv_kernel=33)``). Times: methods interleaved round by round in one
process, minimum over rounds; peak memory: one fresh subprocess per case. The peer is
optional (``pip install --no-deps nystrom-attention``). The same as
``formerlab bench nystrom``; the logic lives in ``formerlab.bench.nystrom``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.nystrom import DEFAULT_SIZES, METHODS, linearity, markdown_table, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--landmarks", type=int, default=64)
    parser.add_argument("--conv-kernel", type=int, default=33)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-exact-n", type=int, default=16384)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    results = run_benchmark(
        sizes=tuple(args.sizes), methods=tuple(args.methods), batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, landmarks=args.landmarks,
        conv_kernel=args.conv_kernel, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads, device=args.device, max_exact_n=args.max_exact_n,
        memory=not args.no_memory, progress=lambda msg: print(f"  {msg}", flush=True),
    )
    print(markdown_table(results))
    print("nystrom ms per 1k tokens (flat = linear in N):",
          ", ".join(f"N={n}: {t:.1f}" for n, t in linearity(results)))


if __name__ == "__main__":
    main()
