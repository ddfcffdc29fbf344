"""Pure-PyTorch reference of ``window_attention``: the memory shuffles a fused kernel removes, done
plainly (roll, pad, partition, bias + mask, attention, reverse, crop, roll back).

2-D follows timm 1.0.x ``SwinTransformerBlock._attn`` without ``proj`` (roll, then pad); 3-D follows the
Video Swin Transformer block (pad, then roll, shift mask over the padded volume). Shift-masked pairs get
probability exactly 0 (timm adds -100).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vitkernels.ops.attention.reference import attention_backward_math, attention_forward_math, attention_reference
from vitkernels.ops.window_attention import geometry
from vitkernels.ops.window_attention.cosine import cosine_qk, cosine_qk_backward


def _pad_with_bias(x: torch.Tensor, pads: Sequence[int], qkv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Pad every spatial dim of (B, *S, 3C) at its end; padded tokens take ``qkv_bias`` (the qkv Linear
    of a zero token), zeros when it is None."""
    if not any(pads):
        if qkv_bias is not None and qkv_bias.requires_grad and torch.is_grad_enabled():
            # Nothing padded: the output does not depend on qkv_bias, yet it is an input that requires a
            # grad (as in the fused backends' autograd function): keep it in the graph with a zero grad.
            return torch.where(torch.ones((), dtype=torch.bool, device=x.device), x, qkv_bias)
        return x
    spec = [0, 0]
    for p in reversed(pads):
        spec += [0, p]
    out = F.pad(x, spec)
    if qkv_bias is not None:
        inside = torch.zeros(out.shape[1:-1], dtype=x.dtype, device=x.device)
        inside[tuple(slice(0, s) for s in x.shape[1:-1])] = 1
        out = out + (1 - inside).unsqueeze(-1) * qkv_bias
    return out


def _partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, *Sp, C) -> (B, nW, N, C), windows and tokens in row-major order."""
    B, C, nd = x.shape[0], x.shape[-1], len(window)
    split = []
    for s, w in zip(x.shape[1:-1], window):
        split += [s // w, w]
    x = x.reshape(B, *split, C)
    perm = [0] + [1 + 2 * d for d in range(nd)] + [2 + 2 * d for d in range(nd)] + [1 + 2 * nd]
    num_windows = math.prod(split[0::2])  # explicit: B may be 0
    return x.permute(perm).reshape(B, num_windows, math.prod(window), C)


def _reverse(windows: torch.Tensor, window: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """(B, nW, N, C) -> (B, *Sp, C), the inverse of ``_partition``."""
    B, C, nd = windows.shape[0], windows.shape[-1], len(window)
    counts = [s // w for s, w in zip(padded, window)]
    x = windows.reshape(B, *counts, *window, C)
    perm = [0]
    for d in range(nd):
        perm += [1 + d, 1 + nd + d]
    return x.permute(perm + [1 + 2 * nd]).reshape(B, *padded, C)


class _Geometry:
    """Where the windows of one map lie: window and shift used (clipped), padded size, table window."""

    def __init__(self, spatial, window_size, shift_size):
        self.nd = len(spatial)
        self.spatial = tuple(spatial)
        self.window, self.shift = geometry.resolve_window_shift(spatial, window_size, shift_size)
        # 2-D: timm builds the table for the clipped window; 3-D: Video Swin keeps the configured window's
        self.table_window = self.window if self.nd == 2 else tuple(window_size)
        self.padded = geometry.padded_size(spatial, self.window)
        self.pads = [p - s for p, s in zip(self.padded, self.spatial)]
        self.dims = tuple(range(1, self.nd + 1))
        self.has_shift = any(self.shift)
        self.n = math.prod(self.window)


def _to_windows(x: torch.Tensor, geo: _Geometry, pad_value: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, *S, ch) -> (B, nW, N, ch): shift, pad (padded tokens take ``pad_value``, zeros when None),
    partition. 2-D as timm (roll the unpadded map, then pad), 3-D as Video Swin (pad, then roll)."""
    back = [-s for s in geo.shift]
    if geo.nd == 2:
        x = torch.roll(x, back, geo.dims) if geo.has_shift else x
        x = _pad_with_bias(x, geo.pads, pad_value)
    else:
        x = _pad_with_bias(x, geo.pads, pad_value)
        x = torch.roll(x, back, geo.dims) if geo.has_shift else x
    return _partition(x, geo.window)


