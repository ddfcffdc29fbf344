"""Rotary position embedding math of ``flash_attention(..., rope=...)`` in plain PyTorch: the reference
rotation (timm's ``apply_rot_embed``) and its adjoint, shared by the reference backend and by the fused
backends' learnable-table path (where the kernels hand back the gradients of the rotated q and k)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rotate_pairs(x: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """timm's ``rot`` (interleaved: [-x1, x0, -x3, x2, ...]) or ``rope_rotate_half`` ([-x2, x1]) on the last
    dim. Its adjoint is its negative (a signed permutation with R^T = -R)."""
    if rotate_half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x (B, H, N, D) with rows ``>= rope.prefix`` rotated: ``x * cos + rotate(x) * sin`` in the promoted
    dtype of x and the tables, rounded to x's dtype once (timm's ``apply_rot_embed``). Differentiable."""
    p = rope.prefix
    tail = x[:, :, p:]
    rotated = (tail * rope.cos + rotate_pairs(tail, rope.rotate_half) * rope.sin).to(x.dtype)
    return rotated if p == 0 else torch.cat([x[:, :, :p], rotated], dim=2)


def rope_backward(grad_rot: torch.Tensor, x: torch.Tensor, rope,
                  tables_need_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The adjoint of ``apply_rope``: from the gradient of the rotated x (B, H, N, D), returns (dx in x's
    dtype, d cos, d sin) with d cos = g * x and d sin = g * rotate(x) summed over the dims the tables
    broadcast (float32 for fp16/bf16/fp32; None unless ``tables_need_grad``). Computed in the tables'
    promoted dtype; the prefix rows pass through."""
    p = rope.prefix
    acc = torch.promote_types(torch.promote_types(x.dtype, rope.cos.dtype), torch.float32)
    g = grad_rot[:, :, p:].to(acc)
    cos, sin = rope.cos.to(acc), rope.sin.to(acc)
    dx_tail = g * cos - rotate_pairs(g * sin, rope.rotate_half)
    dx = dx_tail.to(x.dtype) if p == 0 else torch.cat([grad_rot[:, :, :p].to(x.dtype), dx_tail.to(x.dtype)], dim=2)
    if not tables_need_grad:
        return dx, None, None
    tail = x[:, :, p:].to(acc)
    dcos = (g * tail).sum_to_size(rope.cos.shape)
    dsin = (g * rotate_pairs(tail, rope.rotate_half)).sum_to_size(rope.sin.shape)
    return dx, dcos, dsin


def qk_rope_backward(dq_rot, dk_rot, q, k, rope, tables_need_grad: bool):
    """``rope_backward`` for q and k sharing one table: (dq, dk, (d cos, d sin) in the tables' dtype or
    None)."""
    dq, dcos_q, dsin_q = rope_backward(dq_rot, q, rope, tables_need_grad)
    dk, dcos_k, dsin_k = rope_backward(dk_rot, k, rope, tables_need_grad)
    if not tables_need_grad:
        return dq, dk, None
    return dq, dk, ((dcos_q + dcos_k).to(rope.cos.dtype), (dsin_q + dsin_k).to(rope.sin.dtype))
