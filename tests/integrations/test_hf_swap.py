"""swap_attention on BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2: exactness, masks, leaks."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from formerlab.integrations.hf import restore_attention, swap_attention, swapped_layers  # noqa: E402
from formerlab.testing import assert_no_future_leak  # noqa: E402

from .conftest import DECODERS, ENCODERS, VOCAB, tiny_model  # noqa: E402

N = 12
EXACT = {"encoder": ("nystrom", {"num_landmarks": 32}), "decoder": ("causal_nystrom", {"segment_size": 1})}
APPROX = {"encoder": ("nystrom", {"num_landmarks": 3}), "decoder": ("causal_nystrom", {"segment_size": 4})}


def kind(family):
    return "encoder" if family in ENCODERS else "decoder"


def inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, N), generator=gen)
    right = torch.ones(3, N, dtype=torch.long)
    right[1, 8:] = 0
    right[2, 5:] = 0
    left = right.flip(-1)
    return ids, {"none": None, "right": right, "left": left}


def hidden(model, ids, mask):
    extra = {} if kind_of(model) == "encoder" else {"use_cache": False}
    return model(input_ids=ids, attention_mask=mask, **extra).last_hidden_state


def kind_of(model):
    return "encoder" if model.config.model_type in ENCODERS else "decoder"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def real_rows(out, mask):
    return out if mask is None else out[mask.bool()]


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_exact_options_reproduce_the_model_with_and_without_padding(family):
    model = tiny_model(family)
    ids, masks = inputs()
    with torch.no_grad():
        refs = {k: hidden(model, ids, m) for k, m in masks.items()}
        kernel, options = EXACT[kind(family)]
        swap_attention(model, kernel, **options)
        assert len(swapped_layers(model)) == 2
        for k, mask in masks.items():
            out = hidden(model, ids, mask)
            assert rel(real_rows(out, mask), real_rows(refs[k], mask)) <= 1e-4, (family, k)
        # an approximate setting changes the outputs far above that tolerance (the test
        # can see a wrong kernel), and restoring brings back the original bit for bit
        kernel, options = APPROX[kind(family)]
        swap_attention(model, kernel, **options)
        assert rel(hidden(model, ids, None), refs["none"]) > 1e-2
        restore_attention(model)
        assert torch.equal(hidden(model, ids, masks["right"]), refs["right"])
    assert model.config._attn_implementation != "formerlab"


def test_the_models_own_logit_scaling_is_kept():
    """GPT-2 can scale logits by 1/(layer + 1) on top of 1/√D: the swap keeps it."""
    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    ids, masks = inputs()
    with torch.no_grad():
        ref = hidden(model, ids, masks["left"])
        swap_attention(model, "causal_nystrom", segment_size=1)
        out = hidden(model, ids, masks["left"])
    sel = masks["left"].bool()
    assert rel(out[sel], ref[sel]) <= 1e-4


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_padding_tokens_do_not_reach_real_outputs(family):
    """Changing the ids under the padding leaves the real outputs alone (the mask arrives)."""
    model = tiny_model(family)
    ids, masks = inputs()
    kernel, options = APPROX[kind(family)]
    swap_attention(model, kernel, **options)
    with torch.no_grad():
        for name in ("right", "left"):
            mask = masks[name]
            other = torch.where(mask.bool(), ids, (ids + 7) % VOCAB)
            a, b = hidden(model, ids, mask), hidden(model, other, mask)
            assert torch.allclose(real_rows(a, mask), real_rows(b, mask), atol=1e-5), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_swapped_decoder_is_leak_free_end_to_end(family):
    model = tiny_model(family)
    swap_attention(model, *APPROX["decoder"][:1], **APPROX["decoder"][1])
    x = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(2))
    assert_no_future_leak(
        lambda e: model(inputs_embeds=e, use_cache=False).last_hidden_state, [x], seq_dim=1
    )


def test_leak_checker_catches_a_bidirectional_decoder():
    """The end-to-end check can fail: a GPT-2 made bidirectional leaks."""
    model = tiny_model("gpt2")
    swap_attention(model, "causal_nystrom", segment_size=4)
    for layer in swapped_layers(model):
        layer.causal = False
    x = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AssertionError):
        assert_no_future_leak(
            lambda e: model(inputs_embeds=e, use_cache=False).last_hidden_state, [x], seq_dim=1
        )


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_forward_and_backward_run_and_reach_every_projection(family):
    model = tiny_model(family, head="lm").train()
    swap_attention(model, *APPROX[kind(family)][:1], **APPROX[kind(family)][1])
    ids, masks = inputs()
    labels = ids.masked_fill(~masks["right"].bool(), -100)
    extra = {} if family in ENCODERS else {"use_cache": False}
    loss = model(input_ids=ids, attention_mask=masks["right"], labels=labels, **extra).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if "q_proj" in n or "query" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_swapping_one_model_leaves_another_sharing_its_config_alone():
    a = tiny_model("llama")
    b = copy.deepcopy(a)
    b.config = a.config  # one config object for both, as from_pretrained twice may give
    for module in b.modules():
        if hasattr(module, "config"):
            module.config = a.config
    ids, _ = inputs()
    with torch.no_grad():
        before = hidden(b, ids, None)
        swap_attention(a, "causal_nystrom", segment_size=4)
        assert torch.equal(hidden(b, ids, None), before)
        assert rel(hidden(a, ids, None), before) > 1e-2
    assert b.config._attn_implementation == "sdpa"
    restore_attention(a)
    assert a.config is b.config


def test_only_the_chosen_layers_are_swapped():
    model = tiny_model("bert")
    ids, masks = inputs()
    with torch.no_grad():
        ref = hidden(model, ids, masks["right"])
        swap_attention(model, "nystrom", layers=[1], num_landmarks=3)
        assert len(swapped_layers(model)) == 1
        one = hidden(model, ids, masks["right"])
        swap_attention(model, "nystrom", num_landmarks=3)
        both = hidden(model, ids, masks["right"])
    sel = masks["right"].bool()
    assert rel(one[sel], ref[sel]) > 1e-3 and rel(both[sel], one[sel]) > 1e-3


def test_bad_arguments_fail_before_any_change():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="'nystrom'.*causal kernels.*causal_nystrom"):
        swap_attention(model, "nystrom")
    with pytest.raises(ValueError, match="layers=\\[5\\]"):
        swap_attention(model, "linear", layers=[5])
    with pytest.raises(ValueError, match="segment_size"):
        swap_attention(model, "causal_nystrom", segment_size=0)
    with pytest.raises(ValueError, match="unknown|not a"):
        swap_attention(model, "no-such-kernel")
    assert not swapped_layers(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="cross-attention"):
        swap_attention(tiny_model("gpt2", add_cross_attention=True), "linear")
    with pytest.raises(ValueError, match="no swapped attention"):
        restore_attention(model)


def test_kv_cache_decoding_is_refused_clearly():
    model = tiny_model("llama", head="lm")
    swap_attention(model, "causal_nystrom", segment_size=1)
    ids, _ = inputs()
    out = model(input_ids=ids[:, :5], use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids[:, 5:6], cache=out.cache, use_cache=True)


MODELS = {}


def cached(family):
    if family not in MODELS:
        MODELS[family] = tiny_model(family)
    return MODELS[family]


@settings(max_examples=10, deadline=None)
@given(
    family=st.sampled_from(["bert", "llama"]),
    n=st.integers(2, 20),
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    left=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exactness_holds_for_any_lengths_and_padding_side(family, n, lengths, left, seed):
    model = cached(family)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(lengths), n), generator=gen)
    mask = (torch.arange(n)[None, :] < torch.tensor([min(L, n) for L in lengths])[:, None]).long()
    if left:
        mask = mask.flip(-1)
    try:
        with torch.no_grad():
            ref = hidden(model, ids, mask)
            kernel, options = EXACT[kind(family)]
            swap_attention(model, kernel, **options)
            out = hidden(model, ids, mask)
    finally:
        if swapped_layers(model):
            restore_attention(model)
    sel = mask.bool()
    assert rel(out[sel], ref[sel]) <= 1e-4


def test_without_transformers_the_import_error_says_how_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "formerlab.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install formerlab\[hf\]"):
        importlib.import_module("formerlab.integrations.hf")
