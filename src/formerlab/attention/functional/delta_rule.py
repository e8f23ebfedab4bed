"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet).

DeltaNet (Schlag et al., 2021, "Linear Transformers Are Secretly Fast Weight Programmers",
arXiv:2102.11174) writes to a fast-weight state :math:`S_t` of shape ``[K, V]`` per head
with the delta rule: it first reads what the state holds for the key, then replaces it by
a ``beta``-mix of the old and the new value. Gated DeltaNet (Yang et al., 2025, "Gated
Delta Networks: Improving Mamba2 with Delta Rule", arXiv:2412.06464) decays the state by
:math:`\\alpha_t = e^{g_t}` before the write:

.. math::

    S_t = \\alpha_t (I - \\beta_t k_t k_t^\\top) S_{t-1} + \\beta_t k_t v_t^\\top, \\qquad
    o_t = \\text{scale} \\cdot S_t^\\top q_t,

with :math:`\\alpha_t = 1` for DeltaNet. Keys are expected to have unit norm (pass
``use_qk_l2norm_in_kernel=True`` to normalise ``q`` and ``k`` inside the op) and
:math:`\\beta_t \\in [0, 1]` (``[0, 2]`` with fla's ``allow_neg_eigval``): then every
transition is non-expansive. The values of ``beta`` are not checked, since reading them
would synchronise an accelerator with the host; only shapes are.

``fused_recurrent_*`` run the recurrence token by token. ``chunk_*`` use the chunkwise
parallel form of Yang et al., 2024 ("Parallelizing Linear Transformers with the Delta
Rule over Sequence Length", arXiv:2406.06484), with the decays of Gated DeltaNet folded
in. Inside a chunk of ``C`` tokens starting from state :math:`S_0`, with
:math:`\\gamma_i = \\sum_{j \\le i} g_j` the cumulative log decay from the chunk start,
the state after token ``i`` is

.. math::

    S_i = e^{\\gamma_i} S_0 + \\sum_{j \\le i} e^{\\gamma_i - \\gamma_j} k_j u_j^\\top,

where the pseudo-values :math:`u` (the UT / WY representation) solve the unit
lower-triangular system

.. math::

    (I + A)\\, U = \\operatorname{diag}(\\beta) V - \\operatorname{diag}(\\beta e^{\\gamma}) K S_0,
    \\qquad A_{ij} = \\beta_i e^{\\gamma_i - \\gamma_j} k_i^\\top k_j \\quad (j < i),

so :math:`U = U_0 - W S_0` with :math:`[U_0, W]` obtained by one batched triangular solve
for all chunks at once. Only the chunk-to-chunk pass of :math:`S_0` is sequential, and
autograd keeps one state per chunk, never one per token. Every exponent that is taken is
a difference :math:`\\gamma_i - \\gamma_j` with :math:`j \\le i` (masked to
:math:`-\\infty` above the diagonal before ``exp``), so for decays :math:`g \\le 0` it is
:math:`\\le 0`: strong decays (``g = -20`` per token) underflow to zero and never
overflow.

Convention trap: fla's reference ``naive_recurrent_gated_delta_rule(q, k, v, beta, g)``
takes ``beta`` before ``g``, while ``chunk_gated_delta_rule(q, k, v, g, beta)`` (and this
module's) takes ``g`` before ``beta``; ``fused_recurrent_gated_delta_rule(q, k, v, g, gk,
gv, beta)`` has two more decays in between, so pass ``beta=`` by keyword there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
from formerlab.attention.functional.gla import key_value_state, to_chunks

#: ``eps`` of fla's in-kernel L2 normalisation: ``x / sqrt(sum(x^2) + eps)``.
L2NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- cores
def _recurrent_core(q, k, v, beta, g, gk, gv, initial_state, *, scale):
    """Token-by-token delta rule on one batch (all tensors in the work dtype).

    ``beta`` is ``[B, T, H, 1]`` (one per head) or ``[B, T, H, V]`` (one per value
    channel); ``g`` ``[B, T, H]``, ``gk`` ``[B, T, H, K]`` and ``gv`` ``[B, T, H, V]`` are
    log decays or ``None``.
    """
    batch, seq_len, heads, key_dim = q.shape
    state = initial_state
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    none = [None] * seq_len
    # unbind once (not x[:, t] in the loop) so backward assembles each gradient once
    decay = none if g is None else g.exp()[..., None, None].unbind(1)
    decay_k = none if gk is None else gk.exp().unsqueeze(-1).unbind(1)
    decay_v = none if gv is None else gv.exp().unsqueeze(-2).unbind(1)
    steps = zip((q * scale).unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1))
    outputs = []
    for (q_t, k_t, v_t, b_t), a_t, ak_t, av_t in zip(steps, decay, decay_k, decay_v):
        for factor in (a_t, ak_t, av_t):
            if factor is not None:
                state = state * factor
        # the delta rule: replace what the state returns for k_t by a beta-mix with v_t
        u_t = b_t * (v_t - (k_t.unsqueeze(-2) @ state).squeeze(-2))
        state = state + k_t.unsqueeze(-1) * u_t.unsqueeze(-2)
        outputs.append((q_t.unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outputs, dim=1), state


def _to_chunks(x: torch.Tensor, chunk_size: int, scale: float = 1.0) -> torch.Tensor:
    """``scale * x`` from ``[B, T, H, ...]`` to ``[B * H, N, C, ...]``, time zero-padded.

    The gradient of ``x`` comes back contiguous (``gla.to_chunks``): a transposed one
    would reach the ops upstream of ``x`` (a gate's ``softplus``, a projection) in a
    layout that their backward passes traced by ``torch.compile`` may not produce.
    """
    return to_chunks(x, chunk_size, scale).flatten(0, 1)


def _wy_representation(kc, vc, bc, gamma):
    """Per-chunk pseudo-values: ``U = U0 - W @ S0`` for the state ``S0`` at the chunk start.

    ``kc`` ``[M, N, C, K]``, ``vc`` ``[M, N, C, V]``, ``bc`` ``[M, N, C, 1]``; ``gamma``
    ``[M, N, C]`` the cumulative log decay inside each chunk, or ``None``. Returns
    ``(U0, W, decay)`` with ``decay`` the causal ``e^{gamma_i - gamma_j}`` ``[M, N, C, C]``
    (``None`` without gates).
    """
    chunk = kc.shape[-2]
    k_beta = kc * bc
    gram = k_beta @ kc.transpose(-1, -2)
    decay = None
    if gamma is not None:
        above = torch.ones(chunk, chunk, dtype=torch.bool, device=kc.device).triu(1)
        # gamma_i - gamma_j for j <= i only: the others become exp(-inf) = 0 before any exp
        log_decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(above, float("-inf"))
        decay = log_decay.exp()
        gram = gram * decay
        k_beta = k_beta * gamma.exp().unsqueeze(-1)
    rhs = torch.cat((vc * bc, k_beta), dim=-1)
    # the system is I + the strictly lower part of gram: a unit lower-triangular solve
    # reads only that part (no mask, no identity needed; its gradient is zero elsewhere)
    solved = torch.linalg.solve_triangular(gram, rhs, upper=False, unitriangular=True)
    value_dim = vc.shape[-1]
    return solved[..., :value_dim], solved[..., value_dim:], decay


def _pass_states(u0, w, k_end, chunk_decay, state):
    """The sequential pass between chunks: one step per chunk, so autograd keeps one state
    per chunk.

    For chunk ``n`` with start state ``S``: pseudo-values ``U = U0 - W S`` and the next
    state ``S' = e^{gamma_C} S + K_end^T U`` (``K_end``: keys decayed to the chunk end;
    ``chunk_decay`` ``[M, N, 1, 1]`` or ``None``). Returns the start states ``[M, N, K,
    V]``, the pseudo-values ``[M, N, C, V]`` and the final state ``[M, K, V]``.
    """
    n_chunks = u0.shape[1]
    decays = [None] * n_chunks if chunk_decay is None else chunk_decay.unbind(1)
    steps = zip(u0.unbind(1), w.unbind(1), k_end.transpose(-1, -2).unbind(1), decays)
    starts, pseudo = [], []
    for u0_n, w_n, k_n, a_n in steps:
        starts.append(state)
        u_n = torch.baddbmm(u0_n, w_n, state, alpha=-1)
        state = torch.baddbmm(state if a_n is None else state * a_n, k_n, u_n)
        pseudo.append(u_n)
    return torch.stack(starts, 1), torch.stack(pseudo, 1), state


def _chunk_core(q, k, v, beta, g, initial_state, *, scale, chunk_size):
    """Chunked (gated) delta rule on one batch: ``beta`` ``[B, T, H]``, ``g`` or ``None``."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    # padded tokens have k = 0, beta = 0, g = 0: identity transitions, no output needed
    qc = _to_chunks(q, chunk_size, scale)
    kc, vc = (_to_chunks(x, chunk_size) for x in (k, v))
    bc = _to_chunks(beta, chunk_size).unsqueeze(-1)
    gamma = None if g is None else _to_chunks(g, chunk_size).cumsum(-1)
    u0, w, decay = _wy_representation(kc, vc, bc, gamma)
    scores = qc @ kc.transpose(-1, -2)
    if gamma is None:
        k_end, q_start, chunk_decay = kc, qc, None
    else:
        scores = scores * decay
        k_end = kc * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)  # decay to the chunk end
        q_start = qc * gamma.exp().unsqueeze(-1)  # decay from the chunk start
        chunk_decay = gamma[..., -1].exp()[..., None, None]
    state = initial_state
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    state = state.reshape(batch * heads, key_dim, value_dim)
    starts, pseudo, state = _pass_states(u0, w, k_end, chunk_decay, state)
    if gamma is None:  # with gates, the decay has masked the future already
        scores = scores.tril()
    o = q_start @ starts + scores @ pseudo
    o = o.reshape(batch, heads, -1, value_dim).transpose(1, 2)[:, :seq_len]
    return o, state.reshape(batch, heads, key_dim, value_dim)


# ----------------------------------------------------------------------------- checks
def _check_qkv(q, k, v, allow_groups):
    """Validate ``q, k, v``; return ``(B, T, HV, K, V)`` and the group size ``HV // H``.

    With ``allow_groups`` (grouped value attention, as fla's gated delta rule), ``v`` may
    have ``HV`` heads, a multiple of the ``H`` heads of ``q`` and ``k``; value head ``j``
    reads query/key head ``j // (HV // H)``.
    """
    grouped = (
        allow_groups
        and all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, v))
        and v.shape[2] != q.shape[2]
    )
    if not grouped:
        return check_qkv(q, k, v), 1
    batch, seq_len, heads, key_dim, _ = check_qkv(q, k, k)
    value_heads, value_dim = v.shape[2], v.shape[3]
    if tuple(v.shape[:2]) != (batch, seq_len) or value_heads % heads or 0 in v.shape:
        raise ValueError(
            f"v has shape {tuple(v.shape)}, expected [B, T, HV, V] = ({batch}, {seq_len}, HV, V)"
            f" with HV a multiple of H={heads} (the heads of q and k) and V >= 1"
        )
    check_per_token("v", v, v.shape, "[B, T, HV, V]", q.device)
    return (batch, seq_len, value_heads, key_dim, value_dim), value_heads // heads


def _check_common(q, k, v, scale, initial_state, state_v_first, cu_seqlens, allow_groups):
    """Validate what every op takes.

    Returns ``(sizes, group, offsets, scale, state)`` with ``sizes = (B, T, H, K, V)`` (``H``
    the value heads), the checked ``cu_seqlens`` and the state in ``[N, H, K, V]`` layout.
    """
    sizes, group = _check_qkv(q, k, v, allow_groups)
    batch, seq_len, heads, key_dim, value_dim = sizes
    offsets = check_cu_seqlens(cu_seqlens, batch, seq_len)
    n_states = batch if offsets is None else len(offsets) - 1
    dims = (value_dim, key_dim) if state_v_first else (key_dim, value_dim)
    layout = "[N, H, V, K]" if state_v_first else "[N, H, K, V]"
    check_initial_state(
        initial_state, n_states, heads, *dims, offsets is not None, layout, q.device
    )
    state = key_value_state(initial_state, state_v_first)
    return sizes, group, offsets, resolve_scale(scale, key_dim), state


def _check_beta(beta, sizes, device, per_channel):
    """Validate ``beta``: ``[B, T, H]``, or also ``[B, T, H, V]`` when ``per_channel``."""
    batch, seq_len, heads, _, value_dim = sizes
    if per_channel and isinstance(beta, torch.Tensor) and beta.dim() == 4:
        return check_per_token("beta", beta, (*sizes[:3], value_dim), "[B, T, H, V]", device)
    if not per_channel and isinstance(beta, torch.Tensor) and beta.dim() == 4:
        raise ValueError(
            f"beta has shape {tuple(beta.shape)}, expected [B, T, H] = {(batch, seq_len, heads)}"
            ": the chunked form takes one beta per head and token; a beta per value channel"
            " [B, T, H, V] is supported by the fused_recurrent_* ops"
        )
    layout = "[B, T, H] (or [B, T, H, V])" if per_channel else "[B, T, H]"
    return check_per_token("beta", beta, sizes[:3], layout, device)


def _check_gate_options(g, sizes, device, use_gate_in_kernel, A_log, dt_bias):
    """Validate ``g`` and fla's in-kernel gate options (``A_log``, ``dt_bias`` ``[H]``)."""
    if g is not None:
        check_per_token("g", g, sizes[:3], "[B, T, H]", device)
    if not use_gate_in_kernel:
        return
    if g is None:
        raise ValueError("g=None is not allowed with use_gate_in_kernel=True: g is the raw gate")
    if A_log is None:
        raise ValueError("A_log=None is not allowed with use_gate_in_kernel=True; expected [H]")
    check_per_token("A_log", A_log, sizes[2:3], "[H]", device)
    if dt_bias is not None:
        check_per_token("dt_bias", dt_bias, sizes[2:3], "[H]", device)


def _check_beta_options(use_beta_sigmoid_in_kernel, allow_neg_eigval):
    """fla's rule: ``allow_neg_eigval`` (``beta = 2 sigmoid(.)``) needs the in-kernel sigmoid."""
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(
            "allow_neg_eigval=True is not allowed with use_beta_sigmoid_in_kernel=False; "
            "pass beta in [0, 2] directly, or set use_beta_sigmoid_in_kernel=True (as fla)"
        )


# ----------------------------------------------------------------------------- running
@dataclass(frozen=True)
class _Transforms:
    """What an op does to its inputs before the core and to its outputs after it."""

    out_dtype: torch.dtype
    l2norm: bool = False  # normalise q and k along K
    beta_sigmoid: bool = False  # beta = sigmoid(beta), times 2 with neg_eigval
    neg_eigval: bool = False
    gate: bool = False  # g = -exp(A_log) * softplus(g + dt_bias)
    group: int = 1  # value heads per query/key head
    state_v_first: bool = False  # states are [N, H, V, K]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """fla's in-kernel L2 normalisation along the last axis (differentiable)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)


def _run(core, per_token, gate_params, state, offsets, transforms, output_final_state):
    """Cast to the work dtype, apply the in-kernel transforms, run ``core`` per sequence.

    ``per_token`` is ``(q, k, v, beta, *log_decays)`` (``beta`` may be ``None``: all ones);
    ``gate_params`` is ``(A_log, dt_bias)`` for ``transforms.gate``, else ``(None, None)``.
    """
    tensors = (*per_token, *gate_params, state)
    *per_token, a_log, dt_bias, state = cast(work_dtype(*tensors), *tensors)
    q, k, v, beta, *decays = per_token
    if transforms.l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if beta is None:  # fla's fused_recurrent_*: beta = 1, a full overwrite
        beta = v.new_ones(v.shape[:3])
    if transforms.beta_sigmoid:
        beta = torch.sigmoid(beta) * (2.0 if transforms.neg_eigval else 1.0)
    if transforms.gate:  # the Gated DeltaNet gate: g = -exp(A_log) * softplus(g + dt_bias)
        raw = decays[0] if dt_bias is None else decays[0] + dt_bias
        decays[0] = -a_log.exp() * F.softplus(raw)
    if transforms.group > 1:
        q = q.repeat_interleave(transforms.group, dim=2)
        k = k.repeat_interleave(transforms.group, dim=2)
    o, final = run_per_sequence(core, (q, k, v, beta, *decays), state, offsets)
    o = o.to(transforms.out_dtype).contiguous()
    if not output_final_state:
        return o, None
    return o, transpose_state(final) if transforms.state_v_first else final


def _chunk(chunk_size, scale):
    """The chunked core with its keyword arguments bound (``g`` is ``None`` for DeltaNet)."""

    def core(q, k, v, beta, g, h0):
        return _chunk_core(q, k, v, beta, g, h0, scale=scale, chunk_size=chunk_size)

    return core


def _recurrent(scale):
    """The recurrent core with ``scale`` bound; ``beta`` ``[..., H]`` or ``[..., H, V]``."""

    def core(q, k, v, beta, g, gk, gv, h0):
        beta = beta.unsqueeze(-1) if beta.dim() == 3 else beta
        return _recurrent_core(q, k, v, beta, g, gk, gv, h0, scale=scale)

    return core


# ----------------------------------------------------------------------------- DeltaNet
def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet, chunkwise-parallel form (fla's ``chunk_delta_rule``).

    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and ``o_t = scale * S_t^T
    q_t`` per head (Schlag et al., 2021, arXiv:2102.11174), computed with the UT / WY
    representation of Yang et al., 2024 (arXiv:2406.06484): one triangular solve per chunk,
    one sequential step per chunk. See the module docstring for the derivation.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``, of unit norm for a stable recurrence (or pass
            ``use_qk_l2norm_in_kernel=True``).
        v: values ``[B, T, H, V]``.
        beta: write strengths ``[B, T, H]``, usually in ``(0, 1)`` (values are not
            checked). A beta per value channel ``[B, T, H, V]`` is refused here, as by fla;
            :func:`fused_recurrent_delta_rule` takes it.
        scale: score scale; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``, ``N = B`` or the number of ``cu_seqlens``
            sequences; ``None`` is a zero state.
        output_final_state: whether to return the final state ``[N, H, K, V]``.
        use_qk_l2norm_in_kernel: normalise ``q`` and ``k`` along ``K`` first,
            ``x / sqrt(sum(x^2) + 1e-6)`` in the compute dtype (differentiable).
        cu_seqlens: offsets ``[S + 1]`` of sequences packed along ``T`` (needs ``B = 1``).
        cu_seqlens_cpu: accepted for fla compatibility and unused (the offsets are read
            from ``cu_seqlens``).
        chunk_size: chunk length ``C``, a power of two (fla's keyword, default 64). It
            changes only rounding, never the result.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``v``; the final state
        (in the compute dtype: float64 for float64 inputs, else float32) or ``None``.

    Raises:
        ValueError: on a bad shape, dtype, device, ``scale``, ``chunk_size`` or
            ``cu_seqlens``, naming the argument.
    """
    del cu_seqlens_cpu
    sizes, _, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, False, cu_seqlens, allow_groups=False
    )
    beta = _check_beta(beta, sizes, q.device, per_channel=False)
    chunk_size = check_chunk_size(chunk_size)
    transforms = _Transforms(v.dtype, l2norm=use_qk_l2norm_in_kernel)
    return _run(
        _chunk(chunk_size, scale),
        (q, k, v, beta, None),
        (None, None),
        state,
        offsets,
        transforms,
        output_final_state,
    )


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet, token-by-token recurrence (fla's ``fused_recurrent_delta_rule``).

    The same map as :func:`chunk_delta_rule`, and the streaming step: feed ``T`` new
    tokens with the previous ``final_state`` as ``initial_state``. Autograd keeps every
    per-token state, so prefer :func:`chunk_delta_rule` for training on long sequences.

    Args:
        q, k, v, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        cu_seqlens: as in :func:`chunk_delta_rule`.
        beta: write strengths ``[B, T, H]`` or, one per value channel, ``[B, T, H, V]``
            (then column ``j`` of the state follows its own ``beta[..., j]``); ``None``
            means 1 (fla's default).

    Returns:
        ``(o, final_state)`` as in :func:`chunk_delta_rule`.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    sizes, _, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, False, cu_seqlens, allow_groups=False
    )
    if beta is not None:
        beta = _check_beta(beta, sizes, q.device, per_channel=True)
    transforms = _Transforms(v.dtype, l2norm=use_qk_l2norm_in_kernel)
    return _run(
        _recurrent(scale),
        (q, k, v, beta, None, None, None),
        (None, None),
        state,
        offsets,
        transforms,
        output_final_state,
    )


# ----------------------------------------------------------------------------- Gated DeltaNet
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context: object | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet, chunkwise-parallel form (fla's ``chunk_gated_delta_rule``).

    ``S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and ``o_t = scale *
    S_t^T q_t`` per head (Yang et al., 2025, arXiv:2412.06464), in the chunkwise form of
    the module docstring: only differences of cumulative log decays inside a chunk are
    exponentiated, so strong decays are stable.

    Note the argument order ``(g, beta)``: fla's reference
    ``naive_recurrent_gated_delta_rule`` takes ``(beta, g)``.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``, of unit norm for a stable recurrence (or pass
            ``use_qk_l2norm_in_kernel=True``).
        v: values ``[B, T, HV, V]``; ``HV`` a multiple of ``H`` is grouped value
            attention (value head ``j`` uses query/key head ``j // (HV // H)``), as in fla.
        g: log decay (forget gate, ``<= 0``) ``[B, T, HV]``; with ``use_gate_in_kernel``
            the raw gate input instead.
        beta: write strengths ``[B, T, HV]`` in ``(0, 1)`` (values are not checked); with
            ``use_beta_sigmoid_in_kernel`` logits instead.
        scale: score scale; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``),
            ``N = B`` or the number of ``cu_seqlens`` sequences; ``None`` is a zero state.
        output_final_state: whether to return the final state.
        use_qk_l2norm_in_kernel: normalise ``q`` and ``k`` along ``K`` first,
            ``x / sqrt(sum(x^2) + 1e-6)`` in the compute dtype (differentiable).
        use_beta_sigmoid_in_kernel: ``beta`` holds logits: use ``sigmoid(beta)``.
        allow_neg_eigval: use ``2 * sigmoid(beta)`` (in ``(0, 2)``: the transition may
            have a negative eigenvalue); needs ``use_beta_sigmoid_in_kernel=True``.
        state_v_first: states in ``[N, HV, V, K]`` layout instead of ``[N, HV, K, V]``.
        cu_seqlens: offsets ``[S + 1]`` of sequences packed along ``T`` (needs ``B = 1``).
        cu_seqlens_cpu: accepted for fla compatibility and unused.
        chunk_indices: fla's precomputed kernel grid for ``cu_seqlens``; accepted for fla
            compatibility and unused (the chunks are derived from ``cu_seqlens``).
        cp_context: fla's context parallelism; only ``None`` is supported.
        chunk_size: chunk length ``C``, a power of two (fla's keyword, default 64). It
            changes only rounding, never the result.
        use_gate_in_kernel: compute the log decay as ``-exp(A_log) * softplus(g +
            dt_bias)`` from the raw ``g`` (fla's keyword).
        A_log: ``[HV]``, required with ``use_gate_in_kernel``.
        dt_bias: ``[HV]`` or ``None``, used with ``use_gate_in_kernel``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in the dtype of ``v``; the final
        state (float64 for float64 inputs, else float32) or ``None``.

    Raises:
        ValueError: on a bad shape, dtype, device, option or ``cu_seqlens``, naming the
            argument; for a ``beta`` per value channel, which the chunked form refuses (as
            fla's does: see :func:`fused_recurrent_gated_delta_rule`).
    """
    del cu_seqlens_cpu, chunk_indices
    if cp_context is not None:
        raise ValueError(
            f"cp_context={cp_context!r} is not allowed: context parallelism is not supported;"
            " expected None"
        )
    sizes, group, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens, allow_groups=True
    )
    if g is None:
        raise ValueError("g=None is not allowed; expected a log decay [B, T, HV]")
    _check_gate_options(g, sizes, q.device, use_gate_in_kernel, A_log, dt_bias)
    beta = _check_beta(beta, sizes, q.device, per_channel=False)
    _check_beta_options(use_beta_sigmoid_in_kernel, allow_neg_eigval)
    chunk_size = check_chunk_size(chunk_size)
    transforms = _Transforms(
        v.dtype,
        l2norm=use_qk_l2norm_in_kernel,
        beta_sigmoid=use_beta_sigmoid_in_kernel,
        neg_eigval=allow_neg_eigval,
        gate=use_gate_in_kernel,
        group=group,
        state_v_first=state_v_first,
    )
    gate_params = (A_log, dt_bias) if use_gate_in_kernel else (None, None)
    return _run(
        _chunk(chunk_size, scale),
        (q, k, v, beta, g),
        gate_params,
        state,
        offsets,
        transforms,
        output_final_state,
    )


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet, token-by-token recurrence (fla's ``fused_recurrent_gated_delta_rule``).

    ``S_t = (I - beta_t k_t k_t^T) D_t(S_{t-1}) + beta_t k_t v_t^T``, ``o_t = scale * S_t^T
    q_t``, where ``D_t`` multiplies the state by ``e^{g_t}``, its rows by ``e^{gk_t}`` and
    its columns by ``e^{gv_t}`` (each when given). The reference for
    :func:`chunk_gated_delta_rule` and the streaming step. Autograd keeps every per-token
    state (fla's version has no backward at all), so train with the chunked form.

    fla's argument order puts ``gk`` and ``gv`` between ``g`` and ``beta``: a positional
    call ``(q, k, v, g, beta)`` would pass ``beta`` as ``gk``. Pass ``beta=`` by keyword.

    Args:
        q, k, v, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        state_v_first, cu_seqlens: as in :func:`chunk_gated_delta_rule`.
        g: log decay ``[B, T, HV]``, or ``None`` (with ``use_gate_in_kernel``: the raw gate).
        gk: log decay of the key axis ``[B, T, HV, K]``, or ``None``.
        gv: log decay of the value axis ``[B, T, HV, V]``, or ``None``.
        beta: ``[B, T, HV]`` or, one per value channel, ``[B, T, HV, V]``; ``None`` means 1.
        use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval:
            as in :func:`chunk_gated_delta_rule` (the gate transforms ``g`` only).

    Returns:
        ``(o, final_state)`` as in :func:`chunk_gated_delta_rule`.

    Raises:
        ValueError: on a bad argument, naming it.
    """
    sizes, group, offsets, scale, state = _check_common(
        q, k, v, scale, initial_state, state_v_first, cu_seqlens, allow_groups=True
    )
    batch, seq_len, heads, key_dim, value_dim = sizes
    _check_gate_options(g, sizes, q.device, use_gate_in_kernel, A_log, dt_bias)
    if gk is not None:
        check_per_token("gk", gk, (batch, seq_len, heads, key_dim), "[B, T, HV, K]", q.device)
    if gv is not None:
        check_per_token("gv", gv, (batch, seq_len, heads, value_dim), "[B, T, HV, V]", q.device)
    if beta is not None:
        beta = _check_beta(beta, sizes, q.device, per_channel=True)
    _check_beta_options(use_beta_sigmoid_in_kernel, allow_neg_eigval)
    transforms = _Transforms(
        v.dtype,
        l2norm=use_qk_l2norm_in_kernel,
        beta_sigmoid=use_beta_sigmoid_in_kernel,
        neg_eigval=allow_neg_eigval,
        gate=use_gate_in_kernel,
        group=group,
        state_v_first=state_v_first,
    )
    gate_params = (A_log, dt_bias) if use_gate_in_kernel else (None, None)
    return _run(
        _recurrent(scale),
        (q, k, v, beta, g, gk, gv),
        gate_params,
        state,
        offsets,
        transforms,
        output_final_state,
    )
