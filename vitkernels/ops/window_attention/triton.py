"""Triton Swin / Video Swin window attention: cyclic shift, padding, partition, relative-position bias,
shift mask and window reverse folded into the kernels. No rolled, padded or partitioned copy of the map,
and no (windows x N x N) bias or mask tensor, ever exists in memory.

Every map is handled as 3-D (T, H, W) (2-D: T = 1, window 1, shift 0). A window token's position in the
shifted, padded map is ``p = window * w + i``; its source in the unpadded map is ``(p + s) mod L`` with L
the map size (2-D, timm: roll, then pad) or the padded size (3-D, Video Swin: pad, then roll), and it is
padding when it falls outside the map; padding tokens take ``qkv_bias``. The shift-mask region of ``p``
is timm's ``[0, L-w) | [L-w, L-s) | [L-s, L)`` per dim; the table row of a pair comes from the tokens'
coordinates in the table's window (Video Swin's ``index[:N, :N]`` when a 3-D window is clipped).

Windows of at most 64 tokens (Swin's 7x7 and 8x8; not Video Swin's 8x7x7) fit one tile and take the fused
kernels: one forward program per (consecutive windows, HEADS_PER_PROGRAM consecutive heads) loops over its
windows and, per window, over its heads, with the window's geometry (shift, padding, partition, row offsets)
computed once for all of them; the launcher packs heads while the grid keeps FILL_PROGRAMS programs
(Swin-T at batch 64: 3, 2, 1, 1 heads per program in stages 1..4). The fused backward keeps one head per
program (over a group of windows): its d(table) partial sum is a (64 x 64) fp32 tile carried across the
group's windows (~70 of its ~250 registers per thread under ptxas, sm_90), and a second head would need a
second one. Several 49-token windows are not packed into one tile: the rows stay 77% used (2 x 49 of 128
as 49 of 64), while the block-diagonal mask wastes the off-diagonal blocks of every (N x N) tile (S,
softmax, P V: 2 windows use 29% of a 128 x 128 tile against 59% of a 64 x 64 one), so every step that
scales with N x N would do about twice the work. Only the map's last window
along a shifted dim is cut by the shift mask, and all such windows are cut alike, so a window's mask is one
of 8 patterns (last along T, H, W or not); the table bias plus each pattern's mask is built once per call
as a small dense tensor (8, heads, 64, 64) that the kernels read as one contiguous tile per window,
instead of a per-pair index computation and table gather (the forward that did so took 589 us at Swin-T
stage 1, batch 64, bf16 on an H200; the fused one 92 us).
Bigger windows (12x12, Video Swin 8x7x7) take the blocked kernels: one program per (window, head, query
block), the bias gathered from the table by index arithmetic, the mask from the regions.

Backward: dQKV is written once per token at its source position (each token belongs to one window).
The fused kernel forms P, dP and dS once per window and writes dQ, dK and dV; the blocked path has a
dK/dV kernel, a dQ kernel and a d(table) kernel per (tile, group of windows, head). The
reductions have no atomics: dS summed over a group's windows (d(table)) and padding tokens' dK/dV
(d(qkv_bias): only padding reads qkv_bias) go to one slot per program, summed on the host in a fixed
order; the groups depend on the shape only, so every gradient is bitwise deterministic.

A packed qkv's strides are multiples of 16 elements only when D is (D = 40: 3C = 360 with 3 heads);
Triton's launch specialization then gives no divisibility hint and every q / k / v load of a row went
16 bits at a time (0 cp.async). Every kernel (fused and blocked, and the blocked backward's rowsum) takes
STRIDE_ALIGN (the host's largest of 8 / 4 / 2 dividing every stride of the tensors it reads or writes, and
C; 1 when all are multiples of 16) and rounds the strides to it in the kernel, which tells the compiler.

Swin V2's scaled cosine attention (``cosine=True``) runs in the same kernels: the q and k rows of each tile
are L2-normalised in fp32 where they are loaded (no normalised copy exists), the head's logit scale is
folded into q_hat and the logits stay in natural units; in fp16 / bf16, q_hat and k_hat enter the dots as
hi + lo pairs (logits up to 100 need more than one rounding to the input dtype). The backward applies the
normalisation's adjoint row by row (a program holds a token's whole head dim) and sums d(logit_scale) as
the other reductions: one slot per program, summed on the host in a fixed order. Each kernel body takes a
COSINE flag; its ``*_kernel`` entry point keeps the plain signature (ptxas allocates registers by the
parameter list too: the plain kernels compile as they did), its ``*_cosine_kernel`` one adds the logit
scale (and the d(logit_scale) slots). The entry points' STRIDE_ALIGN (and the fused forward's
HEADS_PER_PROGRAM) default to 1 (strides as Triton specializes them, one head per program), as the AOT tests
compile them unless told.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from vitkernels.ops import tuning
from vitkernels.ops._compile import constant_tensors
from vitkernels.ops.attention.triton import (
    _precision,
    finalize_rows,
    online_softmax_step,
    probs_from_lse,
)
from vitkernels.ops.window_attention import cosine, geometry
from vitkernels.ops.window_attention import triton_configs as configs

# Windows of at most this many tokens (7x7, 8x8) take the fused one-tile forward and backward.
FUSED_MAX_TOKENS = 64
# Grouped reductions (d(table), d(qkv_bias)) aim at about this many programs: several waves on any GPU.
TARGET_PROGRAMS = 1024
# The fused forward packs up to this many heads of a window per program while at least FILL_PROGRAMS
# programs remain (two waves of a 132-SM H100: one-tile programs are short, several share an SM).
MAX_HEADS_PER_PROGRAM = 4
FILL_PROGRAMS = 264


# ----------------------------------------------------------------------------------------------------
# Token geometry


@triton.jit
def _region(p, P, W, s):
    """Shift-mask region of shifted-padded coordinate p along one dim (padded size P, window W, shift s)."""
    r = (p >= P - W).to(tl.int32) + (p >= P - s).to(tl.int32)
    return tl.where(s == 0, 2, r)


@triton.jit
def _window_tokens(n, win_t, win_h, win_w,
                   WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
                   ROLL_FIRST: tl.constexpr):
    """For token numbers ``n`` of the window at grid position (win_t, win_h, win_w): source coordinates
    in the unpadded map, whether each is a real token (else padding) and its shift-mask region."""
    pt = win_t * WT + n // (WH * WW)
    ph = win_h * WH + (n // WW) % WH
    pw = win_w * WW + n % WW
    if ROLL_FIRST:  # timm 2-D: roll the map, then pad its end
        real = (pt < ST) & (ph < SH) & (pw < SW)
        src_t = (pt + SHIFT_T) % ST
        src_h = (ph + SHIFT_H) % SH
        src_w = (pw + SHIFT_W) % SW
    else:  # Video Swin 3-D: pad, then roll the padded volume
        src_t = (pt + SHIFT_T) % PT
        src_h = (ph + SHIFT_H) % PH
        src_w = (pw + SHIFT_W) % PW
        real = (src_t < ST) & (src_h < SH) & (src_w < SW)
    region = (_region(pt, PT, WT, SHIFT_T) * 3 + _region(ph, PH, WH, SHIFT_H)) * 3 + _region(pw, PW, WW, SHIFT_W)
    return src_t, src_h, src_w, real, region


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride`` with its divisibility by ALIGN known to the compiler: ``stride // ALIGN * ALIGN`` is the same
    value (the host checked that ALIGN divides it) as a product by a constant, which AxisInfo tracks; a
    packed qkv at D = 40 has strides that are multiples of 8 elements, not the 16 Triton specializes, and
    ``tl.multiple_of`` on an argument is ignored. ALIGN = 1: unchanged."""
    if ALIGN > 1:
        stride = stride // ALIGN * ALIGN
    return stride


@triton.jit
def _aligned4(stride_b, stride_t, stride_h, stride_w, ALIGN: tl.constexpr):
    """``_aligned`` of one tensor's (batch, t, h, w) strides."""
    return (_aligned(stride_b, ALIGN), _aligned(stride_t, ALIGN), _aligned(stride_h, ALIGN),
            _aligned(stride_w, ALIGN))


@triton.jit
def _token_offsets(src_t, src_h, src_w, stride_t, stride_h, stride_w):
    return src_t.to(tl.int64) * stride_t + src_h.to(tl.int64) * stride_h + src_w.to(tl.int64) * stride_w


@triton.jit
def _load_tokens(QKV, QKVBias, row_off, real, in_window, col0, offs_d, mask_d, HAS_QKV_BIAS: tl.constexpr):
    """(tokens, D) slice [col0, col0 + D) of qkv for the given tokens; padding tokens take qkv_bias."""
    x = tl.load(QKV + row_off[:, None] + col0 + offs_d[None, :], mask=real[:, None] & mask_d[None, :], other=0.0)
    if HAS_QKV_BIAS:
        bias = tl.load(QKVBias + col0 + offs_d, mask=mask_d, other=0.0)
        pad = in_window & (real == 0)
        x = tl.where(pad[:, None] & mask_d[None, :], bias[None, :], x)
    return x


@triton.jit
def _window_of(pid_bw, NUM_WIN, NW_H, NW_W):
    """Batch index and window-grid coordinates of program row ``pid_bw = b * NUM_WIN + window``."""
    w = pid_bw % NUM_WIN
    return pid_bw // NUM_WIN, w // (NW_H * NW_W), (w // NW_W) % NW_H, w % NW_W


