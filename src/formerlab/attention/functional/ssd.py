"""Mamba-2's state-space duality (SSD) in pure PyTorch.

The scalar-decay selective state space model of Mamba-2 (Dao & Gu, 2024, "Transformers are
SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality",
ICML, arXiv:2405.21060) runs, for every head ``h`` with state ``S`` of shape ``[P, N]``::

    dt_t = softplus(dt_t + dt_bias)            (the bias and softplus are optional)
    S_t  = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t
    y_t  = y_t * silu(z_t)                     (optional gate, applied after the D skip)

Heads are split into ``G`` groups that share ``B`` and ``C``: head ``h`` reads group
``h // (H / G)``. The order of the bias, softplus, ``D`` skip and ``z`` gate is that of
mamba_ssm's ``mamba_chunk_scan_combined``, whose call shape :func:`ssd` takes.

:func:`ssd` is the chunked algorithm of the paper (Section 6): inside a chunk of ``Q``
tokens the output is the quadratic, attention-like form ``(C B^T * L) (dt x)`` with the
decay matrix ``L = exp(segsum(dt * A))`` (the "1-semiseparable mask"); between chunks only
the ``[P, N]`` states are passed, so time and backward memory are linear in ``T``.
:func:`ssd_recurrent` is the token-by-token recurrence above: the reference, and a
streaming step for one or a few tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from formerlab.attention.functional._common import check_per_token, contiguous_grad, work_dtype
from formerlab.errors import check_positive_int

__all__ = ["ssd", "ssd_recurrent"]


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 SSD, chunked (Dao & Gu, 2024, Section 6; mamba_ssm's call shape).

    Args:
        x: inputs ``[b, T, H, P]``.
        dt: step sizes ``[b, T, H]`` (before ``dt_bias`` and softplus).
        A: per-head decay rates ``[H]``, negative for a decaying state.
        B: input projections ``[b, T, G, N]``; ``H`` must be divisible by ``G``.
        C: output projections ``[b, T, G, N]``.
        chunk_size: tokens per chunk (>= 1); any value gives the same result, it only
            trades the quadratic in-chunk work against the number of state passes.
        D: skip weights ``[H]`` or ``[H, P]``; ``y += D * x``.
        z: gate ``[b, T, H, P]``; ``y *= silu(z)``, after the ``D`` skip.
        dt_bias: ``[H]``, added to ``dt`` before the softplus.
        initial_states: states before the first token ``[b, H, P, N]`` (zeros if None).
        dt_softplus: apply softplus to ``dt`` (after adding ``dt_bias``).
        return_final_states: also return the states after the last token.

    Returns:
        ``y`` ``[b, T, H, P]`` in ``x``'s dtype, or ``(y, final_states)`` with
        ``final_states`` ``[b, H, P, N]`` in the compute dtype (float32, or float64 when an
        input is float64), kept at that precision so that it can be passed on as
        ``initial_states`` of the next call: two calls on consecutive pieces equal one call.

    Raises:
        ValueError: an argument of the wrong rank or shape, ``H`` not divisible by ``G``,
            or ``chunk_size < 1``.

    The computation runs in float32 (float64 when an input is float64) whatever the input
    dtype, and is differentiable in every tensor argument, ``initial_states`` included.
    """
    check_positive_int("chunk_size", chunk_size)
    wd = _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    xw, dtw, Aw, Bw, Cw, h0 = _prepare(x, dt, A, B, C, dt_bias, initial_states, dt_softplus, wd)
    y, h = _chunk_scan(xw, dtw, Aw, Bw, Cw, h0, chunk_size)
    y = _skip_and_gate(y, xw, D, z, wd).to(x.dtype)
    return (y, h) if return_final_states else y


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 SSD as the token-by-token recurrence (reference and streaming step).

    Same arguments, results and errors as :func:`ssd`; ``chunk_size`` is checked but not
    used. Runs one state update per token, so it is the cheaper choice for a few tokens
    (decoding) and the plain reference for the chunked form::

        S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T,    y_t = S_t C_t
    """
    check_positive_int("chunk_size", chunk_size)
    wd = _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    xw, dtw, Aw, Bw, Cw, h0 = _prepare(x, dt, A, B, C, dt_bias, initial_states, dt_softplus, wd)
    y, h = _recurrent_scan(xw, dtw, Aw, Bw, Cw, h0)
    y = _skip_and_gate(y, xw, D, z, wd).to(x.dtype)
    return (y, h) if return_final_states else y


# --- validation ----------------------------------------------------------------------------


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states) -> torch.dtype:
    """Check every shape against ``x`` and ``B`` before any work; return the compute dtype."""
    _check_rank("x", x, "[b, T, H, P]")
    _check_rank("B", B, "[b, T, G, N]")
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dev = x.device
    check_per_token("dt", dt, (b, T, H), "[b, T, H]", dev)
    check_per_token("A", A, (H,), "[H]", dev)
    check_per_token("B", B, (b, T, G, N), "[b, T, G, N] (the b, T of x)", dev)
    check_per_token("C", C, (b, T, G, N), "[b, T, G, N] (the shape of B)", dev)
    if G < 1 or H % G != 0:
        raise ValueError(
            f"B has shape {tuple(B.shape)}: G={G} groups for H={H} heads (x has shape "
            f"{tuple(x.shape)}); expected G >= 1 dividing H, head h reads group h // (H / G)"
        )
    if D is not None:
        _check_rank("D", D, "[H] or [H, P]", ranks=(1, 2))
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(
                f"D has shape {tuple(D.shape)}, expected [H] = {(H,)} or [H, P] = {(H, P)}"
            )
        check_per_token("D", D, D.shape, device=dev)
    if z is not None:
        check_per_token("z", z, (b, T, H, P), "[b, T, H, P] (the shape of x)", dev)
    if dt_bias is not None:
        check_per_token("dt_bias", dt_bias, (H,), "[H]", dev)
    if initial_states is not None:
        check_per_token("initial_states", initial_states, (b, H, P, N), "[b, H, P, N]", dev)
    return work_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)


def _check_rank(name: str, t, layout: str, ranks: tuple[int, ...] | None = None) -> None:
    """Raise unless ``t`` is a floating-point tensor of the rank of ``layout``."""
    check_per_token(name, t, t.shape if isinstance(t, Tensor) else ())
    ranks = ranks or (layout.count(",") + 1,)
    if t.dim() not in ranks:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} ({t.dim()}-D), expected {layout} "
            f"({' or '.join(f'{r}-D' for r in ranks)})"
        )


# --- shared pre- and post-processing --------------------------------------------------------


def _prepare(x, dt, A, B, C, dt_bias, initial_states, dt_softplus, wd):
    """Cast to the compute dtype and turn ``dt`` into the step sizes actually used."""
    dt = dt.to(wd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(wd)
    if dt_softplus:
        dt = F.softplus(dt)
    b, _, H, P = x.shape
    N = B.shape[-1]
    if initial_states is None:
        h0 = torch.zeros(b, H, P, N, dtype=wd, device=x.device)
    else:
        h0 = contiguous_grad(initial_states.to(wd))  # its gradient, contiguous for compile
    return x.to(wd), dt, A.to(wd), B.to(wd), C.to(wd), h0


def _skip_and_gate(y: Tensor, x: Tensor, D, z, wd) -> Tensor:
    """``y + D * x``, then ``* silu(z)``: mamba_ssm's order (the gate also scales the skip)."""
    if D is not None:
        D = D.to(wd)
        y = y + (D.unsqueeze(-1) if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z.to(wd))
    return y


