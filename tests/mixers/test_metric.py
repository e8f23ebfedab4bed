"""MetricAttention against a naive float64 einsum of the formula softmax(pᵢᵀMpⱼ/√k) p."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from formerlab import attention, mixers
from formerlab.attention.base import AttentionKernel
from formerlab.mixers.metric import MetricAttention
from formerlab.mixers.self_attention import SelfAttention


def slot(a: int, b: int, k: int) -> int:
    """Row-major position of upper-triangle entry (i, j), i <= j, of a k × k matrix."""
    i, j = min(a, b), max(a, b)
    return i * k - i * (i - 1) // 2 + (j - i)


def naive_metric_matrix(params: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """M (H, k, k) from the stored parameters, entry by entry (independent of the module)."""
    heads = params.shape[0]
    if kind == "diagonal":
        zero = params.new_zeros(())
        rows = [
            torch.stack([torch.stack([params[h, a] if a == b else zero for b in range(k)])
                         for a in range(k)])
            for h in range(heads)
        ]
        return torch.stack(rows)
    full = torch.stack([
        torch.stack([torch.stack([params[h, slot(a, b, k)] for b in range(k)]) for a in range(k)])
        for h in range(heads)
    ])
    if kind == "symmetric":
        return full
    low = full * torch.ones(k, k, dtype=torch.bool).tril()  # Cholesky-style factor
    return torch.einsum("hab,hcb->hac", low, low)


def naive_metric_attention(mixer, x, mask=None, causal=False):
    """Explicit float64 einsum of metric attention with the mixer's parameters."""
    h, k = mixer.heads, mixer.head_dim
    weight = mixer.proj.weight.view(h, k, -1)
    p = torch.einsum("bnc,hkc->bhnk", x, weight)
    if mixer.proj.bias is not None:
        p = p + mixer.proj.bias.view(h, k)[None, :, None, :]
    m = naive_metric_matrix(mixer.metric_params, mixer.metric, k)
    scores = torch.einsum("bhia,hac,bhjc->bhij", p, m, p) / math.sqrt(k)
    n = x.shape[1]
    allowed = torch.ones(x.shape[0], 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    live = allowed.any(-1, keepdim=True)
    weights = torch.where(live, scores, 0.0).softmax(-1)
    out = torch.einsum("bhij,bhjk->bhik", weights, p)
    if mask is not None:
        out = out * mask[:, None, :, None]
    out = out.transpose(1, 2).reshape(x.shape[0], n, h * k)
    return out @ mixer.out.weight.T + mixer.out.bias


def randomise_metric(mixer: MetricAttention, generator: torch.Generator) -> None:
    with torch.no_grad():
        mixer.metric_params.copy_(
            torch.randn(mixer.metric_params.shape, generator=generator, dtype=torch.float64)
        )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    n=st.integers(1, 7),
    heads=st.integers(1, 3),
    k=st.integers(1, 4),
    extra_dim=st.integers(0, 3),
    metric=st.sampled_from(["symmetric", "psd", "diagonal"]),
    causal=st.booleans(),
    padded=st.booleans(),
    proj_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_einsum_values_and_gradients(
    batch, n, heads, k, extra_dim, metric, causal, padded, proj_bias, seed
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = heads * k + extra_dim  # head_dim given explicitly, so dim need not be heads·k
    mixer = MetricAttention(dim, heads, head_dim=k, metric=metric, proj_bias=proj_bias).double()
    randomise_metric(mixer, gen)
    x = torch.randn(batch, n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = None
    if padded:
        lengths = torch.randint(0, n + 1, (batch,), generator=gen)
        mask = torch.arange(n)[None, :] < lengths[:, None]
    got = mixer(x, attention_mask=mask, causal=causal)
    want = naive_metric_attention(mixer, x, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    params = [x, mixer.metric_params, mixer.proj.weight, mixer.out.weight]
    grad_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, params, grad_out)
    want_grads = torch.autograd.grad(want, params, grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("metric", ["symmetric", "psd", "diagonal"])
def test_gradcheck_float64(metric):
    torch.manual_seed(0)
    mixer = MetricAttention(6, 2, metric=metric).double()
    randomise_metric(mixer, torch.Generator().manual_seed(1))
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, True, False]])
    params = dict(mixer.named_parameters())

    def fn(x, m, w):
        values = {**params, "metric_params": m, "proj.weight": w}
        return functional_call(mixer, values, (x, mask), {"causal": True})

    m = mixer.metric_params.detach().clone().requires_grad_(True)
    w = mixer.proj.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, m, w))


def test_metric_tensor_forms():
    torch.manual_seed(0)
    for metric in ("symmetric", "psd", "diagonal"):
        mixer = MetricAttention(8, 2, metric=metric)
        torch.testing.assert_close(mixer.metric_tensor(), torch.eye(4).repeat(2, 1, 1))
        randomise_metric(mixer.double(), torch.Generator().manual_seed(2))
        want = naive_metric_matrix(mixer.metric_params, metric, 4)
        torch.testing.assert_close(mixer.metric_tensor(), want)
    psd = MetricAttention(8, 2, metric="psd").double()
    randomise_metric(psd, torch.Generator().manual_seed(3))
    low = psd.factor()
    assert torch.equal(low, low.tril())
    torch.testing.assert_close(low @ low.mT, psd.metric_tensor())