@triton.jit
def _load_key_side(x_base, QKVBias, offs_n, win_t, win_h, win_w, head, stride_xt, stride_xh, stride_xw,
                   C, HEAD_DIM, N_TOK, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
                   BLOCK_D: tl.constexpr, ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr):
    """k and v of a key block of one window-head, with the keys' geometry."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    in_n = offs_n < N_TOK
    kt, kh, kw, real_n, region_n = _window_tokens(offs_n, win_t, win_h, win_w, WT, WH, WW, ST, SH, SW, PT, PH, PW,
                                                  SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
    real_n = real_n & in_n
    rows_n = _token_offsets(kt, kh, kw, stride_xt, stride_xh, stride_xw)
    k = _load_tokens(x_base, QKVBias, rows_n, real_n, in_n, C + head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    v = _load_tokens(x_base, QKVBias, rows_n, real_n, in_n, 2 * C + head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    return k, v, kt, kh, kw, real_n, in_n, region_n


@triton.jit
def _table_rows(n_i, n_j, TT, TH, TW):
    """Table row of each (query, key) pair: relative offsets of their coordinates in the table's window."""
    ti = n_i // (TH * TW)
    hi = (n_i // TW) % TH
    wi = n_i % TW
    tj = n_j // (TH * TW)
    hj = (n_j // TW) % TH
    wj = n_j % TW
    return ((ti[:, None] - tj[None, :] + TT - 1) * (2 * TH - 1) + (hi[:, None] - hj[None, :] + TH - 1)) \
        * (2 * TW - 1) + (wi[:, None] - wj[None, :] + TW - 1)


@triton.jit
def _window_scores(qk, n_i, n_j, in_i, in_j, region_i, region_j, Table, stride_tr, qk_scale, table_scale,
                   TT, TH, TW, HAS_TABLE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Logits of a (query tile x key tile) from its raw dot ``qk`` (q k^T, or q_hat k_hat^T): qk * qk_scale
    + table bias * table_scale (both with log2(e) for log2 units), -inf on keys outside the window and on
    pairs the shift mask separates. ``Table`` points at this head's column."""
    qk = qk * qk_scale
    pair = in_i[:, None] & in_j[None, :]
    if HAS_TABLE:
        rows = _table_rows(n_i, n_j, TT, TH, TW)
        qk += tl.load(Table + rows * stride_tr, mask=pair, other=0.0).to(tl.float32) * table_scale
    keep = in_j[None, :] & (n_i[:, None] >= 0)
    if HAS_SHIFT:
        keep = keep & (region_i[:, None] == region_j[None, :])
    return tl.where(keep, qk, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# Swin V2 scaled cosine attention: q and k rows L2-normalised in fp32 inside the kernels, the head's logit
# scale exp(min(logit_scale, log 100)) folded into q_hat before the dot (as timm's (q_hat * scale) k_hat^T:
# scaling the dot's result instead rounds once more at ~100, and doubles the output's error in fp32), and
# the logits kept in natural units: they reach 100 + table, and only their (small) differences to the row
# max go to log2 units, so neither P nor the saved lse carries a rounding of ~170.


@triton.jit
def _logit_factor(LogitScale, head, stride_ls):
    """The head's exp(min(logit_scale, log 100)), fp32: computed on the host by ``cosine.logit_scale_factor``
    (torch's exp, the reference's bits; tl.exp compiles to ex2.approx, a few ulp off at a factor of 100)."""
    return tl.load(LogitScale + head * stride_ls).to(tl.float32)


@triton.jit
def _l2_normalize(x, norm):
    """x / max(||x||, 1e-12) row-wise in fp32, as F.normalize; IEEE division (``/`` is approximate on the
    GPU, and at logit scale 100 an ulp of x_hat shows in the output)."""
    xf = x.to(tl.float32)
    return tl.math.div_rn(xf, tl.broadcast_to(tl.maximum(norm, 1e-12)[:, None], xf.shape))


@triton.jit
def _l2_rows(x, scale, COSINE: tl.constexpr):
    """The dot operands of a (tokens, D) tile. Without COSINE: (x, x, 0). With it, rows normalised in fp32
    as F.normalize and times ``scale``: (x_hat * scale in x's dtype, what that rounding lost (fp16 / bf16:
    logits up to 100 need more than their mantissa, so hi + lo go into the dots; fp32: the same tile
    again), ||x|| fp32 (tokens,)). The backward's adjoint recomputes x_hat from x and the norm rather
    than keep an fp32 tile alive (the fused backward is at the register limit)."""
    if COSINE:
        xf = x.to(tl.float32)
        norm = tl.math.sqrt_rn(tl.sum(xf * xf, 1))
        x_s = _l2_normalize(x, norm) * scale
        if x.dtype != tl.float32:
            hi = x_s.to(x.dtype)
            lo = (x_s - hi.to(tl.float32)).to(x.dtype)
        else:
            hi = x_s
            lo = x_s
    else:
        hi = x
        lo = x
        norm = tl.zeros([x.shape[0]], dtype=tl.float32)
    return hi, lo, norm


@triton.jit
def _qk_dot(q, q_lo, k, k_lo, COSINE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q k^T (M, N) in fp32 from the operands of ``_l2_rows``; cosine in fp16 / bf16: lo.hi + hi.lo + hi.hi
    of the split operands (lo.lo is below the hi + lo rounding)."""
    if COSINE:
        if q.dtype != tl.float32:
            qk = tl.dot(q_lo, tl.trans(k), input_precision=INPUT_PRECISION)
            qk = tl.dot(q, tl.trans(k_lo), qk, input_precision=INPUT_PRECISION)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=INPUT_PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    return qk


@triton.jit
def _online_softmax_step_ln(qk, m_i, l_i, acc):
    """``online_softmax_step`` on logits in natural units (cosine: only the differences to the running max
    go to log2 units)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a key block the shift mask hides entirely
    p = tl.math.exp2((qk - m_shift[:, None]) * 1.4426950408889634)
    alpha = tl.math.exp2((m_i - m_shift) * 1.4426950408889634)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _l2_adjoint(g, x, norm, COSINE: tl.constexpr):
    """d x from d x_hat (fp32, (tokens, D)) through x_hat = x / max(||x||, eps) row-wise:
    (g - x_hat (x_hat . g)) / ||x||, or g / eps where the norm is clamped (``cosine._normalize_backward``).
    Without COSINE: g."""
    if COSINE:
        x_hat = _l2_normalize(x, norm)
        proj = tl.sum(x_hat * g, 1)
        g = tl.where((norm > 1e-12)[:, None], g - x_hat * proj[:, None], g)
        g = tl.math.div_rn(g, tl.broadcast_to(tl.maximum(norm, 1e-12)[:, None], g.shape))
    return g


# ----------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _window_attn_fwd(
    QKV, QKVBias, Table, Out, LSE, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    COSINE: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """One program per (batch-window, head, query block) of a window bigger than one tile: loops over the
    window's key blocks with the online softmax. STRIDE_ALIGN: what divides every qkv / out stride and C
    (``_aligned``)."""
    pid_bw = tl.program_id(0)  # b * NUM_WIN + window (axis 0: no 65535 grid limit)
    head = tl.program_id(1)
    pid_m = tl.program_id(2)
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_ob, stride_ot, stride_oh, stride_ow = _aligned4(stride_ob, stride_ot, stride_oh, stride_ow, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    b, win_t, win_h, win_w = _window_of(pid_bw, NUM_WIN, NW_H, NW_W)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < N_TOK
    st, sh, sw, real_m, region_m = _window_tokens(offs_m, win_t, win_h, win_w, WT, WH, WW, ST, SH, SW, PT, PH, PW,
                                                  SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
    real_m = real_m & in_m
    x_base = QKV + b.to(tl.int64) * stride_xb
    q = _load_tokens(x_base, QKVBias, _token_offsets(st, sh, sw, stride_xt, stride_xh, stride_xw), real_m, in_m,
                     head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    if COSINE:  # the scale in q_hat, logits in natural units
        sm_scale = sm_scale * _logit_factor(LogitScale, head, stride_ls)
        qk_scale = 1.0
        table_scale = 1.0
    else:
        qk_scale = sm_scale * 1.4426950408889634
        table_scale = 1.4426950408889634
    q, q_lo, q_norm = _l2_rows(q, sm_scale, COSINE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_TOK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, kt, kh, kw, real_n, in_n, region_n = _load_key_side(
            x_base, QKVBias, offs_n, win_t, win_h, win_w, head, stride_xt, stride_xh, stride_xw, C, HEAD_DIM, N_TOK,
            WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS)
        k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
        qk = _window_scores(_qk_dot(q, q_lo, k, k_lo, COSINE, INPUT_PRECISION), offs_m, offs_n, in_m, in_n,
                            region_m, region_n, Table + head * stride_th, stride_tr, qk_scale, table_scale,
                            TT, TH, TW, HAS_TABLE, HAS_SHIFT)
        if COSINE:
            p, m_i, l_i, acc = _online_softmax_step_ln(qk, m_i, l_i, acc)
        else:
            p, m_i, l_i, acc = online_softmax_step(qk, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)

    if COSINE:  # rows past the window may see no key (shift mask): never stored, kept finite
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        lse = m_i + tl.math.log2(l_i) * 0.6931471805599453
    else:
        acc, lse = finalize_rows(acc, m_i, l_i)
    tl.store(LSE + (pid_bw.to(tl.int64) * NUM_HEADS + head) * N_TOK + offs_m, lse, mask=in_m)
    o_rows = _token_offsets(st, sh, sw, stride_ot, stride_oh, stride_ow)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + o_rows[:, None] + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=real_m[:, None] & mask_d[None, :])  # padding is cropped


@triton.jit
def _window_attn_fwd_kernel(
    QKV, QKVBias, Table, Out, LSE,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_tr, stride_th,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_fwd`` without cosine."""
    _window_attn_fwd(
        QKV, QKVBias, Table, Out, LSE, LSE, stride_xb, stride_xt, stride_xh, stride_xw, stride_ob, stride_ot,
        stride_oh, stride_ow, stride_tr, stride_th, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW, ST, SH,
        SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
        ROLL_FIRST, HAS_SHIFT, HAS_TABLE, HAS_QKV_BIAS, False, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_fwd_cosine_kernel(
    QKV, QKVBias, Table, Out, LSE, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_fwd`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_fwd(
        QKV, QKVBias, Table, Out, LSE, LogitScale, stride_xb, stride_xt, stride_xh, stride_xw, stride_ob, stride_ot,
        stride_oh, stride_ow, stride_tr, stride_th, stride_ls, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW,
        ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
        BLOCK_D, ROLL_FIRST, HAS_SHIFT, HAS_TABLE, HAS_QKV_BIAS, True, INPUT_PRECISION, STRIDE_ALIGN)


# ----------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _window_bwd_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_db, stride_dt, stride_dh, stride_dw,
    ST, SH, SW, NUM_HEADS, NUM_TOKENS,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """delta = rowsum(O * dO) per (token, head) of the map, (B, T, H, W, heads) float32. STRIDE_ALIGN: what
    divides every out / dout stride (``_aligned``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # token number in (b, t, h, w) order
    head = tl.program_id(1)
    stride_ob, stride_ot, stride_oh, stride_ow = _aligned4(stride_ob, stride_ot, stride_oh, stride_ow, STRIDE_ALIGN)
    stride_db, stride_dt, stride_dh, stride_dw = _aligned4(stride_db, stride_dt, stride_dh, stride_dw, STRIDE_ALIGN)
    ok = offs < NUM_TOKENS
    b = offs // (ST * SH * SW)
    t = (offs // (SH * SW)) % ST
    h = (offs // SW) % SH
    w = offs % SW
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    col = head * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + (b.to(tl.int64) * stride_ob + _token_offsets(t, h, w, stride_ot, stride_oh, stride_ow))[:, None]
                + col, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + (b.to(tl.int64) * stride_db + _token_offsets(t, h, w, stride_dt, stride_dh, stride_dw))[:, None]
                 + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + offs.to(tl.int64) * NUM_HEADS + head, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _load_query_side(QKV, QKVBias, DOut, LSE, Delta, b, pid_bw, head, offs_m, win_t, win_h, win_w,
                     stride_xt, stride_xh, stride_xw, stride_db, stride_dt, stride_dh, stride_dw,
                     C, HEAD_DIM, NUM_HEADS, N_TOK,
                     WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
                     BLOCK_D: tl.constexpr, ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
                     COSINE: tl.constexpr):
    """Everything the backward needs of a query block: q, dO (0 on padding: it is cropped), lse (log2
    units; cosine: natural log, as its logits), delta, and the tokens' geometry."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    in_m = offs_m < N_TOK
    st, sh, sw, real_m, region_m = _window_tokens(offs_m, win_t, win_h, win_w, WT, WH, WW, ST, SH, SW, PT, PH, PW,
                                                  SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
    real_m = real_m & in_m
    q = _load_tokens(QKV, QKVBias, _token_offsets(st, sh, sw, stride_xt, stride_xh, stride_xw), real_m, in_m,
                     head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    d_rows = b.to(tl.int64) * stride_db + _token_offsets(st, sh, sw, stride_dt, stride_dh, stride_dw)
    do = tl.load(DOut + d_rows[:, None] + head * HEAD_DIM + offs_d[None, :], mask=real_m[:, None] & mask_d[None, :],
                 other=0.0)
    lse = tl.load(LSE + (pid_bw.to(tl.int64) * NUM_HEADS + head) * N_TOK + offs_m, mask=in_m, other=0.0)
    if not COSINE:
        lse = lse * 1.4426950408889634
    tok = ((b.to(tl.int64) * ST + st) * SH + sh) * SW + sw
    delta = tl.load(Delta + tok * NUM_HEADS + head, mask=real_m, other=0.0)
    return q, do, lse, delta, st, sh, sw, real_m, in_m, region_m


@triton.jit
def _window_dscores(q, q_lo, do, lse, delta, k, k_lo, v, offs_m, offs_n, in_m, in_n, region_m, region_n, Table,
                    stride_tr, qk_scale, TT, TH, TW,
                    HAS_TABLE: tl.constexpr, HAS_SHIFT: tl.constexpr, COSINE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """(P, dS, raw q k^T) of a (query tile x key tile) of one window-head: dS = P * (dO V^T - delta); q, k
    (and their lo parts) as ``_l2_rows`` gives them, ``lse`` as ``_load_query_side``'s. Cosine: the logits
    in natural units, the scale already in q (``qk_scale`` unused)."""
    dot = _qk_dot(q, q_lo, k, k_lo, COSINE, INPUT_PRECISION)
    valid = in_m[:, None] & in_n[None, :]
    if COSINE:
        qk = _window_scores(dot, offs_m, offs_n, in_m, in_n, region_m, region_n, Table, stride_tr, 1.0, 1.0,
                            TT, TH, TW, HAS_TABLE, HAS_SHIFT)
        p = tl.where(valid, tl.math.exp2((qk - lse[:, None]) * 1.4426950408889634), 0.0)
    else:
        qk = _window_scores(dot, offs_m, offs_n, in_m, in_n, region_m, region_n, Table, stride_tr, qk_scale,
                            1.4426950408889634, TT, TH, TW, HAS_TABLE, HAS_SHIFT)
        p = probs_from_lse(qk, lse, valid)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    return p, p * (dp - delta[:, None]), dot


@triton.jit
def _window_attn_bwd_dkdv(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, DPad, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    GRAD_PAD: tl.constexpr, COSINE: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """One program per (batch-window, head, key block): dK, dV of its keys (looping over the window's
    queries); real tokens' gradients go to their source positions in dQKV, padding tokens' sums to DPad
    (B*nW, heads, key blocks, 2, D) for d(qkv_bias). Query gradients: ``_window_attn_bwd_dq_kernel``.
    COSINE: dK_hat = dS^T Q_hat * scale, then the normalisation's adjoint row by row (full head dim here).
    STRIDE_ALIGN: what divides every qkv / dout / dqkv stride and C (``_aligned``)."""
    pid_bw = tl.program_id(0)
    head = tl.program_id(1)
    pid_n = tl.program_id(2)
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_db, stride_dt, stride_dh, stride_dw = _aligned4(stride_db, stride_dt, stride_dh, stride_dw, STRIDE_ALIGN)
    stride_gb, stride_gt, stride_gh, stride_gw = _aligned4(stride_gb, stride_gt, stride_gh, stride_gw, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    b, win_t, win_h, win_w = _window_of(pid_bw, NUM_WIN, NW_H, NW_W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    x_base = QKV + b.to(tl.int64) * stride_xb

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, kt, kh, kw, real_n, in_n, region_n = _load_key_side(
        x_base, QKVBias, offs_n, win_t, win_h, win_w, head, stride_xt, stride_xh, stride_xw, C, HEAD_DIM, N_TOK,
        WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS)
    qk_scale = sm_scale * 1.4426950408889634
    k_raw = k
    k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
    q_scale = 1.0
    if COSINE:  # the scale goes into q_hat: dK_hat = dS^T (q_hat * scale)
        q_scale = sm_scale * _logit_factor(LogitScale, head, stride_ls)
        sm_scale = 1.0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_TOK, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta, st, sh, sw, real_m, in_m, region_m = _load_query_side(
            x_base, QKVBias, DOut, LSE, Delta, b, pid_bw, head, offs_m, win_t, win_h, win_w,
            stride_xt, stride_xh, stride_xw, stride_db, stride_dt, stride_dh, stride_dw,
            C, HEAD_DIM, NUM_HEADS, N_TOK, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
            BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS, COSINE)
        q, q_lo, q_norm = _l2_rows(q, q_scale, COSINE)
        p, ds, qk = _window_dscores(q, q_lo, do, lse, delta, k, k_lo, v, offs_m, offs_n, in_m, in_n, region_m,
                                    region_n, Table + head * stride_th, stride_tr, qk_scale, TT, TH, TW, HAS_TABLE,
                                    HAS_SHIFT, COSINE, INPUT_PRECISION)
        dv = tl.dot(tl.trans(p).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    dk = _l2_adjoint(dk * sm_scale, k_raw, k_norm, COSINE)

    g_rows = b.to(tl.int64) * stride_gb + _token_offsets(kt, kh, kw, stride_gt, stride_gh, stride_gw)
    g_mask = real_n[:, None] & mask_d[None, :]
    tl.store(DQKV + g_rows[:, None] + C + head * HEAD_DIM + offs_d[None, :], dk.to(DQKV.dtype.element_ty),
             mask=g_mask)
    tl.store(DQKV + g_rows[:, None] + 2 * C + head * HEAD_DIM + offs_d[None, :], dv.to(DQKV.dtype.element_ty),
             mask=g_mask)
    if GRAD_PAD:
        # Padding keys' dK/dV summed per granule of 16 keys: slot = key // 16 whatever BLOCK_N is, and every
        # slot is rewritten by exactly one program on every launch (autotuning runs several configs on
        # the same buffer: no stale slot may survive).
        pad = (in_n & (real_n == 0))[:, None]
        dk_pad = tl.sum(tl.reshape(tl.where(pad, dk, 0.0), [BLOCK_N // 16, 16, BLOCK_D]), 1)
        dv_pad = tl.sum(tl.reshape(tl.where(pad, dv, 0.0), [BLOCK_N // 16, 16, BLOCK_D]), 1)
        slots = tl.cdiv(N_TOK, 16)
        granule = pid_n * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
        pad_rows = ((pid_bw.to(tl.int64) * NUM_HEADS + head) * slots + granule) * 2 * HEAD_DIM
        pad_mask = (granule < slots)[:, None] & mask_d[None, :]
        tl.store(DPad + pad_rows[:, None] + offs_d[None, :], dk_pad, mask=pad_mask)
        tl.store(DPad + pad_rows[:, None] + HEAD_DIM + offs_d[None, :], dv_pad, mask=pad_mask)


@triton.jit
def _window_attn_bwd_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, DPad,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    GRAD_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dkdv`` without cosine."""
    _window_attn_bwd_dkdv(
        QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, DPad, LSE, stride_xb, stride_xt, stride_xh, stride_xw,
        stride_db, stride_dt, stride_dh, stride_dw, stride_gb, stride_gt, stride_gh, stride_gw, stride_tr,
        stride_th, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T,
        SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST, HAS_SHIFT,
        HAS_TABLE, HAS_QKV_BIAS, GRAD_PAD, False, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_cosine_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, DPad, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    GRAD_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dkdv`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_bwd_dkdv(
        QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, DPad, LogitScale, stride_xb, stride_xt, stride_xh, stride_xw,
        stride_db, stride_dt, stride_dh, stride_dw, stride_gb, stride_gt, stride_gh, stride_gw, stride_tr,
        stride_th, stride_ls, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T,
        SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST, HAS_SHIFT,
        HAS_TABLE, HAS_QKV_BIAS, GRAD_PAD, True, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_dq(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, LogitScale, DScalePart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    COSINE: tl.constexpr, WRITE_DQ: tl.constexpr, SUM_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
):
    """One program per (query block, head, batch-window): dQ = dS K * scale of its real queries (padding
    queries are cropped from the output, so their dQ is 0 and never stored). COSINE: the normalisation's
    adjoint on dQ_hat; SUM_SCALE: each query row's sum of dS * (q_hat * scale) . k_hat (its share of
    d logit_scale) to its slot of DScalePart (B*nW, heads, N), written by this program alone. STRIDE_ALIGN:
    what divides every qkv / dout / dqkv stride and C (``_aligned``)."""
    pid_bw = tl.program_id(0)
    head = tl.program_id(1)
    pid_m = tl.program_id(2)
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_db, stride_dt, stride_dh, stride_dw = _aligned4(stride_db, stride_dt, stride_dh, stride_dw, STRIDE_ALIGN)
    stride_gb, stride_gt, stride_gh, stride_gw = _aligned4(stride_gb, stride_gt, stride_gh, stride_gw, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    b, win_t, win_h, win_w = _window_of(pid_bw, NUM_WIN, NW_H, NW_W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    x_base = QKV + b.to(tl.int64) * stride_xb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, do, lse, delta, st, sh, sw, real_m, in_m, region_m = _load_query_side(
        x_base, QKVBias, DOut, LSE, Delta, b, pid_bw, head, offs_m, win_t, win_h, win_w,
        stride_xt, stride_xh, stride_xw, stride_db, stride_dt, stride_dh, stride_dw,
        C, HEAD_DIM, NUM_HEADS, N_TOK, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
        BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS, COSINE)
    qk_scale = sm_scale * 1.4426950408889634
    if COSINE:  # the scale goes into q_hat: dQ_hat = dS K_hat * scale
        sm_scale = sm_scale * _logit_factor(LogitScale, head, stride_ls)
    q_raw = q
    q, q_lo, q_norm = _l2_rows(q, sm_scale, COSINE)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N_TOK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, kt, kh, kw, real_n, in_n, region_n = _load_key_side(
            x_base, QKVBias, offs_n, win_t, win_h, win_w, head, stride_xt, stride_xh, stride_xw, C, HEAD_DIM, N_TOK,
            WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS)
        k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
        p, ds, qk = _window_dscores(q, q_lo, do, lse, delta, k, k_lo, v, offs_m, offs_n, in_m, in_n, region_m,
                                    region_n, Table + head * stride_th, stride_tr, qk_scale, TT, TH, TW, HAS_TABLE,
                                    HAS_SHIFT, COSINE, INPUT_PRECISION)
        if WRITE_DQ:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        if SUM_SCALE:
            dscale += tl.sum(ds * qk, 1)  # fp32 dS and logits: no dot's rounding in the scale's gradient
    if WRITE_DQ:
        dq = _l2_adjoint(dq * sm_scale, q_raw, q_norm, COSINE)
        g_rows = b.to(tl.int64) * stride_gb + _token_offsets(st, sh, sw, stride_gt, stride_gh, stride_gw)
        tl.store(DQKV + g_rows[:, None] + head * HEAD_DIM + offs_d[None, :], dq.to(DQKV.dtype.element_ty),
                 mask=real_m[:, None] & mask_d[None, :])
    if SUM_SCALE:
        tl.store(DScalePart + (pid_bw.to(tl.int64) * NUM_HEADS + head) * N_TOK + offs_m, dscale, mask=in_m)


@triton.jit
def _window_attn_bwd_dq_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dq`` without cosine."""
    _window_attn_bwd_dq(
        QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, LSE, LSE, stride_xb, stride_xt, stride_xh, stride_xw,
        stride_db, stride_dt, stride_dh, stride_dw, stride_gb, stride_gt, stride_gh, stride_gw, stride_tr,
        stride_th, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T,
        SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST, HAS_SHIFT,
        HAS_TABLE, HAS_QKV_BIAS, False, True, False, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_dq_cosine_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, LogitScale, DScalePart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    WRITE_DQ: tl.constexpr, SUM_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dq`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_bwd_dq(
        QKV, QKVBias, Table, DOut, LSE, Delta, DQKV, LogitScale, DScalePart, stride_xb, stride_xt, stride_xh,
        stride_xw, stride_db, stride_dt, stride_dh, stride_dw, stride_gb, stride_gt, stride_gh, stride_gw,
        stride_tr, stride_th, stride_ls, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, WT, WH, WW, ST, SH, SW, PT, PH,
        PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST,
        HAS_SHIFT, HAS_TABLE, HAS_QKV_BIAS, True, WRITE_DQ, SUM_SCALE, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_of_group(pid_bw, NUM_WIN, NW_T, NW_H, NW_W):
    """Like ``_window_of``, plus the window's mask pattern: which of its dims hold the map's last window
    (the only windows a shift mask cuts), as ``last_t * 4 + last_h * 2 + last_w``."""
    b, win_t, win_h, win_w = _window_of(pid_bw, NUM_WIN, NW_H, NW_W)
    pattern = (win_t == NW_T - 1).to(tl.int32) * 4 + (win_h == NW_H - 1).to(tl.int32) * 2 \
        + (win_w == NW_W - 1).to(tl.int32)
    return b, win_t, win_h, win_w, pattern


@triton.jit
def _window_geometry(pid_bw, offs, in_w, stride_xt, stride_xh, stride_xw,
                     NUM_WIN, NW_T, NW_H, NW_W, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
                     ROLL_FIRST: tl.constexpr):
    """What the fused kernels compute once per window, for all its heads: its batch, mask pattern, the
    tokens' source coordinates, whether they are real (not padding) and their row offsets in qkv."""
    b, win_t, win_h, win_w, pattern = _window_of_group(pid_bw, NUM_WIN, NW_T, NW_H, NW_W)
    st, sh, sw, real, region = _window_tokens(offs, win_t, win_h, win_w, WT, WH, WW, ST, SH, SW, PT, PH, PW,
                                              SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
    real = real & in_w
    return b, pattern, st, sh, sw, real, _token_offsets(st, sh, sw, stride_xt, stride_xh, stride_xw)


@triton.jit
def _load_head(x_base, QKVBias, x_rows, real, in_w, head, offs_d, mask_d, C, HEAD_DIM,
               HAS_QKV_BIAS: tl.constexpr):
    """q, k, v (tokens, D) of one head of a window whose geometry ``_window_geometry`` gave."""
    q = _load_tokens(x_base, QKVBias, x_rows, real, in_w, head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    k = _load_tokens(x_base, QKVBias, x_rows, real, in_w, C + head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    v = _load_tokens(x_base, QKVBias, x_rows, real, in_w, 2 * C + head * HEAD_DIM, offs_d, mask_d, HAS_QKV_BIAS)
    return q, k, v


@triton.jit
def _window_attn_fwd_fused(
    QKV, QKVBias, Bias, Out, LSE, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_bp, stride_bh, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, COSINE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """Forward of windows that fit one tile (N <= 64): one program per (BLOCK_W consecutive windows,
    HEADS_PER_PROGRAM consecutive heads); the window's geometry (shift, padding, partition, row offsets) is
    computed once per window and serves all its heads. ``Bias`` (8 mask patterns, heads, BLOCK, BLOCK)
    holds table bias + shift mask + key mask (-inf) per pattern: one contiguous tile load per window-head
    instead of an index computation and gather per pair. STRIDE_ALIGN: what divides every qkv / out
    stride and C (``_aligned``)."""
    pid = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS_PER_PROGRAM
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_ob, stride_ot, stride_oh, stride_ow = _aligned4(stride_ob, stride_ot, stride_oh, stride_ow, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    offs = tl.arange(0, BLOCK)
    in_w = offs < N_TOK
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qk_scale = sm_scale * 1.4426950408889634
    bias_tile = offs[:, None] * BLOCK + offs[None, :]
    for i in range(0, BLOCK_W):
        # the last program's spare steps redo the last window and store nothing
        valid = pid * BLOCK_W + i < NUM_BW
        pid_bw = tl.minimum(pid * BLOCK_W + i, NUM_BW - 1)
        b, pattern, st, sh, sw, real, x_rows = _window_geometry(
            pid_bw, offs, in_w, stride_xt, stride_xh, stride_xw, NUM_WIN, NW_T, NW_H, NW_W, WT, WH, WW, ST, SH, SW,
            PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
        x_base = QKV + b.to(tl.int64) * stride_xb
        o_rows = b.to(tl.int64) * stride_ob + _token_offsets(st, sh, sw, stride_ot, stride_oh, stride_ow)
        bias_win = Bias + pattern * stride_bp + bias_tile
        for j in range(0, HEADS_PER_PROGRAM):
            # heads past the last (HEADS_PER_PROGRAM not dividing the heads) redo the last head, store nothing
            keep = valid & (head0 + j < NUM_HEADS)
            head = tl.minimum(head0 + j, NUM_HEADS - 1)
            q, k, v = _load_head(x_base, QKVBias, x_rows, real, in_w, head, offs_d, mask_d, C, HEAD_DIM,
                                 HAS_QKV_BIAS)
            bias = tl.load(bias_win + head * stride_bh).to(tl.float32)
            if COSINE:  # the scale in q_hat, logits in natural units
                q, q_lo, q_norm = _l2_rows(q, sm_scale * _logit_factor(LogitScale, head, stride_ls), COSINE)
                k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
                qk = _qk_dot(q, q_lo, k, k_lo, COSINE, INPUT_PRECISION) + bias
                m = tl.max(qk, 1)  # finite: every token sees itself
                p = tl.math.exp2((qk - m[:, None]) * 1.4426950408889634)
                l_i = tl.sum(p, 1)
                lse = m + tl.math.log2(l_i) * 0.6931471805599453
            else:
                qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale + bias * 1.4426950408889634
                m = tl.max(qk, 1)  # finite: every token sees itself
                p = tl.math.exp2(qk - m[:, None])
                l_i = tl.sum(p, 1)
                lse = (m + tl.math.log2(l_i)) * 0.6931471805599453
            acc = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) / l_i[:, None]
            tl.store(LSE + (pid_bw.to(tl.int64) * NUM_HEADS + head) * N_TOK + offs, lse, mask=in_w & keep)
            tl.store(Out + o_rows[:, None] + head * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty),
                     mask=(real & keep)[:, None] & mask_d[None, :])  # padding is cropped


@triton.jit
def _window_attn_fwd_fused_kernel(
    QKV, QKVBias, Bias, Out, LSE,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_bp, stride_bh,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr = 1, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_fwd_fused`` without cosine."""
    _window_attn_fwd_fused(
        QKV, QKVBias, Bias, Out, LSE, LSE, stride_xb, stride_xt, stride_xh, stride_xw, stride_ob, stride_ot,
        stride_oh, stride_ow, stride_bp, stride_bh, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW, WT,
        WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, sm_scale, HEAD_DIM, BLOCK, BLOCK_D, BLOCK_W,
        ROLL_FIRST, HAS_QKV_BIAS, False, INPUT_PRECISION, HEADS_PER_PROGRAM, STRIDE_ALIGN)


@triton.jit
def _window_attn_fwd_fused_cosine_kernel(
    QKV, QKVBias, Bias, Out, LSE, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_bp, stride_bh, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr = 1, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_fwd_fused`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_fwd_fused(
        QKV, QKVBias, Bias, Out, LSE, LogitScale, stride_xb, stride_xt, stride_xh, stride_xw, stride_ob, stride_ot,
        stride_oh, stride_ow, stride_bp, stride_bh, stride_ls, C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W,
        NUM_BW, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, sm_scale, HEAD_DIM, BLOCK, BLOCK_D,
        BLOCK_W, ROLL_FIRST, HAS_QKV_BIAS, True, INPUT_PRECISION, HEADS_PER_PROGRAM, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_fused(
    QKV, QKVBias, Bias, Out, DOut, LSE, DQKV, DSPart, DPadPart, LogitScale, DScalePart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_bp, stride_bh, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    WRITE_DQKV: tl.constexpr, SUM_DS: tl.constexpr, GRAD_PAD: tl.constexpr, COSINE: tl.constexpr,
    SUM_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """The whole backward of windows that fit one tile (N <= 64: 7x7, 8x8): one program per (group of
    consecutive windows, head) walks its windows in order and, per window, loads q, k, v, dO once, forms
    P, dP and dS once and writes dQ, dK, dV of every token at its source position; delta = rowsum(O * dO)
    is formed here too (each token is in exactly one window). ``Bias``: as in the forward. Reductions
    without atomics: dS summed over the group's windows (for d(table)) and the padding keys' dK/dV (for
    d(qkv_bias)) go to this program's slot of DSPart (groups, heads, N * N + 1) / DPadPart (groups, heads,
    2, D), which the host sums over groups in a fixed order: every gradient is bitwise deterministic.
    COSINE: dQ_hat, dK_hat through the normalisation's adjoint per row, and (SUM_SCALE) sum(dS * (q_hat *
    scale) . k_hat) of the group's windows to DScalePart (groups, heads) for d(logit_scale); delta =
    rowsum(P * dP) then, as O's rounding times the logit scale would reach dQ."""
    group = tl.program_id(0)
    head = tl.program_id(1)
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_ob, stride_ot, stride_oh, stride_ow = _aligned4(stride_ob, stride_ot, stride_oh, stride_ow, STRIDE_ALIGN)
    stride_db, stride_dt, stride_dh, stride_dw = _aligned4(stride_db, stride_dt, stride_dh, stride_dw, STRIDE_ALIGN)
    stride_gb, stride_gt, stride_gh, stride_gw = _aligned4(stride_gb, stride_gt, stride_gh, stride_gw, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    offs = tl.arange(0, BLOCK)  # token number in the window: queries and keys are the same tokens
    in_w = offs < N_TOK
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_scale = 1.0
    if COSINE:  # the scale goes into q_hat: dK_hat = dS^T (q_hat * scale), dQ_hat = dS K_hat * scale
        q_scale = sm_scale * _logit_factor(LogitScale, head, stride_ls)
        sm_scale = 1.0
    qk_scale = sm_scale * 1.4426950408889634
    bias_base = Bias + head * stride_bh + offs[:, None] * BLOCK + offs[None, :]
    ds_sum = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    dscale = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)  # a scalar: one register, not a row vector
    pad_dk = tl.zeros([BLOCK_D], dtype=tl.float32)
    pad_dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = group * WINDOWS_PER_GROUP
    last = tl.minimum(first + WINDOWS_PER_GROUP, NUM_BW)
    for i_bw in range(first, last):
        pid_bw = head * 0 + i_bw  # a tensor (the interpreter's loop variable may be a plain int)
        b, pattern, st, sh, sw, real, x_rows = _window_geometry(
            pid_bw, offs, in_w, stride_xt, stride_xh, stride_xw, NUM_WIN, NW_T, NW_H, NW_W, WT, WH, WW, ST, SH, SW,
            PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, ROLL_FIRST)
        q, k, v = _load_head(QKV + b.to(tl.int64) * stride_xb, QKVBias, x_rows, real, in_w, head, offs_d, mask_d, C,
                             HEAD_DIM, HAS_QKV_BIAS)
        d_rows = b.to(tl.int64) * stride_db + _token_offsets(st, sh, sw, stride_dt, stride_dh, stride_dw)
        o_rows = b.to(tl.int64) * stride_ob + _token_offsets(st, sh, sw, stride_ot, stride_oh, stride_ow)
        # dO (and O) are 0 on padding queries: they are cropped from the output
        od_mask = real[:, None] & mask_d[None, :]
        do = tl.load(DOut + d_rows[:, None] + head * HEAD_DIM + offs_d[None, :], mask=od_mask, other=0.0)
        if not COSINE:  # cosine: delta = rowsum(P * dP) below
            o = tl.load(Out + o_rows[:, None] + head * HEAD_DIM + offs_d[None, :], mask=od_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # each token is in one window: formed once
        q_raw = q
        q, q_lo, q_norm = _l2_rows(q, q_scale, COSINE)
        k_raw = k
        k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
        if COSINE:
            # the bias tile's load first, then dP: the logits' tiles then live only until dS (this order keeps
            # the kernel in its 255 registers at 8 warps; loading the bias after the dots spills ~200 bytes)
            bias = tl.load(bias_base + pattern * stride_bp).to(tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            dot = _qk_dot(q, q_lo, k, k_lo, COSINE, INPUT_PRECISION)
            # The forward's P bitwise (its row max and sum, recomputed: the row is in this tile); from the
            # saved lse, an ulp of ~100 would scale a whole row. Rows past the window (dO = 0, delta = 0)
            # give dS = 0 whatever P is.
            qk = dot + bias
            m = tl.max(qk, 1)
            p = tl.math.exp2((qk - m[:, None]) * 1.4426950408889634)
            p = p / tl.sum(p, 1)[:, None]
            # rowsum(P * dP) = rowsum(O * dO) without O's rounding, which the logit scale (up to 100)
            # would carry into dQ and dK; and O is not read
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            if SUM_SCALE:
                dscale += tl.sum(tl.sum(ds * dot, 1), 0)  # fp32 dS and logits: no dot's rounding
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=INPUT_PRECISION)
        else:
            # rows past the window get lse +inf: P = 0 there
            lse2 = tl.load(LSE + (pid_bw.to(tl.int64) * NUM_HEADS + head) * N_TOK + offs, mask=in_w,
                           other=float("inf")) * 1.4426950408889634
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale \
                + tl.load(bias_base + pattern * stride_bp).to(tl.float32) * 1.4426950408889634
            p = tl.math.exp2(qk - lse2[:, None])  # 0 on masked pairs (bias -inf)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=INPUT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
        # Each gradient leaves as soon as it is formed (dV, then dK, then dQ): no fp32 (N, D) tile is carried
        # through the next dots (ptxas -v, sm_90, fp16, 4 warps, 2 stages: D = 32 spilled 4-8 bytes, now
        # none; D = 64, 188 -> 40 bytes; tests/ops/test_window_ptx.py).
        g_rows = b.to(tl.int64) * stride_gb + _token_offsets(st, sh, sw, stride_gt, stride_gh, stride_gw)
        g_ptrs = DQKV + g_rows[:, None] + head * HEAD_DIM + offs_d[None, :]
        g_mask = real[:, None] & mask_d[None, :]
        pad = (in_w & (real == 0))[:, None]
        if WRITE_DQKV:
            tl.store(g_ptrs + 2 * C, dv.to(DQKV.dtype.element_ty), mask=g_mask)
        if GRAD_PAD:
            pad_dv += tl.sum(tl.where(pad, dv, 0.0), 0)
        if SUM_DS:
            ds_sum += ds
        dk = _l2_adjoint(tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=INPUT_PRECISION) * sm_scale,
                         k_raw, k_norm, COSINE)
        if WRITE_DQKV:
            tl.store(g_ptrs + C, dk.to(DQKV.dtype.element_ty), mask=g_mask)
        if GRAD_PAD:
            pad_dk += tl.sum(tl.where(pad, dk, 0.0), 0)
        if WRITE_DQKV:
            dq = _l2_adjoint(tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION) * (sm_scale * q_scale),
                             q_raw, q_norm, COSINE)
            tl.store(g_ptrs, dq.to(DQKV.dtype.element_ty), mask=g_mask)
    slot = group.to(tl.int64) * NUM_HEADS + head
    if SUM_DS:
        # slot layout: N * N sums, then one 0 (the gather into table rows pads with it)
        ds_slot = DSPart + slot * (N_TOK * N_TOK + 1)
        tl.store(ds_slot + offs[:, None] * N_TOK + offs[None, :], ds_sum, mask=in_w[:, None] & in_w[None, :])
        tl.store(ds_slot + N_TOK * N_TOK + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs == 0)
    if GRAD_PAD:
        tl.store(DPadPart + slot * 2 * HEAD_DIM + offs_d, pad_dk, mask=mask_d)
        tl.store(DPadPart + slot * 2 * HEAD_DIM + HEAD_DIM + offs_d, pad_dv, mask=mask_d)
    if SUM_SCALE:
        tl.store(DScalePart + slot + offs, tl.zeros([BLOCK], dtype=tl.float32) + dscale, mask=offs == 0)


@triton.jit
def _window_attn_bwd_fused_kernel(
    QKV, QKVBias, Bias, Out, DOut, LSE, DQKV, DSPart, DPadPart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_bp, stride_bh,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    WRITE_DQKV: tl.constexpr, SUM_DS: tl.constexpr, GRAD_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_fused`` without cosine."""
    _window_attn_bwd_fused(
        QKV, QKVBias, Bias, Out, DOut, LSE, DQKV, DSPart, DPadPart, LSE, LSE, stride_xb, stride_xt, stride_xh,
        stride_xw, stride_ob, stride_ot, stride_oh, stride_ow, stride_db, stride_dt, stride_dh, stride_dw,
        stride_gb, stride_gt, stride_gh, stride_gw, stride_bp, stride_bh, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_T,
        NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
        sm_scale, HEAD_DIM, BLOCK, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS, WRITE_DQKV, SUM_DS, GRAD_PAD, False, False,
        INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_fused_cosine_kernel(
    QKV, QKVBias, Bias, Out, DOut, LSE, DQKV, DSPart, DPadPart, LogitScale, DScalePart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_ob, stride_ot, stride_oh, stride_ow,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_gb, stride_gt, stride_gh, stride_gw,
    stride_bp, stride_bh, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_T, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    WRITE_DQKV: tl.constexpr, SUM_DS: tl.constexpr, GRAD_PAD: tl.constexpr,
    SUM_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_fused`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_bwd_fused(
        QKV, QKVBias, Bias, Out, DOut, LSE, DQKV, DSPart, DPadPart, LogitScale, DScalePart, stride_xb, stride_xt,
        stride_xh, stride_xw, stride_ob, stride_ot, stride_oh, stride_ow, stride_db, stride_dt, stride_dh,
        stride_dw, stride_gb, stride_gt, stride_gh, stride_gw, stride_bp, stride_bh, stride_ls, C, NUM_HEADS, N_TOK,
        NUM_WIN, NW_T, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H,
        SHIFT_W, sm_scale, HEAD_DIM, BLOCK, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS, WRITE_DQKV, SUM_DS, GRAD_PAD, True,
        SUM_SCALE, INPUT_PRECISION, STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_dtable(
    QKV, QKVBias, Table, DOut, LSE, Delta, DSPart, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, COSINE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
):
    """dS summed over a group of consecutive windows, per (query block x key block) tile: one program per
    (key block, query block, group * heads + head) walks its group's windows in a fixed order and writes
    its slot of DSPart (groups, heads, N * N + 1), which the host sums over groups in a fixed order (the
    d(table) reduction of windows bigger than one tile, without atomics). STRIDE_ALIGN: what divides every
    qkv / dout stride and C (``_aligned``)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    slot = tl.program_id(2)  # group * NUM_HEADS + head
    stride_xb, stride_xt, stride_xh, stride_xw = _aligned4(stride_xb, stride_xt, stride_xh, stride_xw, STRIDE_ALIGN)
    stride_db, stride_dt, stride_dh, stride_dw = _aligned4(stride_db, stride_dt, stride_dh, stride_dw, STRIDE_ALIGN)
    C = _aligned(C, STRIDE_ALIGN)
    group = slot // NUM_HEADS
    head = slot % NUM_HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N_TOK
    qk_scale = sm_scale * 1.4426950408889634
    q_scale = 1.0
    if COSINE:  # the scale goes into q_hat
        q_scale = sm_scale * _logit_factor(LogitScale, head, stride_ls)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = group * WINDOWS_PER_GROUP
    last = tl.minimum(first + WINDOWS_PER_GROUP, NUM_BW)
    for i_bw in range(first, last):
        pid_bw = head * 0 + i_bw  # a tensor (the interpreter's loop variable may be a plain int)
        b, win_t, win_h, win_w = _window_of(pid_bw, NUM_WIN, NW_H, NW_W)
        x_base = QKV + b.to(tl.int64) * stride_xb
        q, do, lse, delta, st, sh, sw, real_m, in_m, region_m = _load_query_side(
            x_base, QKVBias, DOut, LSE, Delta, b, pid_bw, head, offs_m, win_t, win_h, win_w,
            stride_xt, stride_xh, stride_xw, stride_db, stride_dt, stride_dh, stride_dw,
            C, HEAD_DIM, NUM_HEADS, N_TOK, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W,
            BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS, COSINE)
        k, v, kt, kh, kw, real_n, in_n, region_n = _load_key_side(
            x_base, QKVBias, offs_n, win_t, win_h, win_w, head, stride_xt, stride_xh, stride_xw, C, HEAD_DIM, N_TOK,
            WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, BLOCK_D, ROLL_FIRST, HAS_QKV_BIAS)
        q, q_lo, q_norm = _l2_rows(q, q_scale, COSINE)
        k, k_lo, k_norm = _l2_rows(k, 1.0, COSINE)
        p, ds, qk = _window_dscores(q, q_lo, do, lse, delta, k, k_lo, v, offs_m, offs_n, in_m, in_n, region_m,
                                    region_n, Table + head * stride_th, stride_tr, qk_scale, TT, TH, TW, True,
                                    HAS_SHIFT, COSINE, INPUT_PRECISION)
        acc += ds
    # slot layout: N * N sums, then one 0 (the gather into table rows pads with it)
    ds_slot = DSPart + slot.to(tl.int64) * (N_TOK * N_TOK + 1)
    tl.store(ds_slot + offs_m[:, None] * N_TOK + offs_n[None, :], acc, mask=(offs_m < N_TOK)[:, None] & in_n[None, :])
    tl.store(ds_slot + N_TOK * N_TOK + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32),
             mask=(offs_n == 0) & (pid_m == 0) & (pid_n == 0))


@triton.jit
def _window_attn_bwd_dtable_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DSPart,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_tr, stride_th,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dtable`` without cosine."""
    _window_attn_bwd_dtable(
        QKV, QKVBias, Table, DOut, LSE, Delta, DSPart, LSE, stride_xb, stride_xt, stride_xh, stride_xw, stride_db,
        stride_dt, stride_dh, stride_dw, stride_tr, stride_th, 0, C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, NUM_BW,
        WINDOWS_PER_GROUP, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW, sm_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST, HAS_SHIFT, HAS_QKV_BIAS, False, INPUT_PRECISION,
        STRIDE_ALIGN)


@triton.jit
def _window_attn_bwd_dtable_cosine_kernel(
    QKV, QKVBias, Table, DOut, LSE, Delta, DSPart, LogitScale,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_db, stride_dt, stride_dh, stride_dw,
    stride_tr, stride_th, stride_ls,
    C, NUM_HEADS, N_TOK, NUM_WIN, NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP,
    WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT, TH, TW,
    sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROLL_FIRST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """``_window_attn_bwd_dtable`` with Swin V2's cosine attention (``LogitScale``: the per-head log scale)."""
    _window_attn_bwd_dtable(
        QKV, QKVBias, Table, DOut, LSE, Delta, DSPart, LogitScale, stride_xb, stride_xt, stride_xh, stride_xw,
        stride_db, stride_dt, stride_dh, stride_dw, stride_tr, stride_th, stride_ls, C, NUM_HEADS, N_TOK, NUM_WIN,
        NW_H, NW_W, NUM_BW, WINDOWS_PER_GROUP, WT, WH, WW, ST, SH, SW, PT, PH, PW, SHIFT_T, SHIFT_H, SHIFT_W, TT,
        TH, TW, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, ROLL_FIRST, HAS_SHIFT, HAS_QKV_BIAS, True,
        INPUT_PRECISION, STRIDE_ALIGN)


# ----------------------------------------------------------------------------------------------------
# Launchers


class _Geometry:
    """The kernels' view of a map: everything as 3-D (T, H, W)."""

    def __init__(self, inputs):
        nd = len(inputs.spatial)
        pad1 = (1,) * (3 - nd)
        self.roll_first = nd == 2
        self.spatial = pad1 + inputs.spatial
        self.window = pad1 + inputs.window
        self.shift = (0,) * (3 - nd) + inputs.shift
        self.table_window = pad1 + inputs.table_window
        self.padded = geometry.padded_size(self.spatial, self.window)
        self.grid = tuple(p // w for p, w in zip(self.padded, self.window))
        self.num_windows = math.prod(self.grid)
        self.n_tok = math.prod(self.window)
        self.has_pad = self.padded != self.spatial

    def args(self):
        return (*self.window, *self.spatial, *self.padded, *self.shift, *self.table_window)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 4 else x  # (B, H, W, ...) -> (B, 1, H, W, ...): a view


def _tune_key(inputs, g: "_Geometry", **extra):
    if inputs.cosine:
        extra["cosine"] = 1  # the normalisation (and fp16 / bf16's split dot) changes the code
    return configs.tune_key(inputs.qkv.dtype, g.n_tok, inputs.head_dim, len(inputs.spatial), any(g.shift),
                            inputs.rel_pos_bias is not None, inputs.qkv_bias is not None, g.has_pad, **extra)


def _cosine_args(inputs) -> Tuple[tuple, tuple]:
    """What the cosine kernels take on top of the plain ones' arguments: ((the per-head factor
    exp(min(logit_scale, log 100)), (heads,) fp32, one tiny op on the host), (its stride,)); the kernels that
    write d(logit_scale) take its slots after the factor. Both empty without cosine."""
    if not inputs.cosine:
        return (), ()
    factor = cosine.logit_scale_factor(inputs.logit_scale, inputs.num_heads, torch.float32)
    return (factor,), (factor.stride(0),)


def window_attention_fwd_triton(inputs, return_bias: bool = False):
    """Forward: (out (B, *S, C) in qkv's dtype, lse (B * nW, heads, N) float32), plus, with
    ``return_bias``, the fused kernels' dense bias (None on the blocked path) for the backward to reuse."""
    qkv = inputs.qkv
    plan = inputs.derived.get("triton_fwd")
    if plan is None:
        plan = inputs.derived["triton_fwd"] = _fwd_plan(inputs)
    g, flags, key, per_program = plan
    B, heads, hd = qkv.shape[0], inputs.num_heads, inputs.head_dim
    C = heads * hd
    table = inputs.rel_pos_bias
    num_bw = B * g.num_windows
    with tuning.on_device(qkv):
        out = torch.empty(qkv.shape[:-1] + (C,), dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty((num_bw, heads, g.n_tok), dtype=torch.float32, device=qkv.device)
        x3, o3 = _as_3d(qkv), _as_3d(out)
        qkv_bias = inputs.qkv_bias if inputs.qkv_bias is not None else x3
        cos_ptrs, cos_strides = _cosine_args(inputs)
        cos = inputs.cosine
        bias = None
        if g.n_tok <= FUSED_MAX_TOKENS:
            bias = _dense_bias(inputs, g)
            kernel = _window_attn_fwd_fused_cosine_kernel if cos else _window_attn_fwd_fused_kernel
            tuning.launch(
                configs.WINDOW_FWD_FUSED, kernel,
                lambda meta: (tuning.cdiv(num_bw, meta["BLOCK_W"]), tuning.cdiv(heads, per_program)),
                (x3, qkv_bias, bias, o3, lse, *cos_ptrs, *x3.stride()[:4], *o3.stride()[:4], *_bias_strides(bias),
                 *cos_strides, C, heads, g.n_tok, g.num_windows, *g.grid, num_bw, *g.args()[:12], inputs.scale),
                flags, key, qkv.device)
        else:
            tuning.launch(
                configs.WINDOW_FWD, _window_attn_fwd_cosine_kernel if cos else _window_attn_fwd_kernel,
                lambda meta: (num_bw, heads, tuning.cdiv(g.n_tok, meta["BLOCK_M"])),
                (x3, qkv_bias, table if table is not None else x3, o3, lse, *cos_ptrs,
                 *x3.stride()[:4], *o3.stride()[:4], *(table.stride() if table is not None else (0, 0)), *cos_strides,
                 C, heads, g.n_tok, g.num_windows, g.grid[1], g.grid[2], *g.args(), inputs.scale),
                flags, key, qkv.device)
    return (out, lse, bias) if return_bias else (out, lse)


def _fwd_plan(inputs):
    """(geometry, launch flags, tune key, heads per program) of the forward: functions of the checked
    metadata only, kept in ``inputs.derived`` (computed once per memoised call signature)."""
    qkv = inputs.qkv
    g = _Geometry(inputs)
    B, heads, hd = qkv.shape[0], inputs.num_heads, inputs.head_dim
    C = heads * hd
    # the output's strides follow from qkv's shape (a new contiguous tensor): known before it exists
    o3_strides = _contiguous_strides(_as_3d(qkv).shape[:-1] + (C,))
    flags = dict(HEAD_DIM=hd, BLOCK_D=max(16, tuning.next_power_of_2(hd)), ROLL_FIRST=g.roll_first,
                 HAS_QKV_BIAS=inputs.qkv_bias is not None, INPUT_PRECISION=_precision(qkv.dtype),
                 STRIDE_ALIGN=_stride_align_of(_as_3d(qkv).stride(), o3_strides, C))
    if g.n_tok <= FUSED_MAX_TOKENS:
        num_bw = B * g.num_windows
        per_program = _heads_per_program(num_bw, heads)
        flags = dict(BLOCK=_fused_block(g.n_tok), HEADS_PER_PROGRAM=per_program, **flags)
        key = _tune_key(inputs, g, **({"heads": per_program} if per_program > 1 else {}))
        return g, flags, key, per_program
    table = inputs.rel_pos_bias
    return g, dict(HAS_SHIFT=any(g.shift), HAS_TABLE=table is not None, **flags), _tune_key(inputs, g), 1


def _contiguous_strides(shape) -> Tuple[int, ...]:
    """A new contiguous tensor's strides; the batch size (dim 0) is never read (traced with a symbolic
    batch, reading it would specialize the graph to one batch size)."""
    strides, step = [], 1
    for size in reversed(shape[1:]):
        strides.append(step)
        step *= max(int(size), 1)
    return (step,) + tuple(reversed(strides))


def _heads_per_program(num_bw: int, heads: int) -> int:
    """Heads per fused-forward program: the largest divisor of ``heads`` up to MAX_HEADS_PER_PROGRAM that
    still leaves FILL_PROGRAMS programs when each takes the most windows the heuristic offers (so every
    heuristic candidate launches at least that many). Swin-T at batch 64, stages 1..4: 3, 2, 1, 1."""
    units = tuning.cdiv(num_bw, configs.FUSED_FWD_MAX_BLOCK_W)
    for per_program in range(min(heads, MAX_HEADS_PER_PROGRAM), 1, -1):
        if heads % per_program == 0 and units * (heads // per_program) >= FILL_PROGRAMS:
            return per_program
    return 1


def _stride_align(tensors, *ints: int) -> int:
    """The kernels' STRIDE_ALIGN (``_aligned``): the largest of 8, 4, 2 dividing every stride but the last
    (unit) one of ``tensors`` and ``ints`` (column offsets), else 1; and 1 when all are multiples of 16,
    which Triton's launch specialization already tells the compiler (the rounding would only cost
    registers: the fused backward at D = 32 spills 60 bytes with it, 8 without). 8 elements of 16 bits:
    one 16-byte vector."""
    return _stride_align_of(*(t.stride() for t in tensors), *ints)


def _stride_align_of(*strides_and_ints) -> int:
    """``_stride_align`` from stride tuples (every stride but the last) and ints."""
    values = [v for x in strides_and_ints for v in (x[:-1] if isinstance(x, tuple) else (x,))]
    if all(v % 16 == 0 for v in values):
        return 1
    for align in (8, 4, 2):
        if all(v % align == 0 for v in values):
            return align
    return 1


def _bias_strides(bias: torch.Tensor) -> Tuple[int, int]:
    """(pattern, head) strides of the dense bias; one bias shared by every head (no table) gets 0."""
    return bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0


def _fused_block(n_tok: int) -> int:
    return max(16, tuning.next_power_of_2(n_tok))  # tl.dot needs 16 rows at least


@constant_tensors
@functools.lru_cache(maxsize=64)
def _fused_layout(window: Tuple[int, ...], table_window: Tuple[int, ...], padded: Tuple[int, ...],
                  shift: Tuple[int, ...], dtype: torch.dtype, device: str):
    """What the fused kernels' bias is built from, for a (T, H, W) window of N tokens in a BLOCK x BLOCK
    tile: the table row of each pair (row 0 off the window) and the additive mask of each of the 8
    patterns ``last_t * 4 + last_h * 2 + last_w`` (0, or -inf on pairs the shift mask separates and on keys
    past the window), (8, 1, BLOCK, BLOCK) in ``dtype``. Only a map's last window along a shifted dim is
    cut by the shift mask, and every such window is cut the same way."""
    n = math.prod(window)
    block = _fused_block(n)
    tok = torch.arange(n)
    coords = (tok // (window[1] * window[2]), (tok // window[2]) % window[1], tok % window[2])
    rows = torch.zeros(block, block, dtype=torch.long)
    rows[:n, :n] = geometry.window_bias_index(window, table_window)  # 2-D as (1, H, W): the same rows
    masks = torch.zeros(8, 1, block, block)
    masks[..., n:] = float("-inf")  # keys past the window
    for pattern in range(8):
        last = ((pattern >> 2) & 1, (pattern >> 1) & 1, pattern & 1)
        region = torch.zeros(n, dtype=torch.long)
        for d in range(3):
            length, w, s = padded[d], window[d], shift[d]
            pos = coords[d] + (length - w if last[d] else 0)  # any earlier window is all region 0
            r = torch.full_like(pos, 2) if s == 0 else (pos >= length - w).long() + (pos >= length - s).long()
            region = region * 3 + r
        masks[pattern, 0, :n, :n].masked_fill_(region[:, None] != region[None, :], float("-inf"))
    return rows.reshape(-1).to(device), masks.to(dtype=dtype, device=device)


def _dense_bias(inputs, g: "_Geometry") -> torch.Tensor:
    """(8, heads or 1, BLOCK, BLOCK), contiguous: table bias + mask of each pattern, in the table's (or
    qkv's) dtype. Two device ops per call (the table changes every step: nothing is cached): one gather of
    the transposed table, whose output is already (heads, BLOCK * BLOCK), and one broadcast add of the
    cached masks; the table's gradient flows through nothing but the kernels."""
    table = inputs.rel_pos_bias
    rows, masks = _fused_layout(g.window, g.table_window, g.padded, g.shift,
                                table.dtype if table is not None else inputs.qkv.dtype, str(inputs.qkv.device))
    if table is None:
        return masks
    block = masks.shape[-1]
    gathered = table.detach().t().index_select(1, rows).view(1, table.shape[1], block, block)
    return torch.add(masks, gathered)  # (8, 1, B, B) + (1, heads, B, B)


def window_attention_bwd_triton(dout, inputs, out, lse, needs, bias=None):
    """Backward: (dqkv (B, *S, 3C) | None, dtable | None, dqkv_bias | None, dlogit_scale | None) for
    ``needs`` (qkv, table, qkv_bias[, logit_scale]). ``bias``: the fused forward's dense bias (rebuilt when
    not given)."""
    with tuning.on_device(inputs.qkv):
        return _window_attention_bwd(dout, inputs, out, lse, needs, bias)


def _windows_per_group(num_bw: int, programs_per_window: int) -> Tuple[int, int]:
    """(windows per group, groups) of a grouped reduction: enough groups for about ``TARGET_PROGRAMS``
    programs, each walking its consecutive windows in order. Depends on the shape only (never on the
    launch config), so the order of every sum, and so every bit of the result, is fixed by the inputs."""
    per_group = max(1, num_bw // tuning.cdiv(TARGET_PROGRAMS, programs_per_window))  # rounded down: >= target
    return per_group, tuning.cdiv(num_bw, per_group)


def _window_attention_bwd(dout, inputs, out, lse, needs, bias):
    need_qkv, need_table, need_bias, need_scale = (tuple(needs) + (False,))[:4]
    need_scale = bool(need_scale) and inputs.cosine
    qkv, table, qkv_bias = inputs.qkv, inputs.rel_pos_bias, inputs.qkv_bias
    g = _Geometry(inputs)
    B, heads, hd = qkv.shape[0], inputs.num_heads, inputs.head_dim
    C = heads * hd
    n = g.n_tok
    num_bw = B * g.num_windows
    block_d = max(16, tuning.next_power_of_2(hd))
    if dout.stride(-1) != 1:  # the kernels read channels with unit stride; autograd rarely hands us another
        dout = dout.contiguous()
    x3, d3, o3 = _as_3d(qkv), _as_3d(dout), _as_3d(out)
    flags = dict(HEAD_DIM=hd, BLOCK_D=block_d, ROLL_FIRST=g.roll_first, HAS_QKV_BIAS=qkv_bias is not None,
                 INPUT_PRECISION=_precision(qkv.dtype))
    cos = inputs.cosine
    cos_ptrs, cos_strides = _cosine_args(inputs)
    bias_arg = qkv_bias if qkv_bias is not None else x3
    grad_pad = need_bias and g.has_pad
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if need_qkv or need_bias else None
    g3 = _as_3d(dqkv) if dqkv is not None else x3
    ds_part = dpad = None  # per-group partial sums of dS (for d(table)) and of padding keys' dK/dV
    dscale_part = None  # cosine: partial sums of dS * (q_hat * scale) . k_hat (for d(logit_scale))

    if n <= FUSED_MAX_TOKENS:
        sum_ds = need_table
        grouped = sum_ds or grad_pad or need_scale
        per_group, groups = _windows_per_group(num_bw, heads) if grouped else (1, num_bw)
        if sum_ds:
            ds_part = torch.empty((groups, heads, n * n + 1), dtype=torch.float32, device=qkv.device)
        if grad_pad:
            dpad = torch.empty((groups, heads, 2, hd), dtype=torch.float32, device=qkv.device)
        if need_scale:
            dscale_part = torch.empty((groups, heads), dtype=torch.float32, device=qkv.device)
        if bias is None:
            bias = _dense_bias(inputs, g)
        key = dict(sum_ds=int(sum_ds), grad_pad=int(grad_pad), write=int(need_qkv))
        cos_flags = dict(SUM_SCALE=need_scale) if cos else {}
        if need_scale:
            key["sum_scale"] = 1
        tuning.launch(
            configs.WINDOW_BWD_FUSED, _window_attn_bwd_fused_cosine_kernel if cos else _window_attn_bwd_fused_kernel,
            lambda meta: (groups, heads),
            (x3, bias_arg, bias, o3, d3, lse, g3, ds_part if sum_ds else lse, dpad if grad_pad else lse,
             *((*cos_ptrs, dscale_part if need_scale else lse) if cos_ptrs else ()),
             *x3.stride()[:4], *o3.stride()[:4], *d3.stride()[:4], *g3.stride()[:4], *_bias_strides(bias),
             *cos_strides, C, heads, n, g.num_windows, *g.grid, num_bw, per_group, *g.args()[:12], inputs.scale),
            dict(BLOCK=_fused_block(n), WRITE_DQKV=need_qkv, SUM_DS=sum_ds, GRAD_PAD=grad_pad,
                 STRIDE_ALIGN=_stride_align((x3, o3, d3, g3), C), **cos_flags, **flags),
            _tune_key(inputs, g, **key), qkv.device)
        if need_scale:
            dscale_part = dscale_part.sum(dim=0)  # heads: groups in a fixed order
    else:
        num_tokens = B * math.prod(g.spatial)
        delta = torch.empty((num_tokens, heads), dtype=torch.float32, device=qkv.device)
        tuning.launcher(_window_bwd_delta_kernel, qkv)[(tuning.cdiv(num_tokens, 64), heads)](
            o3, d3, delta, *o3.stride()[:4], *d3.stride()[:4], *g.spatial, heads, num_tokens,
            HEAD_DIM=hd, BLOCK=64, BLOCK_D=block_d, STRIDE_ALIGN=_stride_align((o3, d3)),
        )
        flags["HAS_SHIFT"] = any(g.shift)
        # each kernel's own tensors: one whose strides are all multiples of 16 keeps STRIDE_ALIGN = 1
        grad_align = _stride_align((x3, d3, g3), C)  # dK/dV, dQ (g3 is x3 when nothing is written)
        table_arg = table if table is not None else x3
        table_strides = table.stride() if table is not None else (0, 0)
        geo = (C, heads, n, g.num_windows, g.grid[1], g.grid[2])
        if need_qkv or need_bias:
            if grad_pad:
                dpad = torch.zeros((num_bw, heads, tuning.cdiv(n, 16), 2, hd), dtype=torch.float32,
                                   device=qkv.device)
            tuning.launch(
                configs.WINDOW_BWD_DKDV, _window_attn_bwd_cosine_kernel if cos else _window_attn_bwd_kernel,
                lambda meta: (num_bw, heads, tuning.cdiv(n, meta["BLOCK_N"])),
                (x3, bias_arg, table_arg, d3, lse, delta, g3, dpad if dpad is not None else lse, *cos_ptrs,
                 *x3.stride()[:4], *d3.stride()[:4], *g3.stride()[:4], *table_strides, *cos_strides, *geo, *g.args(),
                 inputs.scale),
                dict(HAS_TABLE=table is not None, GRAD_PAD=grad_pad, STRIDE_ALIGN=grad_align, **flags),
                _tune_key(inputs, g, grad_pad=int(grad_pad)), qkv.device)
            if dpad is not None:
                dpad = dpad.sum(dim=2)  # B*nW, heads, 2, hd: granules in a fixed order
        if need_qkv or need_scale:
            if need_scale:  # one slot per (window, head, query row), each written by the row's program
                dscale_part = torch.empty((num_bw, heads, n), dtype=torch.float32, device=qkv.device)
            key = {"sum_scale": 1, "write": int(need_qkv)} if need_scale else {}
            cos_flags = dict(WRITE_DQ=need_qkv, SUM_SCALE=need_scale) if cos else {}
            dq_cos_ptrs = (*cos_ptrs, dscale_part if need_scale else lse) if cos_ptrs else ()  # factor computed once
            tuning.launch(
                configs.WINDOW_BWD_DQ, _window_attn_bwd_dq_cosine_kernel if cos else _window_attn_bwd_dq_kernel,
                lambda meta: (num_bw, heads, tuning.cdiv(n, meta["BLOCK_M"])),
                (x3, bias_arg, table_arg, d3, lse, delta, g3, *dq_cos_ptrs,
                 *x3.stride()[:4], *d3.stride()[:4], *g3.stride()[:4], *table_strides, *cos_strides, *geo, *g.args(),
                 inputs.scale),
                dict(HAS_TABLE=table is not None, STRIDE_ALIGN=grad_align, **cos_flags, **flags),
                _tune_key(inputs, g, **key), qkv.device)
            if need_scale:
                dscale_part = dscale_part.sum(dim=(0, 2))  # heads
        if need_table:
            tiles = tuning.cdiv(n, FUSED_MAX_TOKENS) ** 2  # config-independent: the grouping fixes the sum order
            per_group, groups = _windows_per_group(num_bw, heads * tiles)
            ds_part = torch.empty((groups, heads, n * n + 1), dtype=torch.float32, device=qkv.device)
            kernel = _window_attn_bwd_dtable_cosine_kernel if cos else _window_attn_bwd_dtable_kernel
            tuning.launch(
                configs.WINDOW_BWD_DTABLE, kernel,
                lambda meta: (tuning.cdiv(n, meta["BLOCK_N"]), tuning.cdiv(n, meta["BLOCK_M"]), groups * heads),
                (x3, bias_arg, table, d3, lse, delta, ds_part, *cos_ptrs,
                 *x3.stride()[:4], *d3.stride()[:4], *table_strides, *cos_strides, *geo, num_bw, per_group, *g.args(),
                 inputs.scale),
                dict(STRIDE_ALIGN=_stride_align((x3, d3), C), **flags), _tune_key(inputs, g), qkv.device)

    dbias = dtable = None
    if need_bias:
        # Only padding tokens read qkv_bias. q's share is 0 (padding queries are cropped from the output);
        # k's and v's are the per-program partial sums, reduced here in a fixed order.
        dbias = torch.zeros(3 * C, dtype=torch.float32, device=qkv.device)
        if grad_pad:
            pad_kv = dpad.sum(dim=0)  # heads, 2, hd
            dbias[C:] = pad_kv.permute(1, 0, 2).reshape(2 * C)
        dbias = dbias.to(qkv_bias.dtype)
    if need_table:
        # groups summed in a fixed order, then each table row gathers its pairs (padded with the 0 slot)
        pairs = geometry.pairs_by_table_row(inputs.window, inputs.table_window, str(qkv.device))
        per_pair = ds_part.sum(dim=0).index_select(1, pairs.view(-1))  # heads, rows * width
        dtable = per_pair.view(heads, *pairs.shape).sum(-1).t().to(table.dtype)  # rows, heads
    dscale = None
    if need_scale:
        # d logit_scale = factor * sum(dS * q_hat . k_hat) = sum(dS * (q_hat * factor) . k_hat): the kernels'
        # sums; 0 where the clamp at log(100) holds (as torch.clamp's gradient)
        ls = inputs.logit_scale
        # torch.clamp's gradient compares with the double bound: float32(log 100) is past it (gradient 0)
        open_clamp = ls.detach().reshape(heads).double() <= cosine.LOGIT_SCALE_MAX
        dscale = (dscale_part * open_clamp).reshape(ls.shape).to(ls.dtype)
    return (dqkv if need_qkv else None), dtable, dbias, dscale


class TritonWindowKernels:
    """window_attention's Triton forward/backward, in the contract of ``function.WindowAttentionFunction``;
    the forward's cache is the fused kernels' dense bias (rebuilt by the backward when not given)."""

    @staticmethod
    def forward(inputs):
        return window_attention_fwd_triton(inputs, return_bias=True)

    @staticmethod
    def backward(dout, inputs, out, lse, needs, cache=None):
        return window_attention_bwd_triton(dout, inputs, out, lse, tuple(needs), cache)
