"""flash_attention's C++ CPU kernels (``vitkernels._C``, csrc/cpu/attention.cpp) in the kernels' contract
(``function.AttentionFunction``): a blocked online-softmax forward and a FlashAttention-2 backward on
BLAS tiles, q/k/v read in place by their strides, the bias gradient summed in a fixed order, dropout from a
Philox stream seeded by torch's generator. The rel_pos terms are read in place by their strides and added to
each score row; their gradients are summed from dS in the same fixed order. With rope, q and k rows are rotated
(float) as the kernels stage them, the tables read in place by their strides; the backward rotates dQ and dK
back and sums the tables' gradients per (batch, head), then over their broadcast dims in a fixed order."""
from __future__ import annotations

import torch

from vitkernels import _ext
from vitkernels.ops.attention.function import draw_dropout_seed, no_dropout_seed


def _seed(rng: torch.Tensor, dropout_p: float):
    if dropout_p <= 0.0:
        return 0, 0
    seed, offset = rng.tolist()  # a CPU tensor of two int64: no device sync
    return seed, offset


def _rel_args(rel_pos):
    """(rel_h, rel_w, rel_t, prefix) for the kernels: the terms as they are (any strides, never copied)."""
    if rel_pos is None:
        return None, None, None, 0
    return rel_pos.rel_h, rel_pos.rel_w, rel_pos.rel_t, rel_pos.prefix


def _rope_args(rope):
    """(cos, sin, prefix, rotate_half) for the kernels: the 4-D table views as they are (never copied)."""
    if rope is None:
        return None, None, 0, False
    return rope.cos, rope.sin, rope.prefix, rope.rotate_half


class CpuAttentionKernels:
    @staticmethod
    def forward(q, k, v, bias, scale, dropout_p, rel_pos=None, rope=None):
        rng = draw_dropout_seed(q.device) if dropout_p > 0 else no_dropout_seed(q.device)
        out, lse = _ext.extension().attention_forward_cpu(q, k, v, bias, scale, dropout_p, *_seed(rng, dropout_p),
                                                          *_rel_args(rel_pos), *_rope_args(rope))
        return out, lse, rng

    @staticmethod
    def backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad, rel_pos=None,
                 rel_requires_grad=False, rope=None, rope_requires_grad=False):
        if dout.shape[-1] > 1 and dout.stride(-1) != 1:  # the kernels read rows; autograd may hand any strides
            dout = dout.contiguous()
        rel_requires_grad = rel_pos is not None and rel_requires_grad
        rope_requires_grad = rope is not None and rope_requires_grad
        dq, dk, dv, dbias, drel, drope = _ext.extension().attention_backward_cpu(
            dout, q, k, v, bias, out, lse, scale, dropout_p, *_seed(rng, dropout_p), bias_requires_grad,
            *_rel_args(rel_pos), rel_requires_grad, *_rope_args(rope), rope_requires_grad)
        return dq, dk, dv, dbias, drel, drope


def dropout_keep_mask(rng: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep-mask (True = kept) the CPU kernels draw for seed tensor ``rng`` on a (B, H, Nq, Nk) grid:
    for tests that replay a kernel's dropout through the reference."""
    return _ext.extension().attention_dropout_mask_cpu(list(shape), dropout_p, *_seed(rng, dropout_p))
