"""Model shapes, masks, and that a few optimisation steps lower the loss."""

import pytest
import torch

from formerlab import mixers
from formerlab.models import DecoderLM, EncoderClassifier, masked_mean


def test_decoder_and_encoder_shapes():
    ids = torch.randint(0, 11, (3, 7))
    assert DecoderLM(11, dim=16, depth=2, heads=2, max_len=8)(ids).shape == (3, 7, 11)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2]).bool()
    enc = EncoderClassifier(11, 4, dim=16, depth=1, heads=2, max_len=8)
    assert enc(ids, attention_mask=mask).shape == (3, 4)


def test_decoder_head_is_tied_to_embedding():
    lm = DecoderLM(11, dim=16, depth=1, heads=2, max_len=8)
    assert lm.head.weight is lm.embed.tokens.weight


def test_decoder_is_causal_end_to_end():
    torch.manual_seed(0)
    lm = DecoderLM(11, dim=16, depth=2, heads=2, max_len=8).eval()
    ids = torch.randint(0, 11, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11
    torch.testing.assert_close(lm(ids)[0, :5], lm(changed)[0, :5])


def test_encoder_ignores_padding_content():
    torch.manual_seed(0)
    enc = EncoderClassifier(11, 3, dim=16, depth=2, heads=2, max_len=8).eval()
    ids = torch.randint(0, 11, (1, 8))
    mask = torch.tensor([[True] * 5 + [False] * 3])
    other = ids.clone()
    other[0, 5:] = (other[0, 5:] + 3) % 11
    torch.testing.assert_close(enc(ids, mask), enc(other, mask), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(enc(ids, mask), enc(ids[:, :5]), atol=1e-5, rtol=1e-5)


def test_masked_mean_matches_manual_mean():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    torch.testing.assert_close(masked_mean(x, mask)[0], x[0, :2].mean(0))
    torch.testing.assert_close(masked_mean(x, mask)[1], x[1].mean(0))


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    lm = DecoderLM(8, dim=32, depth=1, heads=2, max_len=16)
    data = torch.arange(16).remainder(8).repeat(4, 1)  # a periodic sequence is learnable
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = lm(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 8), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_too_long_input_and_bad_mixer_errors():
    lm = DecoderLM(11, dim=16, depth=1, heads=2, max_len=4)
    with pytest.raises(ValueError, match="exceeds the model's max_len=4"):
        lm(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown token mixer"):
        mixers.build("nope", dim=16, heads=2)
    with pytest.raises(ValueError, match="divisible"):
        mixers.build("attention", dim=10, heads=3)
