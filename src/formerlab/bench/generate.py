"""Generation speed of the demo-size decoder, cached (streaming state) vs recomputed.

For each causal kernel: a ``DecoderLM`` (4 layers, width 128, 4 heads, vocabulary 65 as
tinyshakespeare; random weights, float32, no grad) generates ``tokens`` tokens after a
``prompt``-token prompt.

* **cached**: ``init_state`` + one ``step`` for the prompt, then one ``step`` per token,
  each timed (sampling included). Time per token at position p = median of the steps
  just before p (``window`` of them); tokens/s over the whole generation. Memory: the
  bytes of the whole decoder state at each position (exact, from its tensors), and the
  process's peak resident-set growth during the run (CPU, approximate) /
  ``max_memory_allocated`` (GPU).
* **uncached**: the recompute path costs one forward of the whole context per token, so
  its time per token at position p is the time of ``model(ids[:, :p])`` (median of
  ``repeats``). Running it for every position up to 4k is O(N²)–O(N³) work (minutes to
  hours on a CPU), so by default its total over the generation is the trapezoid integral
  of the per-token times measured at ``uncached_points`` positions (``full_uncached``
  times the real loop instead).

Clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.thread_time``, the CPU
time of the calling thread; only with one torch thread, where every op runs in it). On a
shared, overloaded CPU the wall clock mostly measures waiting for a core; the thread CPU
time is what the computation itself costs (it still sees cache and memory-bandwidth
contention).

Rounds interleave the kernels (every kernel once per round) and the minimum over rounds
of each median is kept, so a busy moment of a shared machine hits all kernels alike.

Hugging Face decoders (``formerlab bench generate --hf``, :func:`run_hf_benchmark`): a
Llama-shaped ``LlamaForCausalLM`` with random weights (built from a config, offline)
decodes one token at a time after a prompt of each context length, side by side: the
original model with HF's own KV cache (``DynamicCache``, SDPA) and the same weights with
formerlab kernels swapped in (:func:`formerlab.integrations.hf.swap_attention`), decoding
with their streaming states (``FormerlabCache``). Per-token time at each context = median
of ``steps`` decoding steps after the prefill; the cache's bytes per layer come from its
tensors (allocated capacity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from formerlab import attention
from formerlab.bench.measure import peak_memory_bytes, start_peak_memory, sync
from formerlab.errors import check_choice, check_positive_int
from formerlab.models import DecoderLM
from formerlab.models.decoder import sample_next

VOCAB = 65
REPORT_AT = (1024, 2048, 4096)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass
class GenerateResult:
    """One kernel's measurements (times in seconds, memory in bytes)."""

    kernel: str
    tokens: int
    cached_total_s: float = float("inf")
    cached_per_token_s: dict[int, float] = field(default_factory=dict)
    state_bytes: dict[int, int] = field(default_factory=dict)
    peak_bytes: int | None = None
    uncached_per_token_s: dict[int, float] = field(default_factory=dict)
    uncached_total_s: float | None = None
    uncached_measured: bool = False


def build_model(kernel: str, dim: int, depth: int, heads: int, device: str, seed: int) -> DecoderLM:
    """The demo-size decoder with rotary positions (no ``max_len`` cap), eval mode."""
    torch.manual_seed(seed)
    model = DecoderLM(VOCAB, dim=dim, depth=depth, heads=heads, max_len=128,
                      mixer_options={"kernel": kernel}, positions="rope")  # fmt: skip
    return model.to(device).eval()


