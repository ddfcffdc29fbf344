"""torchvision drop-ins: ``patch_torchvision(model)`` switches a built torchvision model's modules to
vitkernels' fused versions in place (``unpatch_torchvision(model)`` switches them back). Same parameters,
buffers and state_dict keys: each fused module is torchvision's own class with a mixin in front.

What is fused (torchvision's own code runs wherever the fused path would not give its result):
- ``vit_*`` (``VisionTransformer``): patchify + projection + class token + position embedding in one
  ``patch_embed`` call; the encoder blocks' ``nn.MultiheadAttention`` become ``vitkernels.nn.
  MultiheadAttention`` (``replace_mha``: fused for ``need_weights=False``, as torchvision calls it).
  torchvision's code for a conv stem (``conv_stem_configs``), an image of another size than
  ``image_size`` (torchvision's assert), hooks on ``conv_proj`` or ``encoder``, a subclass with its own
  ``forward`` / ``_process_input``.
- ``swin_t/s/b`` (``ShiftedWindowAttention``): qkv projection -> ``window_attention`` (shift, padding,
  partition, relative-position bias, shift mask, reverse inside) -> proj. A map that is not a multiple of
  the window runs torchvision's order (pad, then shift) as a one-frame 3-D map. torchvision's code for a
  map smaller than the window (torchvision pads it up to the window; window_attention clips the window to
  the map, as timm and Video Swin do), attention dropout in training.
- ``swin_v2_t/s/b`` (``ShiftedWindowAttentionV2``): the same, with ``window_attention(cosine=True)``: scaled
  cosine attention with ``logit_scale``, the ``16 * sigmoid(cpb_mlp(relative_coords_table))`` table, and the
  qkv bias with its k part zeroed in a clone (torchvision's own lines: the k bias gets no gradient). The shift
  mask is exactly -inf where torchvision adds -100 (cosine logits are bounded by the head's scale s <= 100:
  the masked weights are below N e^-(84 - 2s), e^-64 at the initial s = 10). torchvision's code for the
  cases above and a ``logit_scale`` of another dtype than the op takes.
- ``swin3d_t/s/b`` (``ShiftedWindowAttention3d``, ``PatchEmbed3d``): ``window_attention`` on the 3-D map
  (padding, clipping of windows larger than the map and the shift mask as torchvision does them), and the
  tubelet projection as one ``patch_embed`` call when no padding is needed.
- ``mvit_v1_b`` / ``mvit_v2_s`` (``MultiscaleAttention``): torchvision's qkv projection and q / k / v pooling
  (pool convs, their norms, the class token), then one ``flash_attention`` for ``matmul(scaler * q, k^T)``,
  MViTv2's decomposed relative-position bias (``_add_rel_pos``: ``decomposed_rel_pos`` of the pooled
  queries after the class token, ``prefix=1``), the softmax and ``@ v``; then the pooling residual
  (``_add_shortcut``, out of place), and ``project``. torchvision's code for a token count that is not
  class token + ``thw``, pools whose output grid cannot be told before they run (another pool module or
  Pool code), tables of another width or dtype than the heads. The table rows are torchvision's
  (``index_rule="torchvision"``: its float32 rounding of stretched distances, e.g. 16 queries against 6
  pooled keys).
- Every encoder / Swin block gains gradient checkpointing: ``model.set_grad_checkpointing(True)`` on the
  patched ``VisionTransformer``, ``SwinTransformer`` or ``SwinTransformer3d`` recomputes each block in the
  backward pass (``torch.utils.checkpoint``, non-reentrant; dropout masks replayed from the saved RNG
  state), which torchvision's models do not offer themselves.

As for the timm drop-ins, torchvision's code runs under FX symbolic tracing (torchvision's feature
extraction), ``torch.jit.trace`` and ONNX export; ``torch.jit.script`` raises an error naming
``unpatch_torchvision``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as _checkpoint

from vitkernels.nn import _dropin
from vitkernels.nn.multihead_attention import replace_mha, restore_mha
from vitkernels.ops.attention import flash_attention
from vitkernels.ops.attention.checks import head_dim_supported
from vitkernels.ops.attention.rel_pos import decomposed_rel_pos
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.window_attention import window_attention


def _torchvision():
    try:
        from torchvision.models import swin_transformer as swin2d
        from torchvision.models import vision_transformer as vit
        from torchvision.models.video import mvit
        from torchvision.models.video import swin_transformer as swin3d
    except ImportError as exc:  # pragma: no cover - exercised only without torchvision
        raise ImportError(f"vitkernels' torchvision drop-ins need torchvision installed ({exc})") from exc
    return dict(VisionTransformer=vit.VisionTransformer, Encoder=vit.Encoder, EncoderBlock=vit.EncoderBlock,
                SwinTransformer=swin2d.SwinTransformer, SwinTransformerBlock=swin2d.SwinTransformerBlock,
                ShiftedWindowAttention=swin2d.ShiftedWindowAttention,
                ShiftedWindowAttentionV2=swin2d.ShiftedWindowAttentionV2,
                SwinTransformer3d=swin3d.SwinTransformer3d, ShiftedWindowAttention3d=swin3d.ShiftedWindowAttention3d,
                PatchEmbed3d=swin3d.PatchEmbed3d, MultiscaleAttention=mvit.MultiscaleAttention, Pool=mvit.Pool)


class _TorchvisionDropIn:
    """Module-level behaviour of every fused torchvision class: pickles and copies as itself (rebuilt from
    the torchvision class it extends), refuses TorchScript by name."""

    def __reduce_ex__(self, protocol):
        base = _torchvision_base(type(self))
        return _rebuild, (base.__module__, base.__qualname__), self.__getstate__()

    def __prepare_scriptable__(self):
        raise _dropin.script_error(self, "torchvision", "vitkernels.nn.unpatch_torchvision")


def _rebuild(module_name: str, qualname: str):
    cls = fused_class(_dropin.import_qualified(module_name, qualname))
    return cls.__new__(cls)


def _torchvision_base(cls: type) -> type:
    return _dropin.original_class(cls, _TorchvisionDropIn)


def _same_device_and_dtype(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused path's inputs are what torchvision's conv / linear would accept without an error."""
    return x.device == weight.device and (x.dtype == weight.dtype or _dropin.autocast_on(x.device.type))


