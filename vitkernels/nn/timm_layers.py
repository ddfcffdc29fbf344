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
- EVA's ``EvaAttention`` (``eva02_*``, DINOv3, EVA) and ``AttentionRope`` (``attn_type='rope'`` EVA blocks,
  NaFlexViT, grouped-query attention included): timm's projections (``q_bias`` / zero ``k_bias`` /
  ``v_bias``, ``qkv_bias_separate``, separate q / k / v projections) and q / k norms, then one
  ``flash_attention`` that rotates q and k itself (``Rope(cos, sin, prefix=num_prefix_tokens,
  rotate_half=...)`` from timm's ``[sin | cos]`` tensor), takes a float mask as its bias and the dropout;
  then timm's scale norm, gate and proj. Every rope form timm's EVA models give is fused: 'cat' (EVA-02,
  (N, 2D)), DINOv3, 'mixed' (per-block (heads, N, 2D), learnable: the frequencies get their gradient),
  patch dropout's per-sample (B, 1|heads, N, 2D), train-time coordinate jitter. timm's code for
  ``fused_attn=False``, ``is_causal``, bool masks, a rope of another shape or float64 tables on
  lower-precision queries, per-head tables on grouped kv heads, wrapped projections, head dims the kernels
  do not take.
- Swin V2 ``SwinTransformerV2Block`` (``swinv2_*``): ``_attn`` = timm's qkv projection ->
  ``window_attention(cosine=True)`` (timm's roll-then-pad order, scaled cosine logits with ``logit_scale``,
  the ``16 * sigmoid(cpb_mlp(...))`` table, shift mask) -> proj. The shift mask is exactly -inf where timm
  adds -100: with a head's scale s = exp(logit_scale) (at most 100), a masked logit is at most s + 16 - 100
  and the row's own key at least -s, so timm's masked weights are below N e^-(84 - 2s) (e^-64 at the
  initial s = 10): no difference in practice.
  timm's code for the same cases as Swin V1 (attention dropout in training, ``always_partition`` /
  ``dynamic_mask``, a shifted map of another size than the block's mask, a map smaller than the window,
  hooks on ``attn`` or its submodules, timm's fused attention switched off globally) and for a
  ``relative_position_index`` buffer other than the standard one, a qkv Linear with its own bias or wrapped,
  a ``logit_scale`` of another dtype than the op takes. Its ``WindowAttention`` on its own (already
  partitioned windows, e.g. under ``always_partition``): ``flash_attention`` on the normalised q (times the
  per-head logit scale) and k, table + shift mask as one (1, nW * heads, N, N) bias.

Every drop-in also runs timm's code under FX symbolic tracing, ``torch.jit.trace`` and ONNX export (so
those graphs are the unpatched model's) and when a hook is on a module the fused path skips
(``vitkernels.nn._dropin``). ``torch.jit.script`` raises an error naming ``unpatch_timm``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.nn import _dropin
from vitkernels.ops.attention import flash_attention
from vitkernels.ops.attention.checks import Rope, head_dim_supported
from vitkernels.ops.attention.rel_pos import decomposed_rel_pos
from vitkernels.ops.attention.rope import apply_rope
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention


def _timm():
    try:
        import timm  # noqa: F401
        from timm.layers import Attention, AttentionRope, PatchEmbed
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.eva import EvaAttention
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block
        from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
        from timm.models.vision_transformer import VisionTransformer
        from timm.models.vision_transformer_sam import Attention as SamAttention
    except ImportError as exc:  # pragma: no cover - exercised only without timm
        raise ImportError(f"vitkernels' timm drop-ins need timm installed ({exc})") from exc
    return dict(Attention=Attention, PatchEmbed=PatchEmbed, SwinTransformerBlock=SwinTransformerBlock,
                WindowAttention=WindowAttention, VisionTransformer=VisionTransformer,
                VisionTransformerDistilled=VisionTransformerDistilled, SamAttention=SamAttention,
                EvaAttention=EvaAttention, AttentionRope=AttentionRope, SwinTransformerV2Block=SwinTransformerV2Block,
                WindowAttentionV2=WindowAttentionV2)


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
        if any(r < w for r, w in zip(x.shape[1:3], self.window_size)):
            return False  # timm pads a map smaller than the window up to it (window_attention clips)
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


def _float_mask_ok(attn_mask, x, target) -> bool:
    """An additive float mask ``flash_attention`` takes as its bias exactly as SDPA takes it (bool masks keep
    SDPA's own semantics: the original code)."""
    return (isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point() and attn_mask.device == x.device
            and (attn_mask.dtype == x.dtype or _dropin.autocast_on(x.device.type))
            and _dropin.broadcastable(attn_mask.shape, target))


class _FusedRopeAttention(_TimmDropIn):
    """What EVA's ``EvaAttention`` and timm's ``AttentionRope`` share: timm's projections and q / k norms, then
    one ``flash_attention`` with the rotary embedding as ``Rope`` (timm's ``[sin | cos]`` tensor split in two,
    the prefix tokens unrotated), the float mask as the bias and the dropout, instead of timm's rotation + SDPA.

    timm's rope argument comes in every form timm's models give it, all fused: EVA-02 / axial 'cat' and DINOv3
    (N, 2D); 'mixed' per-depth tables indexed per block (H, N, 2D); with patch dropout (B, 1, N, 2D) /
    (B, H, N, 2D); training-time coordinate jitter (a fresh tensor of the same shape); learnable tables
    (gradients flow to them). timm's code runs for a rope that is not such a tensor (another shape, a width other
    than 2 * head_dim, float64 tables on lower-precision queries), ``is_causal``, bool masks, ``fused_attn=False``,
    head dims the kernels do not take and wrapped projections."""

    def _kv_heads(self) -> int:
        return getattr(self, "num_kv_heads", self.num_heads)

    def _original_forward(self, x, rope, attn_mask, is_causal):
        # is_causal only when set: timm versions before it took no such argument
        kwargs = dict(is_causal=is_causal) if is_causal is not False else {}
        return super().forward(x, rope=rope, attn_mask=attn_mask, **kwargs)

    def _projections_ok(self, x) -> bool:
        C, H, D = x.shape[-1], self.num_heads, self.head_dim
        if self.qkv is not None:
            return (isinstance(self.qkv, nn.Linear) and self.qkv.in_features == C
                    and self.qkv.out_features == 3 * H * D and self.qkv.weight.device == x.device)
        kv = self._kv_heads() * D
        return all(isinstance(p, nn.Linear) and p.in_features == C and p.out_features == n
                   for p, n in ((self.q_proj, H * D), (self.k_proj, kv), (self.v_proj, kv)))

    def _rope_ok(self, rope, x) -> bool:
        """timm's rope tensor maps onto ``Rope``: (..., N - prefix, 2 * head_dim) with leading dims that broadcast
        to (B, heads) as torch broadcasts them against timm's (B, heads, N - prefix, head_dim) queries."""
        if rope is None:
            return True
        B, N, _ = x.shape
        npt = self.num_prefix_tokens
        if (not isinstance(rope, torch.Tensor) or not rope.is_floating_point() or rope.device != x.device
                or not 2 <= rope.dim() <= 4 or rope.shape[-1] != 2 * self.head_dim
                or not isinstance(npt, int) or not 0 <= npt <= N or rope.shape[-2] != N - npt):
            return False
        if any(s not in (1, full) for s, full in zip(reversed(rope.shape[:-2]), (self.num_heads, B))):
            return False
        if self._kv_heads() != self.num_heads and rope.dim() >= 3 and rope.shape[-3] != 1:
            return False  # per-head tables on fewer kv heads: timm's broadcasting, not the heads' rotation
        if rope.dtype == torch.float64:  # timm rotates in float64, then rounds: only float64 queries do that too
            return x.dtype == torch.float64 and not _dropin.autocast_on(x.device.type)
        return True

    def _fused_call(self, x, rope, attn_mask, is_causal) -> bool:
        if _dropin.plain_path_reason(x, rope, attn_mask, is_causal) is not None:  # first: arguments may be proxies
            return False
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or is_causal or not self.fused_attn
                or not head_dim_supported(self.head_dim) or self.num_heads % self._kv_heads()
                or not self._projections_ok(x) or not self._rope_ok(rope, x)):
            return False
        B, N, _ = x.shape
        return attn_mask is None or _float_mask_ok(attn_mask, x, (B, self.num_heads, N, N))

    def _attend(self, q, k, v, rope, attn_mask):
        """timm's rotation + SDPA (+ GQA's head expansion) as one ``flash_attention`` call: (B, heads, N, D)."""
        table = None
        if rope is not None:
            npt = self.num_prefix_tokens
            sin, cos = rope.chunk(2, -1)
            if not _dropin.autocast_on(q.device.type):
                if q.dtype != v.dtype:  # a norm that changed q's dtype: timm rotates, then casts to v's dtype
                    half = getattr(self, "rotate_half", False)
                    rot = Rope(cos, sin, prefix=0, rotate_half=half)
                    q, k = (torch.cat([t[:, :, :npt], apply_rope(t[:, :, npt:], rot)], dim=2).type_as(v)
                            for t in (q, k))
                    rope = None
                else:
                    allowed = (q.dtype,) if q.dtype in (torch.float32, torch.float64) else (q.dtype, torch.float32)
                    if cos.dtype not in allowed:  # lower-precision tables: timm's promotion, an exact upcast
                        target = torch.promote_types(q.dtype, cos.dtype)
                        target = target if target in allowed else q.dtype
                        sin, cos = sin.to(target), cos.to(target)
            if rope is not None:
                table = Rope(cos, sin, prefix=npt, rotate_half=bool(getattr(self, "rotate_half", False)))
        groups = self.num_heads // self._kv_heads()
        if groups > 1:  # timm expands after the rotation; the tables are per token here: the same rotation
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # timm calls SDPA without a scale: its default, head_dim ** -0.5 (flash_attention's default too)
        return flash_attention(q, k, v, bias=attn_mask, rope=table,
                               dropout_p=self.attn_drop.p if self.training else 0.0)


