"""Bridges to other libraries. Each submodule needs its optional extra and is imported
explicitly: ``formerlab.integrations.hf`` (Hugging Face transformers, ``pip install
formerlab[hf]``) and ``formerlab.integrations.hf_cache`` (its ``FormerlabCache``: swapped
decoders generate with the kernels' streaming states)."""
