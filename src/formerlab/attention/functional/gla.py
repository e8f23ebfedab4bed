"""Gated linear attention: simple GLA (a scalar decay per head) and GLA (a decay per key).

Both are the gated linear recurrence (Yang et al., 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training", arXiv:2312.06635)

.. math::

    S_t = \\operatorname{diag}(e^{g_t}) S_{t-1} + k_t v_t^\\top, \\qquad
    o_t = \\text{scale} \\cdot S_t^\\top q_t,

with a state :math:`S_t` of shape ``[K, V]`` per head and a log decay :math:`g_t \\le 0`
that is one number per head and token for simple GLA (``g [B, T, H]``, or a fixed
``g_gamma [H]`` per head as in RetNet) and one number per key channel for GLA
(``g [B, T, H, K]``).

``fused_recurrent_*`` run the recurrence token by token. ``chunk_*`` split the sequence
into chunks of ``C`` tokens: inside a chunk the output is a masked quadratic form, between
chunks one ``[K, V]`` state per chunk carries the past (the chunkwise form of GLA, Sec. 3-4
of the paper). Only differences of cumulative log decays *between a later and an earlier
token* are exponentiated, so every exponent is <= 0 and strong decays (``g = -20`` per
token) underflow to zero instead of overflowing. For the per-key decay, the intra-chunk
scores are built by recursive halving: the scores of the upper half against the lower half
factor through the cumulative decay at the split point, ``e^{b_t - b_s} = e^{b_t - m}
e^{m - b_s}`` with both factors <= 1, which turns them into a matrix product.

Autograd keeps one ``[K, V]`` state per chunk (never one per token). The chunk scan and
the decay-weighted terms of GLA have hand-written backward passes (checked against the
recurrence and by ``gradcheck``); they support first-order gradients only.
"""

from __future__ import annotations

import torch

from formerlab.attention.functional._common import (
    DEFAULT_CHUNK_SIZE,
    cast,
    check_chunk_size,
    check_cu_seqlens,
    check_initial_state,
    check_per_token,
    check_qkv,
    resolve_scale,
    run_per_sequence,
    transpose_state,
    work_dtype,
)

#: Chunk length of :func:`chunk_gla` (fla's ``chunk_gla`` takes no ``chunk_size``).
GLA_CHUNK_SIZE = DEFAULT_CHUNK_SIZE

#: Below this block size the per-key intra-chunk scores are summed elementwise, where a
#: batched matrix product of tiny matrices costs more than it saves.
_ELEMENTWISE_BLOCK = 1


# ----------------------------------------------------------------------------- cores
def _recurrent_core(q, k, v, gk, gv, initial_state, *, scale, reverse):
    """Token-by-token recurrence on one batch (all tensors in the work dtype).

    ``gk`` is a log decay broadcastable to ``[B, T, H, K]`` (``[B, T, H, 1]`` for a scalar
    gate) or ``None``; ``gv`` a log decay ``[B, T, H, V]`` of the value axis or ``None``.
    """
    if reverse:  # the state runs from the last token to the first
        q, k, v, gk, gv = (None if x is None else x.flip(1) for x in (q, k, v, gk, gv))
    batch, seq_len, heads, key_dim = q.shape
    state = initial_state
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    # unbind once (not x[:, t] in the loop) so backward assembles each gradient once
    decay_k = [None] * seq_len if gk is None else gk.exp().unbind(1)
    decay_v = [None] * seq_len if gv is None else gv.exp().unbind(1)
    steps = zip((q * scale).unbind(1), k.unbind(1), v.unbind(1), decay_k, decay_v)
    outputs = []
    for q_t, k_t, v_t, a_t, c_t in steps:
        if a_t is not None:
            state = state * a_t.unsqueeze(-1)
        if c_t is not None:
            state = state * c_t.unsqueeze(-2)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outputs.append((q_t.unsqueeze(-2) @ state).squeeze(-2))
    o = torch.stack(outputs, dim=1)
    return (o.flip(1) if reverse else o), state


