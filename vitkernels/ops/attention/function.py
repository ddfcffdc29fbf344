"""``AttentionFunction``: the one autograd.Function of flash_attention, wired to a backend's kernels.

A backend that computes its own gradients passes an object with
``forward(q, k, v, bias, scale, dropout_p) -> (out, lse, rng)`` and
``backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad) -> (dq, dk, dv, dbias)``.
The forward saves q, k, v, bias, out and the row log-sum-exp: nothing N x N.
"""
from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, q, k, v, bias, scale, dropout_p):
        out, lse, rng = kernels.forward(q, k, v, bias, scale, dropout_p)
        ctx.kernels, ctx.scale, ctx.dropout_p, ctx.rng = kernels, scale, dropout_p, rng
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_requires_grad = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias = ctx.kernels.backward(dout, q, k, v, bias, out, lse, ctx.rng, ctx.scale,
                                                 ctx.dropout_p, bias_requires_grad)
        return None, dq, dk, dv, dbias, None, None


class MathKernels:
    """FlashAttention-2's forward/backward contract computed plainly in PyTorch (no dropout): the oracle
    for a fused backend's saved log-sum-exp and its backward, and the test of this Function's wiring."""

    @staticmethod
    def forward(q, k, v, bias, scale, dropout_p):
        from vitkernels.ops.attention.reference import attention_forward_math

        if dropout_p:
            raise ValueError("MathKernels: dropout is not modelled (use attention_reference with a mask)")
        out, lse = attention_forward_math(q, k, v, bias, scale)
        return out, lse, None

    @staticmethod
    def backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad):
        from vitkernels.ops.attention.reference import attention_backward_math

        return attention_backward_math(dout, q, k, v, bias, out, lse, scale, bias_requires_grad)
