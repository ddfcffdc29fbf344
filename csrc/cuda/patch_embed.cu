// CUDA patch gather/scatter (see patch_embed.h for the layouts): one thread per patch element,
// int64 offsets since B*Np*K can pass 2^31 for video batches.
#include "../patch_embed.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace vitkernels {
namespace {

struct Geometry {
  int64_t C, pt, ph, pw, nh, nw, np, k;
  int64_t xs[5];  // x strides
};

template <typename scalar_t, bool GATHER>
__global__ void patch_copy_kernel(scalar_t* __restrict__ x, scalar_t* __restrict__ patches, int64_t total,
                                  Geometry g) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    // i = (row = b * np + n) * k + col; col = ((c * pt + dt) * ph + dh) * pw + dw
    const int64_t row = i / g.k, col = i % g.k;
    const int64_t b = row / g.np, n = row % g.np;
    const int64_t it = n / (g.nh * g.nw), ih = (n / g.nw) % g.nh, iw = n % g.nw;
    const int64_t dw = col % g.pw, dh = (col / g.pw) % g.ph, dt = (col / (g.pw * g.ph)) % g.pt;
    const int64_t c = col / (g.pw * g.ph * g.pt);
    const int64_t off = b * g.xs[0] + c * g.xs[1] + (it * g.pt + dt) * g.xs[2] + (ih * g.ph + dh) * g.xs[3] +
                        (iw * g.pw + dw) * g.xs[4];
    if (GATHER) patches[i] = x[off];
    else x[off] = patches[i];
  }
}

Geometry make_geometry(at::IntArrayRef s, std::array<int64_t, 3> p, at::IntArrayRef strides) {
  Geometry g;
  g.C = s[1];
  g.pt = p[0]; g.ph = p[1]; g.pw = p[2];
  g.nh = s[3] / p[1];
  g.nw = s[4] / p[2];
  g.np = (s[2] / p[0]) * g.nh * g.nw;
  g.k = s[1] * p[0] * p[1] * p[2];
  for (int d = 0; d < 5; ++d) g.xs[d] = strides[d];
  return g;
}

template <bool GATHER>
void launch(const at::Tensor& x, const at::Tensor& patches, const Geometry& g) {
  const int64_t total = patches.numel();
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_copy_cuda", [&] {
    patch_copy_kernel<scalar_t, GATHER><<<blocks, threads, 0, stream>>>(
        const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), const_cast<scalar_t*>(patches.const_data_ptr<scalar_t>()),
        total, g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor patch_gather_cuda(const at::Tensor& x, std::array<int64_t, 3> patch) {
  c10::cuda::CUDAGuard guard(x.device());
  auto g = make_geometry(x.sizes(), patch, x.strides());
  auto patches = at::empty({x.size(0), g.np, g.k}, x.options());
  launch<true>(x, patches, g);
  return patches;
}

at::Tensor patch_scatter_cuda(const at::Tensor& patches_in, at::IntArrayRef x_sizes, std::array<int64_t, 3> patch) {
  c10::cuda::CUDAGuard guard(patches_in.device());
  auto patches = patches_in.contiguous();
  auto x = at::empty(x_sizes, patches.options());
  auto g = make_geometry(x.sizes(), patch, x.strides());
  launch<false>(x, patches, g);
  return x;
}

}  // namespace vitkernels
