"""timm drop-ins: the same modules as timm (constructor, attributes, state_dict keys, methods), with the
compute routed through vitkernels' fused ops, and ``patch_timm(model)`` that switches a built timm model
in place (``unpatch_timm(model)`` switches it back).

Each fused module is timm's own class with a mixin in front that overrides only ``forward`` (or Swin's
``_attn``, or ViT's ``forward_features`` / ``_pos_embed``): parameters, buffers and every other method are
timm's. A class whose code for those methods is not timm's (a subclass overriding them) is left as it is.
Wherever the fused path does not apply, timm's own code runs, so behaviour never changes, only speed:

- Attention: qkv Linear -> strided q/k/v views -> ``flash_attention`` -> proj. timm's code for
  ``fused_attn=False`` (timm's switch: attention-map extraction), ``is_causal``, bool masks and masks
  SDPA would reject, head dims the kernels do not take.
- PatchEmbed: ``patch_embed`` (gathered GEMM, no im2col) for flattened (NLC) and NHWC outputs; timm's code
  for dynamic padding, sizes timm checks (strict image size, a map the patch does not divide), a dtype
  the conv would reject, other output formats, hooks on ``proj``.
- VisionTransformer (ViT, DeiT, distilled DeiT): patchify + projection + cls/dist tokens + pos_embed in one
  ``patch_embed`` call inside ``forward_features``. ``model.patch_embed`` called on its own (or hooked, or
  by ``forward_intermediates``) gives its tokens as in timm. timm's code for ``dynamic_img_size``,
  register tokens, no pos_embed, a norm in the patch embedding.
- SwinTransformerBlock: ``_attn`` = qkv Linear -> ``window_attention`` (shift, pad, partition, bias, mask,
  reverse inside) -> proj; its WindowAttention is then not called. timm's code for dropout on the
  attention in training, ``always_partition`` / ``dynamic_mask``, a shifted map of another size than the
  block's mask, hooks on ``attn`` or its submodules, and timm's fused attention switched off globally
  (``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)``). (Swin's own ``fused_attn`` flag is an
  experimental opt-in that defaults to off; the explicit softmax it selects is the same math.)
- WindowAttention on its own (already partitioned windows): ``flash_attention`` with windows x heads on
  one axis and the table bias + shift mask as one small (1, nW * heads, N, N) bias.
- SAM / ViTDet ``Attention`` (``samvit_*``, ``vision_transformer_sam``; global and windowed blocks alike):
  qkv Linear -> strided q/k/v views -> ``flash_attention`` with the decomposed relative-position bias
  (``decomposed_rel_pos`` of the normed queries and ``rel_pos_h`` / ``rel_pos_w``, tables resized as timm
  resizes them for another map size) -> proj, in and out as (B, H, W, C) maps. timm's code for
  ``fused_attn=False``, rotary embeddings (``use_rope``), tables of another width than the head dim or of
  another dtype than the projection (timm's einsum rejects them), head dims the kernels do not take.

Every drop-in also runs timm's code under FX symbolic tracing, ``torch.jit.trace`` and ONNX export (so
those graphs are the unpatched model's) and when a hook is on a module the fused path skips
(``vitkernels.nn._dropin``). ``torch.jit.script`` raises an error naming ``unpatch_timm``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from vitkernels.nn import _dropin
from vitkernels.ops.attention import flash_attention
from vitkernels.ops.attention.checks import head_dim_supported
from vitkernels.ops.attention.rel_pos import decomposed_rel_pos
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention


def _timm():
    try:
        import timm  # noqa: F401
        from timm.layers import Attention, PatchEmbed
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
        from timm.models.vision_transformer import VisionTransformer
        from timm.models.vision_transformer_sam import Attention as SamAttention
    except ImportError as exc:  # pragma: no cover - exercised only without timm
        raise ImportError(f"vitkernels' timm drop-ins need timm installed ({exc})") from exc
    return dict(Attention=Attention, PatchEmbed=PatchEmbed, SwinTransformerBlock=SwinTransformerBlock,
                WindowAttention=WindowAttention, VisionTransformer=VisionTransformer,
                VisionTransformerDistilled=VisionTransformerDistilled, SamAttention=SamAttention)


def _timm_fused_attn_on() -> bool:
    """timm's global fused-attention switch (TIMM_FUSED_ATTN, ``set_fused_attn``, exportable mode)."""
    from timm.layers import use_fused_attn

    return use_fused_attn()


