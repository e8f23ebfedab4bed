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
    # counters (graph breaks, ...) are process-wide: earlier tests' compiles must not count
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
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
    kernel(q, k, v, causal=causal)  # eager first: warm, as in training
    assert_whole_graph(lambda q, k, v: kernel(q, k, v, causal=causal), q, k, v)


def assert_fullgraph(fn, *args):
    """``fullgraph=True`` too: explain misses a break before the first op (e.g. creating a
    ``torch.Generator``), which then shows as one graph with zero breaks."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_a_fresh_performer_compiles_to_one_graph(causal):
    """No eager call first: the random features are drawn inside the graph (one op)."""
    q, k, v = qkv()
    kernel = attention.build("performer")
    assert_whole_graph(lambda q, k, v: kernel(q, k, v, causal=causal), q, k, v)
    fresh = attention.build("performer")
    assert_fullgraph(lambda q, k, v: fresh(q, k, v, causal=causal), q, k, v)


def test_training_with_performer_redraws_compiles_once():
    """Redraws between optimiser steps (in place, in the ``draws`` buffer) neither break nor
    recompile the graph, and the compiled steps use the new features (they match eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from formerlab.models.decoder import DecoderLM
    from formerlab.train.loop import on_optimizer_step

    options = {"kernel": "performer", "num_features": 8, "redraw_interval": 1}
    ids = torch.randint(0, 8, (2, 17), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = DecoderLM(8, dim=32, depth=2, heads=2, max_len=64, mixer_options=options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        counter = CompileCounterWithBackend("aot_eager")
        net = torch.compile(model, backend=counter) if mode == "compiled" else model
        losses = []
        for step in range(1, 5):
            logits = net(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            on_optimizer_step(model, step)
            losses.append(loss.item())
        runs[mode] = losses
        draws = [int(m.draws) for m in model.modules() if hasattr(m, "draws")]
        assert draws == [4, 4]
    assert counter.frame_count == 1  # one graph for 4 steps and 4 redraws: no recompiles
    assert not torch._dynamo.utils.counters["graph_break"]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)


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


def test_the_training_loop_with_performer_redraws_compiles_once(tiny, monkeypatch):
    """``train.compile=true`` with redraws every step: one graph for the whole run (the
    loop redraws between steps), and the same losses as the eager run."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from formerlab.train import loop

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(loop, "compile_model", lambda model, device: torch.compile(model, backend=counter))
    overrides = tiny(6) + ["model.kernel=performer", "model.kernel_options.num_features=8",
                           "model.kernel_options.redraw_interval=1", "sample.tokens=0"]
    eager = train(load_config(None, overrides), progress=False)
    compiled = train(load_config(None, overrides + ["train.compile=true"]), progress=False)
    assert counter.frame_count == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    got, want = [h["loss"] for h in compiled.history], [h["loss"] for h in eager.history]
    assert got == pytest.approx(want, rel=1e-5)
