"""Every layer creates its tensors on its input's device, checked without a GPU.

With torch's default device set to ``meta``, a tensor created without ``device=`` (or
drawn from a CPU generator without saying so) lands where no input is, and the first op
that mixes it with the CPU inputs fails. So each call below runs once as usual and once
under the ``meta`` default, and must give the same tensors, on the CPU, bit for bit. On a
GPU the same mistake would put a tensor on the CPU next to CUDA inputs (``tests/cuda``
checks that directly when a GPU is present); it would also break users who call
``torch.set_default_device("cuda")``.
"""

import contextlib

import pytest
import torch

from formerlab import attention, mixers, solvers
from formerlab.deq import DEQ, jacobian_spectral_norm
from formerlab.linalg import pinv
from formerlab.linalg.pinv import pinv_reg
from formerlab.models import DecoderLM, EncoderClassifier, TokenTagger
from formerlab.train import load_config, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@contextlib.contextmanager
def meta_default_device():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def assert_same_under_meta_default(build, run):
    """``run(build())`` gives the same CPU tensors under the ``meta`` default device.

    ``build`` runs under the usual default both times (modules hold CPU parameters) and
    with the same seed, so the two runs start from the same weights and draws.
    """
    torch.manual_seed(0)
    expected = run(build())
    torch.manual_seed(0)
    subject = build()
    torch.manual_seed(1)  # the run reseeds itself: both runs draw the same
    with meta_default_device():
        got = run(subject)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g.device.type == "cpu"
        assert torch.equal(g, e)


def gradients(out, inputs):
    return [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]


def qkv(n):
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(2, 2, n, 16, generator=gen, requires_grad=True) for _ in range(3)]


def padding_mask(n):
    """Right padding in row 0, left padding in row 1."""
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n - n // 3:] = False
    mask[1, : n // 4] = False
    return mask


# every kernel with its defaults, both ways where it can, and the options that take other paths
CASES = [(name, {}, False) for name in attention.available()] + [
    (name, {}, True) for name in attention.available(causal=True)] + [
    ("causal_nystrom", {"landmark_system": "triangular"}, True),
    ("nystrom", {"pinv_reg": "tikhonov"}, False),
    ("nystrom", {"pinv_reg": "tsvd"}, False),
    ("nystrom", {"pinv_select": "rows"}, False),
    ("nystrom", {"pinv_init": "spectral", "pinv_order": 2, "conv_kernel": None}, False),
    ("linear", {"feature_map": "relu", "chunk_size": 16}, True),
    ("performer", {"chunk_size": 16, "redraw_interval": 1}, True),
]


@pytest.mark.parametrize("n", [37, 100])
@pytest.mark.parametrize(("name", "options", "causal"), CASES,
                         ids=[f"{n}-{o}-{'causal' if c else 'padded'}" for n, o, c in CASES])
def test_every_kernel_creates_its_tensors_on_its_inputs_device(name, options, causal, n):
    inputs = qkv(n)
    mask = None if causal else padding_mask(n)

    def run(kernel):
        torch.manual_seed(2)
        return gradients(kernel(*inputs, key_padding_mask=mask, causal=causal), inputs)

    assert_same_under_meta_default(lambda: attention.build(name, **options), run)


@pytest.mark.parametrize("name", [n for n in attention.available(causal=True)
                                  if attention.build(n).supports_streaming])
def test_every_streaming_kernel_steps_on_its_inputs_device(name):
    q, k, v = (t.detach() for t in qkv(9))

    def run(kernel):
        state = kernel.init_state(2, 2, 16, device=q.device)
        first, state = kernel.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
        second, state = kernel.step(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], state)
        return [first, second]

    assert_same_under_meta_default(lambda: attention.build(name), run)


MIXERS = [(name, {}) for name in mixers.available()] + [
    ("attention", {"kernel": "causal_nystrom", "rope": True}),
    ("metric", {"kernel": "linear", "rope": True}),
    ("metric", {"metric": "psd"}),
    ("metric", {"metric": "diagonal"}),
    ("quadratic", {"kernel": "performer", "rope": True}),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("name", "options"), MIXERS, ids=[f"{n}-{o}" for n, o in MIXERS])
def test_every_mixer_creates_its_tensors_on_its_inputs_device(name, options, causal):
    build = lambda: mixers.build(name, dim=32, heads=2, **options)  # noqa: E731
    if causal and not build().supports_causal:
        pytest.skip(f"mixer {name!r} with {options} is not causal")
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = None if causal else padding_mask(70)

    def run(mixer):
        torch.manual_seed(2)
        return gradients(mixer(x, key_padding_mask=mask, causal=causal), [x, *mixer.parameters()])

    assert_same_under_meta_default(build, run)


def test_the_fused_nystrom_projection_creates_its_tensors_on_its_inputs_device():
    x = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    build = lambda: mixers.build("attention", dim=64, heads=2, kernel="nystrom",  # noqa: E731
                                 num_landmarks=16)
    assert build().kernel.fuses_projection(x, build().qkv.weight, 2)

    assert_same_under_meta_default(build, lambda m: gradients(m(x), [x, *m.parameters()]))


@pytest.mark.parametrize("name", [n for n in mixers.available()
                                  if mixers.build(n, dim=32, heads=2).supports_streaming])
def test_every_streaming_mixer_steps_on_its_inputs_device(name):
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))

    def run(mixer):
        state = mixer.init_state(2, device=x.device)
        first, state = mixer.step(x[:, :4], state)
        second, state = mixer.step(x[:, 4:], state)
        return [first, second]

    assert_same_under_meta_default(lambda: mixers.build(name, dim=32, heads=2), run)


