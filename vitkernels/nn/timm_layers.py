"""timm drop-ins: the same modules as timm (constructor, attributes, state_dict keys, methods), with the
compute routed through vitkernels' fused ops, and ``patch_timm(model)`` that switches a built timm model
in place.

Each fused module is timm's own class with a mixin in front that overrides only ``forward`` (or Swin's
``_attn``, or ViT's ``_pos_embed``): parameters, buffers and every other method are timm's. Anything a
fused path does not cover (dynamic image size, register tokens, attention dropout in training, masks the
op cannot take) runs timm's own code, so behaviour never changes, only speed.

- Attention: qkv Linear -> strided q/k/v views -> ``flash_attention`` -> proj.
- PatchEmbed: ``patch_embed`` (gathered GEMM, no im2col) for flattened NCHW and NHWC outputs.
- VisionTransformer (ViT, DeiT, distilled DeiT): patchify + projection + cls/dist tokens + pos_embed in one
  ``patch_embed`` call; the model's patch_embed hands the raw image through to ``_pos_embed``.
- SwinTransformerBlock: ``_attn`` = qkv Linear -> ``window_attention`` (shift, pad, partition, bias, mask,
  reverse inside) -> proj. (Its WindowAttention is then not called.)
- WindowAttention on its own (already partitioned windows): ``flash_attention`` with windows x heads on
  one axis and the table bias + shift mask as one small (1, nW * heads, N, N) bias.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.ops.attention import flash_attention
from vitkernels.ops.attention.checks import head_dim_supported
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention


def _timm():
    try:
        import timm  # noqa: F401
        from timm.layers import Attention, PatchEmbed
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover - exercised only without timm
        raise ImportError(f"vitkernels' timm drop-ins need timm installed ({exc})") from exc
    return dict(Attention=Attention, PatchEmbed=PatchEmbed, SwinTransformerBlock=SwinTransformerBlock,
                WindowAttention=WindowAttention, VisionTransformer=VisionTransformer)


class FusedAttentionMixin:
    """timm ``Attention.forward`` on ``flash_attention``."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if is_causal or not head_dim_supported(self.head_dim) or (attn_mask is not None and attn_mask.dtype == torch.bool):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = flash_attention(q, k, v, bias=attn_mask, scale=self.scale,
                            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class FusedPatchEmbedMixin:
    """timm ``PatchEmbed.forward`` on ``patch_embed`` (flattened tokens, or NHWC maps as Swin uses)."""

    _defer_to_model: bool = False  # set by patch_timm when the ViT fuses cls/pos into the same call

    def _fusable(self, x: torch.Tensor) -> bool:
        fmt = getattr(self, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)
        return (x.dim() == 4 and not getattr(self, "dynamic_img_pad", False) and isinstance(self.proj, nn.Conv2d)
                and tuple(self.proj.kernel_size) == tuple(self.proj.stride) and self.proj.padding in ((0, 0), 0)
                and (self.flatten or fmt == "NHWC"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._defer_to_model:
            return x  # the model's _pos_embed runs patch_embed with its cls/dist tokens and positions
        if not self._fusable(x):
            return super().forward(x)
        if getattr(self, "strict_img_size", False) and getattr(self, "img_size", None) is not None:
            if tuple(x.shape[-2:]) != tuple(self.img_size):
                return super().forward(x)  # timm's own size check and message
        tokens = patch_embed(x, self.proj.weight, self.proj.bias)
        if not self.flatten:  # NHWC map
            gh, gw = x.shape[-2] // self.proj.stride[0], x.shape[-1] // self.proj.stride[1]
            tokens = tokens.view(x.shape[0], gh, gw, tokens.shape[-1])
        return self.norm(tokens)


class FusedVisionTransformerMixin:
    """ViT/DeiT: patchify + projection + prefix tokens + positions in one ``patch_embed`` call."""

    def _fused_embed_ok(self) -> bool:
        pe = self.patch_embed
        return (isinstance(pe, FusedPatchEmbedMixin) and pe.flatten and isinstance(pe.norm, nn.Identity)
                and not getattr(pe, "dynamic_img_pad", False) and not getattr(self, "dynamic_img_size", False)
                and getattr(self, "reg_token", None) is None and self.pos_embed is not None)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # patch_embed already ran (not deferred)
            return super()._pos_embed(x)
        prefix = [t for t in (getattr(self, "cls_token", None), getattr(self, "dist_token", None)) if t is not None]
        prefix_tokens = (prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)) if prefix else None
        pe = self.patch_embed
        tokens = patch_embed(x, pe.proj.weight, pe.proj.bias, pos_embed=self.pos_embed, prefix_tokens=prefix_tokens)
        return self.pos_drop(tokens)


class FusedWindowAttentionMixin:
    """timm Swin ``WindowAttention.forward`` (already partitioned windows) on ``flash_attention``: windows
    become the head axis of one call, relative-position bias + shift mask one (1, nW * heads, N, N) bias."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        num_win = 1 if mask is None else mask.shape[0]
        if (not head_dim_supported(head_dim) or B_ % num_win != 0 or (self.training and self.attn_drop.p > 0)):
            return super().forward(x, mask=mask)
        B, H = B_ // num_win, self.num_heads
        bias = self._get_rel_pos_bias().to(x.dtype)  # 1, H, N, N
        if mask is not None:
            bias = bias + mask.to(x.dtype).unsqueeze(1)  # nW, H, N, N
        qkv = self.qkv(x).reshape(B, num_win, N, 3, H, head_dim)
        # (B, nW, N, H, D) -> (B, nW * H, N, D): a strided view, windows and heads on one axis
        q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4).reshape(B, num_win * H, N, head_dim) for i in range(3))
        out = flash_attention(q, k, v, bias=bias.reshape(1, num_win * H, N, N), scale=self.scale)
        out = out.view(B, num_win, H, N, head_dim).permute(0, 1, 3, 2, 4).reshape(B_, N, H * head_dim)
        return self.proj_drop(self.proj(out))


class FusedSwinBlockMixin:
    """Swin ``SwinTransformerBlock._attn`` on ``window_attention``."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        if (getattr(self, "always_partition", False) or getattr(self, "dynamic_mask", False)
                or (self.training and attn.attn_drop.p > 0)):
            return super()._attn(x)
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
        out = window_attention(qkv, num_heads=attn.num_heads, window_size=self.window_size,
                               shift_size=self.shift_size, rel_pos_bias=attn.relative_position_bias_table,
                               qkv_bias=attn.qkv.bias, scale=attn.scale)
        return attn.proj_drop(attn.proj(out))


