"""Triton flash attention (FlashAttention-2 scheme) with a learnable broadcast bias, decomposed relative
position, rotary position embedding and Philox dropout.

Kernels first, then launchers. Shapes: q (B, H, Nq, D), k/v (B, H, Nk, D), bias a broadcast view of
(B, H, Nq, Nk) read by strides (stride 0 on broadcast dims), lse (B, H, Nq) float32.

- Forward: online softmax in base 2 (scale and bias pre-multiplied by log2(e)); saves the row
  log-sum-exp (natural log), nothing N x N.
- Backward: delta = rowsum(O * dO); dK/dV kernel (one program per key block, loops over queries; S^T and
  dP^T formed transposed: 4 GEMMs); dQ kernel (one program per query block, loops over keys: 3 GEMMs),
  which also writes dBias = dS for a bias of the full (B, H, Nq, Nk) shape; dBias kernel for a broadcast
  bias (one program per bias tile, loops over the dims the bias broadcasts, 2 more GEMMs). No atomics:
  every gradient is written by exactly one program in a fixed order, so gradients are bitwise
  deterministic.
- Strides: the batch / head / row strides of q, k, v, out, dO and the gradients are rounded in the
  kernels to STRIDE_ALIGN (8, 4, 2 or 1 elements, what the host found them all to be multiples of):
  Triton specializes integer arguments for divisibility by 16 only, and a packed qkv at D = 40, 56, 72, 88
  has strides that are multiples of 8, enough for 16-byte vectors and cp.async in fp16 / bf16.
- Dropout: keep-mask from Philox with counters (query row, key column // 4, b*H + h, offset), its 4
  outputs for 4 consecutive key columns; the seed and
  offset live in a device tensor drawn from torch's generator of q's device, so the backward
  regenerates exactly the forward's mask without storing it, no host sync happens, and each replay of a
  captured CUDA graph draws a new mask.
- Rope (rotary position embedding): q and k tiles are rotated in float32 as they are loaded (cos and sin
  read by strides, stride 0 on broadcast dims; prefix rows unrotated) and rounded to the input dtype
  before the dots, never written back; the backward forms S and the dot products from the rotated tiles
  and rotates the dQ / dK accumulators back in its epilogues. Interleaved pairs swap in registers; the
  half layout reads the partner half from memory (columns remapped when D is padded, see
  ``_qk_channels``). Learnable tables: the kernels hand back the gradients of the rotated q and k and
  ``rope.qk_rope_backward`` finishes in PyTorch.
- Launch configs: ``triton_configs`` (heuristic candidates, tune keys), selected by ``ops/tuning``;
  every launcher runs on its inputs' device.
- A row whose logits are all -inf gets zeros (m = -inf is shifted by 0, l = 0 divides as 1) and lse
  -inf, which the backward turns into probability 0.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from vitkernels.ops import tuning
from vitkernels.ops.attention.function import draw_dropout_seed, no_dropout_seed
from vitkernels.ops.attention.rope import qk_rope_backward
from vitkernels.ops.attention import triton_configs as configs
from vitkernels.ops.tuning import interpreting  # noqa: F401  (re-exported for the other triton backends)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------------
# Shared tile helpers


@triton.jit
def _dropout_keep(Seed, bh, rows, cols, dropout_p):
    """Keep-mask of the (rows x cols) tile, ``rows`` and ``cols`` 1-D (cols: a block starting at a multiple
    of 4): uniform >= p, the uniforms drawn from Philox with the seed and offset read from the device
    tensor ``Seed`` (int64 [seed, offset]), so a captured CUDA graph draws a new mask at each replay.
    One Philox call per 4 columns: counters (row, col // 4, bh, offset) give 4 outputs, for columns
    4g, 4g + 1, 4g + 2, 4g + 3 (a call per element would compute 4 and keep 1)."""
    BM: tl.constexpr = rows.shape[0]
    BN: tl.constexpr = cols.shape[0]
    seed = tl.load(Seed)
    offset = tl.load(Seed + 1).to(tl.int32)  # Philox counters are 32-bit: the low bits
    groups = tl.max(tl.reshape(cols // 4, [BN // 4, 4]), axis=1)  # col // 4 of each aligned group of 4
    zero = tl.zeros([BM, BN // 4], dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, zero + rows[:, None], zero + groups[None, :], zero + bh, zero + offset)
    # join appends a last dim: [.., g, x, y] holds column 4g + 2x + y, so (x, y) = (0, 0) r0, (0, 1) r1, ...
    u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BM, BN])
    return tl.uint_to_uniform_float(u) >= dropout_p


@triton.jit
def _align(stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """A tensor's batch, head and row strides as visible multiples of ALIGN (``STRIDE_ALIGN``: the host checked
    they are, so the rounding changes no value): Triton derives divisibility from an argument only when it is a
    multiple of 16, and the packed strides of D = 40, 56, 72, 88 are multiples of 8 (16 bytes in fp16 / bf16),
    which the product with a constant now shows its alignment analysis: wide, pipelined loads."""
    return stride_b // ALIGN * ALIGN, stride_h // ALIGN * ALIGN, stride_n // ALIGN * ALIGN


@triton.jit
def _bias_tile(bias_base, rows, cols, mask, stride_bias_m, stride_bias_n):
    """Bias values (float32, times log2(e)) of a tile; int64 offsets since Nq * Nk can pass 2^31."""
    ptrs = bias_base + rows.to(tl.int64) * stride_bias_m + cols.to(tl.int64) * stride_bias_n
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _rel_tile(rel_h, rel_w, rel_t, rows, cols, mask_m, mask_n,
              stride_rhm, stride_rhk, stride_rwm, stride_rwk, stride_rtm, stride_rtk,
              rel_kh, rel_kw, rel_prefix, REL_3D: tl.constexpr):
    """Decomposed relative position of a (rows x cols) tile (float32, times log2(e)): rel_h[i, kh(j)] +
    rel_w[i, kw(j)] (+ rel_t[i, kt(j)]) with i = row - prefix and (kt, kh, kw) key j - prefix on the
    row-major key grid; 0 on the prefix rows and columns. ``rel_*`` point at this (b, h)'s terms. The
    gathers repeat each term value along its grid row / column, so they hit L1."""
    i = rows - rel_prefix
    j = cols - rel_prefix
    valid = ((i >= 0) & mask_m)[:, None] & ((j >= 0) & mask_n)[None, :]
    i = tl.maximum(i, 0)
    j = tl.maximum(j, 0)
    kw = j % rel_kw
    khw = j // rel_kw  # kt * Kh + kh
    kh = khw % rel_kh
    # 32-bit offsets within one (b, h)'s terms (the dispatch refuses terms whose slice reaches 2^31):
    # half the registers of 64-bit pointers per tile element
    val = tl.load(rel_h + ((i * stride_rhm)[:, None] + (kh * stride_rhk)[None, :]), mask=valid,
                  other=0.0).to(tl.float32)
    val += tl.load(rel_w + ((i * stride_rwm)[:, None] + (kw * stride_rwk)[None, :]), mask=valid,
                   other=0.0).to(tl.float32)
    if REL_3D:
        kt = khw // rel_kh
        val += tl.load(rel_t + ((i * stride_rtm)[:, None] + (kt * stride_rtk)[None, :]), mask=valid,
                       other=0.0).to(tl.float32)
    return val * 1.4426950408889634


@triton.jit
def _rel_one_hot(cols, n_k, rel_kh, rel_kw, rel_prefix, AXIS: tl.constexpr, PAD: tl.constexpr):
    """(cols x PAD) float32 one-hot of each key's index along one key-grid axis (0 = t, 1 = h, 2 = w); zero
    rows for prefix keys and keys past ``n_k``: dS @ it sums dS by grid frame / row / column."""
    j = cols - rel_prefix
    valid = (j >= 0) & (cols < n_k)
    j = tl.maximum(j, 0)
    if AXIS == 2:
        idx = j % rel_kw
    elif AXIS == 1:
        idx = (j // rel_kw) % rel_kh
    else:
        idx = j // (rel_kw * rel_kh)
    hot = (idx[:, None] == tl.arange(0, PAD)[None, :]) & valid[:, None]
    return hot.to(tl.float32)


@triton.jit
def _rel_grad_step(acc, ds, ds_dtype_of, cols, n_k, rel_kh, rel_kw, rel_prefix, AXIS: tl.constexpr,
                   PAD: tl.constexpr, EXACT: tl.constexpr):
    """acc (M x PAD) += dS summed by key-grid index along AXIS, a dot with a one-hot. EXACT (fp32 inputs):
    an IEEE fp32 dot; else dS split into high and low parts in the inputs' 16-bit dtype (``ds_dtype_of``'s,
    the dtype dQ's dot already takes dS in): 16 (bf16) to 22 (fp16, outside its subnormal range) significant
    bits, past what the fp16 / bf16 gradient keeps, on tensor cores, exact against the 0/1 one-hot and
    accumulated in fp32."""
    hot = _rel_one_hot(cols, n_k, rel_kh, rel_kw, rel_prefix, AXIS, PAD)
    if EXACT:
        acc = tl.dot(ds, hot, acc, input_precision="ieee")
    else:
        hot16 = hot.to(ds_dtype_of.dtype)
        hi = ds.to(ds_dtype_of.dtype)
        lo = (ds - hi.to(tl.float32)).to(ds_dtype_of.dtype)
        acc = tl.dot(hi, hot16, acc)
        acc = tl.dot(lo, hot16, acc)
    return acc


@triton.jit
def _qk_channels(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE_HALF: tl.constexpr):
    """(the channel each of the BLOCK_D columns of q, k, dq, dk and the rope tables holds, its mask).
    Identity, except for the half layout with a padded head dim (D = 40, 80, 96): each half then sits in
    its own BLOCK_D / 2 columns, [x1 | pad | x2 | pad], so the rotation's partners are BLOCK_D / 2 columns
    apart as when D = BLOCK_D. Any channel order shared by q and k leaves q k^T unchanged, and dq / dk come
    out in it (stored through the same map); v, dO and out keep theirs. Each half stays one contiguous run
    (wide loads)."""
    offs = tl.arange(0, BLOCK_D)
    cols = offs
    mask = offs < HEAD_DIM
    if ROPE_HALF:
        if HEAD_DIM != BLOCK_D:
            j = offs % (BLOCK_D // 2)
            cols = (offs // (BLOCK_D // 2)) * (HEAD_DIM // 2) + j
            mask = j < HEAD_DIM // 2
    return cols, mask


@triton.jit
def _rope_rotate(x, ROPE_HALF: tl.constexpr):
    """timm's rotate of an (R x BLOCK_D) tile in registers: interleaved pairs [-x1, x0, -x3, x2, ...] or, with
    ROPE_HALF, halves [-x2, x1] (halves at BLOCK_D / 2, see ``_qk_channels``). Pairs sit in one thread: a
    reshape / split / join of registers. Halves sit in other threads: the permute costs a shuffle through
    shared memory and many registers, so the main loops read the partner half from memory instead
    (``_rope_apply``); this serves the once-per-program epilogues."""
    R: tl.constexpr = x.shape[0]
    BD: tl.constexpr = x.shape[1]
    if ROPE_HALF:
        lo, hi = tl.split(tl.permute(tl.reshape(x, [R, 2, BD // 2]), (0, 2, 1)))
        rot = tl.reshape(tl.permute(tl.join(-hi, lo), (0, 2, 1)), [R, BD])
    else:
        even, odd = tl.split(tl.reshape(x, [R, BD // 2, 2]))
        rot = tl.reshape(tl.join(-odd, even), [R, BD])
    return rot


@triton.jit
def _half_partners(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(the channel of each column's rotation partner in the half layout, whether the column is in the first
    half): column c holds channel j or D/2 + j (``_qk_channels``), its partner the other; contiguous runs of
    BLOCK_D / 2, so the partner half loads as wide as the tile."""
    offs = tl.arange(0, BLOCK_D)
    half = offs // (BLOCK_D // 2)
    return (1 - half) * (HEAD_DIM // 2) + offs % (BLOCK_D // 2), half == 0


@triton.jit
def _rope_tables(cos_base, sin_base, rows, mask_rows, cols, mask_cols, stride_cn, stride_cd, stride_sn, stride_sd,
                 rope_prefix):
    """cos and sin (float32) of an (R x BLOCK_D) q / k tile: rows are tokens, table row ``row - prefix``;
    cos = 1, sin = 0 on the prefix rows and the padding, which so pass unrotated. ``*_base``: this (b, h)'s
    table (stride 0 on the dims it broadcasts)."""
    i = rows - rope_prefix
    valid = ((i >= 0) & mask_rows)[:, None] & mask_cols[None, :]
    i = tl.maximum(i, 0).to(tl.int64)
    cos = tl.load(cos_base + (i * stride_cn)[:, None] + (cols * stride_cd)[None, :], mask=valid, other=1.0)
    sin = tl.load(sin_base + (i * stride_sn)[:, None] + (cols * stride_sd)[None, :], mask=valid, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rope_apply(x, x_rows, stride_xd, rows, mask_rows, cols, mask_cols, cos_base, sin_base, stride_cn, stride_cd,
                stride_sn, stride_sd, rope_prefix, HEAD_DIM: tl.constexpr, ROPE_HALF: tl.constexpr):
    """x * cos + rotate(x) * sin of a loaded (R x BLOCK_D) q / k tile in float32, rounded to x's dtype once
    (timm's apply_rot_embed with float32 tables): what the dots then take. ``x_rows``: (R x 1) pointers to
    the tile's rows, whence the half layout reads the partner half (an L1 hit, no register shuffle)."""
    cos, sin = _rope_tables(cos_base, sin_base, rows, mask_rows, cols, mask_cols, stride_cn, stride_cd,
                            stride_sn, stride_sd, rope_prefix)
    xf = x.to(tl.float32)
    if ROPE_HALF:
        partner, first = _half_partners(HEAD_DIM, x.shape[1])
        xp = tl.load(x_rows + partner[None, :] * stride_xd, mask=mask_rows[:, None] & mask_cols[None, :],
                     other=0.0).to(tl.float32)
        rot = tl.where(first[None, :], -xp, xp)
    else:
        rot = _rope_rotate(xf, False)
    return (xf * cos + rot * sin).to(x.dtype)


@triton.jit
def _rope_unrotate(g, rows, mask_rows, cols, mask_cols, cos_base, sin_base, stride_cn, stride_cd, stride_sn,
                   stride_sd, rope_prefix, ROPE_HALF: tl.constexpr):
    """The rotation's adjoint on an (R x BLOCK_D) float32 gradient of the rotated q / k: g * cos -
    rotate(g * sin) (rotate^T = -rotate); the tables are read again here rather than kept live through
    the main loop (registers)."""
    cos, sin = _rope_tables(cos_base, sin_base, rows, mask_rows, cols, mask_cols, stride_cn, stride_cd,
                            stride_sn, stride_sd, rope_prefix)
    return g * cos - _rope_rotate(g * sin, ROPE_HALF)


@triton.jit
def online_softmax_step(qk, m_i, l_i, acc):
    """One key tile of the online softmax. ``qk``: (M, N) logits in log2 units, -inf where masked.
    Returns (p, m_new, l_new, acc rescaled to m_new); the caller adds p @ v to acc."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with no finite logit yet has m = -inf: shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def finalize_rows(acc, m_i, l_i):
    """Normalised output rows and their natural-log log-sum-exp (-inf, with zero rows, when all -inf)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], (m_i + tl.math.log2(l_i)) * 0.6931471805599453


@triton.jit
def probs_from_lse(qk, lse2, valid):
    """P = exp2(qk - lse2) for a tile of log2-unit logits, 0 where not ``valid`` and on rows whose lse is
    -inf (all logits -inf)."""
    lse_safe = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return tl.where(valid, tl.math.exp2(qk - lse_safe[:, None]), 0.0)


@triton.jit
def _probs_tile(q, kT, lse2, bias_base, offs_m, offs_n, mask_m, mask_n, qk_scale,
                stride_bias_m, stride_bias_n, bias_cols,
                rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk, stride_rtm, stride_rtk,
                rel_kh, rel_kw, rel_prefix,
                HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """P of an (M x N) tile recomputed from the saved row log-sum-exp (log2 units). ``bias_cols``: the
    bias row's readable extent (see the forward); ``rel_*``: this (b, h)'s rel_pos terms."""
    qk = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
    valid = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        qk += _bias_tile(bias_base, offs_m[:, None], offs_n[None, :], mask_m[:, None] & (offs_n < bias_cols)[None, :],
                         stride_bias_m, stride_bias_n)
    if HAS_REL:
        qk += _rel_tile(rel_h, rel_w, rel_t, offs_m, offs_n, mask_m, mask_n, stride_rhm, stride_rhk,
                        stride_rwm, stride_rwk, stride_rtm, stride_rtk, rel_kh, rel_kw, rel_prefix, REL_3D)
    return probs_from_lse(qk, lse2, valid)


@triton.jit
def _probs_tile_t(k, qT, lse2, bias_base, offs_m, offs_n, mask_m, mask_n, qk_scale,
                  stride_bias_m, stride_bias_n, bias_cols,
                  rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk, stride_rtm, stride_rtk,
                  rel_kh, rel_kw, rel_prefix,
                  HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``_probs_tile`` transposed, (N x M) = P^T, computed as S^T = K Q^T (Triton's fused-attention tutorial):
    the dot's accumulator is the tile the dK/dV products take, not a transpose of it through shared memory.
    The bias is read transposed (its loads still run along the bias rows); the rel_pos gather keeps its
    (M x N) form."""
    qkT = tl.dot(k, qT, input_precision=INPUT_PRECISION) * qk_scale
    valid = mask_n[:, None] & mask_m[None, :]
    if HAS_BIAS:
        qkT += _bias_tile(bias_base, offs_m[None, :], offs_n[:, None],
                          (offs_n < bias_cols)[:, None] & mask_m[None, :], stride_bias_m, stride_bias_n)
    if HAS_REL:
        qkT += tl.trans(_rel_tile(rel_h, rel_w, rel_t, offs_m, offs_n, mask_m, mask_n, stride_rhm, stride_rhk,
                                  stride_rwm, stride_rwk, stride_rtm, stride_rtk, rel_kh, rel_kw, rel_prefix, REL_3D))
    lse_safe = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # as probs_from_lse, along the columns
    return tl.where(valid, tl.math.exp2(qkT - lse_safe[None, :]), 0.0)


# ----------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, Bias, RelH, RelW, RelT, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    stride_rtb, stride_rth, stride_rtm, stride_rtk,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K, BIAS_COLS, REL_KH, REL_KW, REL_PREFIX,
    sm_scale, dropout_p, keep_scale, Seed,
    Cos, Sin, stride_cb, stride_ch, stride_cn, stride_cd, stride_sb, stride_sh, stride_sn, stride_sd, ROPE_PREFIX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ROPE: tl.constexpr = False, ROPE_HALF: tl.constexpr = False,
    STRIDE_ALIGN: tl.constexpr = 1,
):
    stride_qb, stride_qh, stride_qm = _align(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_om = _align(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    # One grid axis (no 65535 limit), query blocks fastest: the blocks of one (b, h) run together and
    # share its K/V in L2 instead of re-reading them from DRAM
    num_m = tl.cdiv(N_Q, BLOCK_M)
    off_bh = tl.program_id(0) // num_m
    start_m = tl.program_id(0) % num_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM  # head dims like 40, 80, 96 run in a padded power-of-two block
    offs_c, mask_c = _qk_channels(HEAD_DIM, BLOCK_D, ROPE_HALF)  # q / k columns: offs_d but for rope halves

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
    k_base = K + off_b * stride_kb + off_h * stride_kh
    kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_c[:, None] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    bias_base = Bias + off_b * stride_biasb + off_h * stride_biash
    rel_h = RelH + off_b * stride_rhb + off_h * stride_rhh
    rel_w = RelW + off_b * stride_rwb + off_h * stride_rwh
    rel_t = RelT + off_b * stride_rtb + off_h * stride_rth
    cos_base = Cos + off_b * stride_cb + off_h * stride_ch
    sin_base = Sin + off_b * stride_sb + off_h * stride_sh

    q = tl.load(q_rows + offs_c[None, :] * stride_qd, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    if HAS_ROPE:  # rotated once per program, in registers (never written back)
        q = _rope_apply(q, q_rows, stride_qd, offs_m, mask_m, offs_c, mask_c, cos_base, sin_base, stride_cn,
                        stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM, ROPE_HALF)
    qk_scale = sm_scale * 1.4426950408889634  # base-2 softmax: exp2(x * log2e) == exp(x)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        kT = tl.load(kT_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        if HAS_ROPE:  # each key tile rotated as it arrives: (keys x D) for the rotation, back to (D x keys)
            k_rows = k_base + cols[:, None].to(tl.int64) * stride_kn
            kT = tl.trans(_rope_apply(tl.trans(kT), k_rows, stride_kd, cols, mask_n, offs_c, mask_c, cos_base,
                                      sin_base, stride_cn, stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM,
                                      ROPE_HALF))
        qk = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            # masked to the row's readable extent, not to N_K: an aligned copy's padded rows let whole
            # 16-element groups load at once (N_K = 197 would split them); padding is masked just below
            qk += _bias_tile(bias_base, offs_m[:, None], cols[None, :], mask_m[:, None] & (cols < BIAS_COLS)[None, :],
                             stride_biasm, stride_biasn)
        if HAS_REL:
            qk += _rel_tile(rel_h, rel_w, rel_t, offs_m, cols, mask_m, mask_n, stride_rhm, stride_rhk,
                            stride_rwm, stride_rwk, stride_rtm, stride_rtk, REL_KH, REL_KW, REL_PREFIX, REL_3D)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        p, m_new, l_i, acc = online_softmax_step(qk, m_i, l_i, acc)  # l_i counts dropped entries too
        if HAS_DROPOUT:
            keep = _dropout_keep(Seed, off_bh, offs_m, cols, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        kT_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    acc, lse = finalize_rows(acc, m_i, l_i)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_ALIGN: tl.constexpr = 1,
):
    """delta = rowsum(O * dO) (B, H, Nq) float32: the softmax-backward term of every row."""
    stride_ob, stride_oh, stride_om = _align(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    off_bh = tl.program_id(0)  # B * H on axis 0: no 65535 grid limit
    start_m = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    Q, K, V, Bias, RelH, RelW, RelT, DOut, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    stride_rtb, stride_rth, stride_rtm, stride_rtk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, BIAS_COLS, REL_KH, REL_KW, REL_PREFIX,
    sm_scale, dropout_p, keep_scale, Seed,
    Cos, Sin, stride_cb, stride_ch, stride_cn, stride_cd, stride_sb, stride_sh, stride_sn, stride_sd, ROPE_PREFIX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HAS_ROPE: tl.constexpr = False, ROPE_HALF: tl.constexpr = False,
    ROPE_UNROTATE: tl.constexpr = True, STRIDE_ALIGN: tl.constexpr = 1,
):
    """One program per key block: dV = P_drop^T dO, dK = dS^T Q * scale, looping over all queries.
    Tiles are formed transposed (keys x queries), S^T = K Q^T and dP^T = V dO^T, so both products are plain
    dots of the accumulators as they come, with no transpose through shared memory (ptxas, sm_90, D = 64
    with a bias: no spill, was 12 bytes; with dropout too: 76 bytes, was 332). With rope, S and dK take the
    rotated q and k, and dK is rotated back in the epilogue (ROPE_UNROTATE; else the gradient of the
    rotated k is stored, for learnable tables)."""
    stride_qb, stride_qh, stride_qm = _align(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _align(stride_dkb, stride_dkh, stride_dkn, STRIDE_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _align(stride_dvb, stride_dvh, stride_dvn, STRIDE_ALIGN)
    num_n = tl.cdiv(N_K, BLOCK_N)  # one grid axis, key blocks fastest (see the forward)
    off_bh = tl.program_id(0) // num_n
    start_n = tl.program_id(0) % num_n
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_K
    mask_d = offs_d < HEAD_DIM
    offs_c, mask_c = _qk_channels(HEAD_DIM, BLOCK_D, ROPE_HALF)  # q / k columns (see the forward)
    rows_n = offs_n[:, None].to(tl.int64)
    cos_base = Cos + off_b * stride_cb + off_h * stride_ch
    sin_base = Sin + off_b * stride_sb + off_h * stride_sh

    k_rows = K + off_b * stride_kb + off_h * stride_kh + rows_n * stride_kn
    k = tl.load(k_rows + offs_c[None, :] * stride_kd, mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    if HAS_ROPE:
        k = _rope_apply(k, k_rows, stride_kd, offs_n, mask_n, offs_c, mask_c, cos_base, sin_base, stride_cn,
                        stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM, ROPE_HALF)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + rows_n * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    qT_ptrs = q_base + offs_m[None, :] * stride_qm + offs_c[:, None] * stride_qd
    do_ptrs = DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom \
        + offs_d[None, :] * stride_dod
    bias_base = Bias + off_b * stride_biasb + off_h * stride_biash
    rel_h = RelH + off_b * stride_rhb + off_h * stride_rhh
    rel_w = RelW + off_b * stride_rwb + off_h * stride_rwh
    rel_t = RelT + off_b * stride_rtb + off_h * stride_rth
    row_base = off_bh.to(tl.int64) * N_Q
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N_Q
        qT = tl.load(qT_ptrs, mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        if HAS_ROPE:
            q_rows = q_base + rows[:, None].to(tl.int64) * stride_qm
            qT = tl.trans(_rope_apply(tl.trans(qT), q_rows, stride_qd, rows, mask_m, offs_c, mask_c, cos_base,
                                      sin_base, stride_cn, stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM,
                                      ROPE_HALF))
        do = tl.load(do_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse2 = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0)
        # pT[n, m] = P[m, n], formed transposed from the start (S^T = K Q^T): no transposed accumulator
        pT = _probs_tile_t(k, qT, lse2, bias_base, rows, offs_n, mask_m, mask_n, qk_scale,
                           stride_biasm, stride_biasn, BIAS_COLS,
                           rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk,
                           stride_rtm, stride_rtk, REL_KH, REL_KW, REL_PREFIX,
                           HAS_BIAS, HAS_REL, REL_3D, INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (dO V^T)^T
        if HAS_DROPOUT:
            keepT = tl.trans(_dropout_keep(Seed, off_bh, rows, offs_n, dropout_p))
            p_dropT = tl.where(keepT, pT * keep_scale, 0.0)
            dpT = tl.where(keepT, dpT * keep_scale, 0.0)
        else:
            p_dropT = pT
        dv = tl.dot(p_dropT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
        qT_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom

    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + rows_n * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    dk = dk * sm_scale
    if HAS_ROPE:
        if ROPE_UNROTATE:  # after dV's store: its accumulator is dead by then
            dk = _rope_unrotate(dk, offs_n, mask_n, offs_c, mask_c, cos_base, sin_base, stride_cn, stride_cd,
                                stride_sn, stride_sd, ROPE_PREFIX, ROPE_HALF)
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + rows_n * stride_dkn + offs_c[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _dscores_tile(q, do, lse2, delta, K, V, bias_base, off_bh, offs_m, mask_m, cols, mask_n, mask_d,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_biasm, stride_biasn, bias_cols,
                  rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk, stride_rtm, stride_rtk,
                  rel_kh, rel_kw, rel_prefix,
                  qk_scale, dropout_p, keep_scale, Seed,
                  offs_c, mask_c, cos_base, sin_base, stride_cn, stride_cd, stride_sn, stride_sd, rope_prefix,
                  HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
                  ROPE_HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """dS = P * (dP - delta) for an (M x N) tile, and the key tile used (for dQ = dS K; rotated with rope, as
    ``q`` already is). ``K``/``V`` point at this (b, h)'s rows; ``offs_c``/``mask_c``: q / k columns."""
    offs_d = tl.arange(0, BLOCK_D)
    rows_n = cols[:, None].to(tl.int64)
    k = tl.load(K + rows_n * stride_kn + offs_c[None, :] * stride_kd, mask=mask_n[:, None] & mask_c[None, :],
                other=0.0)
    if HAS_ROPE:
        k = _rope_apply(k, K + rows_n * stride_kn, stride_kd, cols, mask_n, offs_c, mask_c, cos_base, sin_base,
                        stride_cn, stride_cd, stride_sn, stride_sd, rope_prefix, HEAD_DIM, ROPE_HALF)
    v = tl.load(V + rows_n * stride_vn + offs_d[None, :] * stride_vd, mask=mask_n[:, None] & mask_d[None, :],
                other=0.0)
    p = _probs_tile(q, tl.trans(k), lse2, bias_base, offs_m, cols, mask_m, mask_n, qk_scale,
                    stride_biasm, stride_biasn, bias_cols, rel_h, rel_w, rel_t, stride_rhm, stride_rhk,
                    stride_rwm, stride_rwk, stride_rtm, stride_rtk, rel_kh, rel_kw, rel_prefix,
                    HAS_BIAS, HAS_REL, REL_3D, INPUT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(Seed, off_bh, offs_m, cols, dropout_p)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return p * (dp - delta[:, None]), k


@triton.jit
def _flash_attn_bwd_dq_kernel(
    Q, K, V, Bias, RelH, RelW, RelT, DOut, LSE, Delta, DQ, DRelH, DRelW, DRelT, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    stride_rtb, stride_rth, stride_rtm, stride_rtk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    H, N_Q, N_K, BIAS_COLS, REL_KH, REL_KW, REL_PREFIX, REL_KT,
    sm_scale, dropout_p, keep_scale, Seed,
    Cos, Sin, stride_cb, stride_ch, stride_cn, stride_cd, stride_sb, stride_sh, stride_sn, stride_sd, ROPE_PREFIX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr, REL_GRAD: tl.constexpr,
    KT_PAD: tl.constexpr, KH_PAD: tl.constexpr, KW_PAD: tl.constexpr, REL_EXACT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ROPE: tl.constexpr = False,
    ROPE_HALF: tl.constexpr = False, ROPE_UNROTATE: tl.constexpr = True, STRIDE_ALIGN: tl.constexpr = 1,
    WRITE_DBIAS: tl.constexpr = False,
):
    """One program per query block: dQ = dS K * scale, looping over all keys. With REL_GRAD, also the
    rel_pos gradients of its rows (dS summed by key-grid row / column / frame): the program owns those
    rows, so they are written once, in a fixed order. DRel*: contiguous (B, H, Nq - prefix, K) float32.
    With rope, S and dQ take the rotated q and k and dQ is rotated back in the epilogue (ROPE_UNROTATE).
    WRITE_DBIAS (a bias of the full (B, H, Nq, Nk) shape: each dS element is exactly one of dBias's): dBias = dS
    is stored from here as each tile is formed, in the bias's dtype, and no dBias kernel recomputes S and dP."""
    stride_qb, stride_qh, stride_qm = _align(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dqb, stride_dqh, stride_dqm = _align(stride_dqb, stride_dqh, stride_dqm, STRIDE_ALIGN)
    num_m = tl.cdiv(N_Q, BLOCK_M)  # one grid axis, query blocks fastest (see the forward)
    off_bh = tl.program_id(0) // num_m
    start_m = tl.program_id(0) % num_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    offs_c, mask_c = _qk_channels(HEAD_DIM, BLOCK_D, ROPE_HALF)  # q / k columns (see the forward)
    rows = offs_m[:, None].to(tl.int64)
    qd_mask = mask_m[:, None] & mask_d[None, :]
    qc_mask = mask_m[:, None] & mask_c[None, :]
    cos_base = Cos + off_b * stride_cb + off_h * stride_ch
    sin_base = Sin + off_b * stride_sb + off_h * stride_sh

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm
    q = tl.load(q_rows + offs_c[None, :] * stride_qd, mask=qc_mask, other=0.0)
    if HAS_ROPE:
        q = _rope_apply(q, q_rows, stride_qd, offs_m, mask_m, offs_c, mask_c, cos_base, sin_base, stride_cn,
                        stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM, ROPE_HALF)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    row_base = off_bh.to(tl.int64) * N_Q
    lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    bias_base = Bias + off_b * stride_biasb + off_h * stride_biash
    rel_h = RelH + off_b * stride_rhb + off_h * stride_rhh
    rel_w = RelW + off_b * stride_rwb + off_h * stride_rwh
    rel_t = RelT + off_b * stride_rtb + off_h * stride_rth
    db_rows = DBias + off_b * stride_dbb + off_h * stride_dbh + rows * stride_dbm
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    d_rel_h = tl.zeros([BLOCK_M, KH_PAD], dtype=tl.float32)
    d_rel_w = tl.zeros([BLOCK_M, KW_PAD], dtype=tl.float32)
    d_rel_t = tl.zeros([BLOCK_M, KT_PAD], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        ds, k = _dscores_tile(q, do, lse2, delta, k_base, v_base, bias_base, off_bh, offs_m, mask_m, cols,
                              cols < N_K, mask_d, stride_kn, stride_kd, stride_vn, stride_vd,
                              stride_biasm, stride_biasn, BIAS_COLS,
                              rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk,
                              stride_rtm, stride_rtk, REL_KH, REL_KW, REL_PREFIX,
                              qk_scale, dropout_p, keep_scale, Seed,
                              offs_c, mask_c, cos_base, sin_base, stride_cn, stride_cd, stride_sn, stride_sd,
                              ROPE_PREFIX, HAS_BIAS, HAS_REL, REL_3D, HAS_DROPOUT, INPUT_PRECISION, BLOCK_D,
                              HAS_ROPE, ROPE_HALF, HEAD_DIM)
        if WRITE_DBIAS:  # exactly what the dBias kernel would write for this tile (one term: no sum)
            tl.store(db_rows + cols[None, :].to(tl.int64) * stride_dbn, ds.to(DBias.dtype.element_ty),
                     mask=mask_m[:, None] & (cols < N_K)[None, :])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        if REL_GRAD:
            d_rel_h = _rel_grad_step(d_rel_h, ds, k, cols, N_K, REL_KH, REL_KW, REL_PREFIX, 1, KH_PAD, REL_EXACT)
            d_rel_w = _rel_grad_step(d_rel_w, ds, k, cols, N_K, REL_KH, REL_KW, REL_PREFIX, 2, KW_PAD, REL_EXACT)
            if REL_3D:
                d_rel_t = _rel_grad_step(d_rel_t, ds, k, cols, N_K, REL_KH, REL_KW, REL_PREFIX, 0, KT_PAD,
                                         REL_EXACT)
    dq = dq * sm_scale
    if HAS_ROPE:
        if ROPE_UNROTATE:
            dq = _rope_unrotate(dq, offs_m, mask_m, offs_c, mask_c, cos_base, sin_base, stride_cn, stride_cd,
                                stride_sn, stride_sd, ROPE_PREFIX, ROPE_HALF)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_c[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qc_mask)
    if REL_GRAD:
        # rows of the prefix tokens have no term: not stored
        rel_rows = offs_m - REL_PREFIX
        rel_mask = (rel_rows >= 0) & mask_m
        rel_rows = (off_bh.to(tl.int64) * (N_Q - REL_PREFIX) + tl.maximum(rel_rows, 0))[:, None]
        k_h = tl.arange(0, KH_PAD)[None, :]
        tl.store(DRelH + rel_rows * REL_KH + k_h, d_rel_h, mask=rel_mask[:, None] & (k_h < REL_KH))
        k_w = tl.arange(0, KW_PAD)[None, :]
        tl.store(DRelW + rel_rows * REL_KW + k_w, d_rel_w, mask=rel_mask[:, None] & (k_w < REL_KW))
        if REL_3D:
            k_t = tl.arange(0, KT_PAD)[None, :]
            tl.store(DRelT + rel_rows * REL_KT + k_t, d_rel_t, mask=rel_mask[:, None] & (k_t < REL_KT))


@triton.jit
def _flash_attn_bwd_dbias_kernel(
    Q, K, V, Bias, RelH, RelW, RelT, DOut, LSE, Delta, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    stride_rtb, stride_rth, stride_rtm, stride_rtk,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_dbg,
    H, N_Q, N_K, BIAS_COLS, REL_KH, REL_KW, REL_PREFIX,
    BIAS_H, BIAS_BH, LOOP_B, LOOP_H, B_PER_GROUP,
    sm_scale, dropout_p, keep_scale, Seed,
    Cos, Sin, stride_cb, stride_ch, stride_cn, stride_cd, stride_sb, stride_sh, stride_sn, stride_sd, ROPE_PREFIX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    REDUCE_M: tl.constexpr, REDUCE_N: tl.constexpr, HAS_REL: tl.constexpr, REL_3D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ROPE: tl.constexpr = False,
    ROPE_HALF: tl.constexpr = False, STRIDE_ALIGN: tl.constexpr = 1,
):
    """dBias = dS summed over the dims the bias broadcasts, one program per tile of dBias.

    The program owns one (bias b, bias h, query block, key block) tile and walks the broadcast dims in
    a fixed order (b, h, query blocks if REDUCE_M, key blocks if REDUCE_N), recomputing dS: a
    deterministic reduction without atomics and without a (B, H, Nq, Nk) temporary. A bias shared by the
    batch has its batch walk split in groups of B_PER_GROUP (grid axis 0 is group * BIAS_BH + bias (b, h)),
    each writing its partial sum at ``group * stride_dbg``, summed by the host in a fixed order: enough
    programs to fill the GPU. A bias of the full shape never comes here: the dQ kernel writes its dBias =
    dS (WRITE_DBIAS); this kernel serves the broadcast ones, whose every element sums dS over the batch
    (and / or heads, rows, columns) that many dQ programs produce: it walks them in a fixed order instead
    of adding across programs with atomics."""
    stride_qb, stride_qh, stride_qm = _align(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _align(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _align(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _align(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    group = tl.program_id(0) // BIAS_BH
    pid_bh = tl.program_id(0) % BIAS_BH
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    bias_b = pid_bh // BIAS_H
    bias_h = pid_bh % BIAS_H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_c, mask_c = _qk_channels(HEAD_DIM, BLOCK_D, ROPE_HALF)  # q / k columns (see the forward)
    qk_scale = sm_scale * 1.4426950408889634
    if REDUCE_M:  # this program walks every query block
        loop_m = tl.cdiv(N_Q, BLOCK_M)
    else:
        loop_m = 1
    if REDUCE_N:  # ... and/or every key block
        loop_n = tl.cdiv(N_K, BLOCK_N)
    else:
        loop_n = 1

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ib in range(group * B_PER_GROUP, tl.minimum(group * B_PER_GROUP + B_PER_GROUP, LOOP_B)):
        off_b = (bias_b + ib).to(tl.int64)
        for ih in range(0, LOOP_H):
            off_h = (bias_h + ih).to(tl.int64)
            off_bh = (off_b * H + off_h).to(tl.int32)
            bias_base = Bias + off_b * stride_biasb + off_h * stride_biash
            rel_h = RelH + off_b * stride_rhb + off_h * stride_rhh
            rel_w = RelW + off_b * stride_rwb + off_h * stride_rwh
            rel_t = RelT + off_b * stride_rtb + off_h * stride_rth
            cos_base = Cos + off_b * stride_cb + off_h * stride_ch
            sin_base = Sin + off_b * stride_sb + off_h * stride_sh
            k_base = K + off_b * stride_kb + off_h * stride_kh
            v_base = V + off_b * stride_vb + off_h * stride_vh
            row_base = off_b * H * N_Q + off_h * N_Q
            for im in range(0, loop_m):
                offs_m = (pid_m + im) * BLOCK_M + tl.arange(0, BLOCK_M)
                mask_m = offs_m < N_Q
                rows = offs_m[:, None].to(tl.int64)
                qd_mask = mask_m[:, None] & mask_d[None, :]
                q_rows = Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm
                q = tl.load(q_rows + offs_c[None, :] * stride_qd, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
                if HAS_ROPE:
                    q = _rope_apply(q, q_rows, stride_qd, offs_m, mask_m, offs_c, mask_c, cos_base, sin_base,
                                    stride_cn, stride_cd, stride_sn, stride_sd, ROPE_PREFIX, HEAD_DIM, ROPE_HALF)
                do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + rows * stride_dom
                             + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
                lse2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
                for jn in range(0, loop_n):
                    cols = (pid_n + jn) * BLOCK_N + tl.arange(0, BLOCK_N)
                    ds, _ = _dscores_tile(q, do, lse2, delta, k_base, v_base, bias_base, off_bh, offs_m, mask_m,
                                          cols, cols < N_K, mask_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                          stride_biasm, stride_biasn, BIAS_COLS,
                                          rel_h, rel_w, rel_t, stride_rhm, stride_rhk, stride_rwm, stride_rwk,
                                          stride_rtm, stride_rtk, REL_KH, REL_KW, REL_PREFIX,
                                          qk_scale, dropout_p, keep_scale, Seed,
                                          offs_c, mask_c, cos_base, sin_base, stride_cn, stride_cd, stride_sn,
                                          stride_sd, ROPE_PREFIX, True, HAS_REL, REL_3D, HAS_DROPOUT,
                                          INPUT_PRECISION, BLOCK_D, HAS_ROPE, ROPE_HALF, HEAD_DIM)
                    acc += ds

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    db_base = DBias + group.to(tl.int64) * stride_dbg + bias_b.to(tl.int64) * stride_dbb \
        + bias_h.to(tl.int64) * stride_dbh
    if REDUCE_M:
        if REDUCE_N:
            tl.store(db_base, tl.sum(tl.sum(acc, 1), 0).to(DBias.dtype.element_ty))
        else:
            tl.store(db_base + offs_n.to(tl.int64) * stride_dbn, tl.sum(acc, 0).to(DBias.dtype.element_ty),
                     mask=offs_n < N_K)
    else:
        if REDUCE_N:
            tl.store(db_base + offs_m.to(tl.int64) * stride_dbm, tl.sum(acc, 1).to(DBias.dtype.element_ty),
                     mask=offs_m < N_Q)
        else:
            ptrs = db_base + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :].to(tl.int64) * stride_dbn
            tl.store(ptrs, acc.to(DBias.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_n < N_K)[None, :])


@triton.jit
def _dropout_mask_kernel(Mask, Seed, H, N_Q, N_K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialises the keep-mask the attention kernels draw for (seed, p): for tests and debugging
    only (the kernels themselves never store it)."""
    off_bh = tl.program_id(0)  # B * H on axis 0: no 65535 grid limit
    start_m = tl.program_id(1)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(Seed, off_bh, rows, cols, dropout_p)
        ptrs = Mask + off_bh.to(tl.int64) * N_Q * N_K + rows[:, None].to(tl.int64) * N_K + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows < N_Q)[:, None] & (cols < N_K)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers


def _bias4(bias: Optional[torch.Tensor], q: torch.Tensor, n_k: int):
    """(the bias as a 4-D view with leading 1s, what the kernels read: its broadcast to (B, H, Nq, Nk) with
    stride-0 dims, from an aligned copy when that pays (``_aligned_rows``), and how far each of its rows
    may be read: past Nk into an aligned copy's padding, a multiple of 16, so the column mask never splits
    a wide load; else Nk)."""
    if bias is None:
        return None, None, n_k
    bias4 = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    B, H, n_q = q.shape[:3]
    aligned = _aligned_rows(bias4, B)
    cols = aligned.stride(2) if aligned is not bias4 else n_k
    return bias4, aligned.expand(B, H, n_q, n_k), cols


ROW_ALIGN = 16  # elements: Triton proves 16-byte alignment (wide, pipelined loads) from divisibility by 16


def _aligned_rows(bias4: torch.Tensor, batch: int) -> torch.Tensor:
    """A bias shared by the batch and read by every one of its B programs' tiles, whose rows do not start
    on a multiple of 16 elements (Nk = 197, 577: ViT), is read from a copy with rows padded to 16 (zeros):
    its tile loads then vectorize and pipeline instead of going element by element. One copy per call, B
    times smaller than the reads it speeds up. Any other bias is read in place.

    On a GPU the padding is left unwritten (one device op, the copy; zeros would take a fill too, as
    F.pad does): the kernels load it (their column mask stops at BIAS_COLS, the padded width, so it never
    splits a 16-element group) and drop it by selection: the forward sets every column past Nk to -inf with
    tl.where and the backward's probabilities are tl.where(valid, ..., 0), so whatever bits it holds never
    reach a result (tests poison it with NaN). On the CPU (the interpreter) it is zeroed: numpy would warn
    about the arithmetic on garbage before the selection."""
    bb, bh, bm, bn = bias4.shape
    if bb != 1 or batch == 1 or bn == 1 or bias4.stride(3) != 1:
        return bias4
    strides = (bias4.stride(1), bias4.stride(2))
    if all(st % ROW_ALIGN == 0 for st, n in zip(strides, (bh, bm)) if n > 1) and _aligned_start(bias4):
        return bias4
    padded = -(-bn // ROW_ALIGN) * ROW_ALIGN
    shape = (bb, bh, bm, padded)
    aligned = (bias4.new_empty(shape) if bias4.is_cuda else bias4.new_zeros(shape))[..., :bn]
    aligned.copy_(bias4)
    return aligned


def _aligned_start(t: torch.Tensor) -> bool:
    """Whether the tensor's first element sits on 16 bytes; traced, from its storage offset (the
    allocator's blocks are aligned far beyond 16)."""
    if tuning.traced(t):
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


def _stride_align(*tensors: torch.Tensor) -> int:
    """STRIDE_ALIGN of a launch: the largest of 8, 4, 2, 1 dividing the batch, head and row strides of every
    (B, H, N, D) tensor it reads or writes (the kernels round them to it, see ``_align``; channel strides are
    not rounded). 8 when they all are multiples of 8 elements: a packed qkv at D = 40, 56, 72, 88 and
    contiguous outputs at any N. One gcd over all the strides (the host path stays cheap)."""
    strides = [st for t in tensors for st in t.stride()[:3]]
    if any(isinstance(st, torch.SymInt) for st in strides):
        # symbolic strides (torch.compile, dynamic shapes): each tested for divisibility (math.gcd would
        # specialize them to their values: a recompile per shape)
        return next(a for a in (8, 4, 2, 1) if all(st % a == 0 for st in strides))
    g = math.gcd(*strides)
    return min(8, g & -g) if g else 8


def _align_key(align: int) -> Dict[str, Any]:
    """The tune-key entry of STRIDE_ALIGN: none at 8 (the usual case, the keys stay those the tuned tables
    hold); narrower strides load narrower, other code, maybe other best tiles."""
    return {} if align == 8 else {"align": align}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 in IEEE so its error matches PyTorch's


def _keep_scale(dropout_p: float) -> float:
    """Scale of kept probabilities: 1 / (1 - p), and 0 at p = 1 (everything dropped, output 0)."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _block_d(d: int) -> int:
    return configs.block_d(d)


def _no_seed(like: torch.Tensor) -> torch.Tensor:
    """A placeholder seed (never read: HAS_DROPOUT is off), one per device, never written; a fresh one while
    traced (a graph holds no cached tensor)."""
    if tuning.traced(like):
        return no_dropout_seed(like.device)
    seed = _NO_SEED.get(like.device)
    if seed is None:
        seed = _NO_SEED[like.device] = no_dropout_seed(like.device)
    return seed


_NO_SEED = {}


def _rel_args(rel_pos, q):
    """(the three term pointers, their 12 strides, (Kh, Kw, prefix), flags) of a rel_pos for the kernels;
    q and zero strides stand in for absent terms (never read: HAS_REL / REL_3D off)."""
    if rel_pos is None:
        return (q, q, q), (0,) * 12, (1, 1, 0), dict(HAS_REL=False, REL_3D=False)
    rel_t = rel_pos.rel_t
    terms = (rel_pos.rel_h, rel_pos.rel_w, rel_t if rel_t is not None else rel_pos.rel_h)
    strides = tuple(st for t in terms for st in t.stride())
    _, kh, kw = rel_pos.key_grid
    return terms, strides, (kh, kw, rel_pos.prefix), dict(HAS_REL=True, REL_3D=rel_t is not None)


def _rel_key(rel_pos, grad: bool = False) -> Dict[str, Any]:
    """The tune-key entries of a rel_pos: whether there is one (2-D or 3-D) and, with its gradient, the
    padded grid (the dQ program's accumulators grow with it)."""
    if rel_pos is None:
        return {}
    key = {"rel": 3 if rel_pos.rel_t is not None else 2}
    if grad:
        key["rel_pad"] = max(_rel_pad(n) for n in rel_pos.key_grid)
    return key


def _rel_pad(n: int) -> int:
    """A key-grid axis padded for the one-hot dot (a power of two, at least 16: tl.dot's smallest K)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def _rope_args(rope, q):
    """(cos, sin, their 8 strides, prefix) of a checked rope for the kernels, read in place: strides 0 on
    the dims the 4-D table views broadcast (size 1); q and zero strides stand in without one (never read:
    HAS_ROPE off)."""
    if rope is None:
        return (q, q) + (0,) * 8 + (0,)
    strides = tuple(st if n > 1 else 0 for t in (rope.cos, rope.sin) for n, st in zip(t.shape, t.stride()))
    return (rope.cos, rope.sin) + strides + (rope.prefix,)


def _rope_flags(rope, unrotate: Optional[bool] = None) -> Dict[str, Any]:
    flags = dict(HAS_ROPE=rope is not None, ROPE_HALF=rope is not None and rope.rotate_half)
    if unrotate is not None:
        flags["ROPE_UNROTATE"] = unrotate
    return flags


def _rope_key(rope, unrotate: bool = True) -> Dict[str, Any]:
    """The tune-key entry of a rope: its layout (the rotation's registers and shuffles change the best
    tiles; cos / sin in float32 or q's dtype are specialisations of the same code), and in the backward
    whether the epilogue rotates dq / dk back (learnable tables skip it: other code, other best tiles)."""
    if rope is None:
        return {}
    return {"rope": "half" if rope.rotate_half else "pairs", **({} if unrotate else {"unrotate": 0})}


def flash_attention_fwd_triton(q, k, v, bias, scale: float, dropout_p: float, rel_pos=None, rope=None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: returns (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32, dropout seed tensor). ``rope``:
    a checked ``Rope`` (4-D table views) or None; q and k are rotated as they are loaded."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    with tuning.on_device(q):
        out = torch.empty((B, H, n_q, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
        seed = draw_dropout_seed(q.device) if dropout_p > 0 else _no_seed(q)
        _, bias_b, bias_cols = _bias4(bias, q, n_k)
        bias_strides = bias_b.stride() if bias_b is not None else None
        rel_terms, rel_strides, rel_sizes, rel_flags = _rel_args(rel_pos, q)
        q_strides = q.stride()
        plan_key = None
        if rel_pos is None and rope is None and not tuning.traced(q):
            plan_key = (q.dtype, q.shape, q_strides, n_k, k.stride(), v.stride(), bias_strides, dropout_p > 0)
        plan = _FWD_PLANS.get(plan_key) if plan_key is not None else None
        if plan is None:
            align = _stride_align(q, k, v, out)
            plan = (dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
                         INPUT_PRECISION=_precision(q.dtype), STRIDE_ALIGN=align, **rel_flags, **_rope_flags(rope)),
                    configs.tune_key(q.dtype, n_q, n_k, d, bias_strides, dropout_p > 0, **_rel_key(rel_pos),
                                     **_rope_key(rope), **_align_key(align)))
            if plan_key is not None:
                if len(_FWD_PLANS) >= 1024:
                    _FWD_PLANS.clear()
                _FWD_PLANS[plan_key] = plan
        flags, key = plan
        tuning.launch(
            configs.ATTN_FWD, _flash_attn_fwd_kernel, lambda meta: (B * H * tuning.cdiv(n_q, meta["BLOCK_M"]),),
            (q, k, v, bias_b if bias_b is not None else q, *rel_terms, out, lse,
             *q_strides, *k.stride(), *v.stride(), *(bias_strides or (0, 0, 0, 0)), *rel_strides, *out.stride(),
             H, n_q, n_k, bias_cols, *rel_sizes, scale, dropout_p, _keep_scale(dropout_p), seed, *_rope_args(rope, q)),
            flags, key, q.device)
    return out, lse, seed


# The forward's flags and tune key per (dtype, q shape and strides, Nk, k / v strides, bias strides,
# dropout): what they derive from, computed once (a ViT calls the same few shapes every layer, where the
# host path is the bottleneck). Calls with rel_pos or rope, and traced ones, compute them each time.
_FWD_PLANS: Dict[tuple, Tuple[Dict[str, Any], Dict[str, Any]]] = {}


def flash_attention_bwd_triton(dout, q, k, v, bias, out, lse, seed: torch.Tensor, scale: float, dropout_p: float,
                               bias_requires_grad: bool, rel_pos=None, rel_requires_grad: bool = False, rope=None,
                               rope_unrotate: bool = True):
    """Backward: returns (dq, dk, dv, dbias, drel); dbias has bias's shape (None unless asked for), drel the
    gradients of rel_pos's terms (None unless asked for). With ``rope``, dq and dk are the gradients of the
    unrotated q and k, or (``rope_unrotate=False``) of the rotated ones."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = _block_d(d)
    with tuning.on_device(q):
        delta = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        align = _stride_align(q, k, v, out, dout, dq, dk, dv)
        tuning.launcher(_flash_attn_bwd_preprocess_kernel, out)[(B * H, tuning.cdiv(n_q, 64))](
            out, dout, delta, *out.stride(), *dout.stride(), H, n_q, HEAD_DIM=d, BLOCK_M=64, BLOCK_D=block_d,
            STRIDE_ALIGN=align,
        )
        bias4, bias_b, bias_cols = _bias4(bias, q, n_k)
        bias_arg = bias_b if bias_b is not None else q
        bias_strides = bias_b.stride() if bias_b is not None else None
        rel_terms, rel_strides, rel_sizes, rel_flags = _rel_args(rel_pos, q)
        flags = dict(HEAD_DIM=d, BLOCK_D=block_d, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
                     INPUT_PRECISION=_precision(q.dtype), STRIDE_ALIGN=align, **rel_flags,
                     **_rope_flags(rope, rope_unrotate))
        key = configs.tune_key(q.dtype, n_q, n_k, d, bias_strides, dropout_p > 0, **_rel_key(rel_pos),
                               **_rope_key(rope, rope_unrotate), **_align_key(align))
        scalars = (H, n_q, n_k, bias_cols, *rel_sizes)
        tail = (scale, dropout_p, _keep_scale(dropout_p), seed, *_rope_args(rope, q))
        strides = (*q.stride(), *k.stride(), *v.stride(), *(bias_strides or (0, 0, 0, 0)), *rel_strides,
                   *dout.stride())
        tuning.launch(
            configs.ATTN_BWD_DKDV, _flash_attn_bwd_dkdv_kernel,
            lambda meta: (B * H * tuning.cdiv(n_k, meta["BLOCK_N"]),),
            (q, k, v, bias_arg, *rel_terms, dout, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
             *scalars, *tail),
            flags, key, q.device)
        rel_grad = rel_pos is not None and rel_requires_grad
        d_rel = _rel_grad_buffers(rel_pos, q) if rel_grad else (q, q, q)
        kt, kh, kw = rel_pos.key_grid if rel_pos is not None else (1, 1, 1)
        write_dbias = bias_requires_grad and _dbias_is_ds(bias4, B, H, n_q, n_k)
        dbias4 = torch.empty(bias4.shape, dtype=bias.dtype, device=bias.device) if write_dbias else None
        tuning.launch(
            configs.ATTN_BWD_DQ, _flash_attn_bwd_dq_kernel,
            lambda meta: (B * H * tuning.cdiv(n_q, meta["BLOCK_M"]),),
            (q, k, v, bias_arg, *rel_terms, dout, lse, delta, dq, *d_rel, dbias4 if write_dbias else q, *strides,
             *dq.stride(), *(dbias4.stride() if write_dbias else (0, 0, 0, 0)), *scalars, kt, *tail),
            dict(flags, REL_GRAD=rel_grad, KT_PAD=_rel_pad(kt) if rel_grad else 16,
                 KH_PAD=_rel_pad(kh) if rel_grad else 16, KW_PAD=_rel_pad(kw) if rel_grad else 16,
                 REL_EXACT=q.dtype == torch.float32, WRITE_DBIAS=write_dbias),
            {**key, **_rel_key(rel_pos, rel_grad), **({"dbias": 1} if write_dbias else {})}, q.device)
        drel = None
        if rel_grad:
            drel = tuple(g.to(t.dtype) if g is not None else None
                         for g, t in zip(d_rel if rel_pos.rel_t is not None else d_rel[:2] + (None,),
                                         (rel_pos.rel_h, rel_pos.rel_w, rel_pos.rel_t)))
        dbias = None
        if write_dbias:
            dbias = dbias4.view(bias.shape)
        elif bias_requires_grad:
            bb, bh, bm, bn = bias4.shape
            reduce_m, reduce_n = bm == 1 and n_q > 1, bn == 1 and n_k > 1
            loop_b = B if bb == 1 else 1
            per_group, groups = _dbias_batch_groups(loop_b, bb * bh * (1 if reduce_m else tuning.cdiv(n_q, 64))
                                                    * (1 if reduce_n else tuning.cdiv(n_k, 64)))
            if groups == 1:  # written in place, in the bias's dtype
                parts = torch.empty(bias4.shape, dtype=bias.dtype, device=bias.device).unsqueeze(0)
            else:  # fp32 partial sums per batch group, summed below in a fixed order
                parts = torch.empty((groups,) + tuple(bias4.shape), dtype=torch.float32, device=bias.device)

            def grid(meta):
                return (groups * bb * bh, 1 if reduce_m else tuning.cdiv(n_q, meta["BLOCK_M"]),
                        1 if reduce_n else tuning.cdiv(n_k, meta["BLOCK_N"]))

            tuning.launch(
                configs.ATTN_BWD_DBIAS, _flash_attn_bwd_dbias_kernel, grid,
                (q, k, v, bias_b, *rel_terms, dout, lse, delta, parts, *strides, *parts.stride()[1:], parts.stride(0),
                 *scalars, bh, bb * bh, loop_b, H if bh == 1 else 1, per_group, *tail),
                dict(HEAD_DIM=d, BLOCK_D=block_d, REDUCE_M=reduce_m, REDUCE_N=reduce_n, HAS_DROPOUT=dropout_p > 0,
                     INPUT_PRECISION=_precision(q.dtype), STRIDE_ALIGN=align, **rel_flags, **_rope_flags(rope)),
                {**key, "reduce": f"{int(reduce_m)}{int(reduce_n)}"}, q.device)
            dbias4 = parts[0] if groups == 1 else parts.sum(0).to(bias.dtype)
            dbias = dbias4.view(bias.shape)
    return dq, dk, dv, dbias, drel


def _dbias_is_ds(bias4: torch.Tensor, B: int, H: int, n_q: int, n_k: int) -> bool:
    """Whether each dS element is exactly one of dBias's (a bias of the full (B, H, Nq, Nk) shape; at batch 1
    a batch-1 bias): then the dQ kernel writes dBias = dS as it forms the tiles (WRITE_DBIAS: 7 GEMMs in the
    backward, not 9). A broadcast bias (ViT's (1, H, N, N) shared by the batch) sums dS over the dims it
    broadcasts, elements that many dQ programs form: the dBias kernel walks them in a fixed order (bitwise
    deterministic, no atomics), recomputing S and dP."""
    return tuple(bias4.shape) == (B, H, n_q, n_k)


def _rel_grad_buffers(rel_pos, q):
    """float32 (B, H, Nq - prefix, K) buffers the dQ kernel writes the rel_pos gradients into, one per
    grid axis (t, h, w order of the kernel's arguments: h, w, t; q stands in for an absent rel_t)."""
    def buffer(t):
        return torch.empty(t.shape, dtype=torch.float32, device=q.device)
    return (buffer(rel_pos.rel_h), buffer(rel_pos.rel_w),
            buffer(rel_pos.rel_t) if rel_pos.rel_t is not None else q)


# dBias of a batch-shared bias: batch groups aim at about this many programs (a few waves on any GPU)
DBIAS_TARGET_PROGRAMS = 512


def _dbias_batch_groups(loop_b: int, tiles: int):
    """(batches per group, groups) of dBias's walk over the batch, from the shape only (``tiles``: the
    programs of one group with a fixed 64 x 64 tile estimate), never from the launch config, so the
    order of every sum, and so every bit of dBias, is fixed by the inputs."""
    groups = max(1, min(loop_b, tuning.cdiv(DBIAS_TARGET_PROGRAMS, tiles)))
    per_group = tuning.cdiv(loop_b, groups)
    return per_group, tuning.cdiv(loop_b, per_group)


def dropout_mask_triton(seed: torch.Tensor, B: int, H: int, n_q: int, n_k: int, dropout_p: float) -> torch.Tensor:
    """(B, H, Nq, Nk) bool on the seed's device: True where the kernels keep a probability for this
    (seed, offset) tensor and p."""
    with tuning.on_device(seed):
        mask = torch.empty((B, H, n_q, n_k), dtype=torch.int8, device=seed.device)
        _dropout_mask_kernel[(B * H, tuning.cdiv(n_q, 32))](mask, seed, H, n_q, n_k, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return mask.bool()


class TritonAttentionKernels:
    """flash_attention's Triton forward/backward, in the shape ``AttentionFunction`` expects."""

    @staticmethod
    def forward(q, k, v, bias, scale, dropout_p, rel_pos=None, rope=None):
        return flash_attention_fwd_triton(q, k, v, bias, scale, dropout_p, rel_pos, rope)

    @staticmethod
    def backward(dout, q, k, v, bias, out, lse, seed, scale, dropout_p, bias_requires_grad, rel_pos=None,
                 rel_requires_grad=False, rope=None, rope_requires_grad=False):
        tables_grad = rope is not None and rope_requires_grad
        # learnable tables: the kernels hand back the gradients of the rotated q and k, and rope.py's adjoint
        # gives dq, dk and the tables' (deterministic sums over the broadcast dims, in PyTorch)
        dq, dk, dv, dbias, drel = flash_attention_bwd_triton(dout, q, k, v, bias, out, lse, seed, scale, dropout_p,
                                                             bias_requires_grad, rel_pos, rel_requires_grad, rope,
                                                             rope_unrotate=not tables_grad)
        drope = None
        if tables_grad:
            dq, dk, drope = qk_rope_backward(dq, dk, q, k, rope, True)
        return dq, dk, dv, dbias, drel, drope
