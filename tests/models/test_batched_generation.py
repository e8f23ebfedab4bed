"""Batched generation of prompts of different lengths: ``DecoderLM.generate`` / ``step``
with a left-padding ``attention_mask`` give every row exactly what its prompt alone gives
(greedy tokens, and logits <= 1e-9 in float64), for every causal kernel through the
attention mixer and every other causal mixer, with learned and rotary positions
(registry-driven); a masked step equals ``forward`` with the same mask; the padded
slots' token ids do not matter; masked states stay values; seeded sampling with one
generator per row equals each prompt alone; anything but left padding is refused."""

import pytest
import torch
from torch import nn

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.models import DecoderLM
from formerlab.testing import assert_states_are_values

VOCAB = 11
LENGTHS = (5, 9, 2)
TOKENS = 12


def cases():
    """(id, mixer, options, positions): every causal kernel through ``attention`` (and
    ``causal_nystrom`` at segment size 4, rows out of phase), every other causal mixer
    (with ``causal_nystrom`` at s = 3 if it takes a kernel); learned and rope."""
    kernels = [({"kernel": k}, k) for k in attention.available(causal=True)]
    kernels.append(({"kernel": "causal_nystrom", "segment_size": 4}, "causal_nystrom-s4"))
    mixer_options = [("attention", o, name) for o, name in kernels]
    for name in mixers.available(causal=True):
        if name != "attention":
            options = {"kernel": "causal_nystrom", "segment_size": 3} if takes_kernel(name) else {}
            mixer_options.append((name, options, name))
    out = []
    for mixer, options, label in mixer_options:
        for positions in ("learned", "rope"):
            if positions == "rope" and not takes_kernel(mixer):
                continue  # a mixer without attention has no rotary option
            out.append((f"{mixer}-{label}-{positions}", mixer, options, positions))
    return out


CASES = cases()
IDS = [c[0] for c in CASES]
CASES = [c[1:] for c in CASES]


def lm(mixer, options, positions, max_len=32, seed=0):
    """A tiny float64 decoder with spread-out weights (greedy decoding does not collapse
    onto one token, so a wrong state changes the tokens)."""
    torch.manual_seed(seed)
    model = DecoderLM(
        VOCAB,
        dim=16,
        depth=2,
        heads=2,
        max_len=max_len,
        mixer=mixer,
        mixer_options=options,
        positions=positions,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.3)
    return model.double().eval()


def prompts(seed=1, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]


