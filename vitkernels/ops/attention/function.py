"""``AttentionFunction``: the one autograd.Function of flash_attention, wired to a backend's kernels.

Every backend's kernels (``OpBackend.kernels()``) are an object with
``forward(q, k, v, bias, scale, dropout_p, rel_pos=None, rope=None) -> (out, lse, rng)`` and
``backward(dout, q, k, v, bias, out, lse, rng, scale, dropout_p, bias_requires_grad, rel_pos=None,
rel_requires_grad=False, rope=None, rope_requires_grad=False) -> (dq, dk, dv, dbias, drel, drope)``:
out (B, H, Nq, Dv) in q's dtype, lse (B, H, Nq) float32 (float64 for fp64 inputs), rng the dropout seed
(int64 [seed, offset] on q's device; zeros without dropout); dq, dk, dv contiguous; rel_pos a checked
``RelPos`` (``checks.py``) or None; drel = (d rel_h, d rel_w, d rel_t or None), each shaped like its
term, when ``rel_requires_grad``, else None; rope a checked ``Rope`` (cos and sin 4-D views) or None: q and
k are rotated as they are loaded, dq and dk are the gradients of the unrotated q and k, drope = (d cos,
d sin) shaped like rope.cos, in its dtype, when ``rope_requires_grad``, else None. The forward saves q, k, v, bias, the rel_pos terms, out and
the row log-sum-exp: nothing N x N. The torch.compile ops (``compile.py``) call the same pair.
"""
from __future__ import annotations

import torch

from vitkernels.ops._autograd import autograd_needed
from vitkernels.ops.attention.checks import RelPos, Rope


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, q, k, v, bias, scale, dropout_p, rel_h=None, rel_w=None, rel_t=None, rel_prefix=0,
                cos=None, sin=None, rope_prefix=0, rotate_half=False):
        rel_pos = RelPos(rel_h, rel_w, rel_t, rel_prefix) if rel_h is not None else None
        rope = Rope(cos, sin, rope_prefix, rotate_half) if cos is not None else None
        out, lse, rng = kernels.forward(q, k, v, bias, scale, dropout_p, rel_pos, rope)
        ctx.kernels, ctx.scale, ctx.dropout_p, ctx.rng = kernels, scale, dropout_p, rng
        ctx.rel_prefix, ctx.rope_attrs = rel_prefix, (rope_prefix, rotate_half)
        ctx.save_for_backward(q, k, v, bias, out, lse, rel_h, rel_w, rel_t, cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse, rel_h, rel_w, rel_t, cos, sin = ctx.saved_tensors
        bias_requires_grad = bias is not None and ctx.needs_input_grad[4]
        rel_pos = RelPos(rel_h, rel_w, rel_t, ctx.rel_prefix) if rel_h is not None else None
        rel_requires_grad = rel_pos is not None and any(ctx.needs_input_grad[7:10])
        rope = Rope(cos, sin, *ctx.rope_attrs) if cos is not None else None
        rope_requires_grad = rope is not None and any(ctx.needs_input_grad[11:13])
        dq, dk, dv, dbias, drel, drope = ctx.kernels.backward(
            dout, q, k, v, bias, out, lse, ctx.rng, ctx.scale, ctx.dropout_p, bias_requires_grad, rel_pos,
            rel_requires_grad, rope, rope_requires_grad)
        drel = drel if drel is not None else (None, None, None)
        drope = drope if drope is not None else (None, None)
        return (None, dq, dk, dv, dbias, None, None) + tuple(drel) + (None,) + tuple(drope) + (None, None)


def apply_attention(kernels, inputs) -> torch.Tensor:
    """``AttentionFunction`` on checked ``AttentionInputs``: the rel_pos terms and the rope tables go in as
    tensors (autograd carries their gradients). With nothing to differentiate, the kernels' forward alone."""
    rel, rope = inputs.rel_pos, inputs.rope
    if not autograd_needed(inputs.q, inputs.k, inputs.v, inputs.bias, *(rel.terms if rel is not None else ()),
                           *((rope.cos, rope.sin) if rope is not None else ())):
        return kernels.forward(inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale, inputs.dropout_p, rel,
                               rope)[0]
    args = (kernels, inputs.q, inputs.k, inputs.v, inputs.bias, inputs.scale, inputs.dropout_p)
    if rel is not None or rope is not None:
        args += (None, None, None, 0) if rel is None else (rel.rel_h, rel.rel_w, rel.rel_t, rel.prefix)
    if rope is not None:
        args += (rope.cos, rope.sin, rope.prefix, rope.rotate_half)
    return AttentionFunction.apply(*args)


def draw_dropout_seed(device) -> torch.Tensor:
    """The Philox (seed, offset) of one dropout call: an int64 tensor of 2 on ``device``, drawn from that
    device's torch generator (reproducible under torch.manual_seed, no host sync; inside a captured CUDA
    graph the draw is part of the graph, so every replay gets a new seed, as SDPA's dropout does)."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def no_dropout_seed(device) -> torch.Tensor:
    """The seed tensor of a call without dropout (never read)."""
    return torch.zeros(2, dtype=torch.int64, device=device)
