// The one binding file of vitkernels._C: device dispatch of each kernel and the build flags.
#include <torch/extension.h>

#include "patch_embed.h"

namespace vitkernels {
namespace {

std::array<int64_t, 3> as_patch(const std::vector<int64_t>& patch) {
  TORCH_CHECK(patch.size() == 3, "patch must be (pt, ph, pw), got ", patch.size(), " values");
  for (auto p : patch) TORCH_CHECK(p >= 1, "patch sizes must be >= 1, got ", p);
  return {patch[0], patch[1], patch[2]};
}

at::Tensor patch_gather(const at::Tensor& x, const std::vector<int64_t>& patch) {
  TORCH_CHECK(x.dim() == 5, "patch_gather: x must be (B, C, T, H, W), got ", x.dim(), " dims");
  auto p = as_patch(patch);
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(x.size(2 + d) % p[d] == 0, "patch_gather: x dim ", 2 + d, " (", x.size(2 + d),
                ") is not a multiple of the patch size ", p[d]);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return patch_gather_cuda(x, p);
#else
    TORCH_CHECK(false, "patch_gather: vitkernels._C was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(x.device().is_cpu(), "patch_gather: unsupported device ", x.device());
  return patch_gather_cpu(x, p);
}

at::Tensor patch_scatter(const at::Tensor& patches, const std::vector<int64_t>& x_sizes,
                         const std::vector<int64_t>& patch) {
  TORCH_CHECK(patches.dim() == 3, "patch_scatter: patches must be (B, Np, K), got ", patches.dim(), " dims");
  TORCH_CHECK(x_sizes.size() == 5, "patch_scatter: x_sizes must be (B, C, T, H, W)");
  auto p = as_patch(patch);
  int64_t np = 1;
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(x_sizes[2 + d] % p[d] == 0, "patch_scatter: x dim ", 2 + d, " is not a multiple of the patch");
    np *= x_sizes[2 + d] / p[d];
  }
  TORCH_CHECK(patches.size(0) == x_sizes[0] && patches.size(1) == np &&
                  patches.size(2) == x_sizes[1] * p[0] * p[1] * p[2],
              "patch_scatter: patches shape ", patches.sizes(), " does not match x_sizes and patch");
  if (patches.is_cuda()) {
#ifdef WITH_CUDA
    return patch_scatter_cuda(patches, x_sizes, p);
#else
    TORCH_CHECK(false, "patch_scatter: vitkernels._C was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(patches.device().is_cpu(), "patch_scatter: unsupported device ", patches.device());
  return patch_scatter_cpu(patches, x_sizes, p);
}

}  // namespace
}  // namespace vitkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkernels compiled kernels (C++ CPU, and CUDA when built with CUDA_HOME set)";
  m.def("patch_gather", &vitkernels::patch_gather, "x (B, C, T, H, W) any strides -> patches (B, Np, K)",
        py::arg("x"), py::arg("patch"));
  m.def("patch_scatter", &vitkernels::patch_scatter, "patches (B, Np, K) -> contiguous (B, C, T, H, W)",
        py::arg("patches"), py::arg("x_sizes"), py::arg("patch"));
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