class FusedEvaAttentionMixin(_FusedRopeAttention):
    """EVA / EVA-02 / DINOv3 ``EvaAttention.forward`` (``timm.models.eva``) on ``flash_attention(rope=...)``."""

    def _fused_call(self, x, rope, attn_mask, is_causal) -> bool:
        # timm reshapes the heads' output to x's width: another attention width is timm's error
        return (super()._fused_call(x, rope, attn_mask, is_causal)
                and self.num_heads * self.head_dim == x.shape[-1])

    def forward(self, x, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        if not self._fused_call(x, rope, attn_mask, is_causal):
            return self._original_forward(x, rope, attn_mask, is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.qkv is not None:  # timm's projection code, as it is
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if getattr(self, "qkv_bias_separate", False):
                    qkv = self.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, rope, attn_mask)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class FusedAttentionRopeMixin(_FusedRopeAttention):
    """timm ``AttentionRope.forward`` (``timm.layers``: EVA blocks with ``attn_type='rope'``, NaFlexViT,
    DeepSeek's ViT; grouped-query attention included) on ``flash_attention(rope=...)``."""

    def forward(self, x, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        if not self._fused_call(x, rope, attn_mask, is_causal):
            return self._original_forward(x, rope, attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, rope, attn_mask)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


_LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm's clamp of Swin V2's logit scale


def _v2_qkv(attn, x):
    """timm Swin V2 ``WindowAttention``'s qkv projection, as it is: (qkv, the bias padded tokens take)."""
    if attn.q_bias is None:
        return attn.qkv(x), None
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        qkv = attn.qkv(x)
        qkv += qkv_bias
    else:
        qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    return qkv, qkv_bias


def _v2_table(attn) -> torch.Tensor:
    """Swin V2's continuous relative-position table, ungathered: 16 * sigmoid(cpb_mlp(coords)), (rows, heads)
    (timm gathers, then takes the sigmoid: elementwise, the same values and gradients)."""
    return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))


