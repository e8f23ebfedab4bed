"""Packed sequences (``cu_seqlens``, B = 1) in the models: decoder, classifier, tagger.

``DecoderLM.forward(ids (1, N), cu_seqlens=cu)`` returns (1, N, vocab) equal to each
sequence's logits alone, values and gradients, with learned, rotary and no positions
(positions restart at each boundary: a model whose learned positions did not restart
fails the same check); ``prefill`` then ``step`` with B = S equals each sequence alone;
the classifier returns one row per sequence (its own mean pool), the tagger (1, N,
classes). Bodies other than a ``BlockStack`` run on the padded batch with its mask. Bad
``cu_seqlens``, a mask with it and a mixer that cannot pack are refused.
"""

from itertools import accumulate

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from formerlab import attention
from formerlab.attention.packed import Packing
from formerlab.models import BlockStack, DecoderLM, EncoderClassifier, TokenTagger

F64 = torch.float64
VOCAB = 23
SMALL = dict(dim=16, depth=2, heads=2, max_len=10)
DECODERS = [
    ("learned", "attention", {}),
    ("rope", "attention", {}),
    ("rope", "attention", {"kernel": "causal_nystrom", "segment_size": 3}),
    ("rope", "metric", {"kernel": "linear"}),
    ("none", "quadratic", {"kernel": "performer", "num_features": 16}),
    ("learned", "pooling", {}),
    ("rope", "retention", {}),
    ("learned", "gated_deltanet", {}),
    ("none", "mamba2", {}),
]
DECODER_IDS = [f"{p}-{m}-{o.get('kernel', '')}" for p, m, o in DECODERS]
LENGTHS = st.lists(st.integers(1, 8), min_size=1, max_size=4)


def offsets(lengths, dtype=torch.int64):
    return torch.tensor([0, *accumulate(lengths)], dtype=dtype)


def spans(lengths):
    ends = list(accumulate(lengths))
    return list(zip([0, *ends[:-1]], ends))


