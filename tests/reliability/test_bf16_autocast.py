"""bf16 autocast on the CPU: every kernel, mixer, a DEQ body and training stay finite and
close to float32; the solvers' updates and the pseudoinverses are not touched by it.

The GPU path runs the same checks under CUDA autocast (``tests/cuda``); CPU autocast casts
the same ops (matmuls, linear layers) to bfloat16, so it reaches the same code: what must
stay in float32 (softmax shifts, pseudoinverses, normalisers) has to say so explicitly.
"""

import pytest
import torch

from formerlab import attention, mixers, solvers
from formerlab.deq import DEQ
from formerlab.linalg import pinv, pinv_iterates
from formerlab.linalg.pinv import pinv_reg
from formerlab.train import load_config, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# bf16 keeps 8 bits of mantissa: one rounding is 2^-9 ~ 2e-3 relative; a few of them
# through softmax and the value products stay within 5e-2 of the largest output
RELATIVE = 5e-2


def relative_error(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.abs().max()).item()


def bf16_and_fp32(fn, inputs):
    """(out, grads) of ``fn`` under CPU bf16 autocast and without it."""
    runs = []
    for enabled in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = fn(*leaves)
        out.float().square().sum().backward()
        runs.append((out, [t.grad for t in leaves]))
    return runs


CASES = [(name, False) for name in attention.available()] + [
    (name, True) for name in attention.available(causal=True)]


@pytest.mark.parametrize(("name", "causal"), CASES)
def test_every_kernel_under_bf16_autocast_stays_close_to_fp32(name, causal):
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 2, 200, 32, generator=gen) for _ in range(3)]
    mask = None if causal else torch.arange(200) < torch.tensor([[150], [200]])
    kernel = attention.build(name)
    (out, grads), (ref, ref_grads) = bf16_and_fp32(
        lambda q, k, v: kernel(q, k, v, attention_mask=mask, causal=causal), inputs)
    assert out.dtype == torch.float32  # the input's dtype, whatever autocast computed in
    assert relative_error(out, ref) <= RELATIVE
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert relative_error(g, r) <= 2 * RELATIVE


@pytest.mark.parametrize("name", mixers.available())
def test_every_mixer_under_bf16_autocast_stays_close_to_fp32(name):
    x = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the weights too: the result must not depend on earlier tests
    mixer = mixers.build(name, dim=32, heads=2)
    causal = mixers.is_causal_only(name)  # the recurrent mixers run only causally
    (out, grads), (ref, ref_grads) = bf16_and_fp32(lambda x: mixer(x, causal=causal), [x])
    assert relative_error(out, ref) <= RELATIVE
    assert torch.isfinite(grads[0]).all()
    assert relative_error(grads[0], ref_grads[0]) <= 2 * RELATIVE


