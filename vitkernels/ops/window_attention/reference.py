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

from vitkernels.ops.attention.reference import attention_reference
from vitkernels.ops.window_attention import geometry


def _pad_with_bias(x: torch.Tensor, pads: Sequence[int], qkv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Pad every spatial dim of (B, *S, 3C) at its end; padded tokens take ``qkv_bias`` (the qkv Linear
    of a zero token), zeros when it is None."""
    if not any(pads):
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
    return x.permute(perm).reshape(B, -1, math.prod(window), C)


def _reverse(windows: torch.Tensor, window: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """(B, nW, N, C) -> (B, *Sp, C), the inverse of ``_partition``."""
    B, C, nd = windows.shape[0], windows.shape[-1], len(window)
    counts = [s // w for s, w in zip(padded, window)]
    x = windows.reshape(B, *counts, *window, C)
    perm = [0]
    for d in range(nd):
        perm += [1 + d, 1 + nd + d]
    return x.permute(perm + [1 + 2 * nd]).reshape(B, *padded, C)


def window_attention_reference(
    qkv: torch.Tensor,  # B, H, W, 3C  or  B, T, H, W, 3C
    num_heads: int,
    window_size: Sequence[int],
    shift_size: Sequence[int],
    rel_pos_bias: Optional[torch.Tensor] = None,  # table_rows(table window), num_heads
    qkv_bias: Optional[torch.Tensor] = None,  # 3C
    scale: Optional[float] = None,
) -> torch.Tensor:  # B, H, W, C  or  B, T, H, W, C
    """Shifted-window attention over a whole map; ``window_size``/``shift_size`` are full tuples as the
    user gave them (clipping to a small map happens here)."""
    nd = qkv.dim() - 2
    B, spatial, c3 = qkv.shape[0], tuple(qkv.shape[1:-1]), qkv.shape[-1]
    channels = c3 // 3
    head_dim = channels // num_heads
    window, shift = geometry.resolve_window_shift(spatial, window_size, shift_size)
    table_window = window if nd == 2 else tuple(window_size)
    padded = geometry.padded_size(spatial, window)
    pads = [p - s for p, s in zip(padded, spatial)]
    dims = tuple(range(1, nd + 1))
    has_shift = any(shift)

    if nd == 2:  # timm: roll the unpadded map, then pad
        x = torch.roll(qkv, [-s for s in shift], dims) if has_shift else qkv
        x = _pad_with_bias(x, pads, qkv_bias)
    else:  # Video Swin: pad, then roll the padded volume
        x = _pad_with_bias(qkv, pads, qkv_bias)
        x = torch.roll(x, [-s for s in shift], dims) if has_shift else x

    n = math.prod(window)
    windows = _partition(x, window)  # B, nW, N, 3C
    nw = windows.shape[1]
    qkv_w = windows.reshape(B, nw, n, 3, num_heads, head_dim).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv_w.unbind(0)  # B, nW, heads, N, hd

    bias = None
    if rel_pos_bias is not None:
        index = geometry.window_bias_index(window, table_window, qkv.device)  # N, N
        bias = rel_pos_bias[index.reshape(-1)].reshape(n, n, num_heads).permute(2, 0, 1)  # heads, N, N
    if has_shift:
        ids = _partition(geometry.shift_region_ids(padded, window, shift, qkv.device)[None, ..., None], window)
        ids = ids[0, :, :, 0]  # nW, N
        mask = torch.zeros(nw, n, n, dtype=qkv.dtype, device=qkv.device)
        mask = mask.masked_fill(ids[:, :, None] != ids[:, None, :], float("-inf"))[:, None]  # nW, 1, N, N
        bias = mask if bias is None else bias + mask

    out = attention_reference(q, k, v, bias, scale if scale is not None else head_dim ** -0.5)
    out = out.permute(0, 1, 3, 2, 4).reshape(B, nw, n, channels)  # B, nW, N, C (heads major)
    x = _reverse(out, window, padded)  # B, *padded, C

    crop = (slice(None),) + tuple(slice(0, s) for s in spatial)
    if nd == 2:  # crop, then roll back
        x = x[crop]
        return torch.roll(x, list(shift), dims) if has_shift else x
    x = torch.roll(x, list(shift), dims) if has_shift else x
    return x[crop]
