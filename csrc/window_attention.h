// window_attention kernels of vitkernels._C (layouts: vitkernels/ops/window_attention/function.py).
//
// The map is always seen as 3-D: qkv (B, T, H, W, 3C) with any strides (2-D maps: T = 1, a view made in
// Python), channels [q | k | v], heads major. `window`, `shift`, `padded` are the used (clipped) window, the
// shift and the padded map size per dim (t, h, w). 2-D (timm) rolls the map and then pads it; 3-D (Video Swin,
// `roll_after_pad`) pads and then rolls. Padded tokens take qkv_bias (zeros without it). `index` (N, N) int64
// holds the table row of each (query, key) pair of a window; table (rows, heads). logit_scale (heads,) or
// (heads, 1, ..., 1), float32 or qkv's dtype: Swin V2's cosine attention (q and k rows L2-normalised, the logits
// scaled by exp(min(logit_scale, log 100)) per head; `scale` then multiplies that, 1.0 from Python); None: the
// dot-product attention.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace vitkernels {

struct WindowGeometry {
  std::vector<int64_t> spatial, window, shift, padded;  // 3 each
  bool roll_after_pad = false;
};

// -> (out (B, T, H, W, C) contiguous, lse (B * num_windows, heads, N) float32)
std::tuple<at::Tensor, at::Tensor> window_forward_cpu(const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                                                      const c10::optional<at::Tensor>& qkv_bias,
                                                      const c10::optional<at::Tensor>& index, int64_t num_heads,
                                                      const WindowGeometry& geo, double scale,
                                                      const c10::optional<at::Tensor>& logit_scale);

// -> (dqkv (B, T, H, W, 3C) contiguous or None, d(pairs) (heads, N, N) float32 summed over every window or
// None, d(qkv_bias) (3C,) float32 or None, d(logit_scale) (heads,) float32 or None (cosine and need_logit_scale
// only; 0 where the clamp at log 100 is active)); d(table) is d(pairs) gathered by table row (Python, fixed
// order).
std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>
window_backward_cpu(const at::Tensor& dout, const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                    const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index,
                    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, const WindowGeometry& geo,
                    double scale, bool need_qkv, bool need_pairs, bool need_bias,
                    const c10::optional<at::Tensor>& logit_scale, bool need_logit_scale);

}  // namespace vitkernels
