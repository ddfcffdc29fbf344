"""Pure-PyTorch reference of ``flash_attention``: the semantics every backend must reproduce.

Plain, materialising math (it holds the full (..., Nq, Nk) score matrix); runs on any device and in
fp16/bf16/fp32/fp64. Autograd gives every gradient, bias included.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitkernels.ops.attention.function import draw_dropout_seed, no_dropout_seed


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
    if scores.shape[-1] == 0:  # no keys: every row is "all -inf" (SDPA's zeros); amax needs a key
        return torch.matmul(scores, v).to(out_dtype)
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


def attention_forward_math(q, k, v, bias=None, scale=None, dropout_p=0.0, dropout_mask=None):
    """The FlashAttention-2 forward contract, written plainly: returns (out, lse).

    ``lse`` (..., Nq) float32 is the row log-sum-exp of the scaled, biased logits: the one float per
    row a fused forward saves for its backward (-inf for a row of all -inf logits); float64 for fp64
    inputs. Dropout (``dropout_mask``: True = kept) acts on the probabilities after the softmax, so lse
    does not see it.
    """
    acc = _acc_dtype(q.dtype)
    scores = _scores(q, k, bias, scale, acc)
    lse = torch.logsumexp(scores, dim=-1)  # ..., Nq
    probs = _dropped(_probs_from_lse(scores, lse), dropout_p, dropout_mask)
    out = torch.matmul(probs, v.to(acc)).to(q.dtype)
    return out, lse


def attention_backward_math(dout, q, k, v, bias, out, lse, scale=None, bias_requires_grad=False, dropout_p=0.0,
                            dropout_mask=None):
    """The FlashAttention-2 backward, written plainly from the saved (out, lse) and the forward's dropout
    mask: returns (dq, dk, dv, dbias); dbias is summed over the dims ``bias`` broadcasts (None unless
    asked)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    acc = _acc_dtype(q.dtype)
    scores = _scores(q, k, bias, scale, acc)
    probs = _probs_from_lse(scores, lse.to(acc))  # recomputed, never stored by a fused forward
    dout = dout.to(acc)
    delta = (dout * out.to(acc)).sum(dim=-1, keepdim=True)  # ..., Nq, 1 = rowsum(dO * O) = rowsum(P * dP)
    dv = torch.matmul(_dropped(probs, dropout_p, dropout_mask).transpose(-2, -1), dout)
    dprobs = _dropped(torch.matmul(dout, v.to(acc).transpose(-2, -1)), dropout_p, dropout_mask)
    dscores = probs * (dprobs - delta)  # softmax backward
    dq = torch.matmul(dscores, k.to(acc)) * scale
    dk = torch.matmul(dscores.transpose(-2, -1), q.to(acc)) * scale
    dbias = None
    if bias is not None and bias_requires_grad:
        dbias = dscores.sum_to_size(bias.shape).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _dropped(probs, dropout_p, dropout_mask):
    """Kept entries scaled by 1 / (1 - p), dropped ones 0 (everything at p = 1)."""
    if dropout_p <= 0.0:
        return probs
    keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return probs * dropout_mask.to(probs.dtype) * keep_scale


def reference_dropout_mask(rng: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask (True = kept) the reference kernels draw for a dropout seed tensor ``rng`` (int64
    [seed, offset], from ``draw_dropout_seed``): uniforms >= p from a generator seeded with it, so the
    backward draws the forward's mask again from the saved seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng[0]) ^ int(rng[1]))  # one host read per call: the reference is not fast
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32) >= dropout_p


class ReferenceAttentionKernels:
    """flash_attention's reference as a forward/backward pair in the kernels' contract
    (``function.AttentionFunction``): the plain FlashAttention-2 math, nothing replayed. What the
    reference backend runs under torch.compile."""

    @staticmethod
    def forward(q, k, v, bias, scale, dropout_p):
        rng = draw_dropout_seed(q.device) if dropout_p > 0 else no_dropout_seed(q.device)
        mask = _mask(rng, q, k, dropout_p)
        out, lse = attention_forward_math(q, k, v, bias, scale, dropout_p, mask)
        return out, lse, rng

    @staticmethod
    def backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad):
        return attention_backward_math(dout, q, k, v, bias, out, lse, scale, bias_requires_grad, dropout_p,
                                       _mask(rng, q, k, dropout_p))


def _mask(rng, q, k, dropout_p):
    if dropout_p <= 0.0:
        return None
    shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], k.shape[-2])
    return reference_dropout_mask(rng, shape, dropout_p, q.device)


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
