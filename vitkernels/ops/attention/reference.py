"""Pure-PyTorch reference of ``flash_attention``: the semantics every backend must reproduce.

Plain, materialising math (it holds the full (..., Nq, Nk) score matrix); runs on any device and in
fp16/bf16/fp32/fp64. Autograd gives every gradient, bias included.
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_reference(
    q: torch.Tensor,  # ..., Nq, D
    k: torch.Tensor,  # ..., Nk, D
    v: torch.Tensor,  # ..., Nk, D
    bias: Optional[torch.Tensor] = None,  # broadcastable to ..., Nq, Nk
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,  # ..., Nq, Nk bool, True = kept
) -> torch.Tensor:  # ..., Nq, D
    """softmax(q k^T * scale + bias) v, with a row of all -inf logits giving zeros (not NaN).

    Leading dims are free (B, H for the op; B, windows, H for window attention). ``dropout_mask``
    replaces torch's RNG draw so a kernel's own mask can be replayed; kept probabilities are scaled by
    1 / (1 - dropout_p).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # ..., Nq, Nk
    if bias is not None:
        scores = scores + bias
    # Shift by the row max (detached: softmax does not depend on it). A row of all -inf has max -inf;
    # shifting by 0 instead keeps exp() at 0 there rather than NaN.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)  # all -inf row -> zeros
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(probs, dtype=torch.float32) >= dropout_p
        keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        probs = probs * dropout_mask.to(probs.dtype) * keep_scale
    return torch.matmul(probs, v)


def attention_forward_math(q, k, v, bias=None, scale=None):
    """The FlashAttention-2 forward contract, written plainly: returns (out, lse).

    ``lse`` (..., Nq) float32 is the row log-sum-exp of the scaled, biased logits: the one float per
    row a fused forward saves for its backward (-inf for a row of all -inf logits). No dropout.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)  # ..., Nq
    probs = _probs_from_lse(scores, lse)
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return out, lse


def attention_backward_math(dout, q, k, v, bias, out, lse, scale=None, bias_requires_grad=False):
    """The FlashAttention-2 backward, written plainly from the saved (out, lse): returns
    (dq, dk, dv, dbias); dbias is summed over the dims ``bias`` broadcasts (None unless asked)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.float()
    probs = _probs_from_lse(scores, lse)  # recomputed, never stored by a fused forward
    dout = dout.float()
    delta = (dout * out.float()).sum(dim=-1, keepdim=True)  # ..., Nq, 1 = rowsum(dO * O)
    dv = torch.matmul(probs.transpose(-2, -1), dout)
    dprobs = torch.matmul(dout, v.float().transpose(-2, -1))
    dscores = probs * (dprobs - delta)  # softmax backward
    dq = torch.matmul(dscores, k.float()) * scale
    dk = torch.matmul(dscores.transpose(-2, -1), q.float()) * scale
    dbias = None
    if bias is not None and bias_requires_grad:
        dbias = dscores.sum_to_size(bias.shape).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _probs_from_lse(scores, lse):
    # exp(s - lse); a row of all -inf has lse = -inf and gets probability 0, not NaN.
    lse = lse.unsqueeze(-1)
    safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe)