# --- the two algorithms ---------------------------------------------------------------------


def _recurrent_scan(x, dt, A, B, C, h0) -> tuple[Tensor, Tensor]:
    """One state update per token; ``B`` and ``C`` repeated so head ``h`` reads ``h // R``."""
    R = x.shape[2] // B.shape[2]
    Bh = B.repeat_interleave(R, dim=2)  # [b, T, H, N]
    Ch = C.repeat_interleave(R, dim=2)
    decay = torch.exp(dt * A)  # [b, T, H]
    u = dt.unsqueeze(-1) * x  # [b, T, H, P]
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = decay[:, t, :, None, None] * h + u[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append((h @ Ch[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else torch.zeros_like(x)
    return y, h


def _segsum(a: Tensor) -> Tensor:
    """``S[..., l, s] = a[s+1] + ... + a[l]`` for ``l >= s``, ``-inf`` above the diagonal.

    Each entry is summed over its own segment (a cumulative sum down the columns of a
    masked matrix), so its rounding error grows with the segment, not with the chunk's
    prefix sums, and no entry is ever positive: a difference of prefix sums above the
    diagonal would be (thousands with ``dt * A = -50`` per token, ``exp`` = ``inf``). The
    ``-inf`` mask makes ``exp`` exactly 0 there, in the values and in the gradients.
    """
    Q = a.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    rows = a.unsqueeze(-1).expand(*a.shape, Q)  # rows[..., l, s] = a[l]
    seg = rows.masked_fill(~ones.tril(-1), 0.0).cumsum(-2)  # sum of a[k] over s < k <= l
    return seg.masked_fill(ones.triu(1), float("-inf"))


def _chunk_scan(x, dt, A, B, C, h0, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The chunked SSD algorithm (Dao & Gu, 2024, Section 6, Listing 1).

    Tensors are laid out ``[b, c, G, R, ...]`` (chunk ``c``, group ``G``, head ``R`` within
    the group) so that the shared ``B`` and ``C`` broadcast over the heads of a group.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    if T == 0:
        return torch.zeros_like(x), h0
    Q = min(chunk_size, T)  # a chunk longer than the sequence is the same computation
    nc = -(-T // Q)
    pad = nc * Q - T
    if pad:
        # dt = 0 on the padding: no input and no decay, so the final state is unchanged
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    xg = x.view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # [b, c, G, R, Q, P]
    dtg = dt.view(b, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # [b, c, G, R, Q]
    Bg = B.view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4)  # [b, c, G, Q, N]
    Cg = C.view(b, nc, Q, G, N).permute(0, 1, 3, 2, 4)

    log_decay = dtg * A.view(G, R, 1)
    seg = _segsum(log_decay)  # [b, c, G, R, Q, Q]
    from_start = log_decay.cumsum(-1)  # decay from the chunk's incoming state to token l

    # 1. inside each chunk: the attention-like quadratic form (C B^T * L) (dt x)
    scores = (Cg @ Bg.transpose(-1, -2)).unsqueeze(3) * torch.exp(seg) * dtg.unsqueeze(-2)
    y = scores @ xg  # [b, c, G, R, Q, P]

    # 2. each chunk's own contribution to the state at its end, decayed to the end
    to_end = torch.exp(seg[..., -1, :]) * dtg  # [b, c, G, R, Q]
    xw = (xg * to_end.unsqueeze(-1)).transpose(-1, -2).reshape(b, nc, G, R * P, Q)
    chunk_states = (xw @ Bg).view(b, nc, G, R, P, N)

    # 3. pass the states from chunk to chunk (the only sequential part, nc small steps)
    chunk_decay = torch.exp(from_start[..., -1])  # [b, c, G, R]
    h = h0.reshape(b, G, R, P, N)
    incoming = []
    # unbind, not [:, c]: each indexed read's backward would write a full-size gradient
    # (an O(N^2 / C) backward); unbind's backward stacks the pieces once
    for decay, state in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        incoming.append(h)
        h = decay[:, :, :, None, None] * h + state
    h_in = torch.stack(incoming, dim=1)  # [b, c, G, R, P, N]

    # 4. the incoming state read out at every token: C_l S^T, decayed from the chunk start
    read = Cg @ h_in.reshape(b, nc, G, R * P, N).transpose(-1, -2)  # [b, c, G, Q, R*P]
    read = read.view(b, nc, G, Q, R, P).transpose(3, 4)
    y = y + read * torch.exp(from_start).unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, H, P)[:, :T]
    return y, h.reshape(b, H, P, N)