def run_cached(
    model: DecoderLM,
    prompt: torch.Tensor,
    tokens: int,
    window: int,
    report_at: tuple[int, ...],
    device: str,
    clock: Callable[[], float] = time.perf_counter,
) -> GenerateResult:
    """Time one streamed generation token by token (see the module doc)."""
    result = GenerateResult(model.mixers()[0].kernel.name, tokens)
    generator = torch.Generator(device=device).manual_seed(0)
    base = start_peak_memory(device)
    times: list[float] = []
    with torch.no_grad():
        sync(device)
        start = clock()
        state = model.init_state(prompt.shape[0])
        logits, state = model.step(prompt, state)
        nxt = sample_next(logits[:, -1], 1.0, None, generator)
        for _ in range(tokens - 1):
            t0 = clock()
            logits, state = model.step(nxt, state)
            nxt = sample_next(logits[:, -1], 1.0, None, generator)
            sync(device)
            times.append(clock() - t0)
            if state.position in report_at:
                result.state_bytes[state.position] = state.nbytes
        result.cached_total_s = clock() - start
    result.peak_bytes = peak_memory_bytes(device, base)
    first = prompt.shape[1] + 1  # position (stream length) after the first timed step
    for p in report_at:
        done = [t for i, t in enumerate(times) if p - window < first + i <= p]
        if done:
            result.cached_per_token_s[p] = float(torch.tensor(done).median())
    return result