class _ToChunks(torch.autograd.Function):
    """``scale * x`` from ``[B, T, H, ...]`` to ``[B, H, N, C, ...]``, zero-padded in time.

    Both passes copy into a fresh contiguous tensor, then scale it in place, so the output
    and the gradient of ``x`` are contiguous in eager and in a ``torch.compile`` graph
    alike. (An ``out=`` product into a view that spans the whole buffer, ``T = N * C``,
    is traced with the strides of its transposed source, so a later ``view`` of the
    chunks fails in the graph; a transposed gradient reaches the ops upstream of ``x`` in
    a layout their traced backward passes may not produce.)
    """

    @staticmethod
    def forward(ctx, x, chunk_size, scale):
        batch, seq_len, heads = x.shape[:3]
        n_chunks = -(-seq_len // chunk_size)
        out = x.new_empty(batch, heads, n_chunks * chunk_size, *x.shape[3:])
        out[:, :, seq_len:].zero_()
        out[:, :, :seq_len].copy_(x.transpose(1, 2))
        if scale != 1.0:  # in place on contiguous memory; the zero padding stays zero
            out.mul_(scale)
        ctx.seq_len, ctx.scale = seq_len, scale
        return out.view(batch, heads, n_chunks, chunk_size, *x.shape[3:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        batch, heads, n_chunks, chunk = grad.shape[:4]
        flat = grad.reshape(batch, heads, n_chunks * chunk, *grad.shape[4:])
        moved = flat[:, :, : ctx.seq_len].transpose(1, 2)
        out = grad.new_empty(moved.shape).copy_(moved)
        if ctx.scale != 1.0:
            out.mul_(ctx.scale)
        return out, None, None


def to_chunks(x: torch.Tensor, chunk_size: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * x`` from ``[B, T, H, ...]`` to a contiguous ``[B, H, N, C, ...]``.

    The layout the chunked ops work in: ``N = ceil(T / C)`` chunks of ``C`` tokens, time
    zero-padded to ``N * C``. One strided copy each way, and the gradient of ``x`` is a
    contiguous ``[B, T, H, ...]`` tensor (a transposed view would reach the ops upstream
    of ``x`` in a layout that ``torch.compile`` may not have traced).

    Args:
        x: a per-token tensor ``[B, T, H, ...]`` (any strides).
        chunk_size: the chunk length ``C``.
        scale: a factor applied on the way (the score scale of ``q``).

    Returns:
        ``[B, H, N, C, ...]``, contiguous.
    """
    return _ToChunks.apply(x, chunk_size, scale)


class _StateToKeyValue(torch.autograd.Function):
    """A state ``[N, H, V, K]`` as a contiguous ``[N, H, K, V]`` copy; the gradient likewise.

    A plain ``transpose`` would hand the gradient back as a transposed view, a layout the
    ops upstream of the state may not have been traced with (see :func:`to_chunks`).
    """

    @staticmethod
    def forward(ctx, state):
        return state.transpose(-1, -2).clone(memory_format=torch.contiguous_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad.transpose(-1, -2).clone(memory_format=torch.contiguous_format)


def key_value_state(state: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """The initial state in ``[N, H, K, V]`` layout, from ``[N, H, V, K]`` if ``state_v_first``.

    The swapped state is a contiguous copy whose gradient comes back as a contiguous
    ``[N, H, V, K]`` tensor, the layout of a state the caller computed in that order.

    Args:
        state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), or ``None``.
        state_v_first: whether ``state`` is in ``[N, H, V, K]`` layout.

    Returns:
        ``[N, H, K, V]``, or ``None``.
    """
    if state is None or not state_v_first:
        return state
    return _StateToKeyValue.apply(state)


class _FromChunks(torch.autograd.Function):
    """``[B, H, N, C, V]`` to a contiguous ``[B, T, H, V]`` (padding dropped), one pass."""

    @staticmethod
    def forward(ctx, o, seq_len):
        batch, heads, n_chunks, chunk, value_dim = o.shape
        ctx.chunks = (n_chunks, chunk)
        flat = o.reshape(batch, heads, n_chunks * chunk, value_dim)
        return flat[:, :, :seq_len].transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        batch, seq_len, heads, value_dim = grad.shape
        n_chunks, chunk = ctx.chunks
        out = grad.new_empty(batch, heads, n_chunks * chunk, value_dim)
        out[:, :, seq_len:].zero_()
        out[:, :, :seq_len].copy_(grad.transpose(1, 2))
        return out.view(batch, heads, n_chunks, chunk, value_dim), None


class _ChunkScan(torch.autograd.Function):
    """States at the start of every chunk: ``S_{n+1} = decay_n * S_n + U_n``.

    ``decay`` is ``[B, H, N, 1]`` (scalar) or ``[B, H, N, K]`` (per key), ``updates``
    ``[B, H, N, K, V]`` and ``initial`` ``[B, H, K, V]``. One fused step per chunk and no
    autograd graph per step: the backward pass runs the adjoint recurrence
    ``dS_n = decay_n * dS_{n+1} + dStarts_n`` and gets ``d decay_n = sum_v S_n dS_{n+1}``
    in one batched product. Only the per-chunk states are kept.
    """

    @staticmethod
    def forward(ctx, decay, updates, initial):
        factors = decay.unsqueeze(-1)
        starts = torch.empty_like(updates)
        state = initial
        for n in range(updates.shape[2]):
            starts[:, :, n] = state
            state = torch.addcmul(updates[:, :, n], factors[:, :, n], state)
        ctx.save_for_backward(factors, starts)
        return starts, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_starts, d_final):
        factors, starts = ctx.saved_tensors
        d_state = torch.zeros_like(starts[:, :, 0]) if d_final is None else d_final
        if d_starts is None:
            d_starts = torch.zeros_like(starts)
        d_updates = torch.empty_like(starts)
        for n in reversed(range(starts.shape[2])):
            d_updates[:, :, n] = d_state
            d_state = torch.addcmul(d_starts[:, :, n], factors[:, :, n], d_state)
        d_decay = (starts * d_updates).sum(-1)
        if factors.shape[-2] == 1:
            d_decay = d_decay.sum(-1, keepdim=True)
        return d_decay, d_updates, d_state


def _scan_states(decay, updates, initial_state):
    """States at the start of every chunk and the final state (see :class:`_ChunkScan`)."""
    if initial_state is None:
        initial_state = updates.new_zeros(updates.shape[:2] + updates.shape[3:])
    return _ChunkScan.apply(decay, updates.contiguous(), initial_state)


def _chunk_layout(q, k, v, g, chunk_size, scale):
    """``scale * q, k, v, g`` in ``[B, H, N, C, ...]``, time zero-padded to ``N * C``."""
    scales = (scale, 1.0, 1.0, 1.0)
    return tuple(to_chunks(x, chunk_size, c) for x, c in zip((q, k, v, g), scales))


def _combine(scores, values, queries, starts):
    """``scores @ values + queries @ starts`` (the second product fused in a ``baddbmm``).

    ``scores [..., C, C]``, ``values [..., C, V]``, ``queries [..., C, K]`` and ``starts
    [..., K, V]`` share their leading axes; the result is ``[..., C, V]``.
    """
    lead = scores.shape[:-2]

    def flat(x):
        return x.reshape(-1, *x.shape[-2:])

    intra = flat(scores) @ flat(values)
    o = torch.baddbmm(intra, flat(queries), flat(starts))
    return o.view(*lead, *o.shape[-2:])


def _chunk_scalar_core(q, k, v, g, initial_state, *, scale, chunk_size):
    """Chunked simple GLA: ``g`` is a log decay ``[B, T, H]`` (``None``: no decay)."""
    seq_len = q.shape[1]
    if g is None:
        g = q.new_zeros(q.shape[:3])
    qc, kc, vc, gc = _chunk_layout(q, k, v, g, chunk_size, scale)
    b = gc.cumsum(-1)  # [B, H, N, C]: log decay from the chunk start to each token
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # b_t - b_s for s <= t only; the masked entries become exp(-inf) = 0 before any exp
    log_decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (qc @ kc.transpose(-1, -2)) * log_decay.exp()
    b_last = b[..., -1:]
    updates = (kc * (b_last - b).exp().unsqueeze(-1)).transpose(-1, -2) @ vc
    starts, final = _scan_states(b_last.exp(), updates, initial_state)
    o = _combine(scores, vc, qc * b.exp().unsqueeze(-1), starts)
    return _FromChunks.apply(o, seq_len), final


def _halving_levels(q, k, b):
    """Yield, for each level of the recursive halving, the decay-scaled halves.

    ``q, k, b`` are ``[..., C, K]`` with ``C`` a power of two. At the level of half-size
    ``h`` the chunk is cut into blocks of ``2h`` tokens; every pair ``s < t`` with ``s`` in
    the lower and ``t`` in the upper half of one block is scored at exactly one level.
    With ``m`` the cumulative log decay of the lower half's last token, yields
    ``(h, e_up, e_low, q_up, k_low)``, each ``[..., C / 2h, h, K]``: ``e_up = e^{b_t - m}``
    over the upper halves, ``e_low = e^{m - b_s}`` over the lower halves (both <= 1 when
    the log decays are <= 0), ``q_up = q_t e_up`` and ``k_low = k_s e_low``.
    """
    half = q.shape[-2] // 2
    while half >= 1:
        b_low, b_up = _halves(b, half).unbind(-3)
        split = b_low[..., -1:, :]
        e_up, e_low = (b_up - split).exp(), (split - b_low).exp()
        q_up = _halves(q, half)[..., 1, :, :] * e_up
        yield half, e_up, e_low, q_up, _halves(k, half)[..., 0, :, :] * e_low
        half //= 2


def _halves(x, half):
    """``x [..., C, D]`` viewed as ``[..., C / 2h, 2, h, D]``: blocks of ``2h`` in halves."""
    return x.view(*x.shape[:-2], x.shape[-2] // (2 * half), 2, half, x.shape[-1])


def _block_view(x, half):
    """The ``[..., n_blocks, h, h]`` view of ``x [..., C, C]``: rows upper, columns lower."""
    lead = x.shape[:-2]
    n_blocks = x.shape[-1] // (2 * half)
    grid = x.view(*lead, n_blocks, 2, half, n_blocks, 2, half)
    return grid.diagonal(dim1=-6, dim2=-3)[..., 1, :, 0, :, :].movedim(-1, -3)


def _small_matmul(a, b, half):
    """``a @ b`` for the blocks; elementwise for tiny blocks (cheaper than tiny GEMMs)."""
    if half <= _ELEMENTWISE_BLOCK:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return a @ b


def _intra_scores(q, k, b):
    """Causal intra-chunk scores ``A_ts = sum_i q_ti k_si e^{b_ti - b_si}`` (``s <= t``).

    Returns ``A [..., C, C]`` (zero above the diagonal) and the per-level factors
    ``[e_up, e_low, ...]`` of :func:`_halving_levels`. The diagonal has no decay; every
    other pair is one block product of the recursive halving, so nothing of size
    ``C x C x K`` is formed and no factor exceeds 1.
    """
    chunk = q.shape[-2]
    scores = q.new_zeros(*q.shape[:-2], chunk, chunk)
    scores.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    factors = []
    for half, e_up, e_low, q_up, k_low in _halving_levels(q, k, b):
        _block_view(scores, half).copy_(_small_matmul(q_up, k_low.transpose(-1, -2), half))
        factors += [e_up, e_low]
    return scores, factors


def _intra_scores_backward(d_scores, q, k, factors):
    """Gradients of :func:`_intra_scores` with respect to ``q`` and ``k``."""
    d_scores = d_scores.contiguous()
    d_diag = d_scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    dq, dk = d_diag * k, d_diag * q
    half = q.shape[-2] // 2
    for e_up, e_low in zip(factors[0::2], factors[1::2]):
        q_up = _halves(q, half)[..., 1, :, :] * e_up
        k_low = _halves(k, half)[..., 0, :, :] * e_low
        d_block = _block_view(d_scores, half)
        _halves(dq, half)[..., 1, :, :].addcmul_(_small_matmul(d_block, k_low, half), e_up)
        d_block_t = d_block.transpose(-1, -2)
        _halves(dk, half)[..., 0, :, :].addcmul_(_small_matmul(d_block_t, q_up, half), e_low)
        half //= 2
    return dq, dk


class _GlaChunkTerms(torch.autograd.Function):
    """Every decay-weighted term of one GLA chunk, from ``q, k`` and the log decay ``g``.

    With ``b`` the cumulative log decay inside the chunk (``[..., C, K]``), returns the
    intra-chunk scores ``A`` (:func:`_intra_scores`), the queries seen from the chunk start
    ``q_t e^{b_t}``, the keys seen from the chunk end ``k_s e^{b_C - b_s}`` and the chunk
    decay ``e^{b_C}``: every exponent is a later minus an earlier cumulative decay.

    The backward pass is written out: since all terms depend on ``b`` through ``e^{+b}``
    for ``q`` and ``e^{-b}`` for ``k``, ``db_t = q_t dq_t - k_t dk_t`` (plus the terms of
    ``b_C``), and ``dg`` is its reverse cumulative sum; this saves autograd's many
    intermediate passes over ``[T, K]`` tensors.
    """

    @staticmethod
    def forward(ctx, q, k, g):
        b = g.cumsum(-2)
        scores, factors = _intra_scores(q, k, b)
        b_last = b[..., -1:, :]
        to_start, to_end = b.exp(), (b_last - b).exp()
        q_decayed, k_decayed = q * to_start, k * to_end
        decay = b_last.squeeze(-2).exp()
        ctx.save_for_backward(q, k, to_start, to_end, k_decayed, decay, *factors)
        return scores, q_decayed, k_decayed, decay

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_scores, d_q_decayed, d_k_decayed, d_decay):
        q, k, to_start, to_end, k_decayed, decay, *factors = ctx.saved_tensors
        if d_scores is None:
            dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        else:
            dq, dk = _intra_scores_backward(d_scores, q, k, factors)
        db_last = torch.zeros_like(decay)
        if d_q_decayed is not None:
            dq.addcmul_(d_q_decayed, to_start)
        if d_k_decayed is not None:
            dk.addcmul_(d_k_decayed, to_end)
            db_last += (k_decayed * d_k_decayed).sum(-2)
        if d_decay is not None:
            db_last.addcmul_(decay, d_decay)
        db = q * dq - k * dk
        db[..., -1, :] += db_last
        return dq, dk, db.flip(-2).cumsum(-2).flip(-2)


def _chunk_vector_core(q, k, v, g, initial_state, *, scale, chunk_size):
    """Chunked GLA: ``g`` is a log decay ``[B, T, H, K]``."""
    seq_len = q.shape[1]
    qc, kc, vc, gc = _chunk_layout(q, k, v, g, chunk_size, scale)
    scores, q_decayed, k_decayed, decay = _GlaChunkTerms.apply(qc, kc, gc)
    updates = k_decayed.transpose(-1, -2) @ vc
    starts, final = _scan_states(decay, updates, initial_state)
    o = _combine(scores, vc, q_decayed, starts)
    return _FromChunks.apply(o, seq_len), final


# ----------------------------------------------------------------------------- shared
def _check_common(q, k, v, scale, initial_state, state_v_first, cu_seqlens):
    """Validate what every op takes; return sizes, offsets, scale and the ``[K, V]`` state."""
    batch, seq_len, heads, key_dim, value_dim = check_qkv(q, k, v)
    offsets = check_cu_seqlens(cu_seqlens, batch, seq_len)
    n_states = batch if offsets is None else len(offsets) - 1
    dims = (value_dim, key_dim) if state_v_first else (key_dim, value_dim)
    layout = "[N, H, V, K]" if state_v_first else "[N, H, K, V]"
    check_initial_state(
        initial_state, n_states, heads, *dims, offsets is not None, layout, q.device
    )
    state = key_value_state(initial_state, state_v_first)
    return (
        (batch, seq_len, heads, key_dim, value_dim),
        offsets,
        resolve_scale(scale, key_dim),
        state,
    )


def _run(core, per_token, state, offsets, out_dtype, output_final_state, state_v_first):
    """Cast to the work dtype, run ``core`` per sequence, cast the output back."""
    dtype = work_dtype(*per_token, state)
    per_token, (state,) = cast(dtype, *per_token), cast(dtype, state)
    o, final = run_per_sequence(core, per_token, state, offsets)
    if not output_final_state:
        return o.to(out_dtype).contiguous(), None
    return o.to(out_dtype).contiguous(), transpose_state(final) if state_v_first else final


def _scalar_log_decay(g, g_gamma, sizes, device):
    """Validate ``g`` / ``g_gamma`` and return the per-token log decay ``[B, T, H]``."""
    batch, seq_len, heads = sizes[:3]
    if g is not None:
        check_per_token("g", g, (batch, seq_len, heads), "[B, T, H]", device)
    if g_gamma is not None:
        check_per_token("g_gamma", g_gamma, (heads,), "[H]", device)
    if g_gamma is None:
        return g
    dtype = work_dtype(g, g_gamma)
    gamma = g_gamma.to(dtype).expand(batch, seq_len, heads)
    # fla's kernels apply both decays when both are given: their log decays add
    return gamma if g is None else g.to(dtype) + gamma


# ----------------------------------------------------------------------------- simple GLA
def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA (a scalar log decay per head), chunked-parallel form.

    ``S_t = e^{g_t} S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t`` per head, computed
    chunk by chunk (Yang et al., 2024, arXiv:2312.06635; fla's ``chunk_simple_gla``).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        g: log decay (forget gate, usually <= 0) ``[B, T, H]``, or ``None``.
        g_gamma: data-independent log decay ``[H]`` per head, or ``None``. fla documents
            that only one of ``g`` / ``g_gamma`` should be given; when both are, both decays
            apply (their log decays add), as in fla's kernels. Neither: no decay (causal
            linear attention).
        scale: score scale; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), ``N = B``
            or the number of ``cu_seqlens`` sequences; ``None`` is a zero state.
        output_final_state: whether to return the final state.
        state_v_first: states in ``[N, H, V, K]`` layout instead of ``[N, H, K, V]``.
        cu_seqlens: offsets ``[S + 1]`` of sequences packed along ``T`` (needs ``B = 1``).
        cu_seqlens_cpu: accepted for fla compatibility and unused (the offsets are read
            from ``cu_seqlens``).
        chunk_size: chunk length ``C``, a power of two (fla's keyword, default 64).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``v``; the final state
        (in the compute dtype: float64 for float64 inputs, else float32) or ``None``.

    Raises:
        ValueError: on a bad shape, dtype, device, ``scale``, ``chunk_size`` or
            ``cu_seqlens``, naming the argument.
    """
    del cu_seqlens_cpu
    sizes, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens
    )
    log_decay = _scalar_log_decay(g, g_gamma, sizes, q.device)
    chunk_size = check_chunk_size(chunk_size)

    def core(q_, k_, v_, g_, h0):
        return _chunk_scalar_core(q_, k_, v_, g_, h0, scale=scale, chunk_size=chunk_size)

    per_token = (q, k, v, log_decay)
    return _run(core, per_token, state, offsets, v.dtype, output_final_state, state_v_first)


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simple GLA (a scalar log decay per head), token-by-token recurrence.

    The reference for :func:`chunk_simple_gla` and the streaming step: feed ``T`` new tokens
    with the previous ``final_state`` as ``initial_state``. Autograd keeps every per-token
    state, so prefer :func:`chunk_simple_gla` for training on long sequences.

    Args:
        q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first,
        cu_seqlens: as in :func:`chunk_simple_gla`.
        reverse: run the recurrence from the last token to the first.

    Returns:
        ``(o, final_state)`` as in :func:`chunk_simple_gla`.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    sizes, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens
    )
    log_decay = _scalar_log_decay(g, g_gamma, sizes, q.device)

    def core(q_, k_, v_, g_, h0):
        gk = None if g_ is None else g_.unsqueeze(-1)
        return _recurrent_core(q_, k_, v_, gk, None, h0, scale=scale, reverse=reverse)

    per_token = (q, k, v, log_decay)
    return _run(core, per_token, state, offsets, v.dtype, output_final_state, state_v_first)


# ----------------------------------------------------------------------------- GLA
def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA (a log decay per key channel), chunked-parallel form.

    ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t`` per head
    (Yang et al., 2024, arXiv:2312.06635; fla's ``chunk_gla``), in chunks of
    :data:`GLA_CHUNK_SIZE` tokens (fla's ``chunk_gla`` takes no ``chunk_size``).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        g: log decay (forget gate, usually <= 0) ``[B, T, H, K]``.
        scale: score scale; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), ``N = B``
            or the number of ``cu_seqlens`` sequences; ``None`` is a zero state. Unlike
            fla, any floating dtype is accepted.
        output_final_state: whether to return the final state.
        state_v_first: states in ``[N, H, V, K]`` layout instead of ``[N, H, K, V]``.
        cu_seqlens: offsets ``[S + 1]`` of sequences packed along ``T`` (needs ``B = 1``).
        cu_seqlens_cpu: accepted for fla compatibility and unused.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``v``; the final state
        (float64 for float64 inputs, else float32) or ``None``.

    Raises:
        ValueError: on a bad shape, dtype, device, ``scale`` or ``cu_seqlens``, naming the
            argument.
    """
    del cu_seqlens_cpu
    sizes, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens
    )
    check_per_token("g", g, sizes[:4], "[B, T, H, K]", q.device)

    def core(q_, k_, v_, g_, h0):
        return _chunk_vector_core(q_, k_, v_, g_, h0, scale=scale, chunk_size=GLA_CHUNK_SIZE)

    per_token = (q, k, v, g)
    return _run(core, per_token, state, offsets, v.dtype, output_final_state, state_v_first)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA, token-by-token recurrence, with an optional decay of the value axis too.

    ``S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_t^T``, ``o_t = scale * S_t^T q_t``
    (fla's ``fused_recurrent_gla``; note fla names the key decay ``gk`` here and ``g`` in
    :func:`chunk_gla`). The reference for :func:`chunk_gla` and the streaming step.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, H, V]``.
        gk: log decay of the key axis ``[B, T, H, K]``, or ``None``.
        gv: log decay of the value axis ``[B, T, H, V]``, or ``None``.
        scale, initial_state, output_final_state, state_v_first, cu_seqlens: as in
            :func:`chunk_gla`.
        reverse: run the recurrence from the last token to the first.

    Returns:
        ``(o, final_state)`` as in :func:`chunk_gla`.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    sizes, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens
    )
    batch, seq_len, heads, key_dim, value_dim = sizes
    if gk is not None:
        check_per_token("gk", gk, (batch, seq_len, heads, key_dim), "[B, T, H, K]", q.device)
    if gv is not None:
        check_per_token("gv", gv, (batch, seq_len, heads, value_dim), "[B, T, H, V]", q.device)

    def core(q_, k_, v_, gk_, gv_, h0):
        return _recurrent_core(q_, k_, v_, gk_, gv_, h0, scale=scale, reverse=reverse)

    per_token = (q, k, v, gk, gv)
    return _run(core, per_token, state, offsets, v.dtype, output_final_state, state_v_first)
