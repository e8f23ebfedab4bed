"""torch.compile: every kernel and mixer runs compiled, forward and backward, and matches
eager; the core ones are captured whole (no graph break, checked with dynamo's explain).

CPU compile time is large, so: ``explain`` (tracing only) for graph breaks, the
``aot_eager`` backend (traces forward and backward through AOTAutograd, no code
generation) over the whole registry, and inductor end to end once, through training.
"""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.train import compile as compiling
from formerlab.train import load_config, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CORE_KERNELS = ["softmax", "linear", "performer", "nystrom", "causal_nystrom"]
CORE_MIXERS = ["metric"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qkv(n=128, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, n, 16, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def assert_whole_graph(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", CORE_KERNELS)
def test_core_kernels_compile_without_graph_breaks(name, causal):
    if causal and name not in attention.available(causal=True):
        pytest.skip(f"{name} is not causal")
    kernel = attention.build(name)
    q, k, v = qkv()
    kernel(q, k, v, causal=causal)  # eager first: fills performer's feature cache
    assert_whole_graph(lambda q, k, v: kernel(q, k, v, causal=causal), q, k, v)


@pytest.mark.parametrize("name", CORE_MIXERS + ["attention"])
def test_core_mixers_compile_without_graph_breaks(name):
    options = {"kernel": "nystrom"} if name == "attention" else {}  # projections + conv skip
    mixer = mixers.build(name, dim=32, heads=2, **options)
    x = torch.randn(2, 128, 32)
    mixer(x)
    assert_whole_graph(mixer, x)


@pytest.mark.parametrize("kernel", ["softmax", "causal_nystrom"])
def test_demo_decoder_compiles_as_one_graph(kernel):
    # the embedding's id-range check reads values (two .item() breaks): eager only
    from formerlab.models.decoder import DecoderLM

    model = DecoderLM(8, dim=32, depth=1, heads=2, max_len=64, mixer_options={"kernel": kernel})
    ids = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)
    assert_whole_graph(model, ids)
    with pytest.raises(ValueError, match="token id 8 is out of range"):
        model(torch.full((1, 4), 8))  # eager calls still check


def forward_backward(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), [t.grad for t in inputs]


def assert_compiled_matches_eager(fn, inputs):
    ref_out, ref_grads = forward_backward(fn, inputs)
    out, grads = forward_backward(torch.compile(fn, backend="aot_eager", fullgraph=False), inputs)
    assert ref_out.abs().max() > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert r is not None and r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", attention.available())
def test_every_kernel_compiled_forward_and_backward_match_eager(name):
    kernel = attention.build(name)
    causal = name in attention.available(causal=True)
    assert_compiled_matches_eager(lambda q, k, v: kernel(q, k, v, causal=causal), qkv())


@pytest.mark.parametrize("name", mixers.available())
def test_every_mixer_compiled_forward_and_backward_match_eager(name):
    torch.manual_seed(0)
    mixer = mixers.build(name, dim=32, heads=2)
    assert_compiled_matches_eager(lambda x: mixer(x, causal=True), [torch.randn(2, 128, 32)])


def test_training_with_train_compile_follows_the_eager_run(tiny):
    """Inductor end to end: the compiled run's losses track the eager run's."""
    eager = train(load_config(None, tiny(4)), progress=False)
    compiled = train(load_config(None, tiny(4) + ["train.compile=true"]), progress=False)
    got, want = [h["loss"] for h in compiled.history], [h["loss"] for h in eager.history]
    assert got == pytest.approx(want, rel=1e-4)
    assert compiled.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-4)


def test_train_compile_without_a_cxx_compiler_says_so(tiny, monkeypatch):
    monkeypatch.setattr(compiling, "find_cxx", lambda: None)
    with pytest.raises(ValueError, match="train.compile=true needs a C\\+\\+ compiler"):
        train(load_config(None, tiny(2) + ["train.compile=true"]), progress=False)