def autocast_and_plain(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fn()
    return inside, fn()


@pytest.mark.parametrize("method", solvers.available())
def test_solvers_update_in_float32_under_autocast_and_call_f_under_it(method):
    """Anderson's least squares in bfloat16 stalled at ~2e-3 on this problem (300 of 300
    iterations, unconverged); the solver's updates now run as without autocast."""
    gen = torch.Generator().manual_seed(3)
    a = 0.9 * torch.linalg.qr(torch.randn(4, 64, 64, generator=gen))[0]
    b = torch.randn(4, 64, 1, generator=gen)
    seen = []

    def f(z):
        seen.append(torch.is_autocast_enabled("cpu"))
        with torch.autocast("cpu", enabled=False):  # f in float32: only the solver differs
            return a @ z + b

    solve = lambda: solvers.solve_fixed_point(f, torch.zeros_like(b), method=method,  # noqa: E731
                                              tol=1e-6, max_iter=300)
    (z, info), (z_plain, info_plain) = autocast_and_plain(solve)
    assert info.converged.all() and torch.equal(z, z_plain)
    assert torch.equal(info.iterations, info_plain.iterations)
    assert seen[0] and not seen[-1]  # f ran under the caller's autocast, on and off


def test_pseudoinverses_and_their_certificates_ignore_autocast():
    a = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4)) + 4 * torch.eye(16)
    (z, info), (z_plain, info_plain) = autocast_and_plain(lambda: pinv(a, return_info=True))
    assert z.dtype == torch.float32 and torch.equal(z, z_plain)
    assert info.converged.all() and torch.equal(info.penrose, info_plain.penrose)
    fixed = pinv(a, iters=8, return_info=True)[1]  # a fixed count defers the certificate
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ... and it is read in here
        assert torch.equal(fixed.penrose, pinv(a, iters=8, return_info=True)[1].penrose)
    assert torch.equal(fixed.penrose, pinv(a, iters=8, return_info=True)[1].penrose)
    torch.testing.assert_close(z, torch.linalg.inv(a), rtol=1e-4, atol=1e-5)
    reg, reg_plain = autocast_and_plain(lambda: pinv_reg(a, lam=1e-3))
    assert torch.equal(reg, reg_plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = [z for _, z in zip(range(5), pinv_iterates(a))]
        assert torch.is_autocast_enabled("cpu")  # the generator did not turn it off here
    assert torch.equal(steps[-1], [z for _, z in zip(range(5), pinv_iterates(a))][-1])


def test_a_deq_body_under_bf16_autocast_solves_and_differentiates():
    torch.manual_seed(2)
    lin = torch.nn.Linear(16, 16)
    deq = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), tol=1e-3, max_iter=50)
    x = torch.randn(4, 8, 16)
    (out, grads), (ref, ref_grads) = bf16_and_fp32(deq, [x])
    assert relative_error(out, ref) <= RELATIVE
    assert torch.isfinite(grads[0]).all()
    assert relative_error(grads[0], ref_grads[0]) <= 2 * RELATIVE


def record_linear_output_dtypes(monkeypatch):
    """{model.training: dtypes the model's linear layers produced} of the next ``train``:
    under bf16 autocast they compute in bfloat16, in training steps and in evaluations."""
    from formerlab.train import loop

    seen = {True: set(), False: set()}
    build = loop.build_model

    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(
                    lambda mod, inputs, out: seen[mod.training].add(out.dtype))
        return model

    monkeypatch.setattr(loop, "build_model", build_and_hook)
    return seen


@pytest.mark.parametrize("extra", [
    [],
    ["model.kernel=nystrom", "model.mixer=attention", "task.name=listops", "task.options={}"],
    ["model.deq={}"],
], ids=["softmax-decoder", "nystrom-listops", "deq-body"])
def test_training_with_bf16_autocast_on_the_cpu_follows_fp32(tiny, extra, monkeypatch):
    """Close to float32, and computed in bfloat16: a ``train.bf16`` that is ignored (no
    autocast) would pass the closeness check alone."""
    overrides = tiny(4) + extra + ["train.eval_every=2"]  # two evaluations in the run
    bf16_seen = record_linear_output_dtypes(monkeypatch)
    bf16 = train(load_config(None, overrides + ["train.bf16=true"]), progress=False)
    fp32_seen = record_linear_output_dtypes(monkeypatch)
    fp32 = train(load_config(None, overrides), progress=False)
    losses = [h["loss"] for h in bf16.history]
    fp32_losses = [h["loss"] for h in fp32.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    for got, expected in zip(losses, fp32_losses):
        assert got == pytest.approx(expected, rel=3e-2)
    # autocast ran: bfloat16 matmuls in training steps and in evaluation (eval mode) ...
    assert torch.bfloat16 in bf16_seen[True], f"training steps computed in {bf16_seen[True]}"
    assert torch.bfloat16 in bf16_seen[False], f"evaluations computed in {bf16_seen[False]}"
    assert torch.bfloat16 not in fp32_seen[True] | fp32_seen[False]
    # ... and it shows in the numbers: the losses and evaluations are not bit-wise float32
    assert losses != fp32_losses
    assert [e["eval"]["loss"] for e in bf16.evals] != [e["eval"]["loss"] for e in fp32.evals]
