"""DecoderLM streams: ``step`` equals ``forward``, cached generation equals the recompute
path token for token, for every causal kernel and every causal mixer (registry-driven);
positions learned | rope | none; bad input is refused before any work."""

import warnings

import pytest
import torch
from torch import nn

from formerlab import attention, mixers
from formerlab.mixers.params import takes_kernel
from formerlab.models import DecoderLM
from formerlab.models.deq import DEQStack
from formerlab.testing import assert_no_future_leak, assert_prefix_consistent

VOCAB = 11


def mixer_cases():
    """Every causal kernel through the attention mixer, and every other causal mixer
    (with softmax if it takes a kernel)."""
    cases = [("attention", {"kernel": k}) for k in attention.available(causal=True)]
    for name in mixers.available(causal=True):
        if name != "attention":
            cases.append((name, {"kernel": "softmax"} if takes_kernel(name) else {}))
    return cases


CASES = mixer_cases()
IDS = [f"{m}-{o.get('kernel', '')}" for m, o in CASES]


def lm(mixer="attention", options=None, positions="learned", max_len=16, seed=0, depth=2):
    """A tiny float64 decoder with weights spread out (std 0.3) so that greedy decoding
    does not collapse onto one token and a wrong cache changes the tokens."""
    torch.manual_seed(seed)
    model = DecoderLM(VOCAB, dim=16, depth=depth, heads=2, max_len=max_len, mixer=mixer,
                      mixer_options=options or {}, positions=positions)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.3)
    return model.double().eval()


def chunked_logits(model, ids, chunks):
    state = model.init_state(ids.shape[0])
    outs, start = [], 0
    for size in chunks:
        out, state = model.step(ids[:, start : start + size], state)
        outs.append(out)
        start += size
    assert state.position == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_step_in_chunks_equals_forward(case):
    model = lm(*case, positions="none", max_len=16)
    ids = torch.randint(0, VOCAB, (2, 40))  # past max_len and one causal_nystrom segment
    with torch.no_grad():
        full = model(ids)
        for chunks in ([1] * 40, [3, 1, 5, 2, 5, 20, 4], [40]):
            torch.testing.assert_close(chunked_logits(model, ids, chunks), full, atol=1e-8, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cached_greedy_generation_equals_uncached(case):
    model = lm(*case, max_len=12)  # learned positions: 3 + 20 tokens slide past max_len
    prompt = torch.randint(0, VOCAB, (2, 3))
    cached = model.generate(prompt, 20, top_k=1, use_cache=True)
    plain = model.generate(prompt, 20, top_k=1, use_cache=False)
    assert torch.equal(cached, plain)
    # sampled: the same generator draws give the same tokens, and they vary (so the
    # comparison is not passed by a constant continuation)
    def draw(cache):
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(1), use_cache=cache)

    sampled = draw(True)
    assert torch.equal(sampled, draw(False))
    assert len(set(sampled[0, 3:].tolist())) > 3


@pytest.mark.parametrize("positions", ["rope", "none"])
@pytest.mark.parametrize("kernel", attention.available(causal=True))
def test_rope_and_none_generate_three_times_the_context_with_the_cache(kernel, positions):
    context = 8
    model = lm("attention", {"kernel": kernel}, positions=positions, max_len=context)
    prompt = torch.randint(0, VOCAB, (1, 2))
    tokens = 3 * context
    cached = model.generate(prompt, tokens, top_k=1)
    plain = model.generate(prompt, tokens, top_k=1, use_cache=False)
    assert cached.shape == (1, 2 + tokens)
    assert torch.equal(cached, plain)
    # sampling too: the same generator draws give the same tokens
    def draw(cache):
        seeded = torch.Generator().manual_seed(0)
        return model.generate(prompt, tokens, generator=seeded, use_cache=cache)

    assert torch.equal(draw(True), draw(False))


