"""Packed input to swapped Hugging Face decoders, the way transformers passes it to its own
varlen attention: ``position_ids`` restarting at each sequence (B = 1, no attention mask),
and the batch of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
(``cu_seq_lens_q`` / ``cu_seq_lens_k`` + restarting ``position_ids``, labels).

Ground truth: the same swapped model run on each sequence alone (logits, the causal-LM
loss and every parameter's gradient), in float64, for Llama, Qwen2, Mistral, GPT-2 (learned
absolute positions) × the causal kernels softmax, linear, performer, causal_nystrom. What
stays unsupported is refused with a ``ValueError``, each next to a call that runs."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DataCollatorWithFlattening  # noqa: E402

from formerlab.integrations.hf import formerlab_attention, packed_offsets, swap_attention  # noqa: E402
from formerlab.integrations.hf_cache import FormerlabCache  # noqa: E402

from .conftest import DECODERS, VOCAB, tiny_model  # noqa: E402

LENGTHS = (3, 6, 4)
OFFSETS = (0, 3, 9, 13)
TOL = 1e-10  # float64
KERNELS = {
    "softmax": {},
    "linear": {},
    "performer": {"num_features": 16},
    "causal_nystrom": {"segment_size": 2},  # segments cross no boundary only if packing works
}

torch.set_num_threads(1)


def sequences(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen) for n in LENGTHS]


def packed_positions():
    return torch.cat([torch.arange(n) for n in LENGTHS])[None]


def swapped(family, kernel, **overrides):
    model = tiny_model(family, head="lm", **overrides).double()
    return swap_attention(model, kernel, **KERNELS[kernel])


def lm_loss(logits, labels):
    """HF's causal-LM loss (labels shifted by one, -100 ignored), in float64."""
    return torch.nn.functional.cross_entropy(
        logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="mean"
    )


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("family", DECODERS)
def test_packed_input_equals_each_sequence_alone(family, kernel):
    model = swapped(family, kernel)
    seqs = sequences()
    ids = torch.cat(seqs)[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits for s in seqs], 1)
        by_positions = model(input_ids=ids, position_ids=packed_positions(), use_cache=False)
        # use_cache=True: HF builds a DynamicCache and no packed mask; the positions still count
        with_cache = model(input_ids=ids, position_ids=packed_positions())
        unpacked = model(input_ids=ids, use_cache=False).logits  # one sequence of 13
    assert torch.allclose(by_positions.logits, alone, atol=TOL, rtol=0)
    assert torch.allclose(with_cache.logits, alone, atol=TOL, rtol=0)
    # the test can fail: the later sequences read the earlier ones when not packed
    assert (unpacked[0, 3:] - alone[0, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("family", DECODERS)
def test_the_flattening_collators_batch_gives_each_sequences_loss_and_gradients(family, kernel):
    model = swapped(family, kernel)
    seqs = sequences(1)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in seqs], return_tensors="pt"
    )
    assert batch["cu_seq_lens_q"].tolist() == list(OFFSETS)
    out = model(**batch, use_cache=False)
    loss = lm_loss(out.logits, batch["labels"])
    assert abs(out.loss.item() - loss.item()) < 1e-6  # HF's own loss, in float32
    loss.backward()
    packed_grads = grads(model)
    model.zero_grad()
    # the packed loss is the mean over every predicted token: n - 1 per sequence
    total = sum(n - 1 for n in LENGTHS)
    alone = [model(input_ids=s[None], use_cache=False).logits for s in seqs]
    reference = sum(lm_loss(x, s[None]) * (len(s) - 1) / total for x, s in zip(alone, seqs))
    reference.backward()
    assert torch.allclose(out.logits, torch.cat(alone, 1), atol=TOL, rtol=0)
    assert abs(loss.item() - reference.item()) < TOL
    for got, want in zip(packed_grads, grads(model)):
        assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert sum(g.abs().sum() for g in packed_grads) > 0