def _v2_attention_ok(attn, x, dim: int) -> bool:
    """What timm's Swin V2 ``WindowAttention`` computes on width-``dim`` tokens is what the fused path computes:
    a plain bias-free qkv Linear of 3 * dim outputs, (2wh - 1, 2ww - 1) coordinates, one logit scale per head
    of a dtype the op takes."""
    H = attn.num_heads
    qkv, scale, coords = attn.qkv, attn.logit_scale, attn.relative_coords_table
    if (not isinstance(qkv, nn.Linear) or qkv.bias is not None or qkv.in_features != dim
            or qkv.out_features != 3 * dim or dim % H or qkv.weight.device != x.device):
        return False
    wh, ww = attn.window_size
    if not isinstance(coords, torch.Tensor) or tuple(coords.shape) != (1, 2 * wh - 1, 2 * ww - 1, 2):
        return False
    if (not isinstance(scale, torch.Tensor) or scale.numel() != H or tuple(scale.shape[1:]) != (1,) * (scale.dim() - 1)
            or scale.device != x.device):
        return False
    return (scale.dtype == x.dtype
            or (scale.dtype == torch.float32 and (x.dtype in (torch.float16, torch.bfloat16)
                                                  or _dropin.autocast_on(x.device.type))))


class FusedWindowAttentionV2Mixin(_TimmDropIn):
    """timm Swin V2 ``WindowAttention.forward`` (already partitioned windows: what the block gives it when it
    runs its own code, e.g. ``always_partition`` / ``dynamic_mask``) on ``flash_attention``: q and k
    L2-normalised per head, the per-head logit scale folded into q (scale 1), windows x heads on one axis and
    the 16 * sigmoid table + shift mask as one (1, nW * heads, N, N) bias."""

    def _fused_call(self, x, mask) -> bool:
        if (_dropin.plain_path_reason(x, mask) is not None or not isinstance(x, torch.Tensor) or x.dim() != 3
                or not (getattr(self, "fused_attn", False) or _timm_fused_attn_on())
                or (self.training and self.attn_drop.p > 0)
                or _dropin.observed(getattr(self, "softmax", None), self.attn_drop)):
            return False
        B_, N, C = x.shape
        if not _v2_attention_ok(self, x, C) or not head_dim_supported(C // self.num_heads):
            return False
        if N != self.window_size[0] * self.window_size[1]:
            return False  # timm's own view of the gathered table raises
        if mask is None:
            return True
        return (mask.is_floating_point() and mask.device == x.device and mask.dim() == 3
                and tuple(mask.shape[1:]) == (N, N) and B_ % mask.shape[0] == 0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self._fused_call(x, mask):
            return super().forward(x, mask=mask)
        B_, N, C = x.shape
        H = self.num_heads
        head_dim = C // H
        num_win = 1 if mask is None else mask.shape[0]
        B = B_ // num_win
        qkv = _v2_qkv(self, x)[0].reshape(B, num_win, N, 3, H, head_dim)
        # the per-head logit scale folded into the normalised q (the op's scale is then 1)
        factor = torch.clamp(self.logit_scale, max=_LOGIT_SCALE_MAX).exp().reshape(H, 1)
        if not _dropin.autocast_on(x.device.type):  # under autocast the op takes q in the autocast dtype
            factor = factor.to(qkv.dtype)
        q = F.normalize(qkv[:, :, :, 0], dim=-1) * factor
        k = F.normalize(qkv[:, :, :, 1], dim=-1)
        # (B, nW, N, H, D) -> (B, nW * H, N, D): windows and heads on one axis
        q, k, v = (t.permute(0, 1, 3, 2, 4).reshape(B, num_win * H, N, head_dim) for t in (q, k, qkv[:, :, :, 2]))
        table = self.cpb_mlp(self.relative_coords_table).view(-1, H)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # timm's gather
        bias = (16 * torch.sigmoid(bias)).unsqueeze(0)  # 1, H, N, N
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # nW, H, N, N
        bias = bias.to(q.dtype).reshape(1, num_win * H, N, N)
        out = flash_attention(q, k, v, bias=bias, scale=1.0)
        out = out.view(B, num_win, H, N, head_dim).permute(0, 1, 3, 2, 4).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))


