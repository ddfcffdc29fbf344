"""Reference ViT / DeiT / Swin models whose state_dict keys are timm's: built by timm (``pretrained=False``,
nothing is downloaded) and switched to vitkernels' fused modules with ``patch_timm``.

``create_model(name, **kwargs)`` takes timm's keyword arguments (``img_size``, ``num_classes``, ...);
``load_state_dict(model, state_dict)`` loads a timm state_dict strictly, resampling the absolute position
embedding (and Swin's relative-position tables) when the checkpoint was trained at another image size.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from vitkernels.nn.timm_layers import patch_timm

SUPPORTED = tuple(
    [f"vit_{size}_patch16_{res}" for size in ("tiny", "small", "base", "large") for res in (224, 384)]
    + [f"deit_{size}{d}_patch16_224" for size in ("tiny", "small", "base") for d in ("", "_distilled")]
    + [f"swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base")]
    + ["swin_base_patch4_window12_384"]
)


def list_models():
    return list(SUPPORTED)


def create_model(name: str, **kwargs) -> nn.Module:
    """A timm-compatible model with vitkernels' fused attention, window attention and patch embedding."""
    if name not in SUPPORTED:
        raise ValueError(f"create_model: unknown model {name!r}; supported: {', '.join(SUPPORTED)}")
    if kwargs.pop("pretrained", False):
        raise ValueError("create_model: pretrained weights are not downloaded here; build the model, then "
                         "vitkernels.models.load_state_dict(model, timm_state_dict)")
    import timm

    return patch_timm(timm.create_model(name, pretrained=False, **kwargs))


def load_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load a timm state_dict, adapting position embeddings to the model's image size first (timm's own
    checkpoint filters: ``resample_abs_pos_embed`` for ViT/DeiT, table/index resizing for Swin)."""
    from timm.models import swin_transformer, vision_transformer

    if isinstance(model, swin_transformer.SwinTransformer):
        state_dict = swin_transformer.checkpoint_filter_fn(dict(state_dict), model)
    elif isinstance(model, vision_transformer.VisionTransformer):
        state_dict = vision_transformer.checkpoint_filter_fn(dict(state_dict), model)
    return model.load_state_dict(state_dict, strict=strict)


__all__ = ["create_model", "load_state_dict", "list_models", "SUPPORTED"]