def token_ids(n, seed, batch=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def decoder(positions, mixer, options, seed=0):
    torch.manual_seed(seed)
    model = DecoderLM(VOCAB, positions=positions, mixer=mixer, mixer_options=options, **SMALL)
    return model.to(F64).eval()


def assert_grads_match(model, loss, ref, atol=1e-9):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    refs = torch.autograd.grad(ref, params, allow_unused=True)
    for g, r in zip(grads, refs):
        assert (g is None) == (r is None)
        if g is not None:
            assert (g - r).abs().max() <= atol


@pytest.mark.parametrize(("positions", "mixer", "options"), DECODERS, ids=DECODER_IDS)
@settings(max_examples=2, deadline=None)
@given(lengths=LENGTHS, seed=st.integers(0, 2**16))
@example(lengths=[1], seed=0)
@example(lengths=[7, 1, 10], seed=1)  # N = 18 > max_len: only each sequence must fit
def test_packed_decoder_equals_each_sequence_alone(positions, mixer, options, lengths, seed):
    model = decoder(positions, mixer, options)
    ids = token_ids(sum(lengths), seed)
    logits = model(ids, cu_seqlens=offsets(lengths, torch.int32))
    assert logits.shape == (1, sum(lengths), VOCAB)
    alone = torch.cat([model(ids[:, a:b]) for a, b in spans(lengths)], dim=1)
    assert (logits - alone).abs().max() <= 1e-9
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert_grads_match(model, (logits * weight).sum(), (alone * weight).sum())


@pytest.mark.parametrize(("positions", "mixer", "options"), DECODERS, ids=DECODER_IDS)
def test_decoding_from_a_packed_prefill_equals_each_sequence_alone(positions, mixer, options):
    model = decoder(positions, mixer, options)
    lengths, extra = [4, 1, 6], 3
    ids = token_ids(sum(lengths), seed=1)
    logits, state = model.prefill(ids, offsets(lengths))
    assert (logits - model(ids, cu_seqlens=offsets(lengths))).abs().max() <= 1e-10
    more = token_ids(extra, seed=2, batch=len(lengths))
    steps = []
    for t in range(extra):
        out, state = model.step(more[:, t : t + 1], state)
        steps.append(out)
    steps = torch.cat(steps, dim=1)
    for i, (a, b) in enumerate(spans(lengths)):
        ref = model(torch.cat([ids[:, a:b], more[i : i + 1]], dim=1))
        assert (logits[:, a:b] - ref[:, : b - a]).abs().max() <= 1e-10, i
        assert (steps[i : i + 1] - ref[:, b - a :]).abs().max() <= 1e-10, i


def test_learned_positions_restart_at_each_boundary(monkeypatch):
    model = decoder("learned", "pooling", {})
    lengths = [3, 5]
    ids = token_ids(8, seed=3)
    logits = model(ids, cu_seqlens=offsets(lengths))
    assert (logits[:, 3:] - model(ids[:, 3:])).abs().max() <= 1e-12
    # positions that run on across the boundary (0 … 7) give the second sequence others
    monkeypatch.setattr(Packing, "positions", property(lambda self: torch.arange(8)[None]))
    running = model(ids, cu_seqlens=offsets(lengths))
    assert (running[:, 3:] - model(ids[:, 3:])).abs().max() > 1e-3


def test_each_packed_sequence_must_fit_max_len():
    model = decoder("learned", "attention", {})
    ids = token_ids(14, seed=4)
    assert model(ids, cu_seqlens=offsets([10, 4])).shape == (1, 14, VOCAB)
    with pytest.raises(ValueError, match="sequence length 11 exceeds the model's max_len=10"):
        model(ids, cu_seqlens=offsets([11, 3]))


CLASSIFIERS = [
    (False, {}),
    (False, {"kernel": "nystrom", "num_landmarks": 4}),
    (False, {"kernel": "landmark", "num_landmarks": 4}),
    (True, {"kernel": "causal_nystrom", "segment_size": 3}),
]


@pytest.mark.parametrize(("causal", "options"), CLASSIFIERS, ids=lambda p: str(p))
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_classifier_gives_one_row_per_sequence(causal, options, positions):
    torch.manual_seed(0)
    model = EncoderClassifier(
        VOCAB, 3, causal=causal, positions=positions, mixer_options=options, **SMALL
    ).to(F64)
    lengths = [6, 1, 9, 3]
    ids = token_ids(sum(lengths), seed=5)
    logits = model(ids, cu_seqlens=offsets(lengths))
    alone = torch.cat([model(ids[:, a:b]) for a, b in spans(lengths)])
    assert logits.shape == (4, 3)
    assert (logits - alone).abs().max() <= 1e-9
    weight = torch.randn(4, 3, dtype=F64)
    assert_grads_match(model, (logits * weight).sum(), (alone * weight).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_packed_tagger_equals_each_sequence_alone(causal):
    torch.manual_seed(0)
    model = TokenTagger(VOCAB, 5, causal=causal, positions="rope", **SMALL).to(F64)
    lengths = [2, 7, 1]
    ids = token_ids(10, seed=6)
    logits = model(ids, cu_seqlens=offsets(lengths))
    alone = torch.cat([model(ids[:, a:b]) for a, b in spans(lengths)], dim=1)
    assert logits.shape == (1, 10, 5)
    assert (logits - alone).abs().max() <= 1e-9


class Wrapped(nn.Module):
    """A body that is not a BlockStack (as a DEQ body is not): only attention_mask."""

    def __init__(self):
        super().__init__()
        self.inner = BlockStack(16, 2, 2)

    def forward(self, x, attention_mask=None, causal=False):
        return self.inner(x, attention_mask=attention_mask, causal=causal)


def test_another_body_runs_on_the_padded_batch():
    torch.manual_seed(0)
    model = EncoderClassifier(VOCAB, 3, body=Wrapped(), **SMALL).to(F64)
    lengths = [5, 2, 8]
    ids = token_ids(15, seed=7)
    logits = model(ids, cu_seqlens=offsets(lengths))
    alone = torch.cat([model(ids[:, a:b]) for a, b in spans(lengths)])
    assert (logits - alone).abs().max() <= 1e-9


def test_a_block_stack_takes_packed_sequences():
    torch.manual_seed(0)
    stack = BlockStack(16, 2, 2, "attention", {"kernel": "linear", "rope": True}).to(F64)
    lengths = [3, 6]
    x = torch.randn(1, 9, 16, dtype=F64)
    out = stack(x, causal=True, cu_seqlens=offsets(lengths))
    alone = torch.cat([stack(x[:, a:b], causal=True) for a, b in spans(lengths)], dim=1)
    assert (out - alone).abs().max() <= 1e-10


# --- refusals ---------------------------------------------------------------------


def test_a_mixer_that_cannot_pack_is_refused_in_a_model():
    torch.manual_seed(0)
    model = EncoderClassifier(VOCAB, 3, mixer_options={"kernel": "double_softmax"}, **SMALL)
    with pytest.raises(ValueError, match="'attention' .* cannot take cu_seqlens") as err:
        model(token_ids(5, 0), cu_seqlens=offsets([2, 3]))
    assert str(attention.available(causal=False, packed=True)) in str(err.value)


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        (torch.tensor([0.0, 5.0]), "cu_seqlens has dtype torch.float32, expected torch.int32"),
        (torch.tensor([[0, 5]]), r"cu_seqlens has shape \(1, 2\), expected \[S \+ 1\]"),
        (torch.tensor([0, 5, 5]), r"cu_seqlens=\[0, 5, 5\] .* strictly increasing"),
        (torch.tensor([0, 6]), r"cu_seqlens=\[0, 6\] .* from 0 to T=5"),
    ],
)
def test_bad_cu_seqlens_are_refused_by_every_model(cu, message):
    torch.manual_seed(0)
    ids = token_ids(5, 0)
    lm = DecoderLM(VOCAB, **SMALL)
    models = [lm, EncoderClassifier(VOCAB, 3, **SMALL), TokenTagger(VOCAB, 3, **SMALL)]
    for model in models:
        with pytest.raises(ValueError, match=message):
            model(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match=message):
        lm.prefill(ids, cu)


def test_packed_ids_need_one_row_and_no_mask():
    torch.manual_seed(0)
    ids = token_ids(5, 0, batch=2)
    for model in (DecoderLM(VOCAB, **SMALL), EncoderClassifier(VOCAB, 3, **SMALL)):
        with pytest.raises(ValueError, match="cu_seqlens needs a batch size of 1.*got B=2"):
            model(ids, cu_seqlens=offsets([2, 3]))
        mask = torch.ones(1, 5, dtype=torch.bool)
        with pytest.raises(ValueError, match="attention_mask cannot be combined"):
            model(ids[:1], mask, cu_seqlens=offsets([2, 3]))
