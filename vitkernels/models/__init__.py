"""Reference models on vitkernels' fused modules, nothing downloaded:

- ViT / DeiT / Swin with timm's state_dict keys: built by timm (``pretrained=False``) and switched with
  ``patch_timm``; ``create_model`` takes timm's keyword arguments (``img_size``, ``num_classes``, ...).
- Video Swin ``swin3d_t/s/b`` with torchvision's keys: built by torchvision (``weights=None``) and switched
  with ``patch_torchvision``; takes torchvision's keyword arguments (``num_classes``, ...) and any clip
  size (``img_size`` / ``num_frames`` are accepted and need nothing).
- Video ViT ``video_vit_{tiny,small,base,large}_patch16_tubelet2_224``: joint space-time attention over
  2x16x16 tubelets (``video_vit.VideoVisionTransformer``; ``img_size``, ``num_frames``, ...).

``load_state_dict(model, state_dict)`` loads a state_dict strictly, resampling position embeddings when the
checkpoint was trained at another image / clip size (timm's filters for ViT/DeiT/Swin, torchvision's
``interpolate_embeddings`` for its ViT, trilinear for the video ViT).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from vitkernels.nn.timm_layers import patch_timm
from vitkernels.nn.torchvision_layers import patch_torchvision

IMAGE = tuple(
    [f"vit_{size}_patch16_{res}" for size in ("tiny", "small", "base", "large") for res in (224, 384)]
    + [f"deit_{size}{d}_patch16_224" for size in ("tiny", "small", "base") for d in ("", "_distilled")]
    + [f"swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base")]
    + ["swin_base_patch4_window12_384"]
)
VIDEO = tuple([f"swin3d_{size}" for size in ("t", "s", "b")]
              + [f"video_vit_{size}_patch16_tubelet2_224" for size in ("tiny", "small", "base", "large")])
SUPPORTED = IMAGE + VIDEO


def list_models():
    return list(SUPPORTED)


def is_video(name: str) -> bool:
    """Whether model ``name`` takes (B, C, T, H, W) clips."""
    return name in VIDEO


def create_model(name: str, **kwargs) -> nn.Module:
    """A model with vitkernels' fused attention, window attention and patch embedding (see the module doc)."""
    if name not in SUPPORTED:
        raise ValueError(f"create_model: unknown model {name!r}; supported: {', '.join(SUPPORTED)}")
    if kwargs.pop("pretrained", False) or kwargs.pop("weights", None) is not None:
        raise ValueError("create_model: pretrained weights are not downloaded here; build the model, then "
                         "vitkernels.models.load_state_dict(model, state_dict)")
    if name.startswith("swin3d_"):
        from torchvision.models import video

        kwargs.pop("img_size", None)  # Video Swin takes any clip size: nothing is sized by them
        kwargs.pop("num_frames", None)
        return patch_torchvision(getattr(video, name)(weights=None, **kwargs))
    if name.startswith("video_vit_"):
        from vitkernels.models.video_vit import video_vit

        return patch_timm(video_vit(name.split("_")[2], **kwargs))
    import timm

    return patch_timm(timm.create_model(name, pretrained=False, **kwargs))


def load_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True, *,
                    clip_grid: Optional[Sequence[int]] = None):
    """Load a state_dict, adapting position embeddings to the model's image / clip size first: timm's own
    checkpoint filters (``resample_abs_pos_embed`` for ViT/DeiT, table/index resizing for Swin),
    torchvision's ``interpolate_embeddings`` for its ViT, trilinear resampling for the video ViT
    (``clip_grid``: the checkpoint's (t, h, w) token grid; see ``video_vit.checkpoint_filter_fn``)."""
    from vitkernels.models import video_vit

    if isinstance(model, video_vit.VideoVisionTransformer):
        state_dict = video_vit.checkpoint_filter_fn(state_dict, model, clip_grid)
    elif _is_timm(model):
        from timm.models import swin_transformer, vision_transformer

        if isinstance(model, swin_transformer.SwinTransformer):
            state_dict = swin_transformer.checkpoint_filter_fn(dict(state_dict), model)
        elif isinstance(model, vision_transformer.VisionTransformer):
            state_dict = vision_transformer.checkpoint_filter_fn(dict(state_dict), model)
    elif _is_torchvision_vit(model) and "encoder.pos_embedding" in state_dict:
        from torchvision.models.vision_transformer import interpolate_embeddings

        if state_dict["encoder.pos_embedding"].shape != model.encoder.pos_embedding.shape:
            state_dict = interpolate_embeddings(model.image_size, model.patch_size, dict(state_dict))
    return model.load_state_dict(state_dict, strict=strict)


def _is_timm(model: nn.Module) -> bool:
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def _is_torchvision_vit(model: nn.Module) -> bool:
    return any(c.__module__ == "torchvision.models.vision_transformer" and c.__name__ == "VisionTransformer"
               for c in type(model).__mro__)


__all__ = ["create_model", "load_state_dict", "list_models", "is_video", "SUPPORTED", "IMAGE", "VIDEO"]