def left_padded(rows, seed=2):
    """(ids, mask): the prompts right-aligned, random token ids in the padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(r.shape[1] for r in rows)
    ids = torch.randint(0, VOCAB, (len(rows), width), generator=g)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = True
    return ids, mask


def stepped_logits(model, ids, mask, width):
    """Logits of a masked prompt step then one step per later token, (B, N - width + 1, V)
    (the prompt's last position, then every later one)."""
    with torch.no_grad():
        logits, state = model.step(
            ids[:, :width], model.init_state(ids.shape[0]), attention_mask=mask
        )
        outs = [logits[:, -1:]]
        for t in range(width, ids.shape[1]):
            logits, state = model.step(ids[:, t : t + 1], state)
            outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_left_padded_batch_generates_each_prompt_as_alone(case):
    model = lm(*case)
    rows = prompts()
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    out = model.generate(ids, TOKENS, top_k=1, attention_mask=mask)
    assert out.shape == (3, width + TOKENS) and torch.equal(out[:, :width], ids)
    logits = stepped_logits(model, out[:, :-1], mask, width)
    # a masked step is forward with the same mask
    full_mask = torch.cat([mask, torch.ones(3, TOKENS - 1, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        parallel = model(out[:, :-1], attention_mask=full_mask)[:, width - 1 :]
    assert (logits - parallel).abs().max() <= 1e-9
    for i, row in enumerate(rows):
        alone = model.generate(row, TOKENS, top_k=1)
        assert torch.equal(out[i, width:], alone[0, row.shape[1] :]), i
        n = row.shape[1]
        alone_logits = stepped_logits(model, alone[:, :-1], None, n)
        assert (logits[i : i + 1] - alone_logits).abs().max() <= 1e-9, i
    # the rows differ: the comparison is not passed by one constant continuation
    assert len({tuple(r) for r in out[:, width:].tolist()}) > 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padding_token_ids_do_not_matter(case):
    model = lm(*case)
    rows = prompts(seed=3)
    (a, mask), (b, _) = left_padded(rows, seed=4), left_padded(rows, seed=5)
    assert not torch.equal(a, b)
    width = a.shape[1]
    out_a = model.generate(a, TOKENS, top_k=1, attention_mask=mask)
    out_b = model.generate(b, TOKENS, top_k=1, attention_mask=mask)
    assert torch.equal(out_a[:, width:], out_b[:, width:])
    diff = stepped_logits(model, out_a[:, :-1], mask, width)
    diff = diff - stepped_logits(model, torch.cat([b, out_a[:, width:-1]], 1), mask, width)
    assert diff.abs().max() <= 1e-12


@pytest.mark.parametrize("kernel", ["softmax", "causal_nystrom"])
def test_learned_positions_slide_the_window_per_row_as_alone(kernel):
    """max_len 12 < 9 + 12: the longest row slides first; every row still equals its
    prompt alone (whose window slides when its own length passes max_len)."""
    options = {"kernel": kernel, **({"segment_size": 4} if kernel == "causal_nystrom" else {})}
    model = lm("attention", options, "learned", max_len=12)
    rows = prompts(seed=6)
    ids, mask = left_padded(rows)
    out = model.generate(ids, TOKENS, top_k=1, attention_mask=mask)
    plain = model.generate(ids, TOKENS, top_k=1, attention_mask=mask, use_cache=False)
    assert torch.equal(out, plain)
    for i, row in enumerate(rows):
        alone = model.generate(row, TOKENS, top_k=1)
        assert torch.equal(out[i, ids.shape[1] :], alone[0, row.shape[1] :]), i


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_uncached_batched_generation_equals_cached(positions):
    model = lm("attention", {"kernel": "causal_nystrom", "segment_size": 3}, positions)
    ids, mask = left_padded(prompts(seed=7))
    cached = model.generate(ids, TOKENS, top_k=1, attention_mask=mask)
    assert torch.equal(
        cached, model.generate(ids, TOKENS, top_k=1, attention_mask=mask, use_cache=False)
    )


@pytest.mark.parametrize("kernel", ["softmax", "causal_nystrom", "linear"])
def test_seeded_sampling_with_a_generator_per_row_equals_each_prompt_alone(kernel):
    model = lm("attention", {"kernel": kernel}, "rope")
    rows = prompts(seed=8)
    ids, mask = left_padded(rows)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    out = model.generate(ids, 20, generator=gens, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = model.generate(row, 20, generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(out[i, ids.shape[1] :], alone[0, row.shape[1] :]), i
    assert len(set(out[0, ids.shape[1] :].tolist())) > 3  # really sampled
    # one generator for the batch is allowed (rows draw in turn from it)
    shared = model.generate(
        ids, 20, generator=torch.Generator().manual_seed(0), attention_mask=mask
    )
    assert shared.shape == out.shape


@pytest.mark.parametrize("kernel", ["softmax", "causal_nystrom", "performer"])
def test_masked_decoder_states_are_values(kernel):
    options = {"kernel": kernel, **({"segment_size": 3} if kernel == "causal_nystrom" else {})}
    model = lm("attention", options, "learned")
    g = torch.Generator().manual_seed(9)
    n, prompt = 20, 9
    base = torch.randint(0, VOCAB, (3, n), generator=g)
    _, mask = left_padded(prompts(seed=10), seed=11)
    mask = torch.cat([mask, torch.ones(3, n - prompt, dtype=torch.bool)], dim=1)
    sequences = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (3, n), generator=g)
        ids[:, :prompt] = base[:, :prompt]
        sequences.append([ids, mask])

    def parallel(ids, mask):
        return model(ids, attention_mask=mask).masked_fill(~mask[..., None], 0)

    def step(xs, state):
        logits, state = model.step(xs[0], state, attention_mask=xs[1])
        return logits.masked_fill(~xs[1][..., None], 0), state

    err = assert_states_are_values(
        init=lambda: model.init_state(3),
        step=step,
        parallel=parallel,
        sequences=sequences,
        prompt=prompt,
        atol=1e-9,
    )
    assert err <= 1e-9


@pytest.mark.parametrize(
    "mask_rows, message",
    [
        ([[1, 1, 1, 0]], "generation expects left padding"),  # right padding
        ([[0, 1, 0, 1]], "generation expects left padding"),  # padding in the middle
        ([[0, 0, 0, 0]], "have no real token"),
    ],
)
def test_anything_but_left_padding_is_refused(mask_rows, message):
    model = lm("attention", {"kernel": "softmax"}, "learned")
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], *mask_rows], dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, 3, attention_mask=mask)


def test_bad_masks_and_generators_are_refused():
    model = lm("attention", {"kernel": "softmax"}, "learned")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must be bool \(B, N\) = \(2, 4\)"):
        model.generate(ids, 3, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must be bool \(B, N\) = \(2, 4\)"):
        model.generate(ids, 3, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        model.generate(ids, 3, generator=[torch.Generator()])
    with pytest.raises(ValueError, match=r"attention_mask must be bool \(B, N\) = \(2, 1\)"):
        model.step(
            ids[:, :1], model.init_state(2), attention_mask=torch.ones(2, 2, dtype=torch.bool)
        )
