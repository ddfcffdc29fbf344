"""Drop-in modules: ``MultiheadAttention`` / ``replace_mha`` (undone by ``restore_mha``) for torch's, and
timm's ``Attention``, ``PatchEmbed``, ``WindowAttention``, ``SwinTransformerBlock``, SAM / ViTDet's
``Attention``, EVA's ``EvaAttention`` / ``AttentionRope`` (RoPE) and Swin V2's block and ``WindowAttention``
with ``patch_timm`` (undone by ``unpatch_timm``; these need timm), torchvision's ViT, Swin, Swin V2, Video
Swin and MViT modules with ``patch_torchvision`` (undone by ``unpatch_torchvision``; these need
torchvision)."""
from vitkernels.nn.multihead_attention import MultiheadAttention, replace_mha, restore_mha
from vitkernels.nn.timm_layers import patch_timm, unpatch_timm
from vitkernels.nn.torchvision_layers import patch_torchvision, unpatch_torchvision

__all__ = ["MultiheadAttention", "replace_mha", "restore_mha", "patch_timm", "unpatch_timm",
           "patch_torchvision", "unpatch_torchvision", "Attention", "PatchEmbed", "WindowAttention",
           "SwinTransformerBlock"]


def __getattr__(name: str):
    if name in ("Attention", "PatchEmbed", "WindowAttention", "SwinTransformerBlock"):
        from vitkernels.nn import timm_layers

        return getattr(timm_layers, name)
    raise AttributeError(f"module 'vitkernels.nn' has no attribute {name!r}")
