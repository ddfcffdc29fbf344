"""``WindowAttentionFunction``: the one autograd.Function of window_attention, wired to a backend's
kernels.

Every backend's kernels (``OpBackend.kernels()``) provide ``forward(inputs) -> (out, lse, cache)`` and
``backward(dout, inputs, out, lse, needs, cache=None) -> (dqkv, drel_pos_bias, dqkv_bias, dlogit_scale)``, where
``inputs`` is the checked ``WindowInputs`` (geometry resolved once), out (B, *S, C) in qkv's dtype, lse
(B * nW, heads, N) float32 (float64 for fp64 inputs) the row log-sum-exp (nothing N x N), ``cache`` an
optional tensor the backward may reuse (None: it rebuilds it; torch.compile's ops pass None) and ``needs``
ctx.needs_input_grad for (qkv, rel_pos_bias, qkv_bias, logit_scale); gradients not needed are None
(dlogit_scale: cosine attention only, shaped and typed like ``inputs.logit_scale``).
"""
from __future__ import annotations


import torch

from vitkernels.ops._autograd import autograd_needed


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, inputs, qkv, rel_pos_bias, qkv_bias, logit_scale=None):
        # The tensors travel as arguments so autograd sees them; ``inputs`` carries the geometry.
        inputs = inputs.with_tensors(qkv, rel_pos_bias, qkv_bias, logit_scale)
        out, lse, cache = kernels.forward(inputs)
        ctx.kernels = kernels
        ctx.inputs = inputs.with_tensors(None, None, None, None)
        ctx.save_for_backward(qkv, rel_pos_bias, qkv_bias, logit_scale, out, lse, cache)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, rel_pos_bias, qkv_bias, logit_scale, out, lse, cache = ctx.saved_tensors
        inputs = ctx.inputs.with_tensors(qkv, rel_pos_bias, qkv_bias, logit_scale)
        needs = tuple(ctx.needs_input_grad[2:5]) + (len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5],)
        dqkv, dtable, dbias, dscale = ctx.kernels.backward(dout, inputs, out, lse, needs, cache)
        return (None, None, dqkv, dtable, dbias, dscale)[:len(ctx.needs_input_grad)]


def window_attention_function(kernels, inputs) -> torch.Tensor:
    if not autograd_needed(inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias, inputs.logit_scale):
        return kernels.forward(inputs)[0]  # nothing to differentiate: the kernels' forward alone
    if inputs.logit_scale is None:
        return WindowAttentionFunction.apply(kernels, inputs, inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias)
    return WindowAttentionFunction.apply(kernels, inputs, inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias,
                                        inputs.logit_scale)
