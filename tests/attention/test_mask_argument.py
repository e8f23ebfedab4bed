"""The mask argument is ``attention_mask``: bool (B, N), True = real token, the meaning of
Hugging Face's ``attention_mask``. The old name ``key_padding_mask`` is refused everywhere
the mask is taken (torch's ``MultiheadAttention`` uses that name with the opposite
meaning), and the refusal says what to pass instead."""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.models import BlockStack, DecoderLM, EncoderClassifier, MetaFormerBlock, TokenTagger

MASK = torch.tensor([[True, True, True, False]])


def calls():
    q = torch.randn(1, 2, 4, 8)
    x = torch.randn(1, 4, 16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    out = [(f"kernel-{n}", lambda n=n, **kw: attention.build(n)(q, q, q, **kw))
           for n in attention.available()]
    out += [(f"mixer-{n}", lambda n=n, **kw: mixers.build(n, dim=16, heads=2)(
                x, causal=mixers.is_causal_only(n), **kw))
            for n in mixers.available()]
    block = MetaFormerBlock(16, mixers.build("attention", dim=16, heads=2))
    out += [("block", lambda **kw: block(x, **kw))]
    out += [("stack", lambda **kw: BlockStack(16, 1, 2)(x, **kw))]
    out += [("decoder", lambda **kw: DecoderLM(5, dim=16, depth=1, heads=2, max_len=8)(ids, **kw))]
    out += [("classifier", lambda **kw: EncoderClassifier(5, 2, dim=16, depth=1, heads=2, max_len=8)(ids, **kw))]
    out += [("tagger", lambda **kw: TokenTagger(5, 3, dim=16, depth=1, heads=2, max_len=8)(ids, **kw))]
    return out


@pytest.mark.parametrize("call", [c[1] for c in calls()], ids=[c[0] for c in calls()])
def test_the_old_keyword_is_refused_with_what_to_pass(call):
    call(attention_mask=MASK)  # the new name works
    with pytest.raises(TypeError, match=r"attention_mask=~key_padding_mask"):
        call(key_padding_mask=MASK)


def test_the_mask_means_what_hugging_face_means_and_converts_from_torch():
    """True = real token; a MultiheadAttention key_padding_mask (True = ignore) converts by
    negation, and softmax then equals torch's own multi-head attention on the same mask."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, bias=False).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ignore = torch.tensor([[False] * 5, [False, False, False, True, True]])
    ref, _ = mha(x, x, x, key_padding_mask=ignore)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    heads = lambda t: t.view(2, 5, 2, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(x @ wq.T), heads(x @ wk.T), heads(x @ wv.T)
    kernel = attention.build("softmax")
    good = kernel(q, k, v, attention_mask=~ignore)
    out = good.transpose(1, 2).reshape(2, 5, 16) @ mha.out_proj.weight.T
    real = ~ignore
    assert torch.allclose(out[real], ref[real], atol=1e-12)
    # torch's mask passed unconverted: the real queries of row 1 attend only to padding
    wrong = kernel(q, k, v, attention_mask=ignore)
    assert (wrong[1, :, :3] - good[1, :, :3]).abs().max() > 1e-2