@functools.lru_cache(maxsize=None)
def fused_class(base: type) -> type:
    """timm class -> the same class with vitkernels' fused forward in front of it."""
    t = _timm()
    if issubclass(base, t["VisionTransformer"]):
        mixin = FusedVisionTransformerMixin
    elif issubclass(base, t["SwinTransformerBlock"]):
        mixin = FusedSwinBlockMixin
    elif issubclass(base, t["PatchEmbed"]):
        mixin = FusedPatchEmbedMixin
    elif issubclass(base, t["WindowAttention"]):
        mixin = FusedWindowAttentionMixin
    elif issubclass(base, t["Attention"]):
        mixin = FusedAttentionMixin
    else:
        raise TypeError(f"no vitkernels drop-in for {base.__module__}.{base.__qualname__}")
    return type(base.__name__, (mixin, base), {"__module__": __name__, "__doc__": base.__doc__})


def patch_timm(model: nn.Module) -> nn.Module:
    """Switch timm's Attention, PatchEmbed, VisionTransformer (ViT/DeiT) and SwinTransformerBlock modules
    of ``model`` to their fused versions in place (same parameters, buffers and state_dict keys) and
    return the model."""
    t = _timm()
    supported = (t["VisionTransformer"], t["SwinTransformerBlock"], t["PatchEmbed"], t["Attention"],
                 t["WindowAttention"])
    for module in model.modules():
        cls = type(module)
        if cls.__module__ != __name__ and issubclass(cls, supported):
            module.__class__ = fused_class(cls)
    for module in model.modules():
        if isinstance(module, FusedVisionTransformerMixin) and module._fused_embed_ok():
            module.patch_embed._defer_to_model = True
    return model


def __getattr__(name: str):
    """``Attention``, ``PatchEmbed``, ``WindowAttention``, ``SwinTransformerBlock``: timm's classes with the
    fused forward (created on first use, so importing vitkernels.nn does not need timm)."""
    if name in ("Attention", "PatchEmbed", "WindowAttention", "SwinTransformerBlock"):
        return fused_class(_timm()[name])
    raise AttributeError(name)
