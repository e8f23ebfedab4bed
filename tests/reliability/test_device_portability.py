"""What can be checked of the GPU path without a GPU, over one list of workloads: every
kernel (defaults and the options that take other code paths, padded and causal), the
streaming steps, every mixer, the fused Nyström projection, the solvers, the
pseudoinverses, DEQ layers with their regulariser, the three model kinds, generation,
Hugging Face models with formerlab attention swapped in, and short training runs.

1. **Device placement.** With torch's default device set to ``meta``, a tensor created
   without ``device=`` (or drawn from a CPU generator without saying so) lands where no
   input is, and the first op that mixes it with the CPU inputs fails. Each workload runs
   once as usual and once under the ``meta`` default and must give the same CPU tensors,
   bit for bit. On a GPU the same mistake puts a tensor on the CPU next to CUDA inputs; it
   would also break users of ``torch.set_default_device("cuda")``.
2. **No CPU-only ops.** Every ATen op the workloads run (recorded below autograd, so the
   backward passes count) must have a CUDA kernel in PyTorch's own operator table
   (``native_functions.yaml``, shipped with torch): a CUDA entry, a composite one, or a
   structured delegate that has one.

``tests/cuda`` runs the same code on a GPU when one is present.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

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


@dataclasses.dataclass(frozen=True)
class Workload:
    """``run(build())`` returns CPU tensors; ``build`` makes the module (or None)."""

    id: str
    build: Callable
    run: Callable


def same_under_meta_default(work: Workload):
    """``work`` gives the same CPU tensors under the ``meta`` default device.

    ``build`` runs under the usual default both times (modules hold CPU parameters) and
    with the same seed, so the two runs start from the same weights and draws.
    """
    torch.manual_seed(0)
    expected = work.run(work.build())
    torch.manual_seed(0)
    subject = work.build()
    torch.manual_seed(1)  # each run reseeds itself: both runs draw the same
    with meta_default_device():
        got = work.run(subject)
    assert len(got) == len(expected) > 0
    assert any(bool(e.ne(0).any()) for e in expected)  # it computed something
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


# --------------------------------------------------------------------------- workloads

# every kernel with its defaults, both ways where it can, and the options that take other paths
KERNELS = [(name, {}, False) for name in attention.available()] + [
    (name, {}, True) for name in attention.available(causal=True)] + [
    ("causal_nystrom", {"landmark_system": "triangular"}, True),
    ("nystrom", {"pinv_reg": "tikhonov"}, False),
    ("nystrom", {"pinv_reg": "tsvd"}, False),
    ("nystrom", {"pinv_select": "rows"}, False),
    ("nystrom", {"pinv_init": "spectral", "pinv_order": 2, "conv_kernel": None}, False),
    ("linear", {"feature_map": "relu", "chunk_size": 16}, True),
    ("performer", {"chunk_size": 16, "redraw_interval": 1}, True),
]


def kernel_workload(name, options, causal, n):
    inputs = qkv(n)
    mask = None if causal else padding_mask(n)

    def run(kernel):
        torch.manual_seed(2)
        return gradients(kernel(*inputs, attention_mask=mask, causal=causal), inputs)

    how = "causal" if causal else "padded"
    return Workload(f"kernel-{name}-{options}-{how}-{n}",
                    lambda: attention.build(name, **options), run)


def streaming_kernel_workload(name):
    q, k, v = (t.detach() for t in qkv(9))

    def run(kernel):
        state = kernel.init_state(2, 2, 16, device=q.device)
        first, state = kernel.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
        second, state = kernel.step(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], state)
        return [first, second]

    return Workload(f"kernel-step-{name}", lambda: attention.build(name), run)


MIXERS = [(name, {}) for name in mixers.available()] + [
    ("attention", {"kernel": "causal_nystrom", "rope": True}),
    ("metric", {"kernel": "linear", "rope": True}),
    ("metric", {"metric": "psd"}),
    ("metric", {"metric": "diagonal"}),
    ("quadratic", {"kernel": "performer", "rope": True}),
]


def mixer_workload(name, options, causal):
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = None if causal else padding_mask(70)

    def run(mixer):
        torch.manual_seed(2)
        # a causal-only mixer takes its padded case causally (the mask still applies)
        run_causal = causal or mixers.is_causal_only(name)
        return gradients(mixer(x, attention_mask=mask, causal=run_causal), [x, *mixer.parameters()])

    how = "causal" if causal else "padded"
    return Workload(f"mixer-{name}-{options}-{how}",
                    lambda: mixers.build(name, dim=32, heads=2, **options), run)


def fused_projection_workload():
    x = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def build():
        mixer = mixers.build("attention", dim=64, heads=2, kernel="nystrom", num_landmarks=16)
        assert mixer.kernel.fuses_projection(x, mixer.qkv.weight, 2)
        return mixer

    return Workload("mixer-fused-nystrom-projection", build,
                    lambda m: gradients(m(x), [x, *m.parameters()]))


def streaming_mixer_workload(name):
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))

    def run(mixer):  # by default the state goes where the parameters are
        has_parameters = any(True for _ in mixer.parameters())
        state = mixer.init_state(2) if has_parameters else mixer.init_state(2, device=x.device)
        first, state = mixer.step(x[:, :4], state)
        second, state = mixer.step(x[:, 4:], state)
        return [first, second]

    return Workload(f"mixer-step-{name}", lambda: mixers.build(name, dim=32, heads=2), run)


ROOT_METHODS = [e.name for e in solvers.describe() if e.extra.get("root")]


def solver_workload(method):
    gen = torch.Generator().manual_seed(6)
    a = 0.4 * torch.randn(3, 8, 8, generator=gen, dtype=torch.float64) / 8**0.5
    b = torch.randn(3, 8, 1, generator=gen, dtype=torch.float64)
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

    return Workload(f"solver-{method}", lambda: None, run)


def pinv_workload():
    a = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(7))

    def run(_):
        z, info = pinv(a, return_info=True)
        torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-4, atol=1e-5)
        return [z, info.residual, info.penrose, pinv_reg(a, lam=1e-3),
                pinv_reg(a, method="tsvd", rcond=1e-3)]

    return Workload("pinv-and-pinv_reg", lambda: None, run)


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.lin(z) + x)


def deq_workload(backward):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8), requires_grad=True)

    def run(deq):
        torch.manual_seed(2)
        y = deq(x)
        loss = y.square().sum() + deq.reg_loss
        sigma = jacobian_spectral_norm(lambda z: deq.f(z, x.detach()), y.detach(), iters=3)
        return [y.detach(), sigma, *torch.autograd.grad(loss, [x, *deq.parameters()])]

    return Workload(f"deq-{backward}", lambda: DEQ(Body(), backward=backward, jac_reg=0.1), run)


MODELS = {
    "decoder": lambda: DecoderLM(20, dim=32, depth=2, heads=2, max_len=64, mixer="attention",
                                 mixer_options={"kernel": "causal_nystrom"}),
    "encoder": lambda: EncoderClassifier(20, 3, dim=32, depth=1, heads=2, max_len=64,
                                         mixer="attention", mixer_options={"kernel": "nystrom"}),
    "tagger": lambda: TokenTagger(20, 3, dim=32, depth=1, heads=2, max_len=64, mixer="metric"),
}


def model_workload(kind):
    ids = torch.randint(1, 20, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = None if kind == "decoder" else padding_mask(40)

    def run(model):
        return gradients(model(ids, attention_mask=mask), list(model.parameters()))

    return Workload(f"model-{kind}", MODELS[kind], run)


def generation_workload(use_cache):
    prompt = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(10))

    def run(model):
        gen = torch.Generator().manual_seed(11)  # a CPU generator, whatever the model's device
        return [model.eval().generate(prompt, 12, generator=gen, use_cache=use_cache)]

    return Workload(f"generate-{'cached' if use_cache else 'recomputed'}", MODELS["decoder"], run)


def hf_workload(family, kernel):
    """A tiny random Hugging Face model (no download) with ``kernel`` swapped in."""
    import transformers

    def build():
        from formerlab.integrations.hf import swap_attention

        if family == "bert":
            config = transformers.BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=40,
                intermediate_size=64, max_position_embeddings=72)
        else:
            config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             vocab_size=40, bos_token_id=0, eos_token_id=0)
        return swap_attention(transformers.AutoModel.from_config(config).eval(), kernel)

    ids = torch.randint(1, 40, (2, 30), generator=torch.Generator().manual_seed(14))
    attention_mask = padding_mask(30).long()

    def run(model):
        out = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        projections = [p for n, p in model.named_parameters() if "attn" in n or "attention" in n]
        return gradients(out, projections)

    return Workload(f"hf-{family}-{kernel}", build, run)


HF = importlib.util.find_spec("transformers") is not None  # the hf extra (test dependency)


TINY_RUN = ["model.dim=32", "model.depth=1", "model.heads=2", "task.options.context=32",
            "train.steps=6", "train.batch_size=4", "train.warmup=2", "train.eval_every=3",
            "train.eval_batches=2", "train.log_every=2", "sample.tokens=8", "tracking=none"]


def training_workload(name, extra):
    """Tasks and initial weights are built on the CPU and the loop puts the rest on
    ``train.device``: the loss trajectory and the evaluations stay the same."""

    def run(_):
        with tempfile.TemporaryDirectory() as runs:
            overrides = [*TINY_RUN, f"runs_dir={runs}", *extra]
            result = train(load_config(None, overrides), progress=False)
        losses = [h["loss"] for h in result.history] + [e["eval"]["loss"] for e in result.evals]
        return [torch.tensor(losses, device="cpu")]

    return Workload(f"train-{name}", lambda: None, run)


WORKLOADS = [
    *(kernel_workload(*case, n) for case in KERNELS for n in (37, 100)),
    *(streaming_kernel_workload(n) for n in attention.available(causal=True)
      if attention.build(n).supports_streaming),
    *(mixer_workload(name, options, causal) for name, options in MIXERS
      for causal in (False, True)
      if not causal or mixers.build(name, dim=32, heads=2, **options).supports_causal),
    fused_projection_workload(),
    *(streaming_mixer_workload(n) for n in mixers.available()
      if mixers.build(n, dim=32, heads=2).supports_streaming),
    *(solver_workload(method) for method in solvers.available()),
    pinv_workload(),
    *(deq_workload(backward) for backward in ("implicit", "phantom", "unroll")),
    *(model_workload(kind) for kind in MODELS),
    *(generation_workload(use_cache) for use_cache in (True, False)),
    *([hf_workload("bert", "nystrom"), hf_workload("gpt2", "causal_nystrom")] if HF else []),
    training_workload("decoder", []),
    training_workload("deq-body", ["model.deq={}"]),
    training_workload("nystrom-listops", ["model.kernel=nystrom", "model.mixer=attention",
                                          "task.name=listops", "task.options={}"]),
    training_workload("performer-sort", ["model.kernel=performer", "model.mixer=attention",
                                         "task.name=sort", "task.options={}"]),
]


# --------------------------------------------------------------------------- 1. placement

@pytest.mark.parametrize("work", WORKLOADS, ids=[w.id for w in WORKLOADS])
def test_every_workload_creates_its_tensors_on_its_inputs_device(work):
    same_under_meta_default(work)


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


# --------------------------------------------------------------------------- 1b. foreign

# The converse mistake: a tensor pinned to the CPU (``device="cpu"``, ``torch.device("cpu")``)
# inside a kernel. Under a ``meta`` default it still meets CPU inputs, so check 1 cannot see
# it; here the inputs, parameters and states live on ``meta`` while the default device stays
# the CPU, so a pinned tensor meets foreign ones and the op fails. Meta tensors hold no
# values: reads of a value (``.item()``, ``bool(t)``, ``nonzero``) are answered with stand-ins
# (1, True, "all nonzero") so that data-dependent branches run on; only where tensors are
# made and combined is checked, the numbers are check 1's business.

META = torch.device("meta")
T = torch.Tensor
SCALAR_READS = {T.item: 1, T.__float__: 1.0, T.__int__: 1, T.__index__: 1, T.__bool__: False}
# a healthy input: every finiteness / convergence check passes, no failure flag is set
REDUCTIONS = {torch.all: True, T.all: True, torch.any: False, T.any: False}


class MetaValues(torch.overrides.TorchFunctionMode):
    """Stand-in answers for value reads of meta tensors (see above)."""

    def __init__(self):
        super().__init__()
        self.known = {}  # id -> (tensor, its stand-in truth value): outputs of all / any

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], T) and args[0].is_meta:
            x = args[0]
            if func in SCALAR_READS:
                if id(x) in self.known:
                    return self.known[id(x)][1]
                value = SCALAR_READS[func]
                return bool(value) if x.dtype == torch.bool and func is T.item else value
            if func is T.tolist:
                return torch.ones(x.shape, dtype=x.dtype, device="cpu").tolist()
        out = func(*args, **(kwargs or {}))
        if func in REDUCTIONS and isinstance(out, T) and out.is_meta:
            self.known[id(out)] = (out, REDUCTIONS[func])
        return out


@contextlib.contextmanager
def values_on_meta():
    from torch.fx.experimental import _config

    before = _config.meta_nonzero_assume_all_nonzero
    _config.meta_nonzero_assume_all_nonzero = True
    try:
        with MetaValues():
            yield
    finally:
        _config.meta_nonzero_assume_all_nonzero = before


def meta(*tensors, grad=False):
    return [t.detach().to(META).requires_grad_(grad) for t in tensors]


def foreign_kernel(name, options, causal, n):
    def run():
        inputs = meta(*qkv(n), grad=True)
        mask = None if causal else padding_mask(n).to(META)
        kernel = attention.build(name, **options).to(META)
        return gradients(kernel(*inputs, attention_mask=mask, causal=causal), inputs)

    return f"kernel-{name}-{options}-{'causal' if causal else 'padded'}-{n}", run


def foreign_kernel_step(name):
    def run():
        q, k, v = meta(*qkv(9))
        kernel = attention.build(name).to(META)
        state = kernel.init_state(2, 2, 16, device=META)
        first, state = kernel.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
        second, state = kernel.step(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], state)
        return [first, second]

    return f"kernel-step-{name}", run


def foreign_mixer(name, options, causal):
    def run():
        x, = meta(torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(3)), grad=True)
        mask = None if causal else padding_mask(70).to(META)
        mixer = mixers.build(name, dim=32, heads=2, **options).to(META)
        run_causal = causal or mixers.is_causal_only(name)
        return gradients(mixer(x, attention_mask=mask, causal=run_causal), [x, *mixer.parameters()])

    return f"mixer-{name}-{options}-{'causal' if causal else 'padded'}", run


def foreign_mixer_step(name):
    def run():
        x, = meta(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5)))
        mixer = mixers.build(name, dim=32, heads=2).to(META)
        has_parameters = any(True for _ in mixer.parameters())
        state = mixer.init_state(2) if has_parameters else mixer.init_state(2, device=META)
        first, state = mixer.step(x[:, :4], state)
        second, state = mixer.step(x[:, 4:], state)
        return [first, second]

    return f"mixer-step-{name}", run


def foreign_solver(method):
    def run():
        gen = torch.Generator().manual_seed(6)
        a, b = meta(0.04 * torch.randn(3, 8, 8, generator=gen), torch.randn(3, 8, 1, generator=gen))
        z, info = solvers.solve_fixed_point(lambda z: a @ z + b, torch.zeros_like(b),
                                            method=method, tol=1e-6, max_iter=20)
        out = [z, info.residual]
        if method in ROOT_METHODS:
            root, info = solvers.solve_root(lambda z: z - a @ z - b, torch.zeros_like(b),
                                            method=method, tol=1e-6, max_iter=20)
            out += [root, info.residual]
        return out

    return f"solver-{method}", run


def foreign_pinv():
    def run():
        a, = meta(torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(7)))
        z, info = pinv(a, return_info=True)
        return [z, info.residual, pinv_reg(a, lam=1e-3), pinv_reg(a, method="tsvd", rcond=1e-3)]

    return "pinv-and-pinv_reg", run


def foreign_deq(backward):
    def run():
        x, = meta(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8)), grad=True)
        deq = DEQ(Body(), backward=backward, jac_reg=0.1, max_iter=5).to(META)
        y = deq(x)
        return [y, *torch.autograd.grad(y.square().sum() + deq.reg_loss, [x, *deq.parameters()])]

    return f"deq-{backward}", run


def foreign_model(kind):
    def run():
        ids = torch.randint(1, 20, (2, 40), generator=torch.Generator().manual_seed(9)).to(META)
        mask = None if kind == "decoder" else padding_mask(40).to(META)
        model = MODELS[kind]().to(META)
        return gradients(model(ids, attention_mask=mask), list(model.parameters()))

    return f"model-{kind}", run


def foreign_generation(use_cache):
    def run():
        prompt = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(10))
        model = MODELS["decoder"]().to(META).eval()
        # no CPU generator: its draw would copy meta probabilities to the CPU (no data)
        return [model.generate(prompt.to(META), 6, use_cache=use_cache)]

    return f"generate-{'cached' if use_cache else 'recomputed'}", run


FOREIGN = [
    *(foreign_kernel(*case, n) for case in KERNELS for n in (37, 100)),
    *(foreign_kernel_step(n) for n in attention.available(causal=True)
      if attention.build(n).supports_streaming),
    *(foreign_mixer(name, options, causal) for name, options in MIXERS
      for causal in (False, True)
      if not causal or mixers.build(name, dim=32, heads=2, **options).supports_causal),
    *(foreign_mixer_step(n) for n in mixers.available()
      if mixers.build(n, dim=32, heads=2).supports_streaming),
    *(foreign_solver(method) for method in solvers.available()),
    foreign_pinv(),
    # the implicit backward solves in an autograd hook, which the autograd engine runs on
    # the meta device's own thread, without this thread's stand-in answers
    *(foreign_deq(backward) for backward in ("phantom", "unroll")),
    *(foreign_model(kind) for kind in MODELS),
    *(foreign_generation(use_cache) for use_cache in (True, False)),
]


@pytest.mark.parametrize("run", [r for _, r in FOREIGN], ids=[i for i, _ in FOREIGN])
def test_every_workload_runs_with_its_inputs_and_parameters_on_another_device(run):
    assert torch.get_default_device().type == "cpu"
    with values_on_meta():
        out = run()
    assert len(out) > 0
    assert all(t.device == META for t in out), [t.device for t in out]


def test_a_tensor_pinned_to_the_cpu_meets_meta_inputs_and_fails():
    """The check above has teeth: the mistake it is for fails it."""

    def pinned(q):
        return q + torch.ones(q.shape[-1], device="cpu")

    q, = meta(torch.randn(2, 3))
    with values_on_meta(), pytest.raises(RuntimeError, match="meta"):
        pinned(q)
    with meta_default_device():  # ... where check 1 cannot see it
        assert pinned(torch.randn(2, 3, device="cpu")).device.type == "cpu"


# --------------------------------------------------------------------------- 2. CUDA ops

# chosen by the dispatcher for CPU tensors of a device-generic op (scaled_dot_product_attention);
# on CUDA the same call picks the flash / memory-efficient / math kernels instead
CHOSEN_FOR_CPU = ("_for_cpu",)


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen op that runs (``aten::add.Tensor``)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        overload = "" if func._overloadname == "default" else f".{func._overloadname}"
        self.ops.add(f"{func._schema.name}{overload}")
        return func(*args, **(kwargs or {}))


@functools.cache
def operator_table():
    """``aten::name.overload`` -> its entry of PyTorch's native_functions.yaml."""
    import torchgen

    path = Path(torchgen.__file__).parent / "packaged/ATen/native/native_functions.yaml"
    entries = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {"aten::" + e["func"].split("(")[0]: e for e in entries}


