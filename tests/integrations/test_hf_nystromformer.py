"""HF NystromformerModel: formerlab's nystrom reproduces it configured alike, and fixes it."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from formerlab.integrations.hf import (  # noqa: E402
    NystromformerSwap,
    restore_attention,
    swap_attention,
    swapped_layers,
)

N, M, VOCAB = 16, 4, 40


def model(conv=5):
    torch.manual_seed(0)
    cfg = transformers.NystromformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, segment_means_seq_len=N, num_landmarks=M, conv_kernel_size=conv,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3,
        max_position_embeddings=40,
    )
    return transformers.NystromformerModel(cfg).eval()


def ids(batch=3):
    return torch.randint(2, VOCAB, (batch, N), generator=torch.Generator().manual_seed(1))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_default_swap_uses_the_models_landmarks_and_conv_weights():
    m = model()
    convs = [layer.attention.self.conv.weight.clone() for layer in m.encoder.layer]
    swap_attention(m)
    layers = swapped_layers(m)
    assert [la.kernel.num_landmarks for la in layers] == [M, M]
    assert all(la.kernel.pinv_iters == 6 and la.kernel.pinv_init == "auto" for la in layers)
    for layer, conv in zip(m.encoder.layer, convs):
        assert isinstance(layer.attention.self, NystromformerSwap)
        assert torch.equal(layer.attention.self.conv.weight, conv[:, 0, :, 0])
    restore_attention(m)
    assert all(type(la.attention.self).__name__ == "NystromformerSelfAttention" for la in m.encoder.layer)


@pytest.mark.parametrize("conv", [5, 3])
@torch.no_grad()
def test_configured_alike_it_reproduces_hf_output(conv):
    """Batch-global pinv init (HF's, its per-matrix option cannot be switched on), 6
    iterations, the model's landmarks and conv weights: HF's output to float32 rounding."""
    m = model(conv)
    x = ids()
    ref = m(x).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # formerlab warns about the global init
        swap_attention(m, pinv_init="global")
        alike = m(x).last_hidden_state
    assert rel(alike, ref) <= 1e-4
    swap_attention(m)  # formerlab's default: per-matrix init
    assert rel(m(x).last_hidden_state, ref) > 1e-2


@torch.no_grad()
def test_the_defaults_differ_from_hf_as_documented():
    """HF: one pinv scale for the whole batch, so a sequence's output depends on the others
    in its batch. formerlab's default: per-matrix init, and landmarks over real tokens only,
    so outputs are independent of the batch and of padding."""
    m = model()
    x = ids()
    hf_batch, hf_alone = m(x).last_hidden_state[:1], m(x[:1]).last_hidden_state
    assert rel(hf_batch, hf_alone) > 1e-3
    swap_attention(m)
    assert rel(m(x).last_hidden_state[:1], m(x[:1]).last_hidden_state) <= 1e-5
    mask = torch.ones(3, N, dtype=torch.long)
    mask[1, 10:] = 0
    other = torch.where(mask.bool(), x, (x + 7) % VOCAB)  # different tokens under the padding
    a = m(x, attention_mask=mask).last_hidden_state[1, :10]
    b = m(other, attention_mask=mask).last_hidden_state[1, :10]
    alone = m(x[1:2, :10]).last_hidden_state[0]  # the same 10 tokens, no padding at all
    assert rel(a, b) <= 1e-5 and rel(a, alone) <= 1e-5


def test_trained_conv_weights_go_back_on_restore():
    m = model()
    swap_attention(m)
    swap = m.encoder.layer[0].attention.self
    with torch.no_grad():
        swap.conv.weight.add_(1.0)
    expected = swap.conv.weight.detach().clone()
    restore_attention(m)
    assert torch.equal(m.encoder.layer[0].attention.self.conv.weight[:, 0, :, 0], expected)
