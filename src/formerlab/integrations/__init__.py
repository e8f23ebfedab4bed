"""Bridges to other libraries. Each submodule needs its optional extra and is imported
explicitly: ``formerlab.integrations.hf`` (Hugging Face transformers, ``pip install
formerlab[hf]``)."""