def affine_problem():
    gen = torch.Generator().manual_seed(6)
    a = 0.4 * torch.randn(3, 8, 8, generator=gen, dtype=torch.float64) / 8**0.5
    b = torch.randn(3, 8, 1, generator=gen, dtype=torch.float64)
    return a, b


ROOT_METHODS = [e.name for e in solvers.describe() if e.extra.get("root")]


@pytest.mark.parametrize("method", solvers.available())
def test_every_solver_works_on_its_inputs_device(method):
    a, b = affine_problem()
    exact = torch.linalg.solve(torch.eye(8, dtype=a.dtype) - a, b)

    def run(_):
        z, info = solvers.solve_fixed_point(lambda z: a @ z + b, torch.zeros_like(b),
                                            method=method, tol=1e-10, max_iter=200)
        torch.testing.assert_close(z, exact, rtol=1e-8, atol=1e-8)
        out = [z, info.residual, info.trace]
        if method in ROOT_METHODS:
            root, info = solvers.solve_root(lambda z: z - a @ z - b, torch.zeros_like(b),
                                            method=method, tol=1e-10, max_iter=200)
            torch.testing.assert_close(root, exact, rtol=1e-8, atol=1e-8)
            out += [root, info.residual]
        return out

    assert_same_under_meta_default(lambda: None, run)


def test_the_pseudoinverses_work_on_their_inputs_device():
    a = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(7))

    def run(_):
        z, info = pinv(a, return_info=True)
        torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-4, atol=1e-5)
        return [z, info.residual, pinv_reg(a, lam=1e-3)]

    assert_same_under_meta_default(lambda: None, run)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_deq_layers_and_their_regulariser_work_on_their_inputs_device(backward):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8), requires_grad=True)

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, z, x):
            return torch.tanh(0.3 * self.lin(z) + x)

    def run(deq):
        torch.manual_seed(2)
        y = deq(x)
        loss = y.square().sum() + deq.reg_loss
        sigma = jacobian_spectral_norm(lambda z: deq.f(z, x.detach()), y.detach(), iters=3)
        return [y.detach(), sigma, *torch.autograd.grad(loss, [x, *deq.parameters()])]

    assert_same_under_meta_default(lambda: DEQ(Body(), backward=backward, jac_reg=0.1), run)


MODELS = {
    "decoder": lambda: DecoderLM(20, dim=32, depth=2, heads=2, max_len=64, mixer="attention",
                                 mixer_options={"kernel": "causal_nystrom"}),
    "encoder": lambda: EncoderClassifier(20, 3, dim=32, depth=1, heads=2, max_len=64,
                                         mixer="attention", mixer_options={"kernel": "nystrom"}),
    "tagger": lambda: TokenTagger(20, 3, dim=32, depth=1, heads=2, max_len=64, mixer="metric"),
}


@pytest.mark.parametrize("kind", MODELS)
def test_models_run_forward_and_backward_on_their_inputs_device(kind):
    ids = torch.randint(1, 20, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = None if kind == "decoder" else padding_mask(40)

    def run(model):
        out = model(ids, key_padding_mask=mask)
        return gradients(out, list(model.parameters()))

    assert_same_under_meta_default(MODELS[kind], run)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_samples_on_the_models_device_with_a_cpu_generator(use_cache):
    prompt = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(10))

    def run(model):
        gen = torch.Generator().manual_seed(11)
        return [model.eval().generate(prompt, 12, generator=gen, use_cache=use_cache)]

    assert_same_under_meta_default(MODELS["decoder"], run)


@pytest.mark.parametrize("extra", [
    [],
    ["model.deq={}"],
    ["model.kernel=nystrom", "model.mixer=attention", "task.name=listops", "task.options={}"],
    ["model.kernel=performer", "model.mixer=attention", "task.name=sort", "task.options={}"],
], ids=["decoder", "deq-body", "nystrom-listops", "performer-sort"])
def test_training_is_the_same_under_another_default_device(tiny, extra):
    """Tasks and initial weights are built on the CPU and the loop puts the rest on
    ``train.device``: the loss trajectory, the evaluation and the sample stay the same."""
    overrides = tiny(6) + extra

    def run(_):
        result = train(load_config(None, overrides), progress=False)
        losses = [h["loss"] for h in result.history] + [e["eval"]["loss"] for e in result.evals]
        return [torch.tensor(losses, device="cpu")]

    assert_same_under_meta_default(lambda: None, run)


def test_seeded_draws_come_from_the_generator_wherever_the_result_goes():
    """A CPU generator draws on the CPU and the numbers move: the target device neither
    changes them nor fails (``meta`` stands in for a GPU here; tests/cuda checks CUDA)."""
    from formerlab.linalg.numerics import seeded_randn

    expected = torch.randn(4, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    gen = torch.Generator().manual_seed(12)
    moved = seeded_randn((4, 3), gen, dtype=torch.float64, device="meta")
    assert moved.device.type == "meta" and moved.shape == (4, 3)
    after_one_draw = torch.Generator().manual_seed(12)
    torch.randn(4, 3, generator=after_one_draw, dtype=torch.float64)
    assert torch.equal(gen.get_state(), after_one_draw.get_state())
    gen.manual_seed(12)
    assert torch.equal(seeded_randn((4, 3), gen, dtype=torch.float64, device="cpu"), expected)
    torch.manual_seed(13)
    unseeded = seeded_randn((4, 3), None, dtype=torch.float64, device="cpu")
    torch.manual_seed(13)
    assert torch.equal(unseeded, torch.randn(4, 3, dtype=torch.float64))
