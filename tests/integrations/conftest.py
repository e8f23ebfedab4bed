"""Tiny random-config Hugging Face models (2 layers, width 32) built in the test: no network."""

import pytest

# transformers is imported inside the helpers: each test file skips itself without it

VOCAB = 40
ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
# a larger init than HF's 0.02 so that attention is far from uniform: a kernel that drops
# the mask or a token changes the outputs well above the tolerances of the tests
INIT = 0.3


def tiny_config(family: str, vocab: int = VOCAB, **overrides):
    """2 layers, width 32, 4 heads (2 kv heads for the Llama family); ``overrides`` win."""
    import transformers as t

    if family in ENCODERS:
        cls = t.BertConfig if family == "bert" else t.RobertaConfig
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=72, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
        if family == "roberta":
            kw["pad_token_id"] = 1
    elif family == "gpt2":
        cls = t.GPT2Config
        kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    else:
        cls = {"llama": t.LlamaConfig, "mistral": t.MistralConfig, "qwen2": t.Qwen2Config}[family]
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0)
        if family == "mistral":
            kw["sliding_window"] = None
    return cls(**{**kw, "vocab_size": vocab, "initializer_range": INIT, **overrides})


def tiny_model(family: str, head: str = "base", seed: int = 0, vocab: int = VOCAB, **overrides):
    """``head``: "base" (AutoModel), "lm" (masked-LM for encoders, causal LM for decoders)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(family, vocab, **overrides)
    if head == "base":
        return transformers.AutoModel.from_config(config).eval()
    if family in ENCODERS:
        return transformers.AutoModelForMaskedLM.from_config(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def hf_model():
    return tiny_model