def time_forward(
    model: DecoderLM,
    ids: torch.Tensor,
    repeats: int,
    device: str,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds of one recompute-path token at position ``ids.shape[1]``."""
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            t0 = clock()
            sample_next(model(ids)[:, -1], 1.0, None, generator)
            sync(device)
            times.append(clock() - t0)
    return float(torch.tensor(times).median())


def trapezoid(points: dict[int, float], start: int, end: int) -> float:
    """∫ per-token time over positions start … end from measured points (linear between
    them, constant beyond the outermost ones): the estimated total of a recompute run."""
    xs = sorted(points)
    total = 0.0
    grid = [start, *[x for x in xs if start < x < end], end]
    for a, b in zip(grid, grid[1:]):
        total += (b - a) * (interp(points, xs, a) + interp(points, xs, b)) / 2
    return total


def interp(points: dict[int, float], xs: list[int], x: int) -> float:
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, v in enumerate(xs) if v >= x)
    a, b = xs[hi - 1], xs[hi]
    return points[a] + (points[b] - points[a]) * (x - a) / (b - a)


def run_uncached(
    model: DecoderLM,
    prompt: torch.Tensor,
    tokens: int,
    points: tuple[int, ...],
    repeats: int,
    full: bool,
    device: str,
    result: GenerateResult,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Per-token times of the recompute path at ``points``; its total (see module doc)."""
    end = prompt.shape[1] + tokens
    ids = torch.cat([prompt, torch.randint(0, VOCAB, (prompt.shape[0], tokens), device=device)], 1)
    for p in points:
        if p <= end:
            result.uncached_per_token_s[p] = time_forward(model, ids[:, :p], repeats, device, clock)
    if full:
        sync(device)
        t0 = clock()
        model.generate(prompt, tokens, generator=torch.Generator(device=device).manual_seed(0),
                       use_cache=False)  # fmt: skip
        sync(device)
        result.uncached_total_s, result.uncached_measured = clock() - t0, True
    else:
        result.uncached_total_s = trapezoid(result.uncached_per_token_s, prompt.shape[1], end)


def keep_best(best: GenerateResult | None, new: GenerateResult) -> GenerateResult:
    """Per-field minimum over rounds (state bytes are deterministic)."""
    if best is None:
        return new
    best.cached_total_s = min(best.cached_total_s, new.cached_total_s)
    for name in ("cached_per_token_s", "uncached_per_token_s"):
        mine, theirs = getattr(best, name), getattr(new, name)
        for p, t in theirs.items():
            mine[p] = min(mine.get(p, t), t)
    if new.uncached_total_s is not None:
        best.uncached_total_s = min(best.uncached_total_s or float("inf"), new.uncached_total_s)
    if new.peak_bytes is not None:
        best.peak_bytes = min(best.peak_bytes or new.peak_bytes, new.peak_bytes)
    return best


def run_benchmark(
    kernels: tuple[str, ...] | None = None,
    tokens: int = 4096,
    prompt: int = 16,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    rounds: int = 2,
    repeats: int = 3,
    window: int = 64,
    report_at: tuple[int, ...] = REPORT_AT,
    uncached_points: tuple[int, ...] | None = None,
    full_uncached: bool = False,
    uncached: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    clock: str = "wall",
    progress: Callable[[str], None] | None = None,
) -> list[GenerateResult]:
    """Measure every kernel (default: every causal one); returns one result per kernel."""
    timer = CLOCKS[check_choice("clock", clock, CLOCKS)]
    kernels = tuple(kernels or attention.available(causal=True))
    unknown = sorted(set(kernels) - set(attention.available(causal=True)))
    if unknown:
        raise ValueError(f"kernels {unknown} are not causal kernels; choose from "
                         f"{attention.available(causal=True)}")  # fmt: skip
    for arg, value in (("tokens", tokens), ("prompt", prompt), ("rounds", rounds),
                       ("repeats", repeats), ("window", window)):  # fmt: skip
        check_positive_int(arg, value)
    if threads is not None:
        torch.set_num_threads(check_positive_int("threads", threads))
    if clock == "cpu" and (torch.device(device).type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(
            f"clock='cpu' times the calling thread, so it needs device='cpu' and one torch "
            f"thread; got device={device!r}, {torch.get_num_threads()} threads (pass threads=1)"
        )
    end = prompt + tokens
    # the last sampled token is never fed back, so the stream reaches end - 1
    report_at = tuple(p for p in report_at if prompt < p < end) or (end - 1,)
    points = uncached_points or tuple(sorted({prompt + 1, 256, 512, *report_at, end}))
    models = {k: build_model(k, dim, depth, heads, device, seed) for k in kernels}
    ids = torch.randint(0, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    best: dict[str, GenerateResult] = {}
    for r in range(rounds):
        for k in kernels:
            res = run_cached(models[k], ids, tokens, window, report_at, device, timer)
            if uncached:
                run_uncached(models[k], ids, tokens, points, repeats, full_uncached, device,
                             res, timer)  # fmt: skip
            best[k] = keep_best(best.get(k), res)
            if progress:
                progress(
                    f"round {r + 1}/{rounds} {k:<15} cached {res.cached_total_s:.2f} s"
                    + (f", uncached {res.uncached_total_s:.2f} s" if uncached else "")
                )
    return [best[k] for k in kernels]


def summary_rows(results: list[GenerateResult]) -> list[dict[str, str]]:
    """One markdown row per kernel: tokens/s, ms/token at each reported position,
    growth, state MiB, uncached figures and the speed-up."""
    rows = []
    for r in results:
        row = {"kernel": r.kernel, "cached tok/s": f"{r.tokens / r.cached_total_s:.0f}"}
        ps = sorted(r.cached_per_token_s)
        for p in ps:
            row[f"ms/tok @{p}"] = f"{r.cached_per_token_s[p] * 1e3:.2f}"
        if len(ps) > 1:
            row[f"@{ps[-1]} / @{ps[0]}"] = (
                f"{r.cached_per_token_s[ps[-1]] / r.cached_per_token_s[ps[0]]:.2f}"
            )
        for p in sorted(r.state_bytes):
            row[f"state MiB @{p}"] = f"{r.state_bytes[p] / 2**20:.2f}"
        row["peak MiB"] = "–" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        for p in ps:
            if p in r.uncached_per_token_s:
                row[f"uncached ms/tok @{p}"] = f"{r.uncached_per_token_s[p] * 1e3:.1f}"
        if r.uncached_total_s is not None:
            mark = "" if r.uncached_measured else " (est.)"
            row["uncached total s"] = f"{r.uncached_total_s:.1f}{mark}"
            row["cached speed-up"] = f"{r.uncached_total_s / r.cached_total_s:.1f}×"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- HF decoders

#: ``formerlab bench generate --hf``: contexts (tokens in the cache) at which decoding is timed
HF_CONTEXTS = (1024, 4096)
#: the swapped variants measured by default, beside the original model
HF_KERNELS = ("softmax", "linear", "performer")
ORIGINAL = "original (DynamicCache)"


@dataclass
class HFDecodeResult:
    """One variant of the HF decoder at one thread count (seconds, bytes).

    ``per_token_s[c]``: median seconds of one decoding step with ``c`` tokens in the cache;
    ``layer_bytes[c]``: bytes of the tensors each layer's cache holds there (allocated
    capacity; one entry per layer), read from the cache itself.
    """

    variant: str
    threads: int
    per_token_s: dict[int, float] = field(default_factory=dict)
    layer_bytes: dict[int, list[int]] = field(default_factory=dict)


def build_hf_decoder(
    dim: int, depth: int, heads: int, kv_heads: int, vocab: int, max_positions: int, seed: int
):
    """A Llama-shaped HF decoder (``LlamaForCausalLM``: rotary positions, grouped-query
    attention, SwiGLU MLP of width ≈ 8/3·dim, RMSNorm) with random weights; built from a
    config, nothing downloads. float32, eval mode, HF's own SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for arg, value in (("dim", dim), ("depth", depth), ("heads", heads), ("kv_heads", kv_heads),
                       ("vocab", vocab)):  # fmt: skip
        check_positive_int(arg, value)
    if dim % heads or heads % kv_heads:
        raise ValueError(
            f"dim={dim}, heads={heads}, kv_heads={kv_heads}: dim must be a multiple of heads "
            "and heads a multiple of kv_heads"
        )
    config = LlamaConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=-(-8 * dim // 3 // 32) * 32,
        vocab_size=vocab, max_position_embeddings=max_positions, bos_token_id=0,
        eos_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def cache_layer_bytes(cache) -> list[int]:
    """Bytes of the tensors each layer of an HF ``Cache`` holds: a ``FormerlabCache``
    layer's streaming state, or a ``DynamicCache`` layer's keys and values (exact, from the
    tensors; a preallocated KV buffer counts with its whole capacity)."""
    from formerlab.models.decoder import tensor_bytes

    sizes = []
    for layer in cache.layers:
        if hasattr(layer, "state"):
            sizes.append(tensor_bytes(layer.state))
        else:
            sizes.append(
                tensor_bytes([getattr(layer, "keys", None), getattr(layer, "values", None)])
            )
    return sizes


def time_hf_decode(
    model,
    variant: str,
    context: int,
    steps: int,
    warmup: int,
    vocab: int,
    seed: int,
    clock: Callable[[], float],
    device: str = "cpu",
) -> tuple[float, list[int]]:
    """Prefill ``context`` random tokens into a fresh cache (a ``DynamicCache`` for the
    original model, a ``FormerlabCache`` for a swapped one), then decode ``warmup`` +
    ``steps`` greedy tokens one at a time; returns the median seconds of the ``steps``
    timed ones and the cache's bytes per layer after them."""
    from transformers import DynamicCache

    from formerlab.integrations.hf_cache import FormerlabCache

    cache = DynamicCache(config=model.config) if variant == ORIGINAL else FormerlabCache(model)
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    times = []
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), cache=cache, use_cache=True).logits
        for i in range(warmup + steps):
            nxt = logits[:, -1:].argmax(-1)
            sync(device)
            t0 = clock()
            logits = model(input_ids=nxt, cache=cache, use_cache=True).logits
            sync(device)
            if i >= warmup:
                times.append(clock() - t0)
    return float(torch.tensor(times).median()), cache_layer_bytes(cache)


def run_hf_benchmark(
    kernels: tuple[str, ...] | None = None,
    contexts: tuple[int, ...] = HF_CONTEXTS,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    steps: int = 32,
    warmup: int = 4,
    rounds: int = 2,
    threads: tuple[int, ...] = (1,),
    seed: int = 0,
    clock: str = "wall",
    device: str = "cpu",
    kernel_options: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[HFDecodeResult]:
    """Per-token decoding time and cache memory of a Llama-shaped HF decoder at each
    context, side by side: the original model with HF's ``DynamicCache`` (KV cache, SDPA)
    and the same weights with each formerlab kernel swapped in, decoding with a
    ``FormerlabCache`` (default kernels: softmax, linear, performer).

    Every thread count runs ``rounds`` rounds; a round measures every variant at every
    context in turn (interleaved, so a busy moment of a shared machine hits all alike),
    and the minimum over rounds of each median is kept. ``kernel_options``: per kernel,
    options for ``swap_attention``.
    """
    import copy

    from formerlab.integrations.hf import swap_attention

    timer = CLOCKS[check_choice("clock", clock, CLOCKS)]
    kernels = tuple(HF_KERNELS if kernels is None else kernels)
    unknown = sorted(set(kernels) - set(attention.available(causal=True)))
    if unknown or not kernels:
        raise ValueError(f"kernels {unknown or list(kernels)} are not causal kernels; choose "
                         f"from {attention.available(causal=True)}")  # fmt: skip
    for arg, value in (("steps", steps), ("rounds", rounds)):
        check_positive_int(arg, value)
    check_positive_int("warmup", warmup, minimum=0)
    contexts = tuple(check_positive_int("contexts", c) for c in contexts)
    threads = tuple(check_positive_int("threads", t) for t in threads)
    if clock == "cpu" and (threads != (1,) or torch.device(device).type != "cpu"):
        raise ValueError(
            f"clock='cpu' times the calling thread, so it needs device='cpu' and threads=(1,); "
            f"got device={device!r}, threads={threads}"
        )
    original = build_hf_decoder(dim, depth, heads, kv_heads, vocab,
                                max(contexts) + warmup + steps + 1, seed)  # fmt: skip
    original = original.to(device)
    models = {ORIGINAL: original}
    for k in kernels:
        models[k] = swap_attention(copy.deepcopy(original), k, **(kernel_options or {}).get(k, {}))
    results: list[HFDecodeResult] = []
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            results += _hf_round_robin(models, t, contexts, rounds, steps, warmup, vocab, seed,
                                       timer, device, progress)  # fmt: skip
    finally:
        torch.set_num_threads(before)  # the caller's thread count comes back
    return results


def _hf_round_robin(models, threads, contexts, rounds, steps, warmup, vocab, seed, timer,
                    device, progress) -> list[HFDecodeResult]:  # fmt: skip
    """Every variant at every context, ``rounds`` times interleaved; minimum kept."""
    best = {v: HFDecodeResult(v, threads) for v in models}
    for r in range(rounds):
        for c in contexts:
            for variant, model in models.items():
                s, sizes = time_hf_decode(
                    model, variant, c, steps, warmup, vocab, seed, timer, device
                )
                res = best[variant]
                res.per_token_s[c] = min(res.per_token_s.get(c, s), s)
                res.layer_bytes[c] = sizes
                if progress:
                    progress(f"{threads} thread(s), round {r + 1}/{rounds}, context {c}: "
                             f"{variant:<24} {s * 1e3:.2f} ms/token")  # fmt: skip
    return list(best.values())


def hf_summary_rows(results: list[HFDecodeResult]) -> list[dict[str, str]]:
    """One markdown row per (thread count, variant): ms/token at each context, the ratio of
    the last context's to the first's, and the cache KiB per layer at each context."""
    rows = []
    for r in results:
        row = {"threads": str(r.threads), "model": r.variant}
        cs = sorted(r.per_token_s)
        for c in cs:
            row[f"ms/tok @{c}"] = f"{r.per_token_s[c] * 1e3:.2f}"
        if len(cs) > 1:
            row[f"@{cs[-1]} / @{cs[0]}"] = f"{r.per_token_s[cs[-1]] / r.per_token_s[cs[0]]:.2f}"
        for c in cs:
            per_layer = r.layer_bytes[c]
            row[f"cache KiB/layer @{c}"] = f"{sum(per_layer) / len(per_layer) / 1024:.1f}"
        rows.append(row)
    return rows