def _from_windows(windows: torch.Tensor, geo: _Geometry):
    """(B, nW, N, ch) -> ((B, *S, ch), (ch,) sum over the padded positions): the inverse of ``_to_windows``
    for the kept positions, and (its adjoint) the gradient of the padding value."""
    x = _reverse(windows, geo.window, geo.padded)  # B, *padded, ch
    crop = (slice(None),) + tuple(slice(0, s) for s in geo.spatial)
    if geo.nd == 3:
        x = torch.roll(x, list(geo.shift), geo.dims) if geo.has_shift else x
    pad_sum = None
    if any(geo.pads):  # the padded positions as disjoint slabs: past the map in dim d, inside it before d
        slabs = []
        for d, size in enumerate(geo.spatial):
            slab = x[(slice(None),) + crop[1:d + 1] + (slice(size, None),)]
            slabs.append(slab.reshape(-1, x.shape[-1]).sum(dim=0))
        pad_sum = torch.stack(slabs).sum(dim=0)
    x = x[crop]
    if geo.nd == 2:
        x = torch.roll(x, list(geo.shift), geo.dims) if geo.has_shift else x
    return x, pad_sum


def _heads(windows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, nW, N, C) -> (B, nW, heads, N, hd)."""
    B, nw, n, c = windows.shape
    return windows.reshape(B, nw, n, num_heads, c // num_heads).transpose(2, 3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nW, heads, N, hd) -> (B, nW, N, C), heads major."""
    B, nw, heads, n, hd = x.shape
    return x.transpose(2, 3).reshape(B, nw, n, heads * hd)


def _window_bias(table: Optional[torch.Tensor], geo: _Geometry, num_heads: int, dtype, device):
    """The additive bias of every window: table rows (heads, N, N), plus the shift mask (nW, 1, N, N) of
    -inf between regions; None when there is neither."""
    n = geo.n
    bias = None
    if table is not None:
        index = geometry.window_bias_index(geo.window, geo.table_window, device)  # N, N
        bias = table[index.reshape(-1)].reshape(n, n, num_heads).permute(2, 0, 1)  # heads, N, N
    if geo.has_shift:
        ids = _partition(geometry.shift_region_ids(geo.padded, geo.window, geo.shift, device)[None, ..., None],
                         geo.window)[0, :, :, 0]  # nW, N
        mask = torch.zeros(ids.shape[0], n, n, dtype=dtype, device=device)
        mask = mask.masked_fill(ids[:, :, None] != ids[:, None, :], float("-inf"))[:, None]  # nW, 1, N, N
        bias = mask if bias is None else bias + mask
    return bias