def test_learned_positions_slide_a_window_past_max_len():
    model = lm(max_len=6)
    prompt = torch.randint(0, VOCAB, (1, 9))  # longer than max_len: only the last 6 count
    out = model.generate(prompt, 5, top_k=1)
    other = prompt.clone()
    other[0, :3] = (other[0, :3] + 1) % VOCAB  # outside the window: no influence
    assert torch.equal(model.generate(other, 5, top_k=1)[:, 9:], out[:, 9:])
    with pytest.raises(ValueError, match="max_len=6"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_rope_rotates_and_runs_past_max_len():
    rope, none = lm(positions="rope", max_len=4), lm(positions="none", max_len=4)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        out = rope(ids)  # no learned table, so no max_len cap
        assert out.shape == (1, 12, VOCAB)
        # same weights: the first position sees only itself (no angle matters), later
        # ones are changed by the rotation
        diff = (out - none(ids)).abs().amax(-1)[0]
        assert diff[0] < 1e-12 and diff[1:].min() > 1e-4
    assert rope.embed.positions is None and all(m.rope for m in rope.mixers())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_decoder_is_causal_and_prefix_consistent(case, positions):
    if positions == "rope" and not takes_kernel(case[0]):
        pytest.skip("a mixer without attention has no rotary option")
    model = lm(*case, positions=positions, max_len=40, seed=1, depth=1)
    ids = torch.randint(0, VOCAB, (2, 40))
    assert_no_future_leak(model, [ids], seq_dim=1, check_grad=False, atol=1e-10)
    assert_prefix_consistent(
        model, [ids], seq_dim=1, lengths=[1, 5, 13, 33, 39],
        padded=lambda t, mask: model(t, attention_mask=mask),
    )


def test_a_non_causal_kernel_fails_at_construction_naming_it():
    with pytest.raises(ValueError, match="'nystrom'") as info:
        DecoderLM(VOCAB, dim=16, depth=1, heads=2, mixer_options={"kernel": "nystrom"})
    for name in attention.available(causal=True):
        assert name in str(info.value)


def test_rope_needs_a_mixer_with_attention():
    with pytest.raises(ValueError, match="positions='rope'"):
        DecoderLM(VOCAB, dim=16, depth=1, heads=2, mixer="pooling", positions="rope")
    with pytest.raises(ValueError, match="positions="):
        DecoderLM(VOCAB, dim=16, depth=1, heads=2, positions="absolute")


def test_out_of_range_token_ids_name_the_vocabulary_size():
    model = lm()
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
            model(torch.tensor([[0, bad]]))
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
        model.generate(torch.tensor([[VOCAB + 3]]), 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tokens": -1}, "tokens"), ({"temperature": 0.0}, "temperature"),
     ({"top_k": 0}, "top_k"), ({"ids": torch.zeros(1, 0, dtype=torch.long)}, "at least one")],
)
def test_generate_refuses_bad_arguments(kwargs, match):
    model = lm()
    args = {"ids": torch.zeros(1, 2, dtype=torch.long), "tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(**args)


def test_a_deq_body_falls_back_to_recompute_with_one_warning():
    torch.manual_seed(0)
    body = DEQStack(16, heads=2, tol=1e-10, max_iter=60)
    model = DecoderLM(VOCAB, dim=16, depth=1, heads=2, max_len=16, body=body).double().eval()
    assert not model.supports_streaming
    prompt = torch.randint(0, VOCAB, (1, 3))
    from formerlab.models import decoder

    decoder._WARNED.discard("DEQStack")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = model.generate(prompt, 6, top_k=1)
        model.generate(prompt, 2, top_k=1)
    assert [str(w.message) for w in caught if "recomputes" in str(w.message)].__len__() == 1
    assert torch.equal(cached, model.generate(prompt, 6, top_k=1, use_cache=False))
    with pytest.raises(ValueError, match="cannot stream"):
        model.init_state(1)


def test_the_positions_config_reaches_the_model_and_a_deq_body():
    from formerlab.train import ConfigError, load_config
    from formerlab.train.build import build_model, build_task

    base = ["model.dim=16", "model.depth=1", "model.heads=2", "task.options.context=16"]
    cfg = load_config(None, base + ["model.positions=rope"])
    model = build_model(cfg, build_task(cfg))
    assert model.positions == "rope" and all(m.rope for m in model.mixers())
    cfg = load_config(None, base + ["model.positions=none", "model.deq={max_iter: 3}"])
    model = build_model(cfg, build_task(cfg))
    assert model.positions == "none" and model.embed.positions is None
    cfg = load_config(None, base + ["model.positions=rope", "model.deq={max_iter: 3}"])
    assert all(m.rope for m in build_model(cfg, build_task(cfg)).mixers())
    assert load_config(None, base).model.positions == "learned"
    with pytest.raises((ConfigError, ValueError), match="positions"):
        load_config(None, base + ["model.positions=absolute"])