class FusedSwinV2BlockMixin(_TimmDropIn):
    """Swin V2 ``SwinTransformerV2Block._attn`` on ``window_attention(cosine=True)``: timm's qkv projection
    (``q_bias`` / zero ``k_bias`` / ``v_bias``, ``qkv_bias_separate`` as timm adds it), then shift (timm's
    roll-then-pad order), padding (padded tokens take the qkv bias), partition, scaled cosine attention with the
    ``16 * sigmoid(cpb_mlp(...))`` table and the shift mask, reverse inside the op; then ``proj``.
    ``window_attention`` computes the standard relative-position index itself: a module whose
    ``relative_position_index`` buffer is another runs timm's code (the buffer is read when the block is
    patched and again whenever it is another tensor, as after ``set_input_size``)."""

    _checked_index = None  # the relative_position_index buffer _standard_index was computed from
    _standard_index: bool = False

    def _check_index(self) -> None:
        index = getattr(self.attn, "relative_position_index", None)
        self._standard_index = _dropin.standard_relative_position_index(index, tuple(self.attn.window_size))
        self._checked_index = index

    def _fused_call(self, x) -> bool:
        attn = self.attn
        if (_dropin.plain_path_reason(x) is not None or not isinstance(x, torch.Tensor) or x.dim() != 4
                or getattr(self, "always_partition", False) or getattr(self, "dynamic_mask", False)
                or (self.training and attn.attn_drop.p > 0) or not _timm_fused_attn_on()
                or _dropin.observed(attn, getattr(attn, "softmax", None), attn.attn_drop)):
            return False
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        if tuple(attn.window_size) != window or not all(0 <= s < w for s, w in zip(shift, window)):
            return False
        if any(r < w for r, w in zip(x.shape[1:3], window)):
            return False  # timm pads a map smaller than the window up to it (window_attention clips)
        # timm's mask is built for the block's input_resolution: another shifted map is timm's business; a shift
        # without a mask (or a mask without a shift) is not what window_attention does
        if (self.attn_mask is not None) != any(shift):
            return False
        if self.attn_mask is not None and tuple(x.shape[1:3]) != tuple(self.input_resolution):
            return False
        if not _v2_attention_ok(attn, x, x.shape[-1]):
            return False
        if attn.relative_position_index is not self._checked_index:
            self._check_index()
        return self._standard_index

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_call(x):
            return super()._attn(x)
        attn = self.attn
        qkv, qkv_bias = _v2_qkv(attn, x)
        out = window_attention(qkv, num_heads=attn.num_heads, window_size=self.window_size,
                               shift_size=self.shift_size, rel_pos_bias=_v2_table(attn), qkv_bias=qkv_bias,
                               cosine=True, logit_scale=attn.logit_scale)
        return attn.proj_drop(attn.proj(out))


