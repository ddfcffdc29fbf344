"""``WindowAttentionFunction``: the one autograd.Function of window_attention, wired to a backend's
kernels.

``kernels`` provides ``forward(inputs) -> (out, saved)`` and
``backward(dout, inputs, saved, needs) -> (dqkv, drel_pos_bias, dqkv_bias)``, where ``inputs`` is the
checked ``WindowInputs`` (geometry resolved once), ``saved`` whatever tensors the forward keeps (a fused
kernel keeps the row log-sum-exp, nothing N x N) and ``needs`` is ctx.needs_input_grad for (qkv,
rel_pos_bias, qkv_bias).
"""
from __future__ import annotations

import dataclasses

import torch


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, inputs, qkv, rel_pos_bias, qkv_bias):
        # The tensors travel as arguments so autograd sees them; ``inputs`` carries the geometry.
        inputs = dataclasses.replace(inputs, qkv=qkv, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias)
        out, saved = kernels.forward(inputs)
        ctx.kernels, ctx.inputs, ctx.num_saved = kernels, dataclasses.replace(inputs, qkv=None,
                                                                              rel_pos_bias=None, qkv_bias=None), len(saved)
        ctx.save_for_backward(qkv, rel_pos_bias, qkv_bias, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, rel_pos_bias, qkv_bias, *saved = ctx.saved_tensors
        inputs = dataclasses.replace(ctx.inputs, qkv=qkv, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias)
        dqkv, dtable, dbias = ctx.kernels.backward(dout, inputs, tuple(saved), ctx.needs_input_grad[2:5])
        return None, None, dqkv, dtable, dbias


def window_attention_function(kernels, inputs) -> torch.Tensor:
    return WindowAttentionFunction.apply(kernels, inputs, inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias)


class ReplayKernels:
    """The reference as a (forward, backward) pair: the forward runs without a graph, the backward
    recomputes it under autograd. Checks the Function's wiring; the template a fused backend fills in."""

    @staticmethod
    def _run(inputs):
        from vitkernels.ops.window_attention.reference import window_attention_reference

        return window_attention_reference(inputs.qkv, inputs.num_heads, inputs.window_size, inputs.shift_size,
                                          inputs.rel_pos_bias, inputs.qkv_bias, inputs.scale)

    @classmethod
    def forward(cls, inputs):
        with torch.no_grad():
            return cls._run(inputs), ()

    @classmethod
    def backward(cls, dout, inputs, saved, needs):
        leaves = [inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias]
        wanted = [t is not None and need for t, need in zip(leaves, needs)]
        with torch.enable_grad():
            detached = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(leaves, wanted)]
            out = cls._run(dataclasses.replace(inputs, qkv=detached[0], rel_pos_bias=detached[1],
                                               qkv_bias=detached[2]))
            targets = [t for t, w in zip(detached, wanted) if w]
            grads = iter(torch.autograd.grad(out, targets, dout) if targets else ())
        return tuple(next(grads) if w else None for w in wanted)