def test_a_sliding_window_covering_every_packed_sequence_runs_and_a_shorter_one_is_refused():
    seqs = sequences()
    ids = torch.cat(seqs)[None]
    longest = max(LENGTHS)
    model = swapped("mistral", "linear", sliding_window=longest)  # shorter than the 13 tokens
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits for s in seqs], 1)
        out = model(input_ids=ids, position_ids=packed_positions(), use_cache=False).logits
        assert torch.allclose(out, alone, atol=TOL, rtol=0)
        short = swapped("mistral", "linear", sliding_window=longest - 1)
        with pytest.raises(ValueError, match="sliding window shorter than"):
            short(input_ids=ids, position_ids=packed_positions(), use_cache=False)
        with pytest.raises(ValueError, match="shorter than"):
            short(input_ids=ids, position_ids=packed_positions())  # with HF's DynamicCache
    module = next(m for m in short.modules() if hasattr(m, "formerlab_attention"))
    q, k, v = (torch.randn(1, 4, 13, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    formerlab_attention(module, q, k, v, None, sliding_window=longest, cu_seq_lens_q=cu)
    with pytest.raises(
        ValueError,
        match=f"sliding_window={longest - 1} is shorter than the sequence \\({longest} tokens",
    ):
        formerlab_attention(module, q, k, v, None, sliding_window=longest - 1, cu_seq_lens_q=cu)


def test_packing_is_refused_with_padding_more_than_one_row_or_positions_that_do_not_restart():
    model = swapped("llama", "linear")
    seqs = sequences()
    ids = torch.cat(seqs)[None]
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    positions = packed_positions()
    ones = torch.ones_like(ids)
    holes = ones.clone()
    holes[0, 5] = 0
    with torch.no_grad():
        model(
            input_ids=ids,
            position_ids=positions,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            attention_mask=ones,
            use_cache=False,
        )  # a mask of ones is no padding: runs
        for extra in ({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, {}):
            with pytest.raises(ValueError, match="cannot be combined with a padding"):
                model(
                    input_ids=ids,
                    position_ids=positions,
                    attention_mask=holes,
                    use_cache=False,
                    **extra,
                )
        # padding with positions that only increase over real tokens is plain padding
        model(input_ids=ids, attention_mask=holes, use_cache=False)
        two_rows = torch.cat([ids, ids])
        model(input_ids=two_rows, use_cache=False)
        for use_cache in (False, True):
            with pytest.raises(ValueError, match="more than one row|batch of 2"):
                model(input_ids=two_rows, position_ids=positions.expand(2, -1), use_cache=use_cache)
        with pytest.raises(ValueError, match="do not restart"):
            model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)
        other = torch.tensor([0, 4, 9, 13], dtype=torch.int32)
        with pytest.raises(ValueError, match="disagree"):
            model(
                input_ids=ids,
                position_ids=positions,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=other,
                use_cache=False,
            )
        with pytest.raises(ValueError, match="cu_seq_lens_q: cu_seqlens=\\[0, 3, 9\\]"):
            model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu[:3], use_cache=False)


def test_packed_offsets_reads_every_source_and_they_must_agree():
    cu = torch.tensor(OFFSETS)
    positions = packed_positions()
    assert packed_offsets(None, 1, 13) is None
    assert packed_offsets(None, 1, 13, position_ids=torch.arange(13)[None]) is None
    assert packed_offsets(None, 1, 13, position_ids=positions) == OFFSETS
    assert packed_offsets(cu, 1, 13, position_ids=positions) == OFFSETS  # a 1-d packed mask
    assert packed_offsets(None, 1, 13, cu, cu, positions + 2) == OFFSETS  # RoBERTa's start
    with pytest.raises(ValueError, match="disagree"):
        packed_offsets(torch.tensor([0, 13]), 1, 13, cu)


def test_a_non_causal_kernel_that_cannot_take_cu_seqlens_is_refused():
    model = swap_attention(tiny_model("bert").double(), "double_softmax")
    ids = torch.cat(sequences())[None]
    with torch.no_grad():
        model(input_ids=ids)
        with pytest.raises(ValueError, match="'double_softmax' cannot take cu_seqlens"):
            model(input_ids=ids, position_ids=packed_positions())


def test_packed_sequences_are_not_decoded_with_a_formerlab_cache():
    model = swapped("gpt2", "linear")
    ids = torch.cat(sequences())[None]
    with torch.no_grad():
        model(input_ids=ids, cache=FormerlabCache(model), use_cache=True)
        with pytest.raises(ValueError, match="cannot be decoded with a FormerlabCache"):
            model(
                input_ids=ids,
                position_ids=packed_positions(),
                cache=FormerlabCache(model),
                use_cache=True,
            )
