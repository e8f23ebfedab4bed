"""A Hugging Face model with swapped attention behind formerlab's model interface.

:class:`HFSequenceModel` presents what ``formerlab.train`` expects of a model —
``forward(ids, attention_mask) -> logits`` (and ``generate`` for language models) — so a
local HF checkpoint fine-tunes in formerlab's loop (safetensors checkpoints, MLflow, exact
resume) with any formerlab kernel in its attention:

* decoder tasks: the checkpoint as a causal LM (``AutoModelForCausalLM``), logits (B, N, V);
* encoder tasks: the checkpoint's base model (``AutoModel``), mean of the real tokens'
  last hidden states, a new linear classifier (seeded by the run's seed);
* tagger tasks: the base model and a new linear layer per position.

Token ids are the task's own: they index the checkpoint's embeddings directly, so the task's
vocabulary must fit in the model's (``ValueError`` otherwise). That is meaningful for a
checkpoint trained on the task's vocabulary (or as a warm start of everything above the
embeddings); it does not re-tokenise text with the checkpoint's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerlab.integrations.hf import swap_attention
from formerlab.models.classifier import masked_mean

KINDS = ("decoder", "encoder", "tagger")


def load_local(path: str | Path, kind: str):
    """The checkpoint in the local directory ``path`` (never downloads): a causal LM for
    ``kind="decoder"``, the base model otherwise."""
    import transformers

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.hf.path={str(path)!r} is not a saved Hugging Face model (no config.json); "
            "save one with model.save_pretrained(DIR)"
        )
    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    return auto.from_pretrained(str(folder), local_files_only=True)


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _causal(model: nn.Module) -> bool:
    from formerlab.integrations.hf import attention_modules

    return all(bool(getattr(m, "is_causal", False)) for _, _, m in attention_modules(model))


class HFSequenceModel(nn.Module):
    """``HFSequenceModel(path, kind, vocab_size, kernel, kernel_options, num_classes=None,
    layers=None, max_len=None)``; ``forward(ids, attention_mask=None) -> logits``."""

    def __init__(
        self,
        path: str | Path,
        kind: str,
        vocab_size: int,
        kernel: str,
        kernel_options: dict[str, Any] | None = None,
        num_classes: int | None = None,
        layers: list[int] | None = None,
        max_len: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; expected one of {list(KINDS)}")
        if kind != "decoder" and num_classes is None:
            raise ValueError(f"a {kind} task needs num_classes")
        self.kind = kind
        self.hf = load_local(path, kind)
        config = self.hf.config
        if vocab_size > config.vocab_size:
            raise ValueError(
                f"the task has {vocab_size} token ids but the model at {str(path)!r} embeds "
                f"only {config.vocab_size}; use a model whose vocabulary covers the task's"
            )
        limit = max_positions(config)
        if max_len is not None and limit is not None and max_len > limit:
            raise ValueError(
                f"the task's sequences have up to {max_len} tokens but the model at "
                f"{str(path)!r} takes at most {limit} positions"
            )
        self.max_len = limit or max_len or 1 << 30
        if kind == "decoder" and not getattr(config, "is_decoder", False) and not _causal(self.hf):
            raise ValueError(
                f"the model at {str(path)!r} ({config.model_type}) attends bidirectionally; "
                "a decoder task needs a causal language model (GPT-2, Llama, ...)"
            )
        swap_attention(self.hf, kernel, layers=layers, **(kernel_options or {}))
        self.head = None if kind == "decoder" else nn.Linear(config.hidden_size, num_classes)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = None if attention_mask is None else attention_mask.long()
        if self.kind == "decoder":
            return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        hidden = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.kind == "tagger":
            return self.head(hidden)
        return self.head(masked_mean(hidden, attention_mask))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Save the (fine-tuned) HF model with its original attention, as a plain HF
        checkpoint (``from_pretrained``-loadable); the adapter stays swapped."""
        from formerlab.integrations.hf import restore_attention

        record = self.hf._formerlab_swap
        restore_attention(self.hf)
        try:
            self.hf.save_pretrained(str(folder))
        finally:
            swap_attention(self.hf, record.kernel, layers=record.layers, **record.options)
        return Path(folder)

    @torch.no_grad()
    def generate(
        self, ids: Tensor, tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``tokens`` new tokens after ``ids`` (B, N), recomputing the whole context
        each step (formerlab kernels do not use a KV cache); returns (B, N + tokens)."""
        if self.kind != "decoder":
            raise ValueError(f"generate needs a decoder model; this one is a {self.kind}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is not allowed; expected > 0")
        for _ in range(tokens):
            logits = self(ids[:, -self.max_len:])[:, -1].float() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


__all__ = ["HFSequenceModel", "load_local", "max_positions"]
