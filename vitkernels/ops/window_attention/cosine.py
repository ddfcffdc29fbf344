"""Swin V2's scaled cosine attention in plain PyTorch: ``window_attention(..., cosine=True,
logit_scale=...)`` computes the logits

    normalize(q) . normalize(k) * exp(min(logit_scale[head], log(100)))

(``F.normalize``: x / max(||x||, 1e-12) per head, as timm and torchvision do) before the table and the
shift mask. The forward and its explicit adjoint, used by the reference kernels."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

LOGIT_SCALE_MAX = math.log(100.0)  # timm: log(1 / 0.01); torchvision: log(100.0)
NORM_EPS = 1e-12  # F.normalize's default


def logit_scale_factor(logit_scale: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """exp(min(logit_scale, log 100)) per head, (num_heads,) in ``dtype``."""
    return torch.clamp(logit_scale.reshape(num_heads).to(dtype), max=LOGIT_SCALE_MAX).exp()


def cosine_qk(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k (..., heads, N, hd) -> (normalize(q) * the head's logit scale, normalize(k)) in the accumulation
    dtype (fp32; fp64 for fp64 inputs): the pair whose plain dot product (scale 1) is the cosine logits.
    Differentiable."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads = q.shape[-3]
    factor = logit_scale_factor(logit_scale, heads, acc).view(heads, 1, 1)
    q_hat = torch.nn.functional.normalize(q.to(acc), dim=-1, eps=NORM_EPS)
    k_hat = torch.nn.functional.normalize(k.to(acc), dim=-1, eps=NORM_EPS)
    return q_hat * factor, k_hat


def _normalize_backward(grad_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adjoint of x / max(||x||, eps) along the last dim: (g - x_hat (x_hat . g)) / ||x|| where the
    norm exceeds eps, g / eps where it is clamped."""
    norm = x.norm(dim=-1, keepdim=True)
    clamped = norm <= NORM_EPS
    x_hat = x / norm.clamp_min(NORM_EPS)
    projected = (grad_hat - x_hat * (x_hat * grad_hat).sum(dim=-1, keepdim=True)) / norm.clamp_min(NORM_EPS)
    return torch.where(clamped, grad_hat / NORM_EPS, projected)


def cosine_qk_backward(dq_scaled: torch.Tensor, dk_hat: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       logit_scale: torch.Tensor, need_logit_scale: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The adjoint of ``cosine_qk``: from the gradients of (normalize(q) * factor, normalize(k)), returns
    (dq, dk) in the accumulation dtype and d logit_scale (its shape and dtype; zero where the clamp at
    log(100) is active, as torch.clamp's gradient; None unless asked)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads = q.shape[-3]
    factor = logit_scale_factor(logit_scale, heads, acc).view(heads, 1, 1)
    q, k = q.to(acc), k.to(acc)
    q_hat = q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    dq = _normalize_backward(dq_scaled.to(acc) * factor, q)
    dk = _normalize_backward(dk_hat.to(acc), k)
    dscale = None
    if need_logit_scale:
        per_head = (dq_scaled.to(acc) * q_hat).transpose(0, -3).reshape(heads, -1).sum(dim=1)  # d factor
        # torch.clamp's gradient compares with the double bound: float32(log 100) is past it (gradient 0)
        open_clamp = logit_scale.detach().reshape(heads).double() <= LOGIT_SCALE_MAX
        dscale = (per_head * factor.view(heads) * open_clamp).reshape(logit_scale.shape).to(logit_scale.dtype)
    return dq, dk, dscale
