"""The metric family and pooling inside real models: loss falls, causality, padding."""

import pytest
import torch

from formerlab import attention, mixers
from formerlab.models import DecoderLM, EncoderClassifier
from formerlab.testing import assert_no_future_leak

# (mixer, options) for every variant this family adds.
VARIANTS = [
    ("metric", {"metric": "symmetric"}),
    ("metric", {"metric": "psd"}),
    ("metric", {"metric": "diagonal"}),
    ("quadratic", {}),
    ("quadratic", {"rank": 2}),
    ("pooling", {"pool_size": 3}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in VARIANTS]


def _fit(model, batch_fn, steps=25, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = batch_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_trains_in_decoder_lm(name, options):
    torch.manual_seed(0)
    vocab = 7
    lm = DecoderLM(vocab, dim=16, depth=1, heads=2, max_len=16, mixer=name, mixer_options=options)
    # A fixed batch of periodic sequences: next-token prediction is learnable from the past.
    start = torch.randint(0, vocab, (8, 1))
    ids = (start + torch.arange(13)[None, :] * torch.randint(1, 3, (8, 1))) % vocab

    def loss():
        logits = lm(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    losses = _fit(lm, loss)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_trains_in_encoder_classifier_with_padding(name, options):
    torch.manual_seed(0)
    enc = EncoderClassifier(9, 2, dim=16, depth=1, heads=2, max_len=12, mixer=name,
                            mixer_options=options)
    ids = torch.randint(1, 9, (12, 10))
    lengths = torch.randint(4, 11, (12,))
    mask = torch.arange(10)[None, :] < lengths[:, None]
    labels = (ids[:, 0] > 4).long()  # depends on a real token: the first one

    def loss():
        return torch.nn.functional.cross_entropy(enc(ids, attention_mask=mask), labels)

    losses = _fit(enc, loss)
    assert losses[-1] < 0.7 * losses[0], losses
    # Padded tokens never reach real ones: change them, the logits stay.
    other = torch.where(mask, ids, (ids + 3) % 9)
    enc.eval()
    torch.testing.assert_close(enc(ids, mask), enc(other, mask), rtol=1e-5, atol=1e-6)


def _causal_cases():
    """Every registered causal mixer (defaults) and this family's variants x causal kernels."""
    cases = [(name, {}) for name in mixers.available(causal=True)]
    for name, options in VARIANTS:
        if name == "pooling":
            cases += [(name, {"pool_size": s}) for s in (1, 2, 4)]
            continue
        cases += [(name, {**options, "kernel": k}) for k in attention.available(causal=True)]
    return cases


@pytest.mark.parametrize(("name", "options"), _causal_cases(), ids=repr)
def test_causal_mixers_do_not_leak(name, options):
    torch.manual_seed(0)
    mixer = mixers.build(name, dim=8, heads=2, **options).double().eval()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    assert_no_future_leak(lambda x: mixer(x, causal=True), [x], seq_dim=1, atol=1e-12)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    assert_no_future_leak(
        lambda x: mixer(x, attention_mask=mask, causal=True), [x], seq_dim=1, atol=1e-12
    )


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_decoder_lm_is_causal_end_to_end(name, options):
    torch.manual_seed(0)
    lm = DecoderLM(11, dim=16, depth=2, heads=2, max_len=10, mixer=name, mixer_options=options)
    ids = torch.randint(0, 11, (2, 10))
    assert_no_future_leak(lm.eval(), [ids], seq_dim=1, check_grad=False, atol=1e-6)
