"""``HFSequenceModel``: packed batches as formerlab's own models take them
(``forward(ids (1, N), cu_seqlens=cu)``), and generation with a ``FormerlabCache``.

Ground truth: each packed sequence run alone through the same model (outputs, a loss and
every gradient; decoders, classifiers and taggers); generation without the cache (the
whole context recomputed per token), each left-padded prompt alone, and the window that
slides past the model's positions."""

import pytest
import torch

pytest.importorskip("transformers")

from formerlab import attention  # noqa: E402
from formerlab.integrations.hf_model import HFSequenceModel  # noqa: E402

from .conftest import VOCAB, tiny_model  # noqa: E402

LENGTHS = (3, 6, 4)
OFFSETS = (0, 3, 9, 13)
TOL = 1e-10  # float64
KERNELS = {
    "softmax": {},
    "linear": {},
    "performer": {"num_features": 16},
    "causal_nystrom": {"segment_size": 3},
}

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")

    def save(family):
        path = folder / family
        if not path.exists():
            head = "lm" if family in ("gpt2", "llama", "qwen2", "mistral") else "base"
            tiny_model(family, head=head).save_pretrained(path)
        return path

    return save


def build(saved, family, kind, kernel, options=None, **kw):
    torch.manual_seed(0)
    model = HFSequenceModel(saved(family), kind, VOCAB, kernel, options, **kw)
    return model.double().eval()


def packed_ids(seed=0):
    return torch.randint(2, VOCAB, (1, OFFSETS[-1]), generator=torch.Generator().manual_seed(seed))


def pieces(ids):
    return [ids[:, a:b] for a, b in zip(OFFSETS[:-1], OFFSETS[1:])]


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


CASES = [
    ("gpt2", "decoder", "linear", {}),
    ("llama", "decoder", "causal_nystrom", {"segment_size": 2}),
    ("qwen2", "decoder", "performer", {"num_features": 16}),
    ("bert", "encoder", "nystrom", {"num_landmarks": 2}),
    ("roberta", "tagger", "softmax", {}),
]


@pytest.mark.parametrize(("family", "kind", "kernel", "options"), CASES)
def test_a_packed_forward_and_backward_equal_the_unpacked_ones(
    saved, family, kind, kernel, options
):
    model = build(saved, family, kind, kernel, options, num_classes=3)
    ids = packed_ids()
    weights = torch.randn(1, OFFSETS[-1], VOCAB if kind == "decoder" else 3, dtype=torch.float64)
    if kind == "encoder":
        weights = weights[0, :3]  # one row of class logits per sequence
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    out = model(ids, cu_seqlens=cu)
    (out * weights).sum().backward()
    packed = grads(model)
    model.zero_grad()
    alone = [model(x) for x in pieces(ids)]
    joined = torch.cat(alone, 0 if kind == "encoder" else 1)
    (joined * weights).sum().backward()
    assert out.shape == joined.shape
    assert torch.allclose(out, joined, atol=TOL, rtol=0)
    reference = grads(model)
    assert len(packed) == len(reference) > 0
    for got, want in zip(packed, reference):
        assert torch.allclose(got, want, atol=TOL, rtol=0)
    # unpacked (one long sequence), the later sequences would differ
    if kind != "encoder":
        whole = model(ids)
        assert (whole[0, 3:] - joined[0, 3:]).abs().max() > 1e-3


