"""A Hugging Face model with swapped attention behind formerlab's model interface.

:class:`HFSequenceModel` presents what ``formerlab.train`` expects of a model —
``forward(ids, attention_mask) -> logits`` (and ``generate`` for language models) — so a
local HF checkpoint fine-tunes in formerlab's loop (safetensors checkpoints, MLflow, exact
resume) with any formerlab kernel in its attention:

* decoder tasks: the checkpoint as a causal LM (``AutoModelForCausalLM``), logits (B, N, V);
* encoder tasks: the checkpoint's base model (``AutoModel``), mean of the real tokens'
  last hidden states, a new linear classifier (seeded by the run's seed);
* tagger tasks: the base model and a new linear layer per position.

Packed batches (B = 1, ``cu_seqlens``, :mod:`formerlab.attention.packed`) work as with
formerlab's own models: ``forward(ids (1, N), cu_seqlens=cu)`` gives each sequence what
it gets alone (decoders: (1, N, V) logits; taggers: (1, N, C); classifiers: (S, classes),
one row per sequence). The HF model gets them as its own varlen attention does: positions
restarting at each boundary and the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments.

Generation (``generate`` / ``stream``, as ``DecoderLM``'s) decodes with a
:class:`~formerlab.integrations.hf_cache.FormerlabCache`: each new token costs one
streaming step of every layer's kernel, not a recompute of the whole context
(``use_cache=False`` recomputes).

Token ids are the task's own: they index the checkpoint's embeddings directly, so the task's
vocabulary must fit in the model's (``ValueError`` otherwise). That is meaningful for a
checkpoint trained on the task's vocabulary (or as a warm start of everything above the
embeddings); it does not re-tokenise text with the checkpoint's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerlab.attention.packed import Packing, as_packing, refuse_mask_with_packing
from formerlab.errors import check_positive_float, check_positive_int
from formerlab.integrations.hf import swap_attention
from formerlab.integrations.hf_cache import FormerlabCache
from formerlab.models.classifier import masked_mean
from formerlab.models.decoder import (
    Generators,
    check_generators,
    check_left_padding,
    sample_next,
    warn_once,
)
from formerlab.models.embedding import check_ids

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

    def forward(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | Packing | None = None,
    ) -> Tensor:
        """Logits of ids (B, N) with ``attention_mask`` (B, N), True / 1 = real token; or of
        packed sequences ids (1, N) with ``cu_seqlens`` (see the module doc)."""
        if cu_seqlens is not None:
            refuse_mask_with_packing(attention_mask, cu_seqlens)
            return self._packed(ids, as_packing(cu_seqlens, ids.shape[0], ids.shape[1], ids.device))
        mask = None if attention_mask is None else attention_mask.long()
        if self.kind == "decoder":
            # positions count from each row's first real token (left padding as HF's generate)
            positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
            return self.hf(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        hidden = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.kind == "tagger":
            return self.head(hidden)
        return self.head(masked_mean(hidden, attention_mask))

    def _packed(self, ids: Tensor, packing: Packing) -> Tensor:
        if packing.max_len > self.max_len:
            raise ValueError(
                f"cu_seqlens packs a sequence of {packing.max_len} tokens; the model takes at "
                f"most {self.max_len} positions"
            )
        cu = torch.tensor(packing.offsets, dtype=torch.int32, device=ids.device)
        packed = dict(
            position_ids=packing.positions + _first_position(self.hf.config),
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=packing.max_len,
            max_length_k=packing.max_len,
        )
        if self.kind == "decoder":
            return self.hf(input_ids=ids, use_cache=False, **packed).logits
        hidden = self.hf(input_ids=ids, **packed).last_hidden_state
        if self.kind == "tagger":
            return self.head(hidden)
        return self.head(packing.segment_mean(hidden))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Save the (fine-tuned) HF model with its original attention, as a plain HF
        checkpoint (``from_pretrained``-loadable); the adapter stays swapped."""
        from formerlab.integrations.hf import restore_attention

        record = self.hf._formerlab_swap
        # the swapped layers' own kernels (learned feature maps, drawn features) go back in
        # after the save: swapping again would build fresh ones
        kept = [m.formerlab_attention for m in record.swapped]
        restore_attention(self.hf)
        try:
            self.hf.save_pretrained(str(folder))
        finally:
            swap_attention(self.hf, record.kernel, layers=record.layers, **record.options)
            for module, layer in zip(self.hf._formerlab_swap.swapped, kept):
                module.formerlab_attention = layer
        return Path(folder)

    @property
    def supports_streaming(self) -> bool:
        """Whether generation can decode with a ``FormerlabCache`` (every swapped kernel
        streams); False: ``generate`` recomputes the context for every token."""
        if self.kind != "decoder":
            return False
        try:
            FormerlabCache(self.hf)
        except ValueError:
            return False
        return True

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: Generators = None,
        *,
        use_cache: bool = True,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Sample ``tokens`` new tokens after ``ids`` (B, N >= 1); returns (B, N + tokens).

        As ``DecoderLM.generate``: ``use_cache`` decodes with a ``FormerlabCache`` (each
        new token one streaming step per layer), False recomputes the whole context per
        token; both give the same tokens up to float rounding (``top_k=1`` is greedy).
        ``attention_mask`` (B, N): left-padded prompts, see :meth:`stream`."""
        new = list(
            self.stream(
                ids, tokens, temperature, top_k, generator,
                use_cache=use_cache, attention_mask=attention_mask,
            )
        )  # fmt: skip
        return torch.cat([ids, *new], dim=1)

    @torch.no_grad()
    def stream(
        self,
        ids: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: Generators = None,
        *,
        use_cache: bool = True,
        attention_mask: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield the ``tokens`` sampled tokens one at a time, each (B, 1), as produced.

        The model sees at most its ``max_positions`` last tokens: past that the window
        slides and the cache is rebuilt from the window (positions shift with it). A kernel
        that cannot stream recomputes (as ``use_cache=False``). ``attention_mask`` (B, N),
        True = real token, left padding only: every row gets what its prompt alone gets
        (positions count from each row's first real token; padding adds nothing to any
        state). ``generator``: one, None, or one per row (as ``DecoderLM.stream``).
        """
        self._check_generate(ids, tokens, temperature, top_k, generator)
        mask = check_left_padding(attention_mask, ids)
        if use_cache and not self.supports_streaming:
            warn_once(
                f"hf:{self.hf._formerlab_swap.kernel}",
                f"kernel {self.hf._formerlab_swap.kernel!r} cannot stream its state; generate() "
                "recomputes the whole context for every token (use_cache=False)",
            )
            use_cache = False
        cache = None
        for _ in range(tokens):
            context, window = ids[:, -self.max_len :], None
            if mask is not None and not bool(mask[:, -self.max_len :].all()):
                window = mask[:, -self.max_len :]
            if not use_cache:
                logits = self(context, attention_mask=window)
            elif cache is None or cache.get_seq_length() + 1 > self.max_len:
                cache = FormerlabCache(self.hf)  # (re)started from the window
                logits = self._decode(context, window, cache)
            else:  # the new token is real in every row
                logits = self._decode(ids[:, -1:], window, cache)
            nxt = sample_next(logits[:, -1], temperature, top_k, generator)
            ids = torch.cat([ids, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            yield nxt

    def _decode(self, new: Tensor, window: Tensor | None, cache: FormerlabCache) -> Tensor:
        """Logits of the ``new`` tokens (B, T) after those ``cache`` holds; ``window``: the
        (B, seen + T) mask of every token in view, or None (no padding)."""
        seen = cache.get_seq_length()
        if window is None:
            mask = None
            positions = torch.arange(seen, seen + new.shape[1], device=new.device)[None]
        else:
            mask = window[:, -(seen + new.shape[1]) :].long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        out = self.hf(
            input_ids=new, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        return out.logits

    def _check_generate(
        self, ids: Tensor, tokens: int, temperature: float, top_k: Any, generator: Any
    ) -> None:
        if self.kind != "decoder":
            raise ValueError(f"generate needs a decoder model; this one is a {self.kind}")
        check_ids(ids, self.hf.config.vocab_size)
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(
                f"ids must hold at least one prompt token per sequence (B, N >= 1); got shape "
                f"{tuple(ids.shape)}"
            )
        check_positive_int("tokens", tokens, minimum=0)
        check_positive_float("temperature", temperature)
        if top_k is not None:
            check_positive_int("top_k", top_k)
        check_generators(generator, ids.shape[0])


def _first_position(config) -> int:
    """The position HF gives a sequence's first token: ``pad_token_id + 1`` for RoBERTa
    (its learned positions skip the padding index), 0 otherwise."""
    if getattr(config, "model_type", None) == "roberta":
        return int(config.pad_token_id) + 1
    return 0


__all__ = ["HFSequenceModel", "load_local", "max_positions"]
