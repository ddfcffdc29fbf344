"""Triton fused patch embedding: one GEMM whose A operand is gathered straight from the image/video by
strides (no unfold/im2col copy; channels-last read as it is), with bias, pos_embed and the prefix rows
written by the same launch into the (B, P + Np, E) output (no torch.cat).

GEMM view: M = B * Np patches, K = C * pt * ph * pw features, N = E. A patch row m = (b, it, ih, iw) and a
feature column k address x at ``row(m) + col(k)``: the gather offset is separable, so the kernel never
builds an index tensor. Images are (B, C, 1, H, W) views with pt = 1. The k-order follows x's layout, so
that consecutive k are consecutive in memory and load as wide vectors:
  - NCHW-like strides: k = (c, dt, dh, dw), the conv weight's own order (rows of pw elements);
  - channels-last (unit channel stride, stride_w == C): k = (dt, dh, dw, c), rows of pw * C elements
    (/16 RGB: 48); the weight is read as weight.permute(0, 2, 3, [4,] 1), its (E, [pt,] ph, pw, C) view.
The weight is read as an (E, K) matrix in that k-order with unit K stride and 16-element aligned rows (a
free view of a contiguous conv weight in NCHW order when K is a multiple of 16; otherwise one E x K copy
per call, see ``_weight_rows``).

Backward: dWeight = patches^T dY (gathered again; one program per weight tile and split of the patches,
the splits summed in a fixed order: deterministic; stored in the weight's own (c, dt, dh, dw) layout
whatever the k-order), dX = dY W scattered to x's layout in its k-order only when x needs a gradient,
dBias/dPos/dPrefix from one reduction of dY over the batch.
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
def _patch_col_offsets(offs_k, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, C_IN: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr, stride_c, stride_t, stride_h, stride_w):
    """Offset of feature k inside a patch of x (or dX), in the k-order of x's layout. The patch size (and C
    in channels-last order) are constexprs, so the compiler sees the runs of consecutive addresses:
    NCHW, k = (c, dt, dh, dw): PW consecutive k at unit stride_w (/16: 16 elements, 32 bytes);
    channels-last, k = (dt, dh, j) with j = dw * C + c: the launcher checks stride_w == C * stride_c, so
    j * stride_c addresses the whole PW * C run of a patch row (/16 RGB: 48 elements)."""
    if CHANNELS_LAST:
        ROW: tl.constexpr = PW * C_IN
        j = offs_k % ROW
        dh = (offs_k // ROW) % PH
        dt = offs_k // (ROW * PH)
        return dt.to(tl.int64) * stride_t + dh * stride_h + j * stride_c
    else:
        c = offs_k // (PT * PH * PW)
        dt = (offs_k // (PH * PW)) % PT
        dh = (offs_k // PW) % PH
        dw = offs_k % PW
        return c.to(tl.int64) * stride_c + dt * stride_t + dh * stride_h + dw * stride_w


@triton.jit
def _weight_col_offsets(offs_k, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, C_IN: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, stride_c, stride_t, stride_h, stride_w):
    """Offset of feature k in a tensor of the conv weight's shape (E, C, pt, ph, pw) with these strides (dW's
    store, once per tile): k decoded in the kernel's k-order, any strides."""
    if CHANNELS_LAST:  # k = (dt, dh, dw, c)
        c = offs_k % C_IN
        dw = (offs_k // C_IN) % PW
        dh = (offs_k // (C_IN * PW)) % PH
        dt = offs_k // (C_IN * PW * PH)
    else:  # k = (c, dt, dh, dw)
        c = offs_k // (PT * PH * PW)
        dt = (offs_k // (PH * PW)) % PT
        dh = (offs_k // PW) % PH
        dw = offs_k % PW
    return c.to(tl.int64) * stride_c + dt * stride_t + dh * stride_h + dw * stride_w


@triton.jit
def _patch_embed_fwd_kernel(
    X, W, Bias, Pos, Prefix, Out,
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,  # x: B, C, T, H, W
    stride_we,  # W: E, K_PAD in the k-order (unit K stride, ``_weight_rows``)
    stride_pos_n, stride_pos_e,
    stride_pre_p, stride_pre_e,
    stride_ob, stride_on, stride_oe,  # out: B, P + Np, E
    M, N_EMB, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX, POS_OFFSET,
    PREFIX_ROWS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, POS_HAS_PREFIX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, C_IN: tl.constexpr,
):
    """Programs [0, cdiv(M, BLOCK_M)) compute patch rows: out[b, P + n] = patch @ W^T + bias + pos[n'];
    the programs after them write the B * P prefix rows: out[b, p] = prefix[p] (+ pos[p]). CHANNELS_LAST
    picks the k-order (module docstring)."""
    K_DIM: tl.constexpr = C_IN * PT * PH * PW  # a constexpr: the K mask keeps the vectors (/14: K = 588)
    K_PAD: tl.constexpr = (K_DIM + 15) // 16 * 16  # W's rows: zero-padded to 16 elements (``_weight_rows``)
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
            col_x = _patch_col_offsets(offs_k, PT, PH, PW, C_IN, CHANNELS_LAST,
                                       stride_xc, stride_xt, stride_xh, stride_xw)
            a = tl.load(X + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # (M, K)
            w_t = tl.load(W + offs_k[:, None] + offs_e[None, :].to(tl.int64) * stride_we,
                          mask=(offs_k < K_PAD)[:, None] & mask_e[None, :], other=0.0)  # (K, E): W^T
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
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,  # x: B, C, T, H, W
    stride_db, stride_dn, stride_de,  # dY: B, P + Np, E
    stride_we, stride_wc, stride_wt, stride_wh, stride_ww,  # DW split: the weight's shape E, C, pt, ph, pw
    stride_ws,  # DW: between splits
    M, N_EMB, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX, SPLIT_ROWS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, C_IN: tl.constexpr,
):
    """dW[e, k] = sum over patches of dY[patch, e] * patch[k], split over the patches (split-K: the
    reduction dim is the patch rows): one program per (E tile, K tile, split) walks its SPLIT_ROWS patches in
    order (gathered again, never stored) and writes split ``s`` of DW at ``s * stride_ws``; the host sums
    the splits in a fixed order. Without splits a ViT-B/16 dW had 36 programs for a 132-SM GPU. K is in x's
    k-order (CHANNELS_LAST) for the gather, mapped back to the weight's (c, dt, dh, dw) by the store."""
    K_DIM: tl.constexpr = C_IN * PT * PH * PW
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    offs_e = pid_e * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_e = offs_e < N_EMB
    mask_k = offs_k < K_DIM
    col_x = _patch_col_offsets(offs_k, PT, PH, PW, C_IN, CHANNELS_LAST, stride_xc, stride_xt, stride_xh, stride_xw)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # (E, K)
    row_end = tl.minimum(split * SPLIT_ROWS + SPLIT_ROWS, M)
    for m0 in range(split * SPLIT_ROWS, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        row_x, b, n = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_xb, stride_xt, stride_xh, stride_xw)
        a = tl.load(X + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # (M, K)
        d_rows = b.to(tl.int64) * stride_db + (NUM_PREFIX + n).to(tl.int64) * stride_dn
        dy_t = tl.load(DOut + d_rows[None, :] + offs_e[:, None] * stride_de, mask=mask_e[:, None] & mask_m[None, :],
                       other=0.0)  # (E, M)
        acc = tl.dot(dy_t, a, acc, input_precision=INPUT_PRECISION)
    col_w = _weight_col_offsets(offs_k, PT, PH, PW, C_IN, CHANNELS_LAST, stride_wc, stride_wt, stride_wh, stride_ww)
    tl.store(DW + split.to(tl.int64) * stride_ws + offs_e[:, None].to(tl.int64) * stride_we + col_w[None, :],
             acc.to(DW.dtype.element_ty), mask=mask_e[:, None] & mask_k[None, :])


@triton.jit
def _patch_embed_bwd_dx_kernel(
    DOut, W, DX,
    stride_db, stride_dn, stride_de,  # dY: B, P + Np, E
    stride_we,  # W: E, K_PAD in dX's k-order (unit K stride, ``_weight_rows``)
    stride_xb, stride_xc, stride_xt, stride_xh, stride_xw,  # dX: B, C, T, H, W
    M, N_EMB, NP, GH, GW, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, C_IN: tl.constexpr,
):
    """dX[patch, k] = dY[patch, :] @ W[:, k], scattered to dX's own layout in its k-order (patches do not
    overlap, so every element of dX is written exactly once)."""
    K_DIM: tl.constexpr = C_IN * PT * PH * PW
    K_PAD: tl.constexpr = (K_DIM + 15) // 16 * 16  # W's rows: zero-padded to 16 elements (``_weight_rows``)
    num_k = tl.cdiv(K_DIM, BLOCK_K)  # one grid axis, K blocks fastest: a dY row block is read once from DRAM
    pid_m = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K_DIM
    _, b, n = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, 0, 0, 0, 0)
    d_rows = b.to(tl.int64) * stride_db + (NUM_PREFIX + n).to(tl.int64) * stride_dn
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for e0 in range(0, N_EMB, BLOCK_N):
        offs_e = e0 + tl.arange(0, BLOCK_N)
        mask_e = offs_e < N_EMB
        dy = tl.load(DOut + d_rows[:, None] + offs_e[None, :] * stride_de, mask=mask_m[:, None] & mask_e[None, :],
                     other=0.0)
        w = tl.load(W + offs_e[:, None].to(tl.int64) * stride_we + offs_k[None, :],
                    mask=mask_e[:, None] & (offs_k < K_PAD)[None, :], other=0.0)  # (E, K); dX masks K_DIM
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    row_x, _, _ = _patch_row_offsets(offs_m, NP, GH, GW, PT, PH, PW, stride_xb, stride_xt, stride_xh, stride_xw)
    col_x = _patch_col_offsets(offs_k, PT, PH, PW, C_IN, CHANNELS_LAST, stride_xc, stride_xt, stride_xh, stride_xw)
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


def _k_order(t5: torch.Tensor) -> dict:
    """The k-order constexprs for an image/video (or its gradient) ``t5``: channels-last order when the
    (w, c) pairs of a patch row are consecutive (channels_last / channels_last_3d: unit channel stride,
    stride_w == C; a crop of one keeps it); otherwise k = (c, dt, dh, dw), right for NCHW and any strides."""
    c = t5.shape[1]
    channels_last = c > 1 and t5.stride(1) == 1 and t5.stride(4) == c
    # C is a constexpr in both orders: K = C * pt * ph * pw is then known to the compiler, whose K mask would
    # otherwise split the vectors whenever K is not a multiple of 16 (/14: 588)
    return dict(CHANNELS_LAST=channels_last, C_IN=c)


def _weight_rows(w5: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The weight as an (E, K) matrix in the kernel's k-order with unit K stride and rows 16-element aligned
    (the row stride a multiple of 16, so Triton's divisibility hint lets its loads be 16-byte cp.async).
    NCHW order with K a multiple of 16 (/16, /8, /4 RGB): a view of the contiguous conv weight. Otherwise
    one E x K copy per call, cheap next to the GEMM it feeds (ViT-L/14: 0.6 M weight elements; the GEMM
    reads 9.6 M image elements at batch 64 and does 2 * 16384 * 1024 * 588 flops): channels-last order
    reads weight.permute(0, 2, 3, 4, 1), i.e. (E, pt, ph, pw, C) (a view if the weight is channels-last
    itself); rows of K not a multiple of 16 (/14 RGB: 588) are padded to 592 with zeros, which the kernels
    read (their W mask is K rounded up to 16, so it keeps the vectors whole) against x's masked zeros.
    Only read: dW is written in the weight's own layout by its kernel."""
    E, k_dim = w5.shape[0], math.prod(w5.shape[1:])
    rows = (w5.permute(0, 2, 3, 4, 1) if channels_last else w5).reshape(E, k_dim)
    if k_dim % 16 == 0:
        return rows if rows.stride(1) == 1 and rows.stride(0) % 16 == 0 else rows.contiguous()
    return torch.nn.functional.pad(rows, (0, (-k_dim) % 16))  # a contiguous (E, K_PAD) copy, zeros after K


def _key(x, M, E, k_dim, pt, num_prefix, order, **flags):
    # channels-last order is its own tuning key (other loads, maybe another best tile); the flag is absent
    # for NCHW so recorded NCHW keys keep their names
    cl = dict(channels_last=True) if order["CHANNELS_LAST"] else {}
    return configs.tune_key(x.dtype, M, E, k_dim, video=pt > 1, prefix=num_prefix > 0, **cl, **flags)


def fwd_launch(x, weight, bias, pos_embed, prefix_tokens):
    """The forward launch: (out, grid, args, constexprs, tune key), out allocated. The arguments are what the
    kernel gets, so the PTX test derives Triton's run-time specializations from them."""
    x5, w5 = _as_5d(x), _as_5d(weight)
    (pt, ph, pw), (gt, gh, gw), num_patches, k_dim = _geometry(x5, w5)
    B, E = x.shape[0], weight.shape[0]
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    M = B * num_patches
    pos_has_prefix = pos_embed is not None and pos_embed.shape[1] == num_prefix + num_patches and num_prefix > 0
    order = _k_order(x5)
    w_rows = _weight_rows(w5, order["CHANNELS_LAST"])
    out = torch.empty((B, num_prefix + num_patches, E), dtype=x.dtype, device=x.device)
    pos = pos_embed[0] if pos_embed is not None else out[0]
    prefix = prefix_tokens[0] if prefix_tokens is not None else out[0]
    flags = dict(HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, POS_HAS_PREFIX=pos_has_prefix)
    grid = lambda meta: ((tuning.cdiv(M, meta["BLOCK_M"]) + tuning.cdiv(B * num_prefix, meta["BLOCK_M"]))  # noqa: E731
                         * tuning.cdiv(E, meta["BLOCK_N"]),)
    args = (x5, w_rows, bias if bias is not None else out, pos, prefix, out,
            *x5.stride(), w_rows.stride(0), *pos.stride(), *prefix.stride(), *out.stride(),
            M, E, num_patches, gh, gw, pt, ph, pw, num_prefix,
            num_prefix if pos_has_prefix else 0, B * num_prefix)
    constexprs = dict(**flags, INPUT_PRECISION=_precision(x.dtype), **order)
    return out, grid, args, constexprs, _key(x, M, E, k_dim, pt, num_prefix, order, **flags)


def dw_launch(dout, x, weight):
    """dW's launch: (parts, splits, grid, args, constexprs, tune key). ``parts``: dW itself (one split,
    written in the weight's dtype) or (splits, *weight 5-D shape) fp32 partial sums; both contiguous in the
    weight's (E, C, pt, ph, pw) shape whatever the k-order, so dW has a Conv weight's plain strides."""
    x5, w5 = _as_5d(x), _as_5d(weight)
    (pt, ph, pw), (gt, gh, gw), num_patches, k_dim = _geometry(x5, w5)
    E = weight.shape[0]
    num_prefix = dout.shape[1] - num_patches
    M = x.shape[0] * num_patches
    order = _k_order(x5)
    splits, split_rows = _dw_splits(M, E, k_dim)
    if splits == 1:  # written in place, in the weight's dtype
        parts = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        parts5 = _as_5d(parts).unsqueeze(0)
    else:  # fp32 partial sums, one per split, summed by the caller in a fixed order
        parts = parts5 = torch.empty((splits,) + tuple(w5.shape), dtype=torch.float32, device=weight.device)
    grid = lambda meta: (tuning.cdiv(E, meta["BLOCK_N"]), tuning.cdiv(k_dim, meta["BLOCK_K"]), splits)  # noqa: E731
    args = (x5, dout, parts5, *x5.stride(), *dout.stride(), *parts5.stride()[1:], parts5.stride(0),
            M, E, num_patches, gh, gw, pt, ph, pw, num_prefix, split_rows)
    constexprs = dict(INPUT_PRECISION=_precision(x.dtype), **order)
    return parts, splits, grid, args, constexprs, _key(x, M, E, k_dim, pt, num_prefix, order)


def dx_launch(dout, x, weight):
    """dX's launch: (dx, grid, args, constexprs, tune key); dx keeps x's memory format and is written in its
    own k-order."""
    x5, w5 = _as_5d(x), _as_5d(weight)
    (pt, ph, pw), (gt, gh, gw), num_patches, k_dim = _geometry(x5, w5)
    E = weight.shape[0]
    num_prefix = dout.shape[1] - num_patches
    M = x.shape[0] * num_patches
    dx = torch.empty_like(x)  # keeps x's memory format (channels-last stays channels-last)
    dx5 = _as_5d(dx)
    order = _k_order(dx5)
    w_rows = _weight_rows(w5, order["CHANNELS_LAST"])
    grid = lambda meta: (tuning.cdiv(M, meta["BLOCK_M"]) * tuning.cdiv(k_dim, meta["BLOCK_K"]),)  # noqa: E731
    args = (dout, w_rows, dx5, *dout.stride(), w_rows.stride(0), *dx5.stride(),
            M, E, num_patches, gh, gw, pt, ph, pw, num_prefix)
    constexprs = dict(INPUT_PRECISION=_precision(x.dtype), **order)
    return dx, grid, args, constexprs, _key(x, M, E, k_dim, pt, num_prefix, order)


def patch_embed_fwd_triton(x, weight, bias, pos_embed, prefix_tokens) -> torch.Tensor:
    """Forward: (B, P + Np, E) in x's dtype."""
    with tuning.on_device(x):
        out, grid, args, constexprs, key = fwd_launch(x, weight, bias, pos_embed, prefix_tokens)
        tuning.launch(configs.PATCH_FWD, _patch_embed_fwd_kernel, grid, args, constexprs, key, x.device)
    return out


def patch_embed_bwd_triton(dout, x, weight, bias, pos_embed, prefix_tokens, needs):
    """Backward: (dx, dweight, dbias, dpos_embed, dprefix_tokens), each None unless needed."""
    need_x, need_w, need_b, need_pos, need_prefix = needs
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    num_patches = dout.shape[1] - num_prefix
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
            parts, splits, grid, args, constexprs, key = dw_launch(dout, x, weight)
            tuning.launch(configs.PATCH_BWD_DW, _patch_embed_bwd_dw_kernel, grid, args, constexprs, key, x.device)
            dw = parts if splits == 1 else parts.sum(0).view(weight.shape).to(weight.dtype)
        if need_x:
            dx, grid, args, constexprs, key = dx_launch(dout, x, weight)
            tuning.launch(configs.PATCH_BWD_DX, _patch_embed_bwd_dx_kernel, grid, args, constexprs, key, x.device)
    return dx, dw, db, dpos, dprefix


# dW's split-K aims at about this many programs (a few waves on any GPU) ...
DW_TARGET_PROGRAMS = 512
# ... with splits of at least this many patch rows (fewer would make the fp32 partial sums the traffic)
DW_MIN_SPLIT_ROWS = 1024


def _dw_splits(m: int, n_emb: int, k_dim: int):
    """(splits, patch rows per split) of dW's reduction over the M patch rows. From the shape only, with a
    fixed 128 x 128 tile estimate, never from the launch config: the order of every sum is fixed by the
    inputs, so dW is bitwise deterministic whatever config tuning picks."""
    tiles = tuning.cdiv(n_emb, 128) * tuning.cdiv(k_dim, 128)
    splits = max(1, min(tuning.cdiv(DW_TARGET_PROGRAMS, tiles), m // DW_MIN_SPLIT_ROWS))
    rows = tuning.cdiv(tuning.cdiv(m, splits), 128) * 128  # a multiple of every BLOCK_M
    return tuning.cdiv(m, rows), rows


class TritonPatchEmbedKernels:
    """patch_embed's Triton forward/backward, in the shape ``PatchEmbedFunction`` expects."""

    forward = staticmethod(patch_embed_fwd_triton)
    backward = staticmethod(patch_embed_bwd_triton)
