"""DEQ benchmarks: solver iterations/time on DEQ-Transformer fixed points (ours vs torchdeq
when installed), and training-step peak memory of a DEQ body vs 2/4/8/12 explicit blocks.

    .venv/bin/python benchmarks/bench_deq.py                     # d=256, N=128, B=8
    .venv/bin/python benchmarks/bench_deq.py --gains 1 2 --repeats 5
    .venv/bin/python benchmarks/bench_deq.py --device cuda

The same as ``formerlab bench deq``; the logic (and the measurement method) is documented
in ``formerlab.bench.deq``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.deq import DEPTHS, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gains", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torchdeq", action="store_true", help="Skip the torchdeq comparison.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(
        dim=args.dim, seq=args.seq, batch=args.batch, gains=tuple(args.gains),
        depths=tuple(args.depths), tol=args.tol, max_iter=args.max_iter, repeats=args.repeats,
        compare_torchdeq=not args.no_torchdeq, device=args.device,
    )


if __name__ == "__main__":
    main()
