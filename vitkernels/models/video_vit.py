"""A video ViT with joint space-time attention: clips cut into tubelets (2 x 16 x 16 by default) by one
fused ``patch_embed`` call (projection + cls token + positions), then timm ``Block``s whose attention runs
on ``flash_attention`` over every token of the clip (16 x 224 x 224: 8 x 14 x 14 = 1568 tokens + cls).

The layout and state_dict keys are timm's ViT ones (``patch_embed.proj`` is a Conv3d, ``pos_embed``,
``cls_token``, ``blocks.N.attn.qkv``, ``norm``, ``head``), as in ViViT's model 1 / VideoMAE-style backbones.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkernels.ops._checks import autocast_dtype
from vitkernels.ops.patch_embed import patch_embed

IntOr3 = Union[int, Sequence[int]]


def _triple(value: IntOr3, name: str) -> Tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"VideoVisionTransformer: {name} must be an int or 3 ints (t, h, w), got {value}")
    return value


class VideoPatchEmbed(nn.Module):
    """Tubelet projection: a Conv3d with kernel == stride == (tubelet, patch, patch). The model's
    ``forward_features`` runs it fused with the cls token and positions (one ``patch_embed`` call that reads
    ``proj``'s weights): neither this module nor ``proj`` is called there, so hooks on them do not fire."""

    def __init__(self, clip_size: Tuple[int, int, int], tubelet: Tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        bad = [f"{n}={c} % {t}" for n, c, t in zip(("frames", "height", "width"), clip_size, tubelet) if c % t]
        if bad:
            raise ValueError(f"VideoVisionTransformer: the clip size must be a multiple of the tubelet "
                             f"{tubelet}; got {', '.join(bad)} != 0")
        self.clip_size, self.tubelet = clip_size, tubelet
        self.grid_size = tuple(c // t for c, t in zip(clip_size, tubelet))
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T*H*W / tubelet volume, embed_dim) tokens (no cls, no positions)."""
        return patch_embed(x, self.proj.weight, self.proj.bias)


class VideoVisionTransformer(nn.Module):
    """Video ViT, joint space-time attention.

    Args:
        img_size: frame size (int or (h, w)); num_frames: clip length; patch_size, tubelet_size: the
            tubelet is (tubelet_size, patch_size, patch_size).
        num_classes: head outputs (0: no head); global_pool: "avg" (mean of the patch tokens, then
            ``fc_norm``) or "token" (the cls token after ``norm``).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer (timm ``Block``s).
        drop_rate (head), pos_drop_rate, proj_drop_rate, attn_drop_rate (inside the fused attention),
        drop_path_rate (stochastic depth, linear in depth).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, num_frames: int = 16, patch_size: int = 16,
                 tubelet_size: int = 2, in_chans: int = 3, num_classes: int = 400, global_pool: str = "avg",
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        if global_pool not in ("avg", "token"):
            raise ValueError(f"VideoVisionTransformer: global_pool must be 'avg' or 'token', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("VideoVisionTransformer: global_pool='token' needs class_token=True")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.global_pool, self.embed_dim = num_classes, global_pool, embed_dim
        self.num_features = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embed = VideoPatchEmbed((num_frames, h, w), (tubelet_size, patch_size, patch_size), in_chans,
                                           embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj  # as a Linear over the flattened tubelet (timm / MAE)
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (``torch.utils.checkpoint``, non-reentrant; dropout
        masks replayed from the saved RNG state)."""
        self.grad_checkpointing = bool(enable)

    def _check_clip(self, x: torch.Tensor) -> None:
        expected = (self.patch_embed.proj.in_channels, *self.patch_embed.clip_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"VideoVisionTransformer: x must be (B, C, T, H, W) = (B, {', '.join(map(str, expected))}) "
                f"(the position embedding is learned for that clip size), got {got}; for another clip size "
                "build the model with img_size / num_frames and load the weights with "
                "vitkernels.models.load_state_dict (it resamples pos_embed)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_clip(x)
        proj = self.patch_embed.proj
        if autocast_dtype(x.device.type) is not None:
            # as timm's ViT: fp32 tokens and positions added to the autocast-dtype projection keep the residual
            # stream in fp32; the projection alone runs fused
            x = patch_embed(x, proj.weight, proj.bias)
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.pos_drop(x + self.pos_embed)
        else:
            x = self.pos_drop(patch_embed(x, proj.weight, proj.bias, pos_embed=self.pos_embed,
                                          prefix_tokens=self.cls_token))
        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, P + t*h*w, E) positions of an ``old_grid`` (t, h, w) -> those of ``new_grid``: the patch part
    resampled trilinearly (in fp32), the prefix tokens' positions kept."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if patches.shape[1] != math.prod(old_grid):
        raise ValueError(f"resample_pos_embed: pos_embed has {patches.shape[1]} patch positions, old_grid "
                         f"{old_grid} has {math.prod(old_grid)}")
    dim = patches.shape[-1]
    grid = patches.float().reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=new_grid, mode="trilinear", align_corners=False)
    patches = grid.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: VideoVisionTransformer,
                         old_grid: Optional[Sequence[int]] = None) -> dict:
    """Adapt a state_dict to ``model``'s clip size: ``pos_embed`` resampled from ``old_grid``, the
    checkpoint's (t, h, w) token grid. A state_dict does not record its grid: without ``old_grid``, one of
    the same length is taken as the model's grid, and another length as the model's frame count with square
    frames or the model's frame size with other frames, whichever alone fits (neither or both: ValueError).
    A checkpoint that differs in both frames and frame size needs ``old_grid``."""
    pos = state_dict.get("pos_embed")
    new_grid = tuple(model.patch_embed.grid_size)
    if pos is None:
        return state_dict
    n = pos.shape[1] - model.num_prefix_tokens
    if old_grid is not None:
        old_grid = tuple(int(g) for g in old_grid)
        if math.prod(old_grid) != n:
            raise ValueError(f"load_state_dict: clip_grid {old_grid} has {math.prod(old_grid)} positions, the "
                             f"checkpoint's pos_embed {n}")
    elif pos.shape == model.pos_embed.shape:
        return state_dict
    else:
        t, h, w = new_grid
        side = math.isqrt(n // t) if n % t == 0 else 0
        candidates = ([(t, side, side)] if side and side * side * t == n else []) + \
                     ([(n // (h * w), h, w)] if n % (h * w) == 0 else [])
        if len(candidates) != 1:
            raise ValueError(
                f"load_state_dict: cannot tell the clip grid of a pos_embed with {n} patch positions (the model's "
                f"is {new_grid}; it fits {candidates or 'neither the model frame count nor its frame size'}): "
                "pass clip_grid=(t, h, w), the checkpoint's token grid")
        old_grid = candidates[0]
    state_dict = dict(state_dict)
    state_dict["pos_embed"] = resample_pos_embed(pos, old_grid, new_grid, model.num_prefix_tokens)
    return state_dict


VIDEO_VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def video_vit(size: str, **kwargs) -> VideoVisionTransformer:
    return VideoVisionTransformer(**{**VIDEO_VIT_SIZES[size], **kwargs})
