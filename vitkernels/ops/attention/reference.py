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
    1 / (1 - dropout_p). fp16/bf16 inputs are computed in fp32 and the result cast back, as SDPA's math
    backend does (the error is then PyTorch's own same-dtype error, not that of fp16 logits/softmax).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype = q.dtype
    acc = _acc_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    if bias is not None:
        bias = bias.to(acc)
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
    return torch.matmul(probs, v).to(out_dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16/fp32 -> fp32; fp64 stays fp64 (never a silent downcast of an fp64 oracle).
    return torch.promote_types(dtype, torch.float32)


def attention_forward_math(q, k, v, bias=None, scale=None):
    """The FlashAttention-2 forward contract, written plainly: returns (out, lse).

    ``lse`` (..., Nq) float32 is the row log-sum-exp of the scaled, biased logits: the one float per
    row a fused forward saves for its backward (-inf for a row of all -inf logits); float64 for fp64
    inputs. No dropout.
    """
    acc = _acc_dtype(q.dtype)
    scores = _scores(q, k, bias, scale, acc)
    lse = torch.logsumexp(scores, dim=-1)  # ..., Nq
    probs = _probs_from_lse(scores, lse)
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)
    return out, lse


def attention_backward_math(dout, q, k, v, bias, out, lse, scale=None, bias_requires_grad=False):
    """The FlashAttention-2 backward, written plainly from the saved (out, lse): returns
    (dq, dk, dv, dbias); dbias is summed over the dims ``bias`` broadcasts (None unless asked)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    acc = _acc_dtype(q.dtype)
    scores = _scores(q, k, bias, scale, acc)
    probs = _probs_from_lse(scores, lse.to(acc))  # recomputed, never stored by a fused forward
    dout = dout.to(acc)
    delta = (dout * out.to(acc)).sum(dim=-1, keepdim=True)  # ..., Nq, 1 = rowsum(dO * O)
    dv = torch.matmul(probs.transpose(-2, -1), dout)
    dprobs = torch.matmul(dout, v.to(acc).transpose(-2, -1))
    dscores = probs * (dprobs - delta)  # softmax backward
    dq = torch.matmul(dscores, k.to(acc)) * scale
    dk = torch.matmul(dscores.transpose(-2, -1), q.to(acc)) * scale
    dbias = None
    if bias is not None and bias_requires_grad:
        dbias = dscores.sum_to_size(bias.shape).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _scores(q, k, bias, scale, acc):
    """q k^T * scale + bias in the accumulation dtype (..., Nq, Nk)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    return scores if bias is None else scores + bias.to(acc)


def _probs_from_lse(scores, lse):
    # exp(s - lse); a row of all -inf has lse = -inf and gets probability 0, not NaN.
    lse = lse.unsqueeze(-1)
    safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    return torch.exp(scores - safe)
