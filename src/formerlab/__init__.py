"""formerlab: efficient and implicit Transformer layers, and a workbench to compare them."""

__version__ = "0.1.0"
