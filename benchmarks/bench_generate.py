"""Generation speed of the demo-size decoder per causal kernel, cached vs recomputed.

    .venv/bin/python benchmarks/bench_generate.py                         # 4,096 tokens, every kernel
    .venv/bin/python benchmarks/bench_generate.py --tokens 1024 --at 256 1024   # a quick run
    .venv/bin/python benchmarks/bench_generate.py --full-uncached         # time the real recompute loop
    .venv/bin/python benchmarks/bench_generate.py --threads 1 --clock cpu # on a shared machine
    .venv/bin/python benchmarks/bench_generate.py --hf --dim 256 --threads 1 2  # HF decoder

4 layers, width 128, 16-token prompt; tokens/s, ms per token at positions 1k / 2k / 4k,
decoder-state MiB, and the recompute path's per-token time and total (integrated from
per-position forwards unless --full-uncached). The same as ``formerlab bench generate``;
the logic lives in ``formerlab.bench.generate``.

``--hf``: a Llama-shaped Hugging Face decoder (random weights, offline), its own KV cache
(``DynamicCache``) beside formerlab kernels swapped in and decoding with a
``FormerlabCache``: ms per token at each ``--at`` context (default 1024 4096), the ratio,
cache KiB per layer; ``--threads`` may list several counts. The same as ``formerlab bench
generate --hf``.
"""

from __future__ import annotations

import argparse

import torch

from formerlab.bench.generate import (
    HF_CONTEXTS,
    REPORT_AT,
    hf_summary_rows,
    run_benchmark,
    run_hf_benchmark,
    summary_rows,
)
from formerlab.bench.measure import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", nargs="+", default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at", type=int, nargs="+", default=list(REPORT_AT))
    parser.add_argument("--no-uncached", action="store_true")
    parser.add_argument("--full-uncached", action="store_true")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="one count (several with --hf)"
    )
    parser.add_argument("--hf", action="store_true", help="a Llama-shaped HF decoder")
    parser.add_argument("--kv-heads", type=int, default=2, help="--hf: key/value heads")
    parser.add_argument("--vocab", type=int, default=512, help="--hf: vocabulary size")
    parser.add_argument("--steps", type=int, default=32, help="--hf: timed steps per context")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: thread CPU time (needs --threads 1; for a shared machine)",
    )
    args = parser.parse_args()
    if args.hf:
        hf_main(args)
        return
    if args.threads and len(args.threads) > 1:
        parser.error("--threads takes one count (several only with --hf)")
    args.threads = args.threads[0] if args.threads else None
    results = run_benchmark(
        kernels=tuple(args.kernels) if args.kernels else None, tokens=args.tokens,
        prompt=args.prompt, dim=args.dim, depth=args.depth, heads=args.heads,
        rounds=args.rounds, repeats=args.repeats, report_at=tuple(args.at),
        uncached=not args.no_uncached, full_uncached=args.full_uncached,
        threads=args.threads, device=args.device, clock=args.clock, progress=lambda m: print(" ", m, flush=True),
    )  # fmt: skip
    print(
        f"\n{args.depth} layers, width {args.dim}, {args.tokens} tokens after {args.prompt}, "
        f"{args.device}, {torch.get_num_threads()} thread(s), {args.clock} clock\n"
    )
    print(markdown_table(summary_rows(results)))


def hf_main(args: argparse.Namespace) -> None:
    at = tuple(args.at) if args.at != list(REPORT_AT) else HF_CONTEXTS
    results = run_hf_benchmark(
        kernels=tuple(args.kernels) if args.kernels else None, contexts=at, dim=args.dim,
        depth=args.depth, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
        steps=args.steps, rounds=args.rounds, threads=tuple(args.threads or (torch.get_num_threads(),)),
        device=args.device, clock=args.clock, progress=lambda m: print(" ", m, flush=True),
    )  # fmt: skip
    print(
        f"\nHF decoding, Llama-shaped, {args.depth} layers, width {args.dim}, {args.heads} "
        f"heads ({args.kv_heads} kv), vocabulary {args.vocab}, {args.device}, {args.clock} clock\n"
    )
    print(markdown_table(hf_summary_rows(results)))


if __name__ == "__main__":
    main()
