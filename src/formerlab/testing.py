"""Reusable property checks for tests: the future-leak, prefix-consistency and
state-as-value checkers.

A causal sequence map ``y = f(x)`` must satisfy, for every position ``t``:

* **values**: outputs at positions ``<= t`` do not change when any input at ``> t`` changes;
* **gradients**: the gradient of outputs at ``<= t`` with respect to inputs at ``> t`` is
  *exactly* zero (not merely small: a tiny non-zero gradient is a leak that training
  will amplify).

:func:`check_future_leak` measures both for a few positions and returns a
:class:`LeakReport`; :func:`assert_no_future_leak` raises ``AssertionError`` with the
worst offending position. Both are generic: ``fn`` is any deterministic callable whose
tensor inputs and output carry the sequence on some dimension — per-head kernels on
(B, H, N, D) (``seq_dim=2``), token mixers and models on (B, N, C) (``seq_dim=1``),
token ids (B, N) of a language model, ... Put modules in ``eval()`` mode (dropout would
make any check fail) and close over non-sequence arguments::

    kernel = attention.build("linear")
    assert_no_future_leak(lambda q, k, v: kernel(q, k, v, causal=True), [q, k, v], seq_dim=2)

    mixer.eval()
    assert_no_future_leak(lambda x: mixer(x, causal=True), [x], seq_dim=1)

    lm.eval()  # integer ids: values are checked, gradients need float inputs
    assert_no_future_leak(lm, [ids], seq_dim=1, check_grad=False)

Inputs are perturbed as follows: floating tensors get Gaussian noise (scaled by
``noise_scale`` times the input's standard deviation, at least ``noise_scale``) at
positions ``> t``; integer tensors get fresh random values in ``[0, max + 1)``; bool
tensors (masks) are left alone unless ``perturb_masks=True``, in which case their future
entries are flipped. Non-tensor inputs pass through unchanged.

A decoder needs more than no leak at a fixed N: the past must not depend on *how much*
future there is. :func:`assert_prefix_consistent` checks ``out(x[:n])[:n] == out(x)[:n]``
for every prefix length ``n`` (a kernel whose segmentation is derived from N passes the
leak test and fails this one), and, given a masked form of ``fn``, that right padding to
N with junk leaves the real positions equal to the sequence alone::

    assert_prefix_consistent(
        lambda q, k, v: kernel(q, k, v, causal=True), [q, k, v], seq_dim=2,
        padded=lambda q, k, v, mask: kernel(q, k, v, attention_mask=mask, causal=True),
    )

A streaming state must be a value: ``out, new = step(x, state)`` never changes ``state``,
so one state can be continued twice (beam search, several continuations of one prompt, a
cached system prompt). :func:`assert_states_are_values` branches continuations from one
prompt state, steps them interleaved token by token, reuses the prompt state once more,
and compares every output with the parallel call::

    assert_states_are_values(
        init=lambda: kernel.init_state(1, 2, 4, dtype=torch.float64),
        step=lambda xs, state: kernel.step(*xs, state),
        parallel=lambda q, k, v: kernel(q, k, v, causal=True),
        sequences=[[q1, k1, v1], [q2, k2, v2]], prompt=40, seq_dim=2,
    )
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LeakReport",
    "PrefixReport",
    "assert_no_future_leak",
    "assert_prefix_consistent",
    "assert_states_are_values",
    "check_future_leak",
    "check_prefix_consistency",
]


@dataclass
class LeakReport:
    """What :func:`check_future_leak` measured.

    ``value_leak[t]``: max |Δ output at <= t| when inputs at > t were perturbed.
    ``grad_leak[t]``: max |∂ (outputs at <= t) / ∂ (inputs at > t)| (a random projection
    of the outputs is differentiated, so no cancellation hides a dependence).
    """

    positions: list[int]
    value_leak: dict[int, float] = field(default_factory=dict)
    grad_leak: dict[int, float] = field(default_factory=dict)

    @property
    def max_value_leak(self) -> float:
        return max(self.value_leak.values(), default=0.0)

    @property
    def max_grad_leak(self) -> float:
        return max(self.grad_leak.values(), default=0.0)


def _seq_dims(inputs: Sequence[Any], seq_dim: int | Sequence[int]) -> list[int]:
    if isinstance(seq_dim, int):
        return [seq_dim] * len(inputs)
    dims = list(seq_dim)
    if len(dims) != len(inputs):
        raise ValueError(
            f"seq_dim has {len(dims)} entries but there are {len(inputs)} inputs; "
            "give one int for all inputs or one per input"
        )
    return dims


def _seq_len(inputs: Sequence[Any], dims: list[int]) -> int:
    lengths = {x.shape[d] for x, d in zip(inputs, dims) if isinstance(x, Tensor)}
    if len(lengths) != 1:
        raise ValueError(
            f"tensor inputs must share one sequence length along seq_dim; got lengths {sorted(lengths)}"
        )
    return lengths.pop()


def _future(x: Tensor, dim: int, t: int) -> Tensor:
    """Bool mask broadcastable to ``x``: True at sequence positions > t along ``dim``."""
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    return (torch.arange(n, device=x.device) > t).view(shape)


def _perturb(
    x: Any, dim: int, t: int, generator: torch.Generator, noise_scale: float, masks: bool
) -> Any:
    if not isinstance(x, Tensor):
        return x
    future = _future(x, dim, t)
    if x.dtype == torch.bool:
        return torch.where(future, ~x, x) if masks else x
    if x.is_floating_point():
        base = x.detach().to(torch.float64)
        scale = noise_scale * max(float(base.std()) if base.numel() > 1 else 1.0, 1.0)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64) * scale
        return torch.where(future, (base + noise.to(x.device)).to(x.dtype), x.detach())
    high = int(x.max()) + 1
    fresh = torch.randint(0, max(high, 2), x.shape, generator=generator).to(x.dtype)
    return torch.where(future, fresh.to(x.device), x)


def _outputs(fn: Callable[..., Any], args: Sequence[Any]) -> Tensor:
    out = fn(*args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(
            f"fn must return a tensor (or a tuple whose first item is one); got {type(out).__name__}"
        )
    return out


def _max_diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def check_future_leak(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    seq_dim: int | Sequence[int] = 1,
    out_seq_dim: int | None = None,
    positions: Iterable[int] | None = None,
    check_grad: bool = True,
    noise_scale: float = 1.0,
    perturb_masks: bool = False,
    seed: int = 0,
) -> LeakReport:
    """Measure how much outputs at ``<= t`` depend on inputs at ``> t``; see the module doc.

    ``seq_dim``: sequence dimension of the inputs (one int, or one per input).
    ``out_seq_dim``: sequence dimension of the output (default: the first input's).
    ``positions``: the ``t`` to test (default: 0, 1, N//2 and N-2, all valid ones).
    ``check_grad``: also differentiate (needs floating inputs; integer/bool ones are
    treated as constants). Returns a :class:`LeakReport`.
    """
    inputs = list(inputs)
    dims = _seq_dims(inputs, seq_dim)
    n = _seq_len(inputs, dims)
    if n < 2:
        raise ValueError(f"need a sequence of length >= 2 to test for leaks; got N={n}")
    out_dim = dims[0] if out_seq_dim is None else out_seq_dim
    if positions is None:
        positions = sorted({0, 1, n // 2, n - 2})
    positions = [int(t) for t in positions]
    bad = [t for t in positions if not 0 <= t < n - 1]
    if bad:
        raise ValueError(f"positions {bad} are not allowed; expected 0 <= t < N-1 = {n - 1}")
    generator = torch.Generator().manual_seed(seed)
    report = LeakReport(positions=positions)

    with torch.no_grad():
        base = _outputs(fn, inputs)
    for t in positions:
        perturbed = [
            _perturb(x, d, t, generator, noise_scale, perturb_masks) for x, d in zip(inputs, dims)
        ]
        with torch.no_grad():
            out = _outputs(fn, perturbed)
        report.value_leak[t] = _max_diff(out.narrow(out_dim, 0, t + 1), base.narrow(out_dim, 0, t + 1))

        if not check_grad:
            continue
        leaves = [
            x.detach().clone().requires_grad_(True)
            if isinstance(x, Tensor) and x.is_floating_point()
            else x
            for x in inputs
        ]
        wrt = [(x, d) for x, d in zip(leaves, dims) if isinstance(x, Tensor) and x.requires_grad]
        if not wrt:
            raise ValueError("check_grad=True needs at least one floating-point tensor input")
        out = _outputs(fn, leaves)
        past = out.narrow(out_dim, 0, t + 1)
        weights = torch.randn(past.shape, generator=generator, dtype=torch.float64)
        loss = (past.double() * weights.to(past.device)).sum()
        grads = torch.autograd.grad(loss, [x for x, _ in wrt], allow_unused=True)
        worst = 0.0
        for (_, d), g in zip(wrt, grads):
            if g is None:
                continue
            future = g.narrow(d, t + 1, n - t - 1)
            if not torch.isfinite(future).all():
                worst = float("inf")
            elif future.numel():
                worst = max(worst, float(future.abs().max()))
        report.grad_leak[t] = worst
    return report


def assert_no_future_leak(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    seq_dim: int | Sequence[int] = 1,
    out_seq_dim: int | None = None,
    positions: Iterable[int] | None = None,
    atol: float = 1e-6,
    check_grad: bool = True,
    noise_scale: float = 1.0,
    perturb_masks: bool = False,
    seed: int = 0,
) -> LeakReport:
    """Raise ``AssertionError`` unless ``fn`` is causal along the sequence.

    Values at ``<= t`` may move by at most ``atol`` when inputs at ``> t`` change; the
    gradient of outputs at ``<= t`` with respect to inputs at ``> t`` must be exactly
    zero. Arguments as in :func:`check_future_leak`; returns its report when it passes.
    """
    report = check_future_leak(
        fn,
        inputs,
        seq_dim=seq_dim,
        out_seq_dim=out_seq_dim,
        positions=positions,
        check_grad=check_grad,
        noise_scale=noise_scale,
        perturb_masks=perturb_masks,
        seed=seed,
    )
    problems = []
    for t, leak in report.value_leak.items():
        if not leak <= atol:
            problems.append(f"t={t}: outputs at <= t moved by {leak:.3g} (> atol={atol:g})")
    for t, leak in report.grad_leak.items():
        if leak != 0.0:
            problems.append(f"t={t}: gradient w.r.t. inputs at > t is {leak:.3g} (must be 0)")
    if problems:
        raise AssertionError("future leak detected:\n  " + "\n  ".join(problems))
    return report


@dataclass
class PrefixReport:
    """What :func:`check_prefix_consistency` measured.

    ``prefix_error[n]``: max |out(x[:n]) - out(x)[:n]|. ``padding_error[n]``: max |real
    positions of the call on x[:n] right-padded (junk + mask) to N - out(x[:n])|.
    """

    lengths: list[int]
    prefix_error: dict[int, float] = field(default_factory=dict)
    padding_error: dict[int, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max([*self.prefix_error.values(), *self.padding_error.values()], default=0.0)


def check_prefix_consistency(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    seq_dim: int | Sequence[int] = 1,
    out_seq_dim: int | None = None,
    lengths: Iterable[int] | None = None,
    padded: Callable[..., Any] | None = None,
    seed: int = 0,
) -> PrefixReport:
    """Measure how far outputs on a prefix differ from the prefix of the outputs.

    ``seq_dim`` / ``out_seq_dim``: as in :func:`check_future_leak`. ``lengths``: the prefix
    lengths n to test (default every 1 <= n < N). ``padded``: optional masked form of ``fn``,
    called as ``padded(*inputs, mask)`` with ``mask`` bool (B, N), True = real token (B is
    the first tensor input's dim 0); positions >= n get junk (noise / random ids). Runs
    under ``torch.no_grad()``. Returns a :class:`PrefixReport`.
    """
    inputs = list(inputs)
    dims = _seq_dims(inputs, seq_dim)
    n_full = _seq_len(inputs, dims)
    out_dim = dims[0] if out_seq_dim is None else out_seq_dim
    lengths = list(range(1, n_full)) if lengths is None else [int(n) for n in lengths]
    bad = [n for n in lengths if not 1 <= n <= n_full]
    if bad:
        raise ValueError(f"lengths {bad} are not allowed; expected 1 <= n <= N = {n_full}")
    generator = torch.Generator().manual_seed(seed)
    batch = next(x.shape[0] for x in inputs if isinstance(x, Tensor))
    device = next(x.device for x in inputs if isinstance(x, Tensor))
    report = PrefixReport(lengths=lengths)
    with torch.no_grad():
        full = _outputs(fn, inputs)
        for n in lengths:
            prefix = [x.narrow(d, 0, n) if isinstance(x, Tensor) else x for x, d in zip(inputs, dims)]
            part = _outputs(fn, prefix)
            report.prefix_error[n] = _max_diff(part, full.narrow(out_dim, 0, n))
            if padded is None:
                continue
            # junk at positions >= n (bool inputs are left alone), masked out
            junk = [_perturb(x, d, n - 1, generator, 1.0, False) for x, d in zip(inputs, dims)]
            mask = (torch.arange(n_full, device=device) < n).expand(batch, n_full)
            out = _outputs(padded, [*junk, mask])
            report.padding_error[n] = _max_diff(out.narrow(out_dim, 0, n), part)
    return report


def assert_prefix_consistent(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    seq_dim: int | Sequence[int] = 1,
    out_seq_dim: int | None = None,
    lengths: Iterable[int] | None = None,
    padded: Callable[..., Any] | None = None,
    atol: float = 1e-8,
    seed: int = 0,
) -> PrefixReport:
    """Raise ``AssertionError`` unless ``out(x[:n])[:n] == out(x)[:n]`` within ``atol`` for
    every tested n (and, with ``padded``, right padding leaves the real positions equal).

    ``atol`` = 1e-8 suits float64 inputs; use a looser one for float32. Arguments as in
    :func:`check_prefix_consistency`; returns its report when it passes.
    """
    report = check_prefix_consistency(
        fn, inputs, seq_dim=seq_dim, out_seq_dim=out_seq_dim, lengths=lengths,
        padded=padded, seed=seed,
    )  # fmt: skip
    problems = [
        f"n={n}: out(x[:n]) differs from out(x)[:n] by {err:.3g} (> atol={atol:g})"
        for n, err in report.prefix_error.items()
        if not err <= atol
    ]
    problems += [
        f"n={n}: right padding to N moved the real positions by {err:.3g} (> atol={atol:g})"
        for n, err in report.padding_error.items()
        if not err <= atol
    ]
    if problems:
        raise AssertionError("not prefix consistent:\n  " + "\n  ".join(problems))
    return report


def assert_states_are_values(
    init: Callable[[], Any],
    step: Callable[[list[Any], Any], tuple[Tensor, Any]],
    parallel: Callable[..., Any],
    sequences: Sequence[Sequence[Any]],
    prompt: int,
    *,
    seq_dim: int = 1,
    atol: float = 1e-8,
) -> float:
    """Raise ``AssertionError`` unless a streaming state behaves as a value.

    ``sequences``: two or more input lists (tensors with the sequence on ``seq_dim``, the
    same in the output) that agree on their first ``prompt`` positions. The prompt is
    stepped once from ``init()``; from that one state every sequence's continuation is
    stepped, all of them interleaved one token at a time; then the prompt state is stepped
    a last time with the first continuation in one call. Every output must equal
    ``parallel(*sequence)`` at the same positions within ``atol``. Runs under
    ``torch.no_grad()``; returns the largest error seen.
    """
    if len(sequences) < 2:
        raise ValueError(f"sequences must hold at least 2 branches; got {len(sequences)}")
    n = _seq_len(list(sequences[0]), [seq_dim] * len(sequences[0]))
    if not 1 <= prompt < n:
        raise ValueError(f"prompt={prompt} is not allowed; expected 1 <= prompt < N = {n}")

    def cut(seq: Sequence[Any], a: int, b: int) -> list[Any]:
        return [x.narrow(seq_dim, a, b - a) if isinstance(x, Tensor) else x for x in seq]

    worst, problems = 0.0, []

    def compare(what: str, out: Tensor, ref: Tensor) -> None:
        nonlocal worst
        err = _max_diff(out, ref)
        worst = max(worst, err)
        if not err <= atol:
            problems.append(f"{what}: off the parallel call by {err:.3g} (> atol={atol:g})")

    with torch.no_grad():
        refs = [_outputs(parallel, list(seq)) for seq in sequences]
        out, root = step(cut(sequences[0], 0, prompt), init())
        compare("the prompt", out, refs[0].narrow(seq_dim, 0, prompt))
        states = [root] * len(sequences)
        outs: list[list[Tensor]] = [[] for _ in sequences]
        for t in range(prompt, n):
            for i, seq in enumerate(sequences):
                out, states[i] = step(cut(seq, t, t + 1), states[i])
                outs[i].append(out)
        for i, ref in enumerate(refs):
            got = torch.cat(outs[i], dim=seq_dim)
            compare(f"branch {i}, interleaved", got, ref.narrow(seq_dim, prompt, n - prompt))
        out, _ = step(cut(sequences[0], prompt, n), root)
        compare("the prompt state reused", out, refs[0].narrow(seq_dim, prompt, n - prompt))
    if problems:
        raise AssertionError("branched streams differ from the parallel call:\n  " + "\n  ".join(problems))
    return worst
