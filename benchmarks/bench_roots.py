"""Root solvers on MINPACK's Moré-Garbow-Hillstrom (1981) test list (every system,
dimension and start multiple of its hybrd tests), larger problems (Broyden n=100, 500;
2-D Bratu), x^3 + x - c and a DEQ-style tanh(W z + b) - z, side by side with
scipy.optimize.root (hybr; also broyden1, krylov with --method): solved (max|g| <= 1e-8
recomputed from the returned z), function evaluations, time.

    .venv/bin/python benchmarks/bench_roots.py
    .venv/bin/python benchmarks/bench_roots.py --problem 'wood*' --method default --method hybr --method broyden_newton

The same as ``formerlab bench roots``; the problems and the measurement are documented
in ``formerlab.bench.roots``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.roots import DEFAULT_METHODS, header, markdown_table, run_benchmark, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", action="append", default=None)
    parser.add_argument("--method", action="append", default=None)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = run_benchmark(names=args.problem, methods=tuple(args.method or DEFAULT_METHODS),
                         max_iter=args.max_iter, repeats=args.repeats)
    print(header(args.max_iter, args.repeats))
    print(markdown_table(rows))
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