def _split_qkv(windows: torch.Tensor, num_heads: int):
    """(B, nW, N, 3C) -> q, k, v each (B, nW, heads, N, hd)."""
    B, nw, n, c3 = windows.shape
    qkv_w = windows.reshape(B, nw, n, 3, num_heads, c3 // (3 * num_heads)).permute(3, 0, 1, 4, 2, 5)
    return qkv_w.unbind(0)


def window_attention_reference(
    qkv: torch.Tensor,  # B, H, W, 3C  or  B, T, H, W, 3C
    num_heads: int,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    rel_pos_bias: Optional[torch.Tensor] = None,  # table_rows(table window), num_heads
    qkv_bias: Optional[torch.Tensor] = None,  # 3C
    scale: Optional[float] = None,
    cosine: bool = False,
    logit_scale: Optional[torch.Tensor] = None,  # num_heads values (cosine)
) -> torch.Tensor:  # B, H, W, C  or  B, T, H, W, C
    """Shifted-window attention over a whole map; ``window_size``/``shift_size`` are full tuples as the
    user gave them (clipping to a small map happens here). ``cosine``: Swin V2's scaled cosine logits
    (``cosine.py``), computed in fp32 (fp64 for fp64 inputs)."""
    geo = _Geometry(qkv.shape[1:-1], window_size, shift_size)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = _split_qkv(_to_windows(qkv, geo, qkv_bias), num_heads)  # B, nW, heads, N, hd
    bias = _window_bias(rel_pos_bias, geo, num_heads, qkv.dtype, qkv.device)
    if cosine:
        q, k = cosine_qk(q, k, logit_scale)
        out = attention_reference(q, k, v.to(q.dtype), bias, 1.0).to(qkv.dtype)
    else:
        out = attention_reference(q, k, v, bias, scale if scale is not None else head_dim ** -0.5)
    return _from_windows(_merge_heads(out), geo)[0]


class ReferenceWindowKernels:
    """window_attention's reference as a forward/backward pair in the kernels' contract
    (``function.WindowAttentionFunction``): windows formed plainly, the FlashAttention-2 math per window,
    nothing replayed. What the reference backend runs under torch.compile."""

    @staticmethod
    def forward(inputs):
        qkv, heads = inputs.qkv, inputs.num_heads
        geo = _Geometry(qkv.shape[1:-1], inputs.window_size, inputs.shift_size)
        q, k, v = _split_qkv(_to_windows(qkv, geo, inputs.qkv_bias), heads)
        bias = _window_bias(inputs.rel_pos_bias, geo, heads, qkv.dtype, qkv.device)
        if inputs.cosine:
            q, k = cosine_qk(q, k, inputs.logit_scale)
            v = v.to(q.dtype)
        out_w, lse = attention_forward_math(q, k, v, bias, inputs.scale)  # lse: B, nW, heads, N
        out = _from_windows(_merge_heads(out_w.to(qkv.dtype)), geo)[0]
        return out, lse.reshape(-1, heads, geo.n), None

    @staticmethod
    def backward(dout, inputs, out, lse, needs, cache=None):
        need_qkv, need_table, need_bias, need_scale = (tuple(needs) + (False,))[:4]
        qkv, table, qkv_bias, heads = inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias, inputs.num_heads
        geo = _Geometry(qkv.shape[1:-1], inputs.window_size, inputs.shift_size)
        q, k, v = _split_qkv(_to_windows(qkv, geo, qkv_bias), heads)
        bias = _window_bias(table, geo, heads, qkv.dtype, qkv.device)
        dout_w = _heads(_to_windows(dout, geo, None), heads)  # the adjoint of the output's window reverse
        out_w = _heads(_to_windows(out, geo, None), heads)  # padded rows 0: their dO is 0 too
        q_in, k_in, v_in = q, k, v
        if inputs.cosine:
            q_in, k_in = cosine_qk(q, k, inputs.logit_scale)
            v_in = v.to(q_in.dtype)
        dq, dk, dv, dbias, _ = attention_backward_math(dout_w, q_in, k_in, v_in, bias, out_w,
                                                       lse.view(q.shape[:-1]), inputs.scale,
                                                       bias_requires_grad=need_table and table is not None)
        dscale = None
        if inputs.cosine:
            dq, dk, dscale = cosine_qk_backward(dq, dk, q, k, inputs.logit_scale, need_scale)
            dq, dk, dv = dq.to(qkv.dtype), dk.to(qkv.dtype), dv.to(qkv.dtype)
        dqkv = dqkv_bias = dtable = None
        if need_qkv or need_bias:
            dwin = torch.cat([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], dim=-1)  # B, nW, N, 3C
            dqkv, pad_sum = _from_windows(dwin, geo)
            if need_bias:
                dqkv_bias = (pad_sum if pad_sum is not None else torch.zeros_like(qkv_bias)).to(qkv_bias.dtype)
        if need_table and table is not None:
            dtable = geometry.sum_by_table_row(dbias.sum_to_size(heads, geo.n, geo.n), geo.window,
                                               geo.table_window).to(table.dtype)
        return (dqkv.contiguous() if need_qkv else None), dtable, dqkv_bias, dscale