# mixin -> (timm class name, the methods the mixin reimplements): a timm class is fused only when its code
# for each of them is the code of one of the named timm classes (a subclass that overrides one keeps its own)
_MIXINS = (
    (FusedVisionTransformerMixin, ("VisionTransformer", "VisionTransformerDistilled"),
     ("forward_features", "_pos_embed")),
    (FusedSwinBlockMixin, ("SwinTransformerBlock",), ("_attn",)),
    (FusedSwinV2BlockMixin, ("SwinTransformerV2Block",), ("_attn",)),
    (FusedPatchEmbedMixin, ("PatchEmbed",), ("forward",)),
    (FusedWindowAttentionMixin, ("WindowAttention",), ("forward",)),
    (FusedAttentionMixin, ("Attention",), ("forward",)),
    (FusedSamAttentionMixin, ("SamAttention",), ("forward",)),
    (FusedWindowAttentionV2Mixin, ("WindowAttentionV2",), ("forward",)),
    (FusedEvaAttentionMixin, ("EvaAttention",), ("forward",)),
    (FusedAttentionRopeMixin, ("AttentionRope",), ("forward",)),
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
                        "EVA's EvaAttention, AttentionRope, Swin V2's SwinTransformerV2Block and WindowAttention, "
                        "or a subclass that keeps their forward code)")
    return _dropin.extend_class(base, mixin, __name__)


def patch_timm(model: nn.Module) -> nn.Module:
    """Switch timm's Attention, PatchEmbed, VisionTransformer (ViT/DeiT), SwinTransformerBlock,
    WindowAttention, SAM / ViTDet Attention (``samvit_*``), EVA's EvaAttention and AttentionRope (``eva02_*``,
    DINOv3, RoPE ViTs) and Swin V2's SwinTransformerV2Block and WindowAttention (``swinv2_*``) modules of
    ``model`` to their fused versions in place (same parameters, buffers and state_dict keys) and return the
    model. ``unpatch_timm`` undoes it."""
    for module in model.modules():
        cls = type(module)
        if not issubclass(cls, _TimmDropIn) and _mixin_for(cls) is not None:
            module.__class__ = fused_class(cls)
            if isinstance(module, FusedSwinV2BlockMixin):
                module._check_index()
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Switch every fused timm module of ``model`` back to its timm class in place; returns the model."""
    for module in model.modules():
        if isinstance(module, _TimmDropIn):
            module.__class__ = _timm_base(type(module))
            for flag in ("_defer_next_call", "_embed_deferred", "_checked_index", "_standard_index"):
                module.__dict__.pop(flag, None)
    return model


def __getattr__(name: str):
    """``Attention``, ``PatchEmbed``, ``WindowAttention``, ``SwinTransformerBlock``: timm's classes with the
    fused forward (created on first use, so importing vitkernels.nn does not need timm)."""
    if name in ("Attention", "PatchEmbed", "WindowAttention", "SwinTransformerBlock"):
        return fused_class(_timm()[name])
    raise AttributeError(name)
