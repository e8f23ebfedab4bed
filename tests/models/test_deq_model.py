"""DEQStack as the body of DecoderLM / EncoderClassifier: trains with every backward mode,
stays causal, ignores padding, reports diagnostics and the auxiliary loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from formerlab.models import DecoderLM, EncoderClassifier
from formerlab.models.deq import DEQStack

VOCAB, N = 11, 12


def tiny_lm(**deq):
    torch.manual_seed(0)
    body = DEQStack(32, heads=2, mlp_ratio=2.0, **deq)
    return DecoderLM(VOCAB, dim=32, max_len=N, body=body)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_deq_language_model_trains_with_each_backward_mode(backward):
    model = tiny_lm(backward=backward, max_iter=20, tol=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, N), generator=g)  # memorise one fixed batch
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    if backward == "implicit":
        stats = model.body.diagnostics()
        assert stats["deq_backward_iterations"] >= 1
        assert stats["deq_backward_residual"] == pytest.approx(
            float(model.body.deq.backward_info.lowest_residual.mean()), rel=1e-6)
    # the reported diagnostics against the residual recomputed at the returned point: without
    # autograd the last call of f is f(z*, x) (see DEQ.forward)
    deq = model.body.deq
    calls = []
    handle = deq.f.register_forward_hook(lambda mod, args, out: calls.append((args, out)))
    with torch.no_grad():
        model(ids[:, :-1])
    handle.remove()
    (z_star, *_), f_star = calls[-1]
    b = z_star.shape[0]
    rel = (f_star - z_star).reshape(b, -1).norm(dim=1) / f_star.reshape(b, -1).norm(dim=1)
    info = deq.info
    torch.testing.assert_close(info.lowest_residual, rel, rtol=1e-4, atol=1e-7)
    assert info.converged.tolist() == (rel <= 1e-3 * (1 + 1e-4)).tolist()
    stats = model.body.diagnostics()
    assert stats["deq_nonconverged"] == pytest.approx(float((rel > 1e-3).float().mean()))
    assert stats["deq_residual"] == pytest.approx(float(rel.mean()), rel=1e-4)
    # 1 + iterations evaluations for the solve plus the final f(z*, x); at most max_iter
    assert 1 <= stats["deq_iterations"] <= 20
    assert len(calls) == int(info.iterations.max()) + 2


def test_aux_loss_and_diagnostics_for_the_training_loop():
    model = tiny_lm(max_iter=15)  # jac_reg=1.0 is DEQStack's default
    ids = torch.randint(0, VOCAB, (4, N))
    model.train()
    logits = model(ids)
    aux = model.body.aux_loss
    assert aux is not None and aux.dim() == 0 and aux.requires_grad
    (logits.logsumexp(-1).mean() + aux).backward()
    assert model.body.deq.f.block.mlp.net[0].weight.grad is not None
    assert model.body.diagnostics()["deq_jac_loss"] > 0
    model.eval()
    with torch.no_grad():
        model(ids)
    assert model.body.aux_loss is None
    # without the regulariser it is never set
    plain = tiny_lm(jac_reg=0.0)
    plain(ids).sum().backward()
    assert plain.body.aux_loss is None


def test_deq_decoder_is_causal():
    torch.manual_seed(0)
    body = DEQStack(16, heads=2, mlp_ratio=2.0, solver="broyden", max_iter=80, tol=1e-10, stop="abs")
    model = DecoderLM(VOCAB, dim=16, max_len=N, body=body).double().eval()
    ids = torch.randint(0, VOCAB, (2, N))
    other = ids.clone()
    other[:, 7:] = (other[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert model.body.deq.info.all_converged
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-8, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_deq_classifier_ignores_padding():
    torch.manual_seed(0)
    body = DEQStack(16, heads=2, mlp_ratio=2.0, max_iter=80, tol=1e-10, stop="abs")
    model = EncoderClassifier(VOCAB, 3, dim=16, max_len=N, body=body).double().eval()
    ids = torch.randint(1, VOCAB, (1, 8))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 4])
    with torch.no_grad():
        short = model(ids)
        long = model(padded, attention_mask=mask)
    torch.testing.assert_close(short, long, atol=1e-8, rtol=0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_iters.*valid options.*max_iter"):
        DEQStack(16, heads=2, max_iters=5)
    with pytest.raises(ValueError, match="backward='adjoint'"):
        DEQStack(16, heads=2, backward="adjoint")
    with pytest.raises(ValueError, match="norm='batch'"):
        DEQStack(16, heads=2, norm="batch")


def test_norm_option_reparametrises_the_block():
    body = DEQStack(16, heads=2, norm="weight")
    assert hasattr(body.deq.f.block.mlp.net[0], "parametrizations")
    body(torch.randn(2, 5, 16)).sum().backward()
