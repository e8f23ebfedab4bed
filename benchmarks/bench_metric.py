"""Metric-tensor attention vs standard attention vs the materialising O(N²k²) form.

    .venv/bin/python benchmarks/bench_metric.py                 # B=2, heads=4, k=32
    .venv/bin/python benchmarks/bench_metric.py --sizes 64 128 --repeats 5 --causal

Forward + backward, one fresh subprocess per case (time = median, peak memory = peak
resident set growth on CPU / max_memory_allocated on GPU). Prints a markdown table; the
same as ``formerlab bench metric``. The logic lives in ``formerlab.bench.metric``.
"""

from __future__ import annotations

import argparse

from formerlab.bench.measure import markdown_table
from formerlab.bench.metric import run_benchmark, summary_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-materialised-gib", type=float, default=6.0)
    args = parser.parse_args()

    def progress(result):
        status = result.skipped or f"{result.time_s * 1e3:.1f} ms"
        print(f"  N={result.n:<5} {result.method:<13} {status}", flush=True)

    results = run_benchmark(
        sizes=tuple(args.sizes), batch=args.batch, heads=args.heads, head_dim=args.head_dim,
        causal=args.causal, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        device=args.device, max_materialised_gib=args.max_materialised_gib, progress=progress,
    )
    print()
    print(markdown_table(summary_rows(results)))


if __name__ == "__main__":
    main()
