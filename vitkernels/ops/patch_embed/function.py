"""``PatchEmbedFunction``: the one autograd.Function of patch_embed, wired to a backend's kernels.

``kernels`` provides ``forward(x, weight, bias, pos_embed, prefix_tokens) -> out`` and
``backward(dout, x, weight, bias, pos_embed, prefix_tokens, needs) -> (dx, dweight, dbias, dpos, dprefix)``
where ``needs`` is ctx.needs_input_grad for those five inputs.
"""
from __future__ import annotations

import torch


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, weight, bias, pos_embed, prefix_tokens):
        ctx.kernels = kernels
        ctx.save_for_backward(x, weight, bias, pos_embed, prefix_tokens)
        return kernels.forward(x, weight, bias, pos_embed, prefix_tokens)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, pos_embed, prefix_tokens = ctx.saved_tensors
        grads = ctx.kernels.backward(dout, x, weight, bias, pos_embed, prefix_tokens, ctx.needs_input_grad[1:6])
        return (None,) + tuple(grads)