def test_parameter_counts_halve_attention():
    dim, heads = 128, 4
    k = dim // heads
    standard = sum(p.numel() for p in SelfAttention(dim, heads).parameters())
    assert standard == 4 * dim * dim + dim
    counts = {
        m: sum(p.numel() for p in MetricAttention(dim, heads, metric=m).parameters())
        for m in ("symmetric", "psd", "diagonal")
    }
    assert counts["symmetric"] == 2 * dim * dim + dim + heads * k * (k + 1) // 2
    assert counts["psd"] == counts["symmetric"]
    assert counts["diagonal"] == 2 * dim * dim + dim + heads * k
    assert 0.5 <= counts["symmetric"] / standard < 0.54  # "roughly halves": 0.533 here


def _opt_steps(mixer, loss_fn, steps=40, lr=0.05):
    opt = torch.optim.AdamW(mixer.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_symmetric_metric_stays_symmetric_after_optimizer_steps():
    torch.manual_seed(0)
    mixer = MetricAttention(8, 2, metric="symmetric")
    x = torch.randn(3, 6, 8)
    target = torch.randn(3, 6, 8)
    # A deliberately non-symmetric pull on M as well as the mixer's own loss.
    skew = torch.randn(4, 4)
    _opt_steps(
        mixer,
        lambda: (mixer(x, causal=True) - target).square().mean()
        + (mixer.metric_tensor() - skew).square().sum(),
    )
    m = mixer.metric_tensor()
    assert not torch.allclose(m[0], torch.eye(4))  # it did move
    assert torch.equal(m, m.mT)


def test_psd_stays_positive_semidefinite_where_symmetric_does_not():
    torch.manual_seed(0)
    target = torch.diag(torch.tensor([1.0, -1.0, 0.5, -2.0])).repeat(2, 1, 1)
    eig = {}
    for metric in ("psd", "symmetric"):
        mixer = MetricAttention(8, 2, metric=metric)
        _opt_steps(mixer, lambda m=mixer: (m.metric_tensor() - target).square().sum(), steps=150)
        m = mixer.metric_tensor().detach().double()
        assert torch.equal(m, m.mT)
        eig[metric] = torch.linalg.eigvalsh(m)
    assert eig["symmetric"].min() < -1.0  # the target is indefinite and reachable
    assert eig["psd"].min() >= -1e-6  # a Gram matrix LLᵀ cannot follow it


class _NonCausalKernel(AttentionKernel):
    name = "test-noncausal"
    supports_causal = False

    def attend(self, q, k, v, attention_mask, causal, need_weights):
        return v, None


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="metric='cosine'.*symmetric"):
        MetricAttention(8, 2, metric="cosine")
    with pytest.raises(ValueError, match="dim=10 must be divisible by heads=4"):
        MetricAttention(10, 4)
    with pytest.raises(ValueError, match="head_dim=0"):
        MetricAttention(8, 2, head_dim=0)
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        MetricAttention(8, 2, kernel="nope")
    with pytest.raises(ValueError, match="factor\\(\\) needs metric='psd'"):
        MetricAttention(8, 2).factor()
    mixer = MetricAttention(8, 2)
    mixer.kernel = _NonCausalKernel()
    with pytest.raises(ValueError, match="does not support causal=True"):
        mixer(torch.randn(1, 3, 8), causal=True)


def test_registry_builds_with_flat_kernel_options():
    mixer = mixers.build("metric", dim=16, heads=2, metric="psd", kernel="softmax", scale=0.5)
    assert isinstance(mixer, MetricAttention) and mixer.kernel.scale == 0.5
    assert mixer.metric == "psd"


@pytest.mark.parametrize("kernel", attention.available())
def test_any_kernel_equals_tied_self_attention(kernel):
    """Metric attention with kernel K == SelfAttention with K and weights q=MP, k=v=P."""
    torch.manual_seed(0)
    dim, heads, k = 8, 2, 4
    metric = MetricAttention(dim, heads, kernel=kernel).double().eval()
    randomise_metric(metric, torch.Generator().manual_seed(4))
    standard = SelfAttention(dim, heads, kernel=kernel).double().eval()
    standard.kernel = metric.kernel  # same kernel instance (same random state, if any)
    with torch.no_grad():
        p_w = metric.proj.weight.view(heads, k, dim)
        q_w = torch.einsum("hab,hbc->hac", metric.metric_tensor(), p_w).reshape(dim, dim)
        standard.qkv.weight.copy_(torch.cat([q_w, metric.proj.weight, metric.proj.weight]))
        standard.out.load_state_dict(metric.out.state_dict())
    x = torch.randn(2, 6, dim, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    causal = metric.supports_causal
    got = metric(x, attention_mask=mask, causal=causal)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, standard(x, attention_mask=mask, causal=causal))
