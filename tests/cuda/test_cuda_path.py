"""The GPU path: every kernel, mixer, solver, the DEQ body, the training loop (fp32 and
bf16 autocast) and the benchmarks on CUDA, checked against the same code on the CPU.

Marked ``cuda``: skipped, with the reason shown in the summary, without a GPU.
"""

import sys

import pytest
import torch

from formerlab import attention, mixers, solvers
from formerlab.train import load_config, train

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def ieee_float32():
    """Compare with the CPU in IEEE float32: cuDNN runs float32 convolutions (the Nyström
    conv skip) in TF32 by default, ~1e-3 off; matmuls are pinned too, whatever the user
    configured."""
    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    yield
    for b, value in zip(backends, saved):
        b.fp32_precision = value


def qkv(n=256):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, n, 32, generator=gen) for _ in range(3)]


def forward_backward(fn, inputs, device):
    inputs = [t.detach().to(device).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.float().square().sum().backward()
    return out.detach().float().cpu(), [t.grad.float().cpu() for t in inputs]


class CausalCall(torch.nn.Module):
    """``mixer(x, causal=causal)`` as a module (so ``.cuda()`` moves the mixer)."""

    def __init__(self, mixer, causal):
        super().__init__()
        self.mixer, self.causal = mixer, causal

    def forward(self, x):
        return self.mixer(x, causal=self.causal)


def assert_same_on_cuda(module_fn, inputs, rtol=1e-3, atol=1e-4):
    torch.manual_seed(0)
    cpu_module = module_fn()
    torch.manual_seed(0)
    gpu_module = module_fn().cuda()
    ref, ref_grads = forward_backward(cpu_module, inputs, "cpu")
    out, grads = forward_backward(gpu_module, inputs, "cuda")
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", attention.available())
def test_every_kernel_on_cuda_matches_the_cpu(name):
    causal = name in attention.available(causal=True)

    def build():
        kernel = attention.build(name)
        return lambda q, k, v: kernel.to(q.device)(q, k, v, causal=causal)

    assert_same_on_cuda(build, qkv())


@pytest.mark.parametrize("name", attention.available())
def test_every_kernel_under_bf16_autocast_stays_close_to_fp32(name):
    causal = name in attention.available(causal=True)
    kernel = attention.build(name).cuda()
    q, k, v = (t.cuda() for t in qkv())
    ref = kernel(q, k, v, causal=causal)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernel(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()


@pytest.mark.parametrize("name", mixers.available())
def test_every_mixer_on_cuda_matches_the_cpu(name):
    x = [torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(1))]
    causal = mixers.is_causal_only(name)  # the recurrent mixers run only causally
    assert_same_on_cuda(lambda: CausalCall(mixers.build(name, dim=32, heads=2), causal), x)


@pytest.mark.parametrize("method", solvers.available())
def test_every_solver_finds_the_fixed_point_on_cuda(method):
    gen = torch.Generator().manual_seed(0)
    a = (0.5 * torch.randn(4, 16, 16, generator=gen) / 4).cuda()
    b = torch.randn(4, 16, 1, generator=gen).cuda()
    z, info = solvers.solve_fixed_point(lambda z: a @ z + b, torch.zeros_like(b), method=method,
                                        tol=1e-6, max_iter=200)
    exact = torch.linalg.solve(torch.eye(16, device="cuda") - a, b)
    assert z.device.type == "cuda"
    torch.testing.assert_close(z, exact, rtol=1e-4, atol=1e-4)


def test_a_cpu_generator_drives_sampling_and_probes_on_cuda():
    """Seeded CPU generators work with CUDA tensors and draw what they draw on the CPU."""
    from formerlab.deq import jacobian_frobenius, jacobian_spectral_norm
    from formerlab.models import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(20, dim=32, depth=1, heads=2, max_len=64).eval()
    prompt = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    cpu = model.generate(prompt, 8, generator=torch.Generator().manual_seed(2))
    gpu = model.cuda().generate(prompt.cuda(), 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gpu.cpu(), cpu)
    z = torch.randn(3, 7, device="cuda", requires_grad=True)
    frob = jacobian_frobenius(3 * z, z, generator=torch.Generator().manual_seed(3))
    assert frob.device.type == "cuda" and 0 < frob.item() < 30
    sigma = jacobian_spectral_norm(lambda u: 3 * u, z, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sigma.cpu(), torch.full((3,), 3.0))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("extra", [[], ["model.kernel=nystrom", "model.mixer=attention"],
                                   ["model.deq={}"]])
def test_training_runs_on_cuda(tiny, bf16, extra):
    overrides = tiny(4) + ["train.device=cuda", f"train.bf16={str(bf16).lower()}"] + extra
    if "model.kernel=nystrom" in extra:  # nystrom is not causal: an encoder task
        overrides += ["task.name=listops", "task.options={}"]
    result = train(load_config(None, overrides), progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    cpu = train(load_config(None, [o for o in overrides if "device" not in o and "bf16" not in o]),
                progress=False)
    assert losses[0] == pytest.approx(cpu.history[0]["loss"], rel=3e-2 if bf16 else 1e-3)


def test_benchmarks_run_on_cuda_with_the_sdpa_backends():
    from formerlab.bench import causal, nystrom

    rows = nystrom.run_benchmark(sizes=(1024,), methods=("nystrom", "softmax", "sdpa-flash",
                                 "sdpa-efficient"), repeats=1, device="cuda", memory=False)
    assert all(r.time_ms and r.time_ms > 0 for r in rows)
    times = causal.thread_scaling(1024, (1,), ("softmax", "sdpa-flash", "sdpa-efficient",
                                  "causal_nystrom"), device="cuda", repeats=1)
    assert all(t[1] > 0 for t in times.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs 2 GPUs")
def test_two_nccl_ranks_reproduce_one_gpu(tiny, tmp_path):
    import json
    import subprocess

    overrides = tiny(10) + ["train.device=cuda"]
    one = train(load_config(None, overrides), run_dir=tmp_path / "one", progress=False)
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "formerlab", "train", "--nproc", "2",
                           "--no-progress", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p.name.startswith("run"))
    state = json.loads(next(run.glob("**/state.json")).read_text())
    got = [h["loss"] for h in state["history"] if "loss" in h]
    assert got == pytest.approx([h["loss"] for h in one.history], abs=1e-4)
