"""``AttentionFunction``: the one autograd.Function of flash_attention, wired to a backend's kernels.

Every backend's kernels (``OpBackend.kernels()``) are an object with
``forward(q, k, v, bias, scale, dropout_p, rel_pos=None) -> (out, lse, rng)`` and
``backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad, rel_pos=None,
rel_requires_grad=False) -> (dq, dk, dv, dbias, drel)``:
out (B, H, Nq, Dv) in q's dtype, lse (B, H, Nq) float32 (float64 for fp64 inputs), rng the dropout seed
(int64 [seed, offset] on q's device; zeros without dropout); dq, dk, dv contiguous; rel_pos a checked
``RelPos`` (``checks.py``) or None; drel = (d rel_h, d rel_w, d rel_t or None), each shaped like its
term, when ``rel_requires_grad``, else None. The forward saves q, k, v, bias, the rel_pos terms, out and
the row log-sum-exp: nothing N x N. The torch.compile ops (``compile.py``) call the same pair.
"""
from __future__ import annotations

import torch

from vitkernels.ops.attention.checks import RelPos


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, q, k, v, bias, scale, dropout_p, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0):
        rel_pos = RelPos(rel_h, rel_w, rel_t, rel_prefix) if rel_h is not None else None
        out, lse, rng = kernels.forward(q, k, v, bias, scale, dropout_p, rel_pos)
        ctx.kernels, ctx.scale, ctx.dropout_p, ctx.rng, ctx.rel_prefix = kernels, scale, dropout_p, rng, rel_prefix
        ctx.save_for_backward(q, k, v, bias, out, lse, rel_h, rel_w, rel_t)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse, rel_h, rel_w, rel_t = ctx.saved_tensors
        bias_requires_grad = bias is not None and ctx.needs_input_grad[4]
        rel_pos = RelPos(rel_h, rel_w, rel_t, ctx.rel_prefix) if rel_h is not None else None
        rel_requires_grad = rel_pos is not None and any(ctx.needs_input_grad[7:10])
        dq, dk, dv, dbias, drel = ctx.kernels.backward(dout, q, k, v, bias, out, lse, ctx.rng, ctx.scale,
                                                       ctx.dropout_p, bias_requires_grad, rel_pos, rel_requires_grad)
        drel = drel if drel is not None else (None, None, None)
        return (None, dq, dk, dv, dbias, None, None) + tuple(drel) + (None,)


def apply_attention(kernels, inputs) -> torch.Tensor:
    """``AttentionFunction`` on checked ``AttentionInputs``: the rel_pos terms go in as tensors (autograd
    carries their gradients)."""
    rel = inputs.rel_pos
    if rel is None:
        return AttentionFunction.apply(kernels, inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale,
                                       inputs.dropout_p)
    return AttentionFunction.apply(kernels, inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale,
                                   inputs.dropout_p, rel.rel_h, rel.rel_w, rel.rel_t, rel.prefix)


def draw_dropout_seed(device) -> torch.Tensor:
    """The Philox (seed, offset) of one dropout call: an int64 tensor of 2 on ``device``, drawn from that
    device's torch generator (reproducible under torch.manual_seed, no host sync; inside a captured CUDA
    graph the draw is part of the graph, so every replay gets a new seed, as SDPA's dropout does)."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def no_dropout_seed(device) -> torch.Tensor:
    """The seed tensor of a call without dropout (never read)."""
    return torch.zeros(2, dtype=torch.int64, device=device)
