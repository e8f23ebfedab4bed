"""Left padding through mixers and ``DecoderLM`` with ``causal_nystrom`` at segment size 4:
the real positions get what the unpadded sequence gives them (rotary positions are
relative, so the shift by the padding cancels in every dot product)."""

import pytest
import torch

from formerlab import mixers
from formerlab.mixers.params import takes_kernel
from formerlab.models import DecoderLM

F64 = torch.float64
PAD, N = 5, 23
KERNEL = {"kernel": "causal_nystrom", "segment_size": 4}
MIXERS = [m for m in mixers.available(causal=True) if takes_kernel(m)]


def mask():
    return (torch.arange(PAD + N) >= PAD)[None]


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("name", MIXERS)
def test_mixers_are_left_padding_invariant(name, rope):
    torch.manual_seed(0)
    mixer = mixers.build(name, dim=16, heads=2, rope=rope, **KERNEL).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, N, 16, generator=g, dtype=F64)
    junk = 10 * torch.randn(1, PAD, 16, generator=g, dtype=F64)
    ref = mixer(x, causal=True)
    out = mixer(torch.cat([junk, x], dim=1), attention_mask=mask(), causal=True)
    assert (out[:, PAD:] - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("positions", ["rope", "none"])
def test_decoder_is_left_padding_invariant(positions):
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=13, dim=16, depth=2, heads=2, max_len=64, positions=positions,
                   mixer_options=KERNEL).to(F64).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 13, (1, N), generator=g)
    junk = torch.randint(0, 13, (1, PAD), generator=g)
    ref = lm(ids)
    out = lm(torch.cat([junk, ids], dim=1), attention_mask=mask())
    assert (out[:, PAD:] - ref).abs().max() <= 1e-9
    # the padding must matter if it is not masked: the check can fail
    assert (lm(torch.cat([junk, ids], dim=1))[:, PAD:] - ref).abs().max() > 1e-3
