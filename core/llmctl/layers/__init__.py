"""Building blocks of the native models. Every op a platform may override goes through ``ctx.ops`` and every
attention call through ``ctx.attention``, so the layers never know which hardware they run on."""

from llmctl.layers.attention import Attention
from llmctl.layers.embedding import LMHead, VocabEmbedding
from llmctl.layers.linear import Linear, MergedLinear
from llmctl.layers.mlp import GatedMLP
from llmctl.layers.norm import RMSNorm
from llmctl.layers.rotary import RotaryEmbedding, get_rope

__all__ = [
    "Attention",
    "GatedMLP",
    "LMHead",
    "Linear",
    "MergedLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "VocabEmbedding",
    "get_rope",
]
