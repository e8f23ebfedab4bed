"""Models built from MetaFormer blocks with pluggable token mixers."""

from formerlab.models.block import MLP, BlockStack, MetaFormerBlock
from formerlab.models.classifier import EncoderClassifier, masked_mean
from formerlab.models.decoder import DecoderLM, DecoderState
from formerlab.models.embedding import POSITIONS, TokenEmbedding, position_options
from formerlab.models.tagger import TokenTagger

__all__ = [
    "MLP", "POSITIONS", "BlockStack", "DecoderLM", "DecoderState", "EncoderClassifier",
    "MetaFormerBlock", "TokenEmbedding", "TokenTagger", "masked_mean", "position_options",
]