def runs_on_cuda(op):
    """Whether ``op`` has a CUDA kernel: no dispatch entry (composite implicit), a CUDA or
    composite key, or a structured delegate (the out= op) that has one."""
    entry = operator_table().get(op)
    if entry is None:
        raise KeyError(f"{op} is not in native_functions.yaml")
    if "structured_delegate" in entry:
        return runs_on_cuda("aten::" + entry["structured_delegate"])
    keys = {k.strip() for key in entry.get("dispatch", {}) for k in key.split(",")}
    return not keys or any("CUDA" in k or k.startswith("Composite") for k in keys)


def test_the_operator_table_tells_cpu_only_ops_from_cuda_ones():
    assert runs_on_cuda("aten::mm") and runs_on_cuda("aten::add.Tensor")
    assert runs_on_cuda("aten::linalg_solve_triangular") and runs_on_cuda("aten::_softmax")
    assert not runs_on_cuda("aten::_scaled_dot_product_flash_attention_for_cpu")
    assert not runs_on_cuda("aten::mkldnn_linear")


def test_every_op_the_workloads_run_has_a_cuda_kernel():
    recorder = OpRecorder()
    with recorder:
        for work in WORKLOADS:
            torch.manual_seed(0)
            work.run(work.build())
    aten = {op for op in recorder.ops if op.startswith("aten::")}
    # it saw the backward passes, the decoders' sampling and the linear algebra too
    assert {"aten::_softmax_backward_data", "aten::multinomial",
            "aten::linalg_solve_triangular", "aten::_linalg_solve_ex"} <= aten
    # the rest: prims of torch's own Python decompositions and the profiler's markers
    assert {op.split("::")[0] for op in recorder.ops - aten} <= {"prims", "profiler"}
    cpu_only = sorted(op for op in aten
                      if not runs_on_cuda(op) and not any(t in op for t in CHOSEN_FOR_CPU))
    assert cpu_only == [], f"ops without a CUDA kernel: {cpu_only}"
