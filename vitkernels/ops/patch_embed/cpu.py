"""patch_embed's CPU backend: torch's own convolution (oneDNN/MKL) for the projection and the epilogue
(bias inside the conv; position embedding and prefix rows) written once into the output, no ``torch.cat``.
The backward: dWeight as one GEMM over the patches, dX (when x needs one) by the conv's data backward, the
epilogue's gradients from one batch sum of dOut.

Why not a hand-written GEMM: the projection is a plain (B*Np, K) x (K, E) product that the BLAS torch links
already runs at the machine's peak; what eager code wastes is the passes around it (cat, a separate add),
and those are what this backend removes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitkernels.ops.patch_embed.reference import epilogue_grads, patchify


def write_epilogue(tokens, pos_embed, prefix_tokens):
    """(B, P + Np, E) from the projected patches ``tokens`` (B, Np, E, any strides): + pos, prefix rows
    first; one pass over the output."""
    B, num_patches, E = tokens.shape
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    out = torch.empty(B, num_prefix + num_patches, E, dtype=tokens.dtype, device=tokens.device)
    body = out[:, num_prefix:]
    if pos_embed is None:
        body.copy_(tokens)
    else:
        torch.add(tokens, pos_embed[:, -num_patches:], out=body)
    if num_prefix:
        head = prefix_tokens
        if pos_embed is not None and pos_embed.shape[1] == num_prefix + num_patches:
            head = prefix_tokens + pos_embed[:, :num_prefix]
        out[:, :num_prefix] = head
    return out


class CpuPatchEmbedKernels:
    @staticmethod
    def forward(x, weight, bias, pos_embed, prefix_tokens):  # -> B, P + Np, E
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        # A channels-last conv writes (B, *grid, E): the tokens' own (B, Np, E) layout, so the epilogue reads
        # rows instead of transposing. oneDNN picks it from either operand; the weight is taken channels-last
        # unless x already is (a copy of E*K elements; x is never copied here).
        channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if not x.is_contiguous(memory_format=channels_last):
            weight = weight.contiguous(memory_format=channels_last)
        y = conv(x, weight, bias, stride=tuple(weight.shape[2:]))  # B, E, *grid
        tokens = y.flatten(2).transpose(1, 2)  # B, Np, E
        if pos_embed is None and prefix_tokens is None:
            return tokens.contiguous()  # a view of y when the conv wrote channels-last (no copy)
        return write_epilogue(tokens, pos_embed, prefix_tokens)

    @staticmethod
    def backward(dout, x, weight, bias, pos_embed, prefix_tokens, needs):
        need_x, need_w, need_b, need_pos, need_prefix = needs
        E, patch = weight.shape[0], tuple(weight.shape[2:])
        num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
        db, dpos, dprefix = epilogue_grads(dout, pos_embed, num_prefix, need_b, need_pos, need_prefix)
        dx = dw = None
        grid = [s // p for s, p in zip(x.shape[2:], patch)]
        dbody = dout[:, num_prefix:]  # B, Np, E
        if need_w:
            # One GEMM over the patches (a reshaped copy of x). Not the conv's weight backward: oneDNN sums that
            # over the batch in a thread-count-dependent order, and these gradients are bitwise reproducible.
            k = math.prod(weight.shape[1:])
            dw = torch.mm(dbody.reshape(-1, E).t(), patchify(x, patch).reshape(-1, k)).view(weight.shape)
        if need_x:
            # the conv's own data backward (each input element written once: no reduction order to vary), on
            # dOut's token rows seen as a channels-last (B, E, *grid) map (a view)
            dy = dbody.transpose(1, 2).reshape(x.shape[0], E, *grid)
            channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            w = weight if x.is_contiguous(memory_format=channels_last) else weight.contiguous(memory_format=channels_last)
            dx = torch.ops.aten.convolution_backward(
                dy, x, w, None, list(patch), [0] * len(patch), [1] * len(patch), False, [0] * len(patch), 1,
                [True, False, False])[0]
        return dx, dw, db, dpos, dprefix
