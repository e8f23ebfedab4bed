"""``generate`` of Hugging Face decoders with swapped attention decodes with the formerlab
kernels' streaming states (``FormerlabCache``). Ground truth: the same model without a
cache (the whole sequence recomputed every step) and the kernel's parallel call on the
whole generated sequence, for Llama, Qwen2, Mistral, GPT-2 and every streaming kernel;
greedy, sampling, beam search, a left-padded batch against each prompt alone; the cache's
row selection against stepping the selected inputs; and HF's own cache after
``restore_attention``.

The models run in float64; ``generate`` hands its logits over in float32 (its own cast),
so they are compared to float32 rounding (``F32``), and the same decoding is checked in
float64 (``TOL``) through the model's forward with a ``FormerlabCache``."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from formerlab import attention  # noqa: E402
from formerlab.integrations.hf import restore_attention, swap_attention  # noqa: E402
from formerlab.integrations.hf_cache import FormerlabCache, select_state_rows  # noqa: E402

from .conftest import DECODERS, VOCAB, tiny_model  # noqa: E402

NEW = 6
TOL = 1e-9  # float64 logits of the forward
F32 = 2e-6  # generate's float32 logits (|logit| < 8: a few float32 ulps)
KERNELS = {
    "softmax": {},
    "linear": {},
    "performer": {"num_features": 16},
    "causal_nystrom": {"segment_size": 3},  # segments finish inside prompt and decoding
}
# no early stop at the tiny models' eos (token 0): every call makes NEW tokens
GEN = {"max_new_tokens": NEW, "min_new_tokens": NEW, "pad_token_id": 1}

torch.set_num_threads(1)


def prompts(rows=2, n=7, seed=0):
    return torch.randint(2, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def swapped(family, kernel):
    model = tiny_model(family, head="lm").double()
    return swap_attention(model, kernel, **KERNELS[kernel])


def run(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN, **kw)


def logits(out):
    return torch.stack(out.logits, dim=1)  # (B, NEW, V), float32


def stream_logits(model, seq, start, mask=None):
    """float64 logits of ``seq`` (B, N) decoded with a FormerlabCache: the first ``start``
    tokens at once (the prefill), then one token per call, positions counted from each
    row's first real token as generate counts them; (B, N - start + 1, V)."""
    mask = torch.ones_like(seq) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, outs = FormerlabCache(model), []
    with torch.no_grad():
        for lo, hi in [(0, start)] + [(t, t + 1) for t in range(start, seq.shape[1])]:
            out = model(
                input_ids=seq[:, lo:hi],
                attention_mask=mask[:, :hi],
                position_ids=positions[:, lo:hi],
                cache=cache,
                use_cache=True,
            )
            outs.append(out.logits[:, -1])
    assert cache.get_seq_length() == seq.shape[1]
    return torch.stack(outs, dim=1)


cases = pytest.mark.parametrize("kernel", list(KERNELS))
families = pytest.mark.parametrize("family", DECODERS)