class _TimmDropIn:
    """Module-level behaviour of every fused timm class: pickles and copies as itself (the class is made at
    run time, so pickle rebuilds it from the timm class it extends), refuses TorchScript by name."""

    def __reduce_ex__(self, protocol):
        base = _timm_base(type(self))
        return _rebuild, (base.__module__, base.__qualname__), self.__getstate__()

    def __prepare_scriptable__(self):
        raise _dropin.script_error(self, "timm", "vitkernels.nn.unpatch_timm")


def _rebuild(module_name: str, qualname: str):
    cls = fused_class(_dropin.import_qualified(module_name, qualname))
    return cls.__new__(cls)


def _timm_base(cls: type) -> type:
    return _dropin.original_class(cls, _TimmDropIn)


class FusedAttentionMixin(_TimmDropIn):
    """timm ``Attention.forward`` on ``flash_attention``."""

    def _fused_call(self, x, attn_mask, is_causal) -> bool:
        if _dropin.plain_path_reason(x, attn_mask, is_causal) is not None:  # first: arguments may be proxies
            return False
        if is_causal or not self.fused_attn or not head_dim_supported(self.head_dim) or x.dim() != 3:
            return False
        if attn_mask is None:
            return True
        B, N, _ = x.shape
        return (attn_mask.is_floating_point() and attn_mask.device == x.device  # bool masks: SDPA's own semantics
                and (attn_mask.dtype == x.dtype or _dropin.autocast_on(x.device.type))
                and _dropin.broadcastable(attn_mask.shape, (B, self.num_heads, N, N)))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if not self._fused_call(x, attn_mask, is_causal):
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


class FusedPatchEmbedMixin(_TimmDropIn):
    """timm ``PatchEmbed.forward`` on ``patch_embed`` (flattened tokens, or NHWC maps as Swin uses)."""

    _defer_next_call: bool = False  # set by the fused ViT's forward_features for the one call it makes

    def _fusable(self, x) -> bool:
        """Whether ``patch_embed`` gives exactly what timm's forward gives for ``x`` (else timm's code runs,
        with its own checks and messages)."""
        proj = self.proj
        fmt = getattr(self, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)
        if (_dropin.plain_path_reason(x) is not None or not isinstance(x, torch.Tensor) or x.dim() != 4
                or getattr(self, "dynamic_img_pad", False) or not (self.flatten or fmt == "NHWC")
                or type(proj) is not nn.Conv2d or _dropin.observed(proj)):
            return False
        if (tuple(proj.kernel_size) != tuple(proj.stride) or tuple(proj.padding) != (0, 0)
                or tuple(proj.dilation) != (1, 1) or proj.groups != 1 or x.shape[1] != proj.in_channels):
            return False
        H, W = x.shape[-2:]
        if H % proj.stride[0] or W % proj.stride[1]:  # timm asserts, or the conv drops the remainder
            return False
        if getattr(self, "strict_img_size", False) and getattr(self, "img_size", None) is not None:
            if (H, W) != tuple(self.img_size):
                return False
        if x.device != proj.weight.device:  # the conv's own error
            return False
        return x.dtype == proj.weight.dtype or _dropin.autocast_on(x.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._defer_next_call:  # the ViT's _pos_embed runs patch_embed with its tokens and positions
            self._defer_next_call = False
            return x
        if not self._fusable(x):
            return super().forward(x)
        tokens = patch_embed(x, self.proj.weight, self.proj.bias)
        if not self.flatten:  # NHWC map
            gh, gw = x.shape[-2] // self.proj.stride[0], x.shape[-1] // self.proj.stride[1]
            tokens = tokens.view(x.shape[0], gh, gw, tokens.shape[-1])
        return self.norm(tokens)


class FusedVisionTransformerMixin(_TimmDropIn):
    """ViT/DeiT: patchify + projection + prefix tokens + positions in one ``patch_embed`` call."""

    _embed_deferred: bool = False  # forward_features asked patch_embed to hand the image to _pos_embed

    def _fused_embed_ok(self, x) -> bool:
        pe = self.patch_embed
        return (isinstance(pe, FusedPatchEmbedMixin) and pe.flatten and isinstance(pe.norm, nn.Identity)
                and not getattr(self, "dynamic_img_size", False) and getattr(self, "reg_token", None) is None
                and self.pos_embed is not None and pe._fusable(x) and not _dropin.observed(pe, pe.norm))

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # the tracer check first: under FX, reading a parameter records a node
        if _dropin.plain_path_reason(x, *args, *kwargs.values()) is not None or not self._fused_embed_ok(x):
            return super().forward_features(x, *args, **kwargs)
        # timm's forward_features calls patch_embed(x) then _pos_embed(x): patch_embed hands the image on
        # (nobody observes it: no hooks, checked above) and _pos_embed embeds it in one call.
        self.patch_embed._defer_next_call = True
        self._embed_deferred = True
        try:
            return super().forward_features(x, *args, **kwargs)
        finally:
            self.patch_embed._defer_next_call = False
            self._embed_deferred = False

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self._embed_deferred or self.patch_embed._defer_next_call:
            return super()._pos_embed(x)
        self._embed_deferred = False
        pe = self.patch_embed
        if _dropin.autocast_on(x.device.type):
            # timm adds the fp32 tokens and positions to the autocast-dtype projection: the tokens are fp32
            # from there on. The projection alone runs fused; cat, add and dropout are timm's.
            return super()._pos_embed(patch_embed(x, pe.proj.weight, pe.proj.bias))
        prefix = [t for t in (getattr(self, "cls_token", None), getattr(self, "dist_token", None)) if t is not None]
        prefix_tokens = (prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)) if prefix else None
        tokens = patch_embed(x, pe.proj.weight, pe.proj.bias, pos_embed=self.pos_embed, prefix_tokens=prefix_tokens)
        return self.pos_drop(tokens)