def _projection_is_patchify(proj: nn.Module, conv_type: type, in_channels: int) -> bool:
    """``proj`` is a plain conv with kernel == stride, no padding / dilation / groups (what patch_embed is)."""
    return (type(proj) is conv_type and tuple(proj.kernel_size) == tuple(proj.stride)
            and all(p == 0 for p in proj.padding) and all(d == 1 for d in proj.dilation)
            and proj.groups == 1 and proj.padding_mode == "zeros" and proj.in_channels == in_channels)


class GradCheckpointBlockMixin(_TorchvisionDropIn):
    """An encoder / Swin block whose forward is recomputed in the backward pass when ``grad_checkpointing``
    is set (by the model's ``set_grad_checkpointing``). The block's own forward runs, whatever it is."""

    grad_checkpointing: bool = False

    def forward(self, *args, **kwargs):
        if (self.grad_checkpointing and torch.is_grad_enabled() and self.training
                and _dropin.plain_path_reason(*args, *kwargs.values()) is None):
            return _checkpoint.checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


class GradCheckpointModelMixin(_TorchvisionDropIn):
    """``set_grad_checkpointing(enable=True)`` for the whole model (timm's name and signature)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, GradCheckpointBlockMixin):
                module.grad_checkpointing = bool(enable)


class FusedVisionTransformerMixin(GradCheckpointModelMixin):
    """torchvision ViT: patchify + projection + class token + positions in one ``patch_embed`` call."""

    def _fused_embed_ok(self, x) -> bool:
        if _dropin.plain_path_reason(x) is not None or not isinstance(x, torch.Tensor) or x.dim() != 4:
            return False
        encoder, tv = self.encoder, _torchvision()
        if (type(encoder).forward is not tv["Encoder"].forward
                or not _projection_is_patchify(self.conv_proj, nn.Conv2d, x.shape[1])
                or _dropin.observed(self.conv_proj, encoder)):
            return False
        if tuple(self.conv_proj.kernel_size) != (self.patch_size, self.patch_size):
            return False
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):  # torchvision asserts the size
            return False
        n_patches = (self.image_size // self.patch_size) ** 2
        if tuple(encoder.pos_embedding.shape) != (1, n_patches + 1, self.hidden_dim):
            return False
        return _same_device_and_dtype(x, self.conv_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_embed_ok(x):
            return super().forward(x)
        encoder = self.encoder
        if _dropin.autocast_on(x.device.type):
            # torchvision adds the fp32 class token and positions to the autocast-dtype projection: the
            # tokens are fp32 from there on. The projection alone runs fused; cat and add are torchvision's.
            tokens = patch_embed(x, self.conv_proj.weight, self.conv_proj.bias)
            x = encoder(torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1))
            return self.heads(x[:, 0])
        tokens = patch_embed(x, self.conv_proj.weight, self.conv_proj.bias, pos_embed=encoder.pos_embedding,
                             prefix_tokens=self.class_token)
        x = encoder.ln(encoder.layers(encoder.dropout(tokens)))
        return self.heads(x[:, 0])


class FusedShiftedWindowAttentionMixin(_TorchvisionDropIn):
    """torchvision Swin ``ShiftedWindowAttention`` (2-D) and ``ShiftedWindowAttention3d`` on
    ``window_attention``. ``window_attention`` computes the standard relative-position index itself: a
    module whose ``relative_position_index`` buffer is another (a state_dict that carries one: torchvision
    saves it) runs torchvision's code. The buffer is checked when the module is patched and after every
    ``load_state_dict``, not per call."""

    _standard_index: bool = False

    def _check_index(self) -> None:
        self._standard_index = _dropin.standard_relative_position_index(
            getattr(self, "relative_position_index", None), self.window_size)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._check_index()

    def _fused_call(self, x) -> bool:
        if (_dropin.plain_path_reason(x) is not None or not isinstance(x, torch.Tensor)
                or not self._standard_index):
            return False
        spatial_dims = len(self.window_size)
        if x.dim() != spatial_dims + 2 or x.shape[-1] != self.qkv.in_features or x.shape[-1] % self.num_heads:
            return False
        if self.training and self.attention_dropout > 0:
            return False
        if not head_dim_supported(x.shape[-1] // self.num_heads):
            return False
        window, shift = list(self.window_size), list(self.shift_size)
        if len(shift) != spatial_dims or not all(0 <= s < w for s, w in zip(shift, window)):
            return False
        if spatial_dims == 2 and any(r < w for r, w in zip(x.shape[1:3], window)):
            return False  # torchvision pads a map smaller than the window up to it (window_attention clips)
        return self._table_ok() and _same_device_and_dtype(x, self.qkv.weight)

    def _table_ok(self) -> bool:
        rows = 1
        for w in self.window_size:
            rows *= 2 * w - 1
        return tuple(self.relative_position_bias_table.shape) == (rows, self.num_heads)

    def _attention_args(self):
        """(the qkv bias, window_attention's table / scale arguments) for a map of head dim ``head_dim``."""
        head_dim = self.qkv.in_features // self.num_heads
        return self.qkv.bias, dict(rel_pos_bias=self.relative_position_bias_table, scale=head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_call(x):
            return super().forward(x)
        qkv_bias, table_args = self._attention_args()
        # torchvision applies qkv to the zero-padded map: padded tokens are qkv.bias, as window_attention takes them
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        window, shift = tuple(self.window_size), tuple(self.shift_size)
        pad_then_shift = len(window) == 2 and any(r % w for r, w in zip(x.shape[1:3], window))
        if pad_then_shift:
            # torchvision's 2-D order (pad, then shift) is the 3-D op's: a map of one frame, windows (1, wh, ww);
            # the 2-D table is the 3-D table of that window (the frame term has one row)
            qkv, window, shift = qkv.unsqueeze(1), (1, *window), (0, *shift)
        out = window_attention(qkv, num_heads=self.num_heads, window_size=window, shift_size=shift,
                               qkv_bias=qkv_bias, **table_args)
        out = F.linear(out.squeeze(1) if pad_then_shift else out, self.proj.weight, self.proj.bias)
        return F.dropout(out, p=self.dropout, training=self.training)


class FusedShiftedWindowAttentionV2Mixin(FusedShiftedWindowAttentionMixin):
    """torchvision Swin V2 ``ShiftedWindowAttentionV2`` (``swin_v2_t/s/b``) on ``window_attention(cosine=True)``:
    the qkv bias with its k part zeroed (in a clone, as torchvision does it: the k bias gets no gradient), the
    ``16 * sigmoid(cpb_mlp(relative_coords_table))`` table and ``logit_scale`` as they are; padding, shift,
    clipping and the relative-position index checks as for ``ShiftedWindowAttention``."""

    def _table_ok(self) -> bool:
        wh, ww = self.window_size
        coords, scale, H = self.relative_coords_table, self.logit_scale, self.num_heads
        if not isinstance(coords, torch.Tensor) or tuple(coords.shape) != (1, 2 * wh - 1, 2 * ww - 1, 2):
            return False
        if (not isinstance(scale, torch.Tensor) or scale.numel() != H
                or tuple(scale.shape[1:]) != (1,) * (scale.dim() - 1)):
            return False
        weight = self.qkv.weight
        return scale.device == weight.device and scale.dtype in (weight.dtype, torch.float32)

    def _fused_call(self, x) -> bool:
        if not super()._fused_call(x):
            return False
        # logit_scale: the op takes fp32 (fp16 / bf16 maps, autocast) or the map's dtype
        scale = self.logit_scale
        return (scale.dtype == x.dtype or (scale.dtype == torch.float32 and (
            x.dtype in (torch.float16, torch.bfloat16) or _dropin.autocast_on(x.device.type))))

    def _attention_args(self):
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        qkv_bias = self.qkv.bias
        if qkv_bias is not None:  # torchvision's own lines
            qkv_bias = qkv_bias.clone()
            length = qkv_bias.numel() // 3
            qkv_bias[length: 2 * length].zero_()
        return qkv_bias, dict(rel_pos_bias=table, cosine=True, logit_scale=self.logit_scale)


class FusedPatchEmbed3dMixin(_TorchvisionDropIn):
    """torchvision Video Swin ``PatchEmbed3d`` (tubelets, (B, T, H, W, C) out) on ``patch_embed``."""

    def _fusable(self, x) -> bool:
        if (_dropin.plain_path_reason(x) is not None or not isinstance(x, torch.Tensor) or x.dim() != 5
                or not _projection_is_patchify(self.proj, nn.Conv3d, x.shape[1]) or _dropin.observed(self.proj)):
            return False
        if tuple(self.proj.kernel_size) != tuple(self.tuple_patch_size):
            return False
        if any(r % p for r, p in zip(x.shape[2:], self.tuple_patch_size)):  # torchvision pads first
            return False
        return _same_device_and_dtype(x, self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return super().forward(x)
        grid = [r // p for r, p in zip(x.shape[2:], self.tuple_patch_size)]
        tokens = patch_embed(x, self.proj.weight, self.proj.bias)  # B, T*H*W, C
        return self.norm(tokens.view(x.shape[0], *grid, tokens.shape[-1]))


def _pooled_grid(pool: Optional[nn.Module], thw: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """The (T, H, W) torchvision's ``Pool`` returns for a ``thw`` grid, told before it runs (a Conv3d pool,
    torchvision's Pool code); ``thw`` itself without a pool; None when it cannot be told."""
    if pool is None:
        return tuple(thw)
    conv = getattr(pool, "pool", None)
    if type(pool).forward is not _torchvision()["Pool"].forward or type(conv) is not nn.Conv3d \
            or isinstance(conv.padding, str):
        return None
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(thw, conv.kernel_size, conv.stride, conv.padding, conv.dilation))


def _pooled_residual(out: torch.Tensor, q: torch.Tensor, with_cls_embed: bool) -> torch.Tensor:
    """torchvision's ``_add_shortcut(out, q, with_cls_embed)`` out of place (flash_attention saved ``out`` for
    its backward): ``out + q``, or ``out + q`` after the class token; in ``out``'s dtype, as the in-place
    add gives it."""
    res = torch.add(out, q).to(out.dtype)
    if not with_cls_embed:
        res[:, :, :1] = out[:, :, :1]
    return res


def _int_grid(thw) -> bool:
    return (isinstance(thw, (tuple, list)) and len(thw) == 3
            and all(isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool) for n in thw))


class FusedMultiscaleAttentionMixin(_TorchvisionDropIn):
    """torchvision MViT ``MultiscaleAttention``: torchvision's projection and pooling, then one
    ``flash_attention`` (with MViTv2's decomposed relative positions after the class token), the pooling
    residual out of place, and the output projection."""

    def _rel_tables(self):
        tables = (self.rel_pos_t, self.rel_pos_h, self.rel_pos_w)
        return tables if all(t is not None for t in tables) else None  # torchvision's own condition

    def _fused_call(self, x, thw) -> bool:
        if _dropin.plain_path_reason(x, *(thw if isinstance(thw, (tuple, list)) else (thw,))) is not None:
            return False
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not _int_grid(thw):
            return False
        if not head_dim_supported(self.head_dim) or not isinstance(self.qkv, nn.Linear) \
                or self.qkv.out_features != 3 * self.num_heads * self.head_dim:
            return False  # a wrapped qkv (an adapter, a quantized module): torchvision's code calls it as it is
        if x.shape[1] != 1 + math.prod(thw):  # class token + the thw grid, else torchvision's code (and errors)
            return False
        tables = self._rel_tables()
        if tables is None:
            return True
        if any(t.dim() != 2 or t.shape[1] != self.head_dim or t.device != x.device for t in tables):
            return False
        if not (_dropin.autocast_on(x.device.type) or all(t.dtype == self.qkv.weight.dtype for t in tables)):
            return False  # torchvision's einsum rejects them (decomposed_rel_pos would cast)
        k_thw = _pooled_grid(self.pool_k, thw)  # v must be pooled to k's grid: else torchvision's code (error)
        return _pooled_grid(self.pool_q, thw) is not None and k_thw is not None \
            and _pooled_grid(self.pool_v, thw) == k_thw

    def forward(self, x: torch.Tensor, thw: Tuple[int, int, int]) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        if not self._fused_call(x, thw):
            return super().forward(x, thw)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(dim=2)
        if self.pool_k is not None:
            k, k_thw = self.pool_k(k, thw)
        else:
            k_thw = thw
        if self.pool_v is not None:
            v = self.pool_v(v, thw)[0]
        if self.pool_q is not None:
            q, thw = self.pool_q(q, thw)
        tables = self._rel_tables()
        rel_pos = (decomposed_rel_pos(q, thw, k_thw, tables[1], tables[2], tables[0], prefix=1,
                                      index_rule="torchvision") if tables is not None else None)
        # q, k, v have a unit last stride from torchvision's projection and pools; a pool of another kind
        # (a subclass) might not: copied then, as torchvision's matmul would read it anyway
        out = flash_attention(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)), rel_pos=rel_pos,
                              scale=self.scaler)
        if self.residual_pool:
            out = _pooled_residual(out, q, self.residual_with_cls_embed)
        out = out.transpose(1, 2).reshape(B, -1, self.output_dim)
        return self.project(out), thw


# mixin -> (torchvision class names, the methods the mixin reimplements): a class is fused only when its code
# for each of them is torchvision's (a subclass that overrides one keeps its own). The checkpointing mixins
# reimplement nothing (they wrap whatever forward the class has).
_MIXINS = (
    (FusedVisionTransformerMixin, ("VisionTransformer",), ("forward", "_process_input")),
    (GradCheckpointModelMixin, ("SwinTransformer",), ()),
    (GradCheckpointModelMixin, ("SwinTransformer3d",), ()),
    (GradCheckpointBlockMixin, ("EncoderBlock",), ()),
    (GradCheckpointBlockMixin, ("SwinTransformerBlock",), ()),
    # Swin V2 first: a ShiftedWindowAttention subclass (with another forward), the V2 entry is the one for it
    (FusedShiftedWindowAttentionV2Mixin, ("ShiftedWindowAttentionV2",),
     ("forward", "get_relative_position_bias", "define_relative_position_index")),
    (FusedShiftedWindowAttentionMixin, ("ShiftedWindowAttention",),
     ("forward", "get_relative_position_bias", "define_relative_position_index")),
    (FusedShiftedWindowAttentionMixin, ("ShiftedWindowAttention3d",),
     ("forward", "get_relative_position_bias", "define_relative_position_index")),
    (FusedPatchEmbed3dMixin, ("PatchEmbed3d",), ("forward",)),
    (FusedMultiscaleAttentionMixin, ("MultiscaleAttention",), ("forward",)),
)


def _mixin_for(cls: type):
    return _dropin.select_mixin(cls, _MIXINS, _torchvision())


@functools.lru_cache(maxsize=None)
def fused_class(base: type) -> type:
    """torchvision class -> the same class with vitkernels' fused forward in front of it."""
    mixin = _mixin_for(base)
    if mixin is None:
        raise TypeError(f"no vitkernels drop-in for {base.__module__}.{base.__qualname__} (torchvision's "
                        "VisionTransformer, EncoderBlock, SwinTransformer(3d), SwinTransformerBlock(V2), "
                        "ShiftedWindowAttention(3d), ShiftedWindowAttentionV2, PatchEmbed3d, MultiscaleAttention, "
                        "or a subclass that keeps their forward code)")
    return _dropin.extend_class(base, mixin, __name__)


def patch_torchvision(model: nn.Module) -> nn.Module:
    """Switch ``model``'s torchvision ViT / Swin / Video Swin / MViT modules (and every
    ``nn.MultiheadAttention``) to their fused versions in place (same parameters, buffers and state_dict keys)
    and return the model. ``unpatch_torchvision`` undoes it."""
    if type(model) is not nn.MultiheadAttention:  # replace_mha takes the model around one
        replace_mha(model)
    for module in model.modules():
        cls = type(module)
        if not issubclass(cls, _TorchvisionDropIn) and _mixin_for(cls) is not None:
            module.__class__ = fused_class(cls)
            if isinstance(module, FusedShiftedWindowAttentionMixin):
                module._check_index()
    return model


def unpatch_torchvision(model: nn.Module) -> nn.Module:
    """Switch every fused torchvision module of ``model`` back to its torchvision class (and vitkernels'
    ``MultiheadAttention`` back to torch's) in place; returns the model."""
    for module in model.modules():
        if isinstance(module, _TorchvisionDropIn):
            module.__class__ = _torchvision_base(type(module))
            for flag in ("grad_checkpointing", "_standard_index"):
                module.__dict__.pop(flag, None)
    return restore_mha(model)
