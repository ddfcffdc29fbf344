"""patch_embed's CPU backend: the projection on torch's own kernels (a GEMM over the patches, or the conv
for small patches; see CONV_MAX_K) and the epilogue (position embedding and prefix rows) written once into
the output, no ``torch.cat``.
The backward is the reference's (see CpuPatchEmbedKernels.backward).

Why not a hand-written GEMM: the projection is a plain (B*Np, K) x (K, E) product that the BLAS torch links
already runs at the machine's peak; what eager code wastes is the passes around it (cat, a separate add),
and those are what this backend removes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitkernels.ops.patch_embed.reference import ReferencePatchEmbedKernels, patchify, write_epilogue


# Up to this many products per output (K = C * prod(patch)) the projection runs as torch's conv: oneDNN sums
# them in one running sum, as accurate as a GEMM for Swin's K = 48 and ~2.5x the GEMM's error at ViT's
# K = 768, where the GEMM (MKL's blocked sums; as fast there) runs instead.
CONV_MAX_K = 64


class CpuPatchEmbedKernels:
    @staticmethod
    def forward(x, weight, bias, pos_embed, prefix_tokens):  # -> B, P + Np, E
        return CpuPatchEmbedKernels._forward(x, weight, bias, pos_embed, prefix_tokens, False)[0]

    @staticmethod
    def forward_keeping_patches(x, weight, bias, pos_embed, prefix_tokens):
        """(out, the (B, Np, K) patch matrix) for training: always the GEMM path, whose patch matrix the
        backward's dWeight needs anyway (the conv would leave the backward to form it again)."""
        return CpuPatchEmbedKernels._forward(x, weight, bias, pos_embed, prefix_tokens, True)

    @staticmethod
    def _forward(x, weight, bias, pos_embed, prefix_tokens, keep_patches):
        E, patch = weight.shape[0], tuple(weight.shape[2:])
        k = math.prod(weight.shape[1:])
        patches = None
        if k > CONV_MAX_K or keep_patches:
            patches = patchify(x, patch)  # B, Np, K (a reshaped copy of x)
            B, num_patches = patches.shape[:2]
            tokens = torch.mm(patches.reshape(-1, k), weight.reshape(E, k).t()).view(B, num_patches, E)
            pos_body = None if pos_embed is None else pos_embed[:, -num_patches:]
            if bias is None:
                body_add = pos_body
            else:  # bias + pos once per call (1, Np, E): the epilogue adds one table
                body_add = bias if pos_body is None else pos_body + bias
        else:
            conv = F.conv2d if x.dim() == 4 else F.conv3d
            # A channels-last conv writes (B, *grid, E): the tokens' own layout, so the epilogue reads rows
            # instead of transposing. oneDNN picks it from either operand; the weight is taken channels-last
            # unless x already is (a copy of E*K elements; x is never copied here).
            channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            if not x.is_contiguous(memory_format=channels_last):
                weight = weight.contiguous(memory_format=channels_last)
            tokens = conv(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)  # B, Np, E
            body_add = None if pos_embed is None else pos_embed[:, -tokens.shape[1]:]
        if body_add is None and prefix_tokens is None:
            return tokens.contiguous(), patches  # no copy when the projection wrote rows
        return write_epilogue(tokens, body_add, prefix_tokens, pos_embed), patches

    # The backward is the reference's: dWeight one GEMM over the patches (the forward's, kept, when the
    # weight needs a gradient), dX one GEMM scattered back to the image, the epilogue's gradients from one
    # batch sum of dOut. Measured against the conv's own backward:
    # its data backward is ~2x slower at patch 16, and its weight backward sums over the batch in a
    # thread-count-dependent order (these gradients are bitwise reproducible at any thread count).
    backward = staticmethod(ReferencePatchEmbedKernels.backward)
