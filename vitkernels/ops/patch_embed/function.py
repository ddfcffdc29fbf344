"""``PatchEmbedFunction``: the one autograd.Function of patch_embed, wired to a backend's kernels.

``kernels`` provides ``forward(x, weight, bias, pos_embed, prefix_tokens) -> out`` and
``backward(dout, x, weight, bias, pos_embed, prefix_tokens, needs) -> (dx, dweight, dbias, dpos, dprefix)``
where ``needs`` is ctx.needs_input_grad for those five inputs. Kernels may also offer
``forward_keeping_patches(...) -> (out, patches)`` and take ``patches=`` in ``backward``: the patch matrix
the forward formed anyway, kept for dWeight when the weight needs a gradient (as autograd keeps the
reference's), instead of being formed again.
"""
from __future__ import annotations

import torch

from vitkernels.ops._autograd import autograd_needed


class PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, weight, bias, pos_embed, prefix_tokens):
        ctx.kernels = kernels
        patches = None
        if ctx.needs_input_grad[2] and hasattr(kernels, "forward_keeping_patches"):
            out, patches = kernels.forward_keeping_patches(x, weight, bias, pos_embed, prefix_tokens)
        else:
            out = kernels.forward(x, weight, bias, pos_embed, prefix_tokens)
        ctx.keeps_patches = patches is not None
        ctx.save_for_backward(x, weight, bias, pos_embed, prefix_tokens, patches)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, pos_embed, prefix_tokens, patches = ctx.saved_tensors
        extra = dict(patches=patches) if ctx.keeps_patches else {}
        dx, dw, db, dpos, dprefix = ctx.kernels.backward(dout, x, weight, bias, pos_embed, prefix_tokens,
                                                         ctx.needs_input_grad[1:6], **extra)
        return None, dx, dw, _plain_strides(db), _plain_strides(dpos), _plain_strides(dprefix)


def _plain_strides(grad):
    """A parameter's gradient with the strides of a new tensor of its shape. The epilogue's gradients are
    slices of one batch sum: their size-1 dims keep the sum's strides, which DDP's gradient buckets take for
    a layout mismatch (a warning and a slower copy every step). They are small: the copy is cheap."""
    if grad is None:
        return None
    strides, step = [], 1
    for size in reversed(grad.shape):
        strides.append(step)
        step *= max(size, 1)
    if grad.stride() == tuple(reversed(strides)):
        return grad
    return grad.clone(memory_format=torch.contiguous_format)


def apply_patch_embed(kernels, inputs) -> torch.Tensor:
    """``PatchEmbedFunction`` on checked inputs; with nothing to differentiate, the kernels' forward alone."""
    tensors = (inputs.x, inputs.weight, inputs.bias, inputs.pos_embed, inputs.prefix_tokens)
    if not autograd_needed(*tensors):
        return kernels.forward(*tensors)
    return PatchEmbedFunction.apply(kernels, *tensors)