class FusedWindowAttentionMixin(_TimmDropIn):
    """timm Swin ``WindowAttention.forward`` (already partitioned windows) on ``flash_attention``: windows
    become the head axis of one call, relative-position bias + shift mask one (1, nW * heads, N, N) bias."""

    def _fused_call(self, x, mask) -> bool:
        if (_dropin.plain_path_reason(x, mask) is not None or not (self.fused_attn or _timm_fused_attn_on())
                or (self.training and self.attn_drop.p > 0) or x.dim() != 3
                or _dropin.observed(getattr(self, "softmax", None), self.attn_drop)):
            return False
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        if not head_dim_supported(head_dim):
            return False
        if mask is None:
            return True
        B_, N, _ = x.shape
        return (mask.is_floating_point() and mask.device == x.device and mask.dim() == 3
                and tuple(mask.shape[1:]) == (N, N) and B_ % mask.shape[0] == 0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self._fused_call(x, mask):
            return super().forward(x, mask=mask)
        B_, N, C = x.shape
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        num_win = 1 if mask is None else mask.shape[0]
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


class FusedSwinBlockMixin(_TimmDropIn):
    """Swin ``SwinTransformerBlock._attn`` on ``window_attention``."""

    def _fused_call(self, x) -> bool:
        attn = self.attn
        if (_dropin.plain_path_reason(x) is not None or getattr(self, "always_partition", False)
                or getattr(self, "dynamic_mask", False) or (self.training and attn.attn_drop.p > 0)
                or not (attn.fused_attn or _timm_fused_attn_on()) or x.dim() != 4
                or _dropin.observed(attn, getattr(attn, "softmax", None), attn.attn_drop)):
            return False
        # timm's mask is built for the block's input_resolution: another shifted map is timm's business
        return self.attn_mask is None or tuple(x.shape[1:3]) == tuple(self.input_resolution)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_call(x):
            return super()._attn(x)
        attn = self.attn
        out = window_attention(attn.qkv(x), num_heads=attn.num_heads, window_size=self.window_size,
                               shift_size=self.shift_size, rel_pos_bias=attn.relative_position_bias_table,
                               qkv_bias=attn.qkv.bias, scale=attn.scale)
        return attn.proj_drop(attn.proj(out))


class FusedSamAttentionMixin(_TimmDropIn):
    """timm SAM / ViTDet ``Attention.forward`` (``vision_transformer_sam``: a (B, H, W, C) map or window, with
    the decomposed relative-position bias) on ``flash_attention(..., rel_pos=...)``."""

    def _fused_call(self, x) -> bool:
        if _dropin.plain_path_reason(x) is not None:  # first: the argument may be a proxy
            return False
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or not self.fused_attn
                or not head_dim_supported(self.head_dim) or not isinstance(self.qkv, nn.Linear)
                or self.qkv.out_features != 3 * self.num_heads * self.head_dim):
            return False  # a wrapped qkv (an adapter, a quantized module): timm's code calls it as it is
        if not self.use_rel_pos:
            return self.rope is None  # rotary embeddings: timm's code
        tables = (self.rel_pos_h, self.rel_pos_w)
        if any(t.dim() != 2 or t.shape[1] != self.head_dim or t.device != x.device for t in tables):
            return False  # timm's einsum / indexing raises its own error
        # without autocast timm's einsum takes the tables only in the queries' dtype (decomposed_rel_pos
        # would cast them); under autocast both run in the autocast dtype
        return (_dropin.autocast_on(x.device.type)
                or all(t.dtype == self.qkv.weight.dtype for t in tables))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_call(x):
            return super().forward(x)
        B, H, W, _ = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, -1)).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, D) strided views, no copies
        q, k = self.q_norm(q), self.k_norm(k)
        rel_pos = (decomposed_rel_pos(q, (H, W), (H, W), self.rel_pos_h, self.rel_pos_w)
                   if self.use_rel_pos else None)
        # timm calls SDPA without a scale: its default, head_dim ** -0.5 (flash_attention's default too)
        x = flash_attention(q, k, v, rel_pos=rel_pos, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.proj_drop(self.proj(x))
        return x.view(B, H, W, -1)


# mixin -> (timm class name, the methods the mixin reimplements): a timm class is fused only when its code
# for each of them is the code of one of the named timm classes (a subclass that overrides one keeps its own)
_MIXINS = (
    (FusedVisionTransformerMixin, ("VisionTransformer", "VisionTransformerDistilled"),
     ("forward_features", "_pos_embed")),
    (FusedSwinBlockMixin, ("SwinTransformerBlock",), ("_attn",)),
    (FusedPatchEmbedMixin, ("PatchEmbed",), ("forward",)),
    (FusedWindowAttentionMixin, ("WindowAttention",), ("forward",)),
    (FusedAttentionMixin, ("Attention",), ("forward",)),
    (FusedSamAttentionMixin, ("SamAttention",), ("forward",)),
)


def _mixin_for(cls: type):
    return _dropin.select_mixin(cls, _MIXINS, _timm())


@functools.lru_cache(maxsize=None)
def fused_class(base: type) -> type:
    """timm class -> the same class with vitkernels' fused forward in front of it."""
    mixin = _mixin_for(base)
    if mixin is None:
        raise TypeError(f"no vitkernels drop-in for {base.__module__}.{base.__qualname__} (timm's Attention, "
                        "PatchEmbed, VisionTransformer, SwinTransformerBlock, WindowAttention, SAM's Attention, "
                        "or a subclass that keeps their forward code)")
    return _dropin.extend_class(base, mixin, __name__)


def patch_timm(model: nn.Module) -> nn.Module:
    """Switch timm's Attention, PatchEmbed, VisionTransformer (ViT/DeiT), SwinTransformerBlock,
    WindowAttention and SAM / ViTDet Attention (``samvit_*``) modules of ``model`` to their fused versions in
    place (same parameters, buffers and state_dict keys) and return the model. ``unpatch_timm`` undoes it."""
    for module in model.modules():
        cls = type(module)
        if not issubclass(cls, _TimmDropIn) and _mixin_for(cls) is not None:
            module.__class__ = fused_class(cls)
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Switch every fused timm module of ``model`` back to its timm class in place; returns the model."""
    for module in model.modules():
        if isinstance(module, _TimmDropIn):
            module.__class__ = _timm_base(type(module))
            for flag in ("_defer_next_call", "_embed_deferred"):
                module.__dict__.pop(flag, None)
    return model


def __getattr__(name: str):
    """``Attention``, ``PatchEmbed``, ``WindowAttention``, ``SwinTransformerBlock``: timm's classes with the
    fused forward (created on first use, so importing vitkernels.nn does not need timm)."""
    if name in ("Attention", "PatchEmbed", "WindowAttention", "SwinTransformerBlock"):
        return fused_class(_timm()[name])
    raise AttributeError(name)
