// C++ CPU patch gather/scatter (see patch_embed.h for the layouts).
#include "../patch_embed.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace vitkernels {
namespace {

struct PatchGeometry {
  int64_t B, C, T, H, W;       // x sizes
  int64_t pt, ph, pw;          // patch
  int64_t nt, nh, nw, np, k;   // grid, patches per sample, features per patch

  PatchGeometry(at::IntArrayRef s, std::array<int64_t, 3> p)
      : B(s[0]), C(s[1]), T(s[2]), H(s[3]), W(s[4]), pt(p[0]), ph(p[1]), pw(p[2]),
        nt(T / pt), nh(H / ph), nw(W / pw), np(nt * nh * nw), k(C * pt * ph * pw) {}
};

// Copies one patch row: row (b, n) of `patches` <-> the pt*ph*pw block of every channel in x.
// GATHER: x -> patches; otherwise patches -> x. One patch row per task keeps writes disjoint.
template <typename scalar_t, bool GATHER>
void patch_rows(scalar_t* x, const int64_t* xs, scalar_t* patches, const PatchGeometry& g) {
  at::parallel_for(0, g.B * g.np, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.np, n = row % g.np;
      const int64_t it = n / (g.nh * g.nw), ih = (n / g.nw) % g.nh, iw = n % g.nw;
      scalar_t* prow = patches + row * g.k;
      scalar_t* xb = x + b * xs[0] + it * g.pt * xs[2] + ih * g.ph * xs[3] + iw * g.pw * xs[4];
      int64_t col = 0;
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t dt = 0; dt < g.pt; ++dt)
          for (int64_t dh = 0; dh < g.ph; ++dh) {
            scalar_t* src = xb + c * xs[1] + dt * xs[2] + dh * xs[3];
            for (int64_t dw = 0; dw < g.pw; ++dw, ++col) {
              if (GATHER) prow[col] = src[dw * xs[4]];
              else src[dw * xs[4]] = prow[col];
            }
          }
    }
  });
}

}  // namespace

at::Tensor patch_gather_cpu(const at::Tensor& x, std::array<int64_t, 3> patch) {
  PatchGeometry g(x.sizes(), patch);
  auto patches = at::empty({g.B, g.np, g.k}, x.options());
  const std::array<int64_t, 5> xs = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_gather_cpu", [&] {
    // read-only use of x: GATHER never writes through this pointer
    patch_rows<scalar_t, true>(const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), xs.data(),
                               patches.mutable_data_ptr<scalar_t>(), g);
  });
  return patches;
}

at::Tensor patch_scatter_cpu(const at::Tensor& patches_in, at::IntArrayRef x_sizes, std::array<int64_t, 3> patch) {
  PatchGeometry g(x_sizes, patch);
  // Patches come from a matmul and are contiguous; a strided gradient is made dense once here.
  auto patches = patches_in.contiguous();
  auto x = at::empty(x_sizes, patches.options());
  const std::array<int64_t, 5> xs = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "patch_scatter_cpu", [&] {
    patch_rows<scalar_t, false>(x.mutable_data_ptr<scalar_t>(), xs.data(),
                                const_cast<scalar_t*>(patches.const_data_ptr<scalar_t>()), g);
  });
  return x;
}

}  // namespace vitkernels
