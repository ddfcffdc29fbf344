"""Triton fused patch embedding: one GEMM whose A operand is gathered straight from the image/video by
strides (no unfold/im2col copy; channels-last read as it is), with bias, pos_embed and the prefix rows
written by the same launch into the (B, P + Np, E) output (no torch.cat).

GEMM view: M = B * Np patches, K = C * pt * ph * pw features, N = E. A patch row m = (b, it, ih, iw) and a
feature column k = (c, dt, dh, dw) address x at ``row(m) + col(k)``: the gather offset is separable, so
the kernel never builds an index tensor. Images are (B, C, 1, H, W) views with pt = 1.

Backward: dWeight = patches^T dY (gathered again; one program per weight tile, looping over all patches:
deterministic), dX = dY W scattered to x's layout only when x needs a gradient, dBias/dPos/dPrefix from
one reduction of dY over the batch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vitkernels.ops import tuning
from vitkernels.ops.attention.triton import _precision
from vitkernels.ops.patch_embed import triton_configs as configs


@triton.jit
def _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_b, stride_t, stride_h, stride_w):
    """Offset of each patch's first element (b, it*pt, ih*ph, iw*pw) and its index in the sample."""
    b = offs_m // NP
    n = offs_m % NP
    it = n // (GH * GW)
    ih = (n // GW) % GH
    iw = n % GW
    off = b.to(tl.int64) * stride_b + (it * PT).to(tl.int64) * stride_t + (ih * PH).to(tl.int64) * stride_h \
        + (iw * PW).to(tl.int64) * stride_w
    return off, b, n


@triton.jit
def _patch_col_offsets(offs_k, PT, PH, PW, stride_c, stride_t, stride_h, stride_w):
    """Offset of feature k = (c, dt, dh, dw) inside a patch, for a tensor with these strides. The patch
    size is a constexpr in every kernel: with PW = 16 the compiler sees 16 consecutive k at consecutive
    addresses (unit stride_w) and loads them as wide vectors."""
    c = offs_k // (PT * PH * PW)
    dt = (offs_k // (PH * PW)) % PT
    dh = (offs_k // PW) % PH
    dw = offs_k % PW
    return c.to(tl.int64) * stride_c + dt * stride_t + dh * stride_h + dw * stride_w


@triton.jit
def _patch_embed_fwd_kernel(
    X, W, Bias, Pos, Prefix, Out,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_we, stride_wc, stride_wt, stride_wh, stride_ww,
    stride_pos_n, stride_pos_e,
    stride_pre_p, stride_pre_e,
    stride_ob, stride_on, stride_oe,
    M, N_EMB, K_DIM, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX, POS_OFFSET,
    PREFIX_ROWS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, POS_HAS_PREFIX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Programs [0, cdiv(M, BLOCK_M)) compute patch rows: out[b, P + n] = patch @ W^T + bias + pos[n'];
    the programs after them write the B * P prefix rows: out[b, p] = prefix[p] (+ pos[p])."""
    # one grid axis, embedding blocks fastest: the programs of one patch block run together, so its image
    # tile comes from DRAM once and from L2 for the other E blocks (the weight is small: L2-resident)
    num_n = tl.cdiv(N_EMB, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_e = offs_e < N_EMB
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    if pid_m < num_m_blocks:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_x, b, n = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_xb, stride_xt, stride_xh, stride_xw)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_DIM
            col_x = _patch_col_offsets(offs_k, PT, PH, PW, stride_xc, stride_xt, stride_xh, stride_xw)
            a = tl.load(X + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            col_w = _patch_col_offsets(offs_k, PT, PH, PW, stride_wc, stride_wt, stride_wh, stride_ww)
            w_t = tl.load(W + col_w[:, None] + offs_e[None, :].to(tl.int64) * stride_we,
                          mask=mask_k[:, None] & mask_e[None, :], other=0.0)  # (K, E): W^T
            acc = tl.dot(a, w_t, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_e[None, :]
        if HAS_POS:
            pos_rows = (POS_OFFSET + n).to(tl.int64) * stride_pos_n
            acc += tl.load(Pos + pos_rows[:, None] + offs_e[None, :] * stride_pos_e, mask=mask, other=0.0).to(tl.float32)
        out_rows = b.to(tl.int64) * stride_ob + (NUM_PREFIX + n).to(tl.int64) * stride_on
        tl.store(Out + out_rows[:, None] + offs_e[None, :] * stride_oe, acc.to(Out.dtype.element_ty), mask=mask)
    else:
        offs_r = (pid_m - num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_r < PREFIX_ROWS)[:, None] & mask_e[None, :]
        b = offs_r // NUM_PREFIX
        p = offs_r % NUM_PREFIX
        val = tl.load(Prefix + p[:, None] * stride_pre_p + offs_e[None, :] * stride_pre_e, mask=mask,
                      other=0.0).to(tl.float32)
        if POS_HAS_PREFIX:
            val += tl.load(Pos + p[:, None] * stride_pos_n + offs_e[None, :] * stride_pos_e, mask=mask,
                           other=0.0).to(tl.float32)
        out_rows = b.to(tl.int64) * stride_ob + p.to(tl.int64) * stride_on
        tl.store(Out + out_rows[:, None] + offs_e[None, :] * stride_oe, val.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_dw_kernel(
    X, DOut, DW,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dn, stride_de,
    stride_we, stride_wc, stride_wt, stride_wh, stride_ww,
    stride_ws,
    M, N_EMB, K_DIM, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX, SPLIT_ROWS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dW[e, k] = sum over patches of dY[patch, e] * patch[k], split over the patches (split-K: the
    reduction dim is the patch rows): one program per (E tile, K tile, split) walks its SPLIT_ROWS patches in
    order (gathered again, never stored) and writes split ``s`` of DW at ``s * stride_ws``; the host sums
    the splits in a fixed order. Without splits a ViT-B/16 dW had 36 programs for a 132-SM GPU."""
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    offs_e = pid_e * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_e = offs_e < N_EMB
    mask_k = offs_k < K_DIM
    col_x = _patch_col_offsets(offs_k, PT, PH, PW, stride_xc, stride_xt, stride_xh, stride_xw)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    row_end = tl.minimum(split * SPLIT_ROWS + SPLIT_ROWS, M)
    for m0 in range(split * SPLIT_ROWS, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        row_x, b, n = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_xb, stride_xt, stride_xh, stride_xw)
        a = tl.load(X + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        d_rows = b.to(tl.int64) * stride_db + (NUM_PREFIX + n).to(tl.int64) * stride_dn
        dy_t = tl.load(DOut + d_rows[None, :] + offs_e[:, None] * stride_de, mask=mask_e[:, None] & mask_m[None, :],
                       other=0.0)  # (E, M)
        acc = tl.dot(dy_t, a, acc, input_precision=INPUT_PRECISION)
    col_w = _patch_col_offsets(offs_k, PT, PH, PW, stride_wc, stride_wt, stride_wh, stride_ww)
    tl.store(DW + split.to(tl.int64) * stride_ws + offs_e[:, None].to(tl.int64) * stride_we + col_w[None, :],
             acc.to(DW.dtype.element_ty), mask=mask_e[:, None] & mask_k[None, :])


@triton.jit
def _patch_embed_bwd_dx_kernel(
    DOut, W, DX,
    stride_db, stride_dn, stride_de,
    stride_we, stride_wc, stride_wt, stride_wh, stride_ww,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,
    M, N_EMB, K_DIM, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dX[patch, k] = dY[patch, :] @ W[:, k], scattered to x's layout (patches do not overlap, so every
    element of dX is written exactly once)."""
    num_k = tl.cdiv(K_DIM, BLOCK_K)  # one grid axis, K blocks fastest: a dY row block is read once from DRAM
    pid_m = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K_DIM
    _, b, n = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, 0, 0, 0, 0)
    d_rows = b.to(tl.int64) * stride_db + (NUM_PREFIX + n).to(tl.int64) * stride_dn
    col_w = _patch_col_offsets(offs_k, PT, PH, PW, stride_wc, stride_wt, stride_wh, stride_ww)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for e0 in range(0, N_EMB, BLOCK_N):
        offs_e = e0 + tl.arange(0, BLOCK_N)
        mask_e = offs_e < N_EMB
        dy = tl.load(DOut + d_rows[:, None] + offs_e[None, :] * stride_de, mask=mask_m[:, None] & mask_e[None, :],
                     other=0.0)
        w = tl.load(W + offs_e[:, None].to(tl.int64) * stride_we + col_w[None, :],
                    mask=mask_e[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    row_x, _, _ = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_xb, stride_xt, stride_xh, stride_xw)
    col_x = _patch_col_offsets(offs_k, PT, PH, PW, stride_xc, stride_xt, stride_xh, stride_xw)
    tl.store(DX + row_x[:, None] + col_x[None, :], acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(2) if t.dim() == 4 else t  # images as (B, C, 1, H, W) / weights as (E, C, 1, ph, pw)


def _geometry(x5: torch.Tensor, w5: torch.Tensor):
    pt, ph, pw = w5.shape[2:]
    grid = (x5.shape[2] // pt, x5.shape[3] // ph, x5.shape[4] // pw)
    return (pt, ph, pw), grid, math.prod(grid), w5.shape[1] * pt * ph * pw


def patch_embed_fwd_triton(x, weight, bias, pos_embed, prefix_tokens) -> torch.Tensor:
    """Forward: (B, P + Np, E) in x's dtype."""
    x5, w5 = _as_5d(x), _as_5d(weight)
    (pt, ph, pw), (gt, gh, gw), num_patches, k_dim = _geometry(x5, w5)
    B, E = x.shape[0], weight.shape[0]
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    M = B * num_patches
    pos_has_prefix = pos_embed is not None and pos_embed.shape[1] == num_prefix + num_patches and num_prefix > 0
    with tuning.on_device(x):
        out = torch.empty((B, num_prefix + num_patches, E), dtype=x.dtype, device=x.device)
        pos = pos_embed[0] if pos_embed is not None else out[0]
        prefix = prefix_tokens[0] if prefix_tokens is not None else out[0]
        flags = dict(HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, POS_HAS_PREFIX=pos_has_prefix)
        tuning.launch(
            configs.PATCH_FWD, _patch_embed_fwd_kernel,
            lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + triton.cdiv(B * num_prefix, meta["BLOCK_M"]))
                          * triton.cdiv(E, meta["BLOCK_N"]),),
            (x5, w5, bias if bias is not None else out, pos, prefix, out,
             *x5.stride(), *w5.stride(), *pos.stride(), *prefix.stride(), *out.stride(),
             M, E, k_dim, num_patches, gh, gw, pt, ph, pw, num_prefix,
             num_prefix if pos_has_prefix else 0, B * num_prefix),
            dict(**flags, INPUT_PRECISION=_precision(x.dtype)),
            configs.tune_key(x.dtype, M, E, k_dim, video=pt > 1, prefix=num_prefix > 0, **flags), x.device)
    return out


def patch_embed_bwd_triton(dout, x, weight, bias, pos_embed, prefix_tokens, needs):
    """Backward: (dx, dweight, dbias, dpos_embed, dprefix_tokens), each None unless needed."""
    need_x, need_w, need_b, need_pos, need_prefix = needs
    x5, w5 = _as_5d(x), _as_5d(weight)
    (pt, ph, pw), (gt, gh, gw), num_patches, k_dim = _geometry(x5, w5)
    B, E = x.shape[0], weight.shape[0]
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    M = B * num_patches
    precision = _precision(x.dtype)
    key = configs.tune_key(x.dtype, M, E, k_dim, video=pt > 1, prefix=num_prefix > 0)
    dx = dw = db = dpos = dprefix = None
    with tuning.on_device(x):
        if need_b or need_pos or need_prefix:
            per_token = dout.sum(dim=0, dtype=torch.float32)  # P + Np, E: one pass over dY for all three
            if need_b:
                db = per_token[num_prefix:].sum(0).to(bias.dtype)
            if need_pos:
                rows = per_token if pos_embed.shape[1] == num_prefix + num_patches else per_token[num_prefix:]
                dpos = rows.unsqueeze(0).to(pos_embed.dtype)
            if need_prefix:
                dprefix = per_token[:num_prefix].unsqueeze(0).to(prefix_tokens.dtype)
        if need_w:
            splits, split_rows = _dw_splits(M, E, k_dim)
            if splits == 1:  # written in place, in the weight's dtype
                dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                parts = _as_5d(dw).unsqueeze(0)
            else:  # fp32 partial sums, one per split, summed below in a fixed order
                parts = torch.empty((splits,) + tuple(w5.shape), dtype=torch.float32, device=weight.device)
            tuning.launch(
                configs.PATCH_BWD_DW, _patch_embed_bwd_dw_kernel,
                lambda meta: (triton.cdiv(E, meta["BLOCK_N"]), triton.cdiv(k_dim, meta["BLOCK_K"]), splits),
                (x5, dout, parts, *x5.stride(), *dout.stride(), *parts.stride()[1:], parts.stride(0),
                 M, E, k_dim, num_patches, gh, gw, pt, ph, pw, num_prefix, split_rows),
                dict(INPUT_PRECISION=precision), key, x.device)
            if splits > 1:
                dw = parts.sum(0).view(weight.shape).to(weight.dtype)
        if need_x:
            dx = torch.empty_like(x)  # keeps x's memory format (channels-last stays channels-last)
            dx5 = _as_5d(dx)
            tuning.launch(
                configs.PATCH_BWD_DX, _patch_embed_bwd_dx_kernel,
                lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(k_dim, meta["BLOCK_K"]),),
                (dout, w5, dx5, *dout.stride(), *w5.stride(), *dx5.stride(),
                 M, E, k_dim, num_patches, gh, gw, pt, ph, pw, num_prefix),
                dict(INPUT_PRECISION=precision), key, x.device)
    return dx, dw, db, dpos, dprefix


# dW's split-K aims at about this many programs (a few waves on any GPU) ...
DW_TARGET_PROGRAMS = 512
# ... with splits of at least this many patch rows (fewer would make the fp32 partial sums the traffic)
DW_MIN_SPLIT_ROWS = 1024


def _dw_splits(m: int, n_emb: int, k_dim: int):
    """(splits, patch rows per split) of dW's reduction over the M patch rows. From the shape only, with a
    fixed 128 x 128 tile estimate, never from the launch config: the order of every sum is fixed by the
    inputs, so dW is bitwise deterministic whatever config tuning picks."""
    tiles = triton.cdiv(n_emb, 128) * triton.cdiv(k_dim, 128)
    splits = max(1, min(triton.cdiv(DW_TARGET_PROGRAMS, tiles), m // DW_MIN_SPLIT_ROWS))
    rows = triton.cdiv(triton.cdiv(m, splits), 128) * 128  # a multiple of every BLOCK_M
    return triton.cdiv(m, rows), rows


class TritonPatchEmbedKernels:
    """patch_embed's Triton forward/backward, in the shape ``PatchEmbedFunction`` expects."""

    forward = staticmethod(patch_embed_fwd_triton)
    backward = staticmethod(patch_embed_bwd_triton)
