"""Hugging Face decoders with ``causal_nystrom`` (segment size 4) swapped in: a
left-padded prompt, positions taken from the mask, gives its real tokens the hidden
states of the same prompt without padding."""

import pytest
import torch

pytest.importorskip("transformers")

from formerlab.integrations.hf import swap_attention  # noqa: E402

from .conftest import DECODERS, VOCAB, tiny_model  # noqa: E402

PAD, N = 5, 14


@pytest.mark.parametrize("kernel, options", [
    ("causal_nystrom", {"segment_size": 4}), ("causal_nystrom", {"segment_size": 3}),
    ("linear", {}),
])
@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_prompts_equal_the_prompt_alone(family, kernel, options):
    model = tiny_model(family).double()
    swap_attention(model, kernel, **options)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (1, N), generator=g)
    padded = torch.cat([torch.randint(2, VOCAB, (1, PAD), generator=g), ids], dim=1)
    mask = (torch.arange(PAD + N) >= PAD).long()[None]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).last_hidden_state
        out = model(input_ids=padded, attention_mask=mask, position_ids=positions,
                    use_cache=False).last_hidden_state
    assert (out[:, PAD:] - ref).abs().max() <= 1e-9
