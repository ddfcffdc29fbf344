"""The three fused ops; each validates its inputs once, then dispatch picks a backend."""
from vitkernels.ops.attention import RelPos, Rope, decomposed_rel_pos, flash_attention
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention

__all__ = ["flash_attention", "window_attention", "patch_embed", "RelPos", "Rope", "decomposed_rel_pos"]
