// flash_attention kernels of vitkernels._C (layouts: vitkernels/ops/attention/function.py).
//
// q (B, H, Nq, D), k and v (B, H, Nk, D): any strides with a unit last stride. bias: broadcastable to
// (B, H, Nq, Nk), q's dtype. Outputs are contiguous; lse (B, H, Nq) float32. Dropout: kept with
// probability 1 - p from a Philox stream keyed by (seed, offset); the backward replays it from the same pair.
// rel_h, rel_w (, rel_t): the decomposed relative-position terms (B, H, Nq - rel_prefix, K) of q's dtype, any
// strides, read in place (checks.py RelPos); all None without them. cos, sin: the rotary tables (checks.py Rope)
// as (1|B, 1|H, Nq - rope_prefix, D) views, float32 or q's dtype, any strides, read in place; q and k rows from
// rope_prefix on are rotated (in float) as they are loaded, rotate_half picks the halves layout over the
// interleaved pairs; None without rope (which needs Nq == Nk).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace vitkernels {

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const c10::optional<at::Tensor>& bias, double scale,
                                                         double dropout_p, int64_t seed, int64_t offset,
                                                         const c10::optional<at::Tensor>& rel_h,
                                                         const c10::optional<at::Tensor>& rel_w,
                                                         const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix,
                                                         const c10::optional<at::Tensor>& cos,
                                                         const c10::optional<at::Tensor>& sin, int64_t rope_prefix,
                                                         bool rotate_half);

// (d rel_h, d rel_w, d rel_t or None): contiguous, each shaped like its term.
using RelPosGrads = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>;

// (d cos, d sin): contiguous, shaped like cos, in its dtype.
using RopeGrads = std::tuple<at::Tensor, at::Tensor>;

// -> (dq, dk, dv, dbias, drel, drope): dq, dk the gradients of the unrotated q, k; dbias has bias's shape
// (summed over its broadcast dims), None unless asked for; drel None unless rel_requires_grad; drope None
// unless rope_requires_grad (summed over the tables' broadcast dims in a fixed order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<RelPosGrads>,
           c10::optional<RopeGrads>>
attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse,
                       double scale, double dropout_p, int64_t seed, int64_t offset, bool bias_requires_grad,
                       const c10::optional<at::Tensor>& rel_h, const c10::optional<at::Tensor>& rel_w,
                       const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix, bool rel_requires_grad,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, int64_t rope_prefix,
                       bool rotate_half, bool rope_requires_grad);

// The keep-mask (True = kept) those kernels draw on a (B, H, Nq, Nk) grid: for tests.
at::Tensor attention_dropout_mask_cpu(std::vector<int64_t> shape, double dropout_p, int64_t seed, int64_t offset);

}  // namespace vitkernels
