"""Drop-in modules: ``MultiheadAttention`` / ``replace_mha`` for torch's, and timm-compatible layers."""
from vitkernels.nn.multihead_attention import MultiheadAttention, replace_mha

__all__ = ["MultiheadAttention", "replace_mha"]
