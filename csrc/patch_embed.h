// Patch gather/scatter: the im2col of a non-overlapping patch embedding, read by strides.
//
// x is always seen as 5-D (B, C, T, H, W) (images: T = pt = 1, a view made in Python); patches are
// (B, Np, K) with Np = (T/pt)(H/ph)(W/pw) in row-major (t, h, w) order and K = C*pt*ph*pw flattened
// (c, dt, dh, dw) as Conv3d's weight is.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace vitkernels {

at::Tensor patch_gather_cpu(const at::Tensor& x, std::array<int64_t, 3> patch);
at::Tensor patch_scatter_cpu(const at::Tensor& patches, at::IntArrayRef x_sizes, std::array<int64_t, 3> patch);

#ifdef WITH_CUDA
at::Tensor patch_gather_cuda(const at::Tensor& x, std::array<int64_t, 3> patch);
at::Tensor patch_scatter_cuda(const at::Tensor& patches, at::IntArrayRef x_sizes, std::array<int64_t, 3> patch);
#endif

}  // namespace vitkernels