@cases
@families
def test_greedy_with_the_cache_equals_recomputing_and_the_parallel_call(family, kernel):
    model = swapped(family, kernel)
    ids = prompts()
    cached = run(model, ids, do_sample=False, use_cache=True)
    assert isinstance(cached.cache, FormerlabCache)
    assert cached.cache.get_seq_length() == ids.shape[1] + NEW - 1  # the last token unfed
    plain = run(model, ids, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert (logits(cached) - logits(plain)).abs().max() <= F32
    n, seq = ids.shape[1], cached.sequences
    with torch.no_grad():  # the kernel's parallel call on the whole generated sequence
        whole = model(input_ids=seq, use_cache=False).logits[:, n - 1 :]
    assert (logits(cached) - whole[:, :NEW]).abs().max() <= F32
    assert (stream_logits(model, seq, n) - whole).abs().max() <= TOL
    # the logits are not trivially equal: they change from step to step
    assert (logits(cached)[:, 1:] - logits(cached)[:, :-1]).abs().max() > 1e-3


@cases
@families
def test_sampling_with_a_fixed_seed_equals_recomputing(family, kernel):
    model = swapped(family, kernel)
    ids = prompts(rows=3, seed=1)
    torch.manual_seed(7)
    cached = run(model, ids, do_sample=True, use_cache=True, top_k=0)
    torch.manual_seed(7)
    plain = run(model, ids, do_sample=True, use_cache=False, top_k=0)
    assert torch.equal(cached.sequences, plain.sequences)
    assert (logits(cached) - logits(plain)).abs().max() <= F32


@cases
@families
def test_beam_search_with_the_cache_equals_beam_search_without(family, kernel):
    model = swapped(family, kernel)
    ids = prompts(rows=2, seed=2)
    beam = {"num_beams": 3, "num_return_sequences": 3, "do_sample": False, "output_scores": True}
    cached = run(model, ids, use_cache=True, **beam)
    plain = run(model, ids, use_cache=False, **beam)
    assert torch.equal(cached.sequences, plain.sequences)
    assert (cached.sequences_scores - plain.sequences_scores).abs().max() <= F32
    assert torch.equal(cached.beam_indices, plain.beam_indices)
    # beams were reordered on the way: a beam's parent changed at some step
    assert (cached.beam_indices[:, 1:] != cached.beam_indices[:, :1]).any()


@cases
@families
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(family, kernel):
    model = swapped(family, kernel)
    lengths = (3, 7, 5)
    width = max(lengths)
    alone = [prompts(rows=1, n=n, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.full((3, width), 1, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(alone):
        ids[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    batch = run(model, ids, attention_mask=mask, do_sample=False, use_cache=True)
    full = torch.cat([mask, torch.ones(3, NEW, dtype=torch.long)], dim=1)
    streamed = stream_logits(model, batch.sequences, width, full)
    for i, p in enumerate(alone):
        single = run(model, p, do_sample=False, use_cache=True)
        assert torch.equal(batch.sequences[i, width:], single.sequences[0, p.shape[1] :])
        assert (logits(batch)[i] - logits(single)[0]).abs().max() <= F32
        own = stream_logits(model, single.sequences, p.shape[1])
        assert (streamed[i] - own[0]).abs().max() <= TOL


@cases
def test_the_cache_reorder_then_step_equals_stepping_the_reordered_inputs(kernel):
    model = swapped("llama", kernel)
    ids, nxt = prompts(rows=3, n=8, seed=3), prompts(rows=3, n=2, seed=4)
    order = torch.tensor([2, 0, 2])  # beam search repeats and drops rows
    with torch.no_grad():
        cache = FormerlabCache(model)
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.reorder_cache(order)
        got = model(input_ids=nxt, cache=cache, use_cache=True).logits
        fresh = FormerlabCache(model)
        model(input_ids=ids[order], cache=fresh, use_cache=True)
        want = model(input_ids=nxt, cache=fresh, use_cache=True).logits
        whole = model(input_ids=torch.cat([ids[order], nxt], 1), use_cache=False).logits
    assert (got - want).abs().max() <= TOL
    assert (got - whole[:, -2:]).abs().max() <= TOL
    assert cache.get_seq_length() == 10


@cases
def test_select_state_rows_then_step_equals_the_step_of_the_selected_rows(kernel):
    op = attention.build(kernel, **KERNELS[kernel])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row: per-row first positions follow their rows
    mask[2, :1] = False
    past, new = slice(0, 7), slice(7, 9)
    state = op.init_state(3, 2, 4, dtype=torch.float64)
    _, state = op.step(
        q[:, :, past], k[:, :, past], v[:, :, past], state, attention_mask=mask[:, past]
    )
    for order in (torch.tensor([2, 0, 2, 1]), torch.tensor([1])):
        picked = select_state_rows(state, order)
        got, _ = op.step(q[order][:, :, new], k[order][:, :, new], v[order][:, :, new], picked)
        ref = op.init_state(len(order), 2, 4, dtype=torch.float64)
        _, ref = op.step(
            q[order][:, :, past],
            k[order][:, :, past],
            v[order][:, :, past],
            ref,
            attention_mask=mask[order][:, past],
        )
        want, _ = op.step(q[order][:, :, new], k[order][:, :, new], v[order][:, :, new], ref)
        assert (got - want).abs().max() <= 1e-12
        # the state it came from still steps as before (a value, untouched)
        again, _ = op.step(q[:, :, new], k[:, :, new], v[:, :, new], state)
        parallel = op(q, k, v, attention_mask=mask, causal=True)[:, :, new]
        assert (again - parallel).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="1-d integer tensor"):
        select_state_rows(state, torch.tensor([True, False, True]))


@families
def test_restore_gives_back_hf_own_cache_and_outputs(family):
    original = tiny_model(family, head="lm").double()
    model = copy.deepcopy(original)
    ids = prompts(seed=6)
    want = run(original, ids, do_sample=False, use_cache=True)
    swap_attention(model, "causal_nystrom", segment_size=3)
    assert isinstance(run(model, ids, do_sample=False).cache, FormerlabCache)
    restore_attention(model)
    assert "_prepare_cache_for_generation" not in model.__dict__
    got = run(model, ids, do_sample=False, use_cache=True)
    assert type(got.cache) is DynamicCache
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(logits(got), logits(want))


def test_a_deep_copy_generates_with_its_own_kernels():
    model = swapped("gpt2", "linear")
    twin = copy.deepcopy(model)
    assert twin._prepare_cache_for_generation.__self__ is twin
    with torch.no_grad():
        weight = twin.transformer.h[0].attn.c_attn.weight  # the twin's q, k, v differ
        weight.add_(0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    ids = prompts(seed=8)
    a, b = run(model, ids, do_sample=False), run(twin, ids, do_sample=False)
    assert (logits(a) - logits(b)).abs().max() > 1e-3
    c = run(twin, ids, do_sample=False, use_cache=False)
    assert (logits(b) - logits(c)).abs().max() <= F32


def test_a_kernel_that_cannot_stream_still_refuses_the_cache():
    model = tiny_model("llama", head="lm").double()
    swap_attention(model, "causal_nystrom", segment_size=3, landmark_system="triangular")
    ids = prompts(seed=9)
    with pytest.raises(ValueError, match="cannot decode with a cache.*use_cache=False"):
        run(model, ids, do_sample=False, use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        FormerlabCache(model)
    out = run(model, ids, do_sample=False, use_cache=False)
    with torch.no_grad():
        whole = model(input_ids=out.sequences, use_cache=False).logits
    assert (logits(out) - whole[:, ids.shape[1] - 1 : -1]).abs().max() <= F32


def test_other_caches_and_models_are_refused_clearly():
    model = swapped("qwen2", "linear")
    ids = prompts(seed=11)
    with pytest.raises(ValueError, match="cache_implementation='static'.*use_cache=False"):
        run(model, ids, do_sample=False, cache_implementation="static")
    with torch.no_grad():  # HF's DynamicCache, built by a plain forward, cannot continue
        out = model(input_ids=ids, use_cache=True)
        assert type(out.cache) is DynamicCache
        with pytest.raises(ValueError, match="FormerlabCache"):
            model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
    with pytest.raises(ValueError, match="not"):
        FormerlabCache(tiny_model("qwen2", head="lm"))
    with pytest.raises(ValueError, match="bidirectionally"):
        FormerlabCache(swap_attention(tiny_model("bert"), "nystrom"))
    with pytest.raises(ValueError, match="cannot be cropped"):
        FormerlabCache(model).crop(-1)
