"""Root solvers on the Moré-Garbow-Hillstrom (1981) nonlinear equations (plus x^3 + x - c
and a DEQ-style tanh(W z + b) - z), side by side with scipy.optimize.root (hybr,
broyden1, krylov): solved (max|g| <= 1e-8 recomputed from the returned z), function
evaluations, time.

    .venv/bin/python benchmarks/bench_roots.py
    .venv/bin/python benchmarks/bench_roots.py --problem rosenbrock --problem wood

The same as ``formerlab bench roots``; the problems and the measurement are documented
in ``formerlab.bench.roots``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.roots import header, markdown_table, run_benchmark, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", action="append", default=None)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = run_benchmark(names=args.problem, max_iter=args.max_iter, repeats=args.repeats)
    print(header(args.max_iter, args.repeats))
    print(markdown_table(rows))
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
