"""Pure-PyTorch reference of ``patch_embed``: patchify + projection + bias, prefix tokens, pos_embed."""
from __future__ import annotations

import math
from typing import Optional

import torch


def patchify(x: torch.Tensor, patch) -> torch.Tensor:
    """(B, C, [T,] H, W) -> (B, Np, C * prod(patch)): patches in row-major (t, h, w) order, each flattened
    (c, [pt,] ph, pw) as Conv2d/Conv3d see it."""
    B, C, nd = x.shape[0], x.shape[1], len(patch)
    num_patches = math.prod(s // p for s, p in zip(x.shape[2:], patch))  # explicit: B may be 0
    split = []
    for s, p in zip(x.shape[2:], patch):
        split += [s // p, p]
    x = x.reshape(B, C, *split)  # B, C, n1, p1, n2, p2, [n3, p3]
    perm = [0] + [2 + 2 * d for d in range(nd)] + [1] + [3 + 2 * d for d in range(nd)]
    return x.permute(perm).reshape(B, num_patches, C * math.prod(patch))


def unpatchify(patches: torch.Tensor, x_shape, patch) -> torch.Tensor:
    """The inverse of ``patchify``: (B, Np, C * prod(patch)) -> x_shape."""
    B, C, nd = x_shape[0], x_shape[1], len(patch)
    grid = [s // p for s, p in zip(x_shape[2:], patch)]
    x = patches.reshape(B, *grid, C, *patch)
    perm = [0, 1 + nd]
    for d in range(nd):
        perm += [1 + d, 2 + nd + d]
    return x.permute(perm).reshape(x_shape)


def patch_embed_reference(
    x: torch.Tensor,  # B, C, H, W  or  B, C, T, H, W
    weight: torch.Tensor,  # E, C, ph, pw  or  E, C, pt, ph, pw
    bias: Optional[torch.Tensor] = None,  # E
    pos_embed: Optional[torch.Tensor] = None,  # 1, P + Np, E  or  1, Np, E
    prefix_tokens: Optional[torch.Tensor] = None,  # 1, P, E
) -> torch.Tensor:  # B, P + Np, E
    """cat(prefix_tokens.expand(B), patches @ W^T + bias) + pos_embed."""
    E = weight.shape[0]
    patches = patchify(x, weight.shape[2:])  # B, Np, K
    tokens = torch.matmul(patches, weight.reshape(E, -1).t())  # B, Np, E
    if bias is not None:
        tokens = tokens + bias
    num_patches = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == num_patches:
        tokens = tokens + pos_embed  # prefix tokens get no position
        pos_embed = None
    if prefix_tokens is not None:
        tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def write_epilogue(tokens, body_add, prefix_tokens, pos_embed):
    """(B, P + Np, E) from the projected patches ``tokens`` (B, Np, E, any strides): ``body_add`` (what the
    patch rows add: bias and/or their position embedding, broadcastable; None: nothing) added in one pass
    over the output; prefix rows (+ their position embedding) first."""
    B, num_patches, E = tokens.shape
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    out = torch.empty(B, num_prefix + num_patches, E, dtype=tokens.dtype, device=tokens.device)
    body = out[:, num_prefix:]
    if body_add is None:
        body.copy_(tokens)
    else:
        torch.add(tokens, body_add, out=body)
    if num_prefix:
        head = prefix_tokens
        if pos_embed is not None and pos_embed.shape[1] == num_prefix + num_patches:
            head = prefix_tokens + pos_embed[:, :num_prefix]
        out[:, :num_prefix] = head
    return out


def epilogue_grads(dout, pos_embed, num_prefix: int, need_bias: bool, need_pos: bool, need_prefix: bool):
    """(dbias, dpos_embed, dprefix_tokens) from dout (B, P + Np, E): the epilogue's gradients are sums of
    dout over the batch (and the patches, for the bias); None where not needed. One pass over dout: its
    batch sum (torch accumulates it in float32 at least) gives all three."""
    if not (need_bias or need_pos or need_prefix):
        return None, None, None
    rows = dout if dout.shape[0] == 1 else dout.sum(dim=0, keepdim=True)  # 1, P + Np, E
    db = rows[0, num_prefix:].sum(dim=0) if need_bias else None
    dpos = None
    if need_pos:
        dpos = rows if pos_embed.shape[1] == dout.shape[1] else rows[:, num_prefix:]
    dprefix = rows[:, :num_prefix] if need_prefix else None
    return db, dpos, dprefix


class ReferencePatchEmbedKernels:
    """patch_embed's reference as a forward/backward pair in the kernels' contract
    (``function.PatchEmbedFunction``): the plain math of the forward and of its gradients, nothing
    replayed. What the reference backend runs under torch.compile."""

    @staticmethod
    def forward(x, weight, bias, pos_embed, prefix_tokens):
        return patch_embed_reference(x, weight, bias, pos_embed, prefix_tokens)

    @staticmethod
    def backward(dout, x, weight, bias, pos_embed, prefix_tokens, needs, patches=None):
        """``patches`` (B, Np, K): the forward's patch matrix when it kept it; None: formed here."""
        need_x, need_w, need_b, need_pos, need_prefix = needs
        E, patch = weight.shape[0], weight.shape[2:]
        num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
        dbody = dout[:, num_prefix:]  # B, Np, E
        dx = dw = None
        db, dpos, dprefix = epilogue_grads(dout, pos_embed, num_prefix, need_b, need_pos, need_prefix)
        if need_w:
            patches = patchify(x, patch) if patches is None else patches  # B, Np, K
            dw = torch.matmul(dbody.reshape(-1, E).t(), patches.reshape(-1, patches.shape[-1])).view(weight.shape)
        if need_x:
            dx = unpatchify(torch.matmul(dbody, weight.reshape(E, -1)), x.shape, patch)
        return dx, dw, db, dpos, dprefix
