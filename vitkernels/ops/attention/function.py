"""``AttentionFunction``: the one autograd.Function of flash_attention, wired to a backend's kernels.

Every backend's kernels (``OpBackend.kernels()``) are an object with
``forward(q, k, v, bias, scale, dropout_p) -> (out, lse, rng)`` and
``backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad) -> (dq, dk, dv, dbias)``:
out (B, H, Nq, Dv) in q's dtype, lse (B, H, Nq) float32 (float64 for fp64 inputs), rng the dropout seed
(int64 [seed, offset] on q's device; zeros without dropout); dq, dk, dv contiguous. The forward saves q,
k, v, bias, out and the row log-sum-exp: nothing N x N. The torch.compile ops (``compile.py``) call the
same pair.
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


def draw_dropout_seed(device) -> torch.Tensor:
    """The Philox (seed, offset) of one dropout call: an int64 tensor of 2 on ``device``, drawn from that
    device's torch generator (reproducible under torch.manual_seed, no host sync; inside a captured CUDA
    graph the draw is part of the graph, so every replay gets a new seed, as SDPA's dropout does)."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def no_dropout_seed(device) -> torch.Tensor:
    """The seed tensor of a call without dropout (never read)."""
    return torch.zeros(2, dtype=torch.int64, device=device)
