// flash_attention kernels of vitkernels._C (layouts: vitkernels/ops/attention/function.py).
//
// q (B, H, Nq, D), k and v (B, H, Nk, D): any strides with a unit last stride. bias: broadcastable to
// (B, H, Nq, Nk), q's dtype. Outputs are contiguous; lse (B, H, Nq) float32. Dropout: kept with
// probability 1 - p from a Philox stream keyed by (seed, offset); the backward replays it from the same pair.
// rel_h, rel_w (, rel_t): the decomposed relative-position terms (B, H, Nq - rel_prefix, K) of q's dtype, any
// strides, read in place (checks.py RelPos); all None without them.
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
                                                         const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix);

// (d rel_h, d rel_w, d rel_t or None): contiguous, each shaped like its term.
using RelPosGrads = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>;

// -> (dq, dk, dv, dbias, drel): dbias has bias's shape (summed over its broadcast dims), None unless asked for;
// drel None unless rel_requires_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<RelPosGrads>>
attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse,
                       double scale, double dropout_p, int64_t seed, int64_t offset, bool bias_requires_grad,
                       const c10::optional<at::Tensor>& rel_h, const c10::optional<at::Tensor>& rel_w,
                       const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix, bool rel_requires_grad);

// The keep-mask (True = kept) those kernels draw on a (B, H, Nq, Nk) grid: for tests.
at::Tensor attention_dropout_mask_cpu(std::vector<int64_t> shape, double dropout_p, int64_t seed, int64_t offset);

}  // namespace vitkernels
