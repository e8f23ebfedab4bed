"""Models built from MetaFormer blocks with pluggable token mixers."""

from formerlab.models.block import MLP, BlockStack, MetaFormerBlock
from formerlab.models.classifier import EncoderClassifier, masked_mean
from formerlab.models.decoder import DecoderLM
from formerlab.models.tagger import TokenTagger

__all__ = ["MLP", "BlockStack", "DecoderLM", "EncoderClassifier", "MetaFormerBlock", "TokenTagger", "masked_mean"]