def test_packed_input_is_validated(saved):
    model = build(saved, "gpt2", "decoder", "linear")
    ids = packed_ids()
    cu = torch.tensor(OFFSETS)
    with pytest.raises(ValueError, match="attention_mask cannot be combined with cu_seqlens"):
        model(ids, torch.ones_like(ids), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens=\\[0, 3, 9\\] is not allowed"):
        model(ids, cu_seqlens=cu[:3])
    long = torch.randint(2, VOCAB, (1, 70))
    with pytest.raises(ValueError, match="a sequence of 68 tokens; the model takes at most 64"):
        model(long, cu_seqlens=torch.tensor([0, 2, 70]))


def test_the_packing_reaches_hf_as_its_varlen_attention_gets_it(saved):
    model = build(saved, "llama", "decoder", "linear")
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    model.hf.model.register_forward_pre_hook(record, with_kwargs=True)
    model(packed_ids(), cu_seqlens=torch.tensor(OFFSETS))
    assert seen["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert seen["cu_seq_lens_q"].tolist() == seen["cu_seq_lens_k"].tolist() == list(OFFSETS)
    assert seen["max_length_q"] == seen["max_length_k"] == 6


# --------------------------------------------------------------------------- generation


def prompts():
    ids = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :5] = False
    return ids, mask


def count_tokens(model):
    """The number of tokens each call of the HF model gets."""
    lengths = []
    model.hf.get_input_embeddings().register_forward_hook(
        lambda module, args, out: lengths.append(args[0].shape[1])
    )
    return lengths


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_with_the_cache_equals_recomputing(saved, family, kernel):
    model = build(saved, family, "decoder", kernel, KERNELS[kernel])
    assert model.supports_streaming
    ids, mask = prompts()
    lengths = count_tokens(model)
    cached = model.generate(ids, 6, top_k=1, attention_mask=mask)
    assert lengths == [9] + [1] * 5  # one prefill, then one token per step: the cache is used
    recomputed = model.generate(ids, 6, top_k=1, attention_mask=mask, use_cache=False)
    assert lengths[6:] == [9, 10, 11, 12, 13, 14]
    assert torch.equal(cached, recomputed)
    alone = model.generate(ids[2:, 5:], 6, top_k=1)  # the left-padded row, alone
    assert torch.equal(cached[2:, 9:], alone[:, 4:])
    # past the 64 positions of the tiny models the window slides (the cache restarts)
    long = torch.randint(2, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        model.generate(long, 8, top_k=1), model.generate(long, 8, top_k=1, use_cache=False)
    )


def test_the_cached_logits_equal_the_forward_on_the_whole_sequence(saved):
    model = build(saved, "llama", "decoder", "causal_nystrom", {"segment_size": 3})
    ids, mask = prompts()
    out = model.generate(ids, 5, top_k=1, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.bool)], 1)
    logits = model(out[:, :-1], attention_mask=full_mask[:, :-1])
    # the greedy token of every step is the argmax of the whole sequence's logits there
    assert torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])


def test_sampling_with_one_generator_per_row_equals_recomputing(saved):
    model = build(saved, "gpt2", "decoder", "performer", KERNELS["performer"])
    ids, mask = prompts()

    def sample(use_cache):
        gens = [torch.Generator().manual_seed(7) for _ in range(3)]
        return model.generate(
            ids, 6, temperature=0.8, generator=gens, attention_mask=mask, use_cache=use_cache
        )

    assert torch.equal(sample(True), sample(False))


def test_generation_arguments_are_validated(saved):
    model = build(saved, "gpt2", "decoder", "linear")
    ids, mask = prompts()
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(ids, 2, temperature=0)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="out of range"):
        model.generate(ids + VOCAB, 2)
    encoder = build(saved, "bert", "encoder", "nystrom", num_classes=2)
    with pytest.raises(ValueError, match="needs a decoder"):
        encoder.generate(ids, 2)
    assert not encoder.supports_streaming


def test_a_kernel_that_cannot_stream_recomputes_with_a_warning(saved):
    options = {"segment_size": 2, "landmark_system": "triangular"}
    model = build(saved, "llama", "decoder", "causal_nystrom", options)
    assert not model.supports_streaming
    ids, mask = prompts()
    lengths = count_tokens(model)
    with pytest.warns(RuntimeWarning, match="cannot stream"):
        out = model.generate(ids, 3, top_k=1, attention_mask=mask)
    assert lengths == [9, 10, 11]  # the whole context every token
    assert torch.equal(out, model.generate(ids, 3, top_k=1, attention_mask=mask, use_cache=False))


def test_saving_keeps_the_swapped_layers_own_kernels(saved, tmp_path):
    # a kernel that differs from what a fresh swap would build (other random features):
    # save_pretrained restores HF's attention to save, and must put these very kernels back
    model = build(saved, "llama", "decoder", "performer", {"num_features": 8})
    for i, module in enumerate(model.hf._formerlab_swap.swapped):
        module.formerlab_attention.kernel = attention.build(
            "performer", num_features=8, seed=100 + i).double()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    before = [m.formerlab_attention.kernel for m in model.hf._formerlab_swap.swapped]
    with torch.no_grad():
        want = model(ids)
        model.save_pretrained(tmp_path / "saved")
        got = model(ids)
    assert torch.equal(got, want)
    after = [m.formerlab_attention.kernel for m in model.hf._formerlab_swap.swapped]
    assert all(a is b for a, b in zip(after, before)) and len(after) == len(before) > 0
