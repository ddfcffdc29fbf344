"""Pure-PyTorch reference of ``flash_attention``: the semantics every backend must reproduce.

Plain, materialising math (it holds the full (..., Nq, Nk) score matrix); runs on any device and in
fp16/bf16/fp32/fp64. Autograd gives every gradient, bias included.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vitkernels.ops.attention.function import draw_dropout_seed, no_dropout_seed
from vitkernels.ops.attention.rope import apply_rope, qk_rope_backward


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


def rel_pos_dense(rel_pos, n_q: int, n_k: int) -> torch.Tensor:
    """The (B, H, Nq, Nk) bias a ``RelPos`` stands for (what the kernels never form): the per-axis terms
    broadcast over the key grid, zero on the ``prefix`` rows and columns. Differentiable."""
    terms = rel_pos.terms
    grid = rel_pos.key_grid
    B, H, rows = terms[0].shape[:3]
    t_term = rel_pos.rel_t if rel_pos.rel_t is not None else terms[0].new_zeros(B, H, rows, 1)
    dense = (t_term[..., :, None, None] + rel_pos.rel_h[..., None, :, None]
             + rel_pos.rel_w[..., None, None, :]).reshape(B, H, rows, grid[0] * grid[1] * grid[2])
    p = rel_pos.prefix
    if p:
        dense = torch.nn.functional.pad(dense, (p, 0, p, 0))
    return dense.reshape(B, H, n_q, n_k)


def rel_pos_grads(dscores: torch.Tensor, rel_pos) -> Tuple[Optional[torch.Tensor], ...]:
    """(d rel_h, d rel_w, d rel_t or None) from dS (B, H, Nq, Nk): dS summed over the keys of each key-grid
    row / column / frame, in each term's dtype."""
    B, H = dscores.shape[:2]
    p = rel_pos.prefix
    kt, kh, kw = rel_pos.key_grid
    ds = dscores[:, :, p:, p:].reshape(B, H, -1, kt, kh, kw)
    d_h = ds.sum(dim=(3, 5)).to(rel_pos.rel_h.dtype)
    d_w = ds.sum(dim=(3, 4)).to(rel_pos.rel_w.dtype)
    d_t = ds.sum(dim=(4, 5)).to(rel_pos.rel_t.dtype) if rel_pos.rel_t is not None else None
    return d_h, d_w, d_t


def with_rel_pos(bias: Optional[torch.Tensor], rel_pos, n_q: int, n_k: int) -> Optional[torch.Tensor]:
    """``bias`` plus the dense form of ``rel_pos`` (the bias the reference math sees); ``bias`` without one."""
    if rel_pos is None:
        return bias
    dense = rel_pos_dense(rel_pos, n_q, n_k)
    return dense if bias is None else bias + dense


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
                            dropout_mask=None, rel_pos=None, rel_requires_grad=False):
    """The FlashAttention-2 backward, written plainly from the saved (out, lse) and the forward's dropout
    mask: returns (dq, dk, dv, dbias, drel); dbias is summed over the dims ``bias`` broadcasts (None unless
    asked), drel the (d rel_h, d rel_w, d rel_t) of ``rel_pos`` (None unless asked)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    acc = _acc_dtype(q.dtype)
    scores = _scores(q, k, with_rel_pos(bias, rel_pos, q.shape[-2], k.shape[-2]), scale, acc)
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
    drel = rel_pos_grads(dscores, rel_pos) if rel_pos is not None and rel_requires_grad else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, drel


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
    def forward(q, k, v, bias, scale, dropout_p, rel_pos=None, rope=None):
        rng = draw_dropout_seed(q.device) if dropout_p > 0 else no_dropout_seed(q.device)
        mask = _mask(rng, q, k, dropout_p)
        q_r, k_r = (apply_rope(q, rope), apply_rope(k, rope)) if rope is not None else (q, k)
        out, lse = attention_forward_math(q_r, k_r, v, with_rel_pos(bias, rel_pos, q.shape[-2], k.shape[-2]),
                                          scale, dropout_p, mask)
        return out, lse, rng

    @staticmethod
    def backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad, rel_pos=None,
                 rel_requires_grad=False, rope=None, rope_requires_grad=False):
        q_r, k_r = (apply_rope(q, rope), apply_rope(k, rope)) if rope is not None else (q, k)
        dq, dk, dv, dbias, drel = attention_backward_math(dout, q_r, k_r, v, bias, out, lse, scale,
                                                          bias_requires_grad, dropout_p, _mask(rng, q, k, dropout_p),
                                                          rel_pos, rel_requires_grad)
        drope = None
        if rope is not None:
            dq, dk, drope = qk_rope_backward(dq, dk, q, k, rope, rope_requires_grad)
        return dq, dk, dv, dbias, drel, drope


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
