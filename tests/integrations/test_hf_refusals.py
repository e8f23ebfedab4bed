"""Mask patterns formerlab kernels cannot honour are refused, not ignored: a sliding window
shorter than the sequence (Mistral's ``config.sliding_window``), packed sequences in more
than one row (``position_ids`` that restart inside the rows of a batch of two; one row is
packing, see test_hf_packed.py), and a ``sliding_window`` handed straight to the attention
function. Each refusal is checked
against a window / packing that the same call *would* accept, so a test cannot pass by an
unrelated error."""

import pytest
import torch

pytest.importorskip("transformers")

from formerlab.integrations.hf import formerlab_attention, swap_attention  # noqa: E402

from .conftest import VOCAB, tiny_model  # noqa: E402

N = 10


def ids(n=N, rows=1):
    return torch.randint(2, VOCAB, (rows, n), generator=torch.Generator().manual_seed(3))


def test_a_sliding_window_shorter_than_the_sequence_is_refused():
    model = swap_attention(tiny_model("mistral", sliding_window=4), "causal_nystrom")
    with torch.no_grad():
        model(input_ids=ids(4))  # the window covers the whole sequence: plain causal
        with pytest.raises(ValueError, match="sliding window shorter than the sequence"):
            model(input_ids=ids(N))


def test_a_long_enough_sliding_window_is_plain_causal_and_runs():
    model = swap_attention(tiny_model("mistral", sliding_window=64), "causal_nystrom")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids(N)).last_hidden_state).all()


def test_packed_sequences_in_more_than_one_row_are_refused():
    model = swap_attention(tiny_model("llama"), "causal_nystrom")
    packed = torch.cat([torch.arange(4), torch.arange(N - 4)])[None]  # two sequences, 4 + 6
    with torch.no_grad():
        model(input_ids=ids(), position_ids=packed, use_cache=False)  # one row: packing
        with pytest.raises(ValueError, match="packed sequences in more than one row"):
            model(input_ids=ids(rows=2), position_ids=packed.expand(2, -1), use_cache=False)


def test_the_attention_function_refuses_a_short_sliding_window():
    model = swap_attention(tiny_model("llama"), "causal_nystrom")
    module = next(m for m in model.modules() if hasattr(m, "formerlab_attention"))
    q, k, v = (
        torch.randn(1, 4, N, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    out, _ = formerlab_attention(module, q, k, v, None, sliding_window=N)  # covers all: runs
    assert out.shape == (1, N, 4, 8)
    with pytest.raises(ValueError, match=f"sliding_window=4 is shorter than the sequence \\({N}"):
        formerlab_attention(module, q, k, v, None, sliding_window=4)
