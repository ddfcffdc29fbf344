"""The compiled-extension path of patch_embed (``cpu`` and ``cuda`` backends): the patch gather of
vitkernels._C (x read by strides, channels-last included) feeding one GEMM, the epilogue (bias, pos,
prefix rows) written into the output in place, no ``torch.cat``. The backward gathers the patches again
for dWeight and scatters dX only when x needs a gradient."""
from __future__ import annotations

import math

import torch

from vitkernels import _ext
from vitkernels.ops.patch_embed.reference import epilogue_grads, write_epilogue


def _as_5d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.dim() == 4 else x  # images as (B, C, 1, H, W): a view, not a copy


def _patch3(weight: torch.Tensor):
    patch = list(weight.shape[2:])
    return [1] + patch if len(patch) == 2 else patch


class GatherGemmKernels:
    @staticmethod
    def forward(x, weight, bias, pos_embed, prefix_tokens):  # -> B, P + Np, E
        ext = _ext.extension()
        B, E = x.shape[0], weight.shape[0]
        patches = ext.patch_gather(_as_5d(x), _patch3(weight))  # B, Np, K
        num_patches, k = patches.shape[1], patches.shape[2]
        w2 = weight.reshape(E, k)  # a view of a contiguous Conv weight
        rows = patches.view(B * num_patches, k)
        tokens = torch.addmm(bias, rows, w2.t()) if bias is not None else torch.mm(rows, w2.t())
        tokens = tokens.view(B, num_patches, E)
        if prefix_tokens is None and pos_embed is None:
            return tokens
        body_add = None if pos_embed is None else pos_embed[:, -num_patches:]
        return write_epilogue(tokens, body_add, prefix_tokens, pos_embed)

    @staticmethod
    def backward(dout, x, weight, bias, pos_embed, prefix_tokens, needs):
        need_x, need_w, need_b, need_pos, need_prefix = needs
        ext = _ext.extension()
        E = weight.shape[0]
        num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
        dbody = dout[:, num_prefix:]  # B, Np, E
        dx = dw = None
        db, dpos, dprefix = epilogue_grads(dout, pos_embed, num_prefix, need_b, need_pos, need_prefix)
        k = math.prod(weight.shape[1:])
        if need_w:
            patches = ext.patch_gather(_as_5d(x), _patch3(weight))  # gathered again, never stored
            dw = torch.mm(dbody.reshape(-1, E).t(), patches.view(-1, k)).view(weight.shape)
        if need_x:
            dpatches = torch.matmul(dbody, weight.reshape(E, k))  # B, Np, K
            dx = ext.patch_scatter(dpatches, list(_as_5d(x).shape), _patch3(weight)).view(x.shape)
        return dx, dw, db, dpos, dprefix
