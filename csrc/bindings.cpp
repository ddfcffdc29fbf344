// The one binding file of vitkernels._C: device dispatch of each kernel and the build flags.
#include <torch/extension.h>

#include "attention.h"
#include "patch_embed.h"
#include "window_attention.h"

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

WindowGeometry window_geometry(const std::vector<int64_t>& spatial, const std::vector<int64_t>& window,
                               const std::vector<int64_t>& shift, const std::vector<int64_t>& padded,
                               bool roll_after_pad) {
  for (const auto* v : {&spatial, &window, &shift, &padded})
    TORCH_CHECK(v->size() == 3, "window geometry: spatial, window, shift and padded take 3 values (t, h, w)");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(window[d] >= 1 && padded[d] % window[d] == 0 && padded[d] >= spatial[d] && shift[d] >= 0 &&
                    shift[d] < window[d] && spatial[d] >= 1,
                "window geometry: inconsistent window / shift / padded size in dim ", d);
  WindowGeometry g;
  g.spatial = spatial, g.window = window, g.shift = shift, g.padded = padded, g.roll_after_pad = roll_after_pad;
  return g;
}

}  // namespace
}  // namespace vitkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitkernels compiled kernels (C++ CPU, and CUDA when built with CUDA_HOME set)";
  m.def("patch_gather", &vitkernels::patch_gather, "x (B, C, T, H, W) any strides -> patches (B, Np, K)",
        py::arg("x"), py::arg("patch"));
  m.def("patch_scatter", &vitkernels::patch_scatter, "patches (B, Np, K) -> contiguous (B, C, T, H, W)",
        py::arg("patches"), py::arg("x_sizes"), py::arg("patch"));
  m.def("attention_forward_cpu", &vitkernels::attention_forward_cpu,
        "flash attention forward on CPU -> (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"), py::arg("rel_h") = py::none(),
        py::arg("rel_w") = py::none(), py::arg("rel_t") = py::none(), py::arg("rel_prefix") = 0,
        py::arg("cos") = py::none(), py::arg("sin") = py::none(), py::arg("rope_prefix") = 0,
        py::arg("rotate_half") = false);
  m.def("attention_backward_cpu", &vitkernels::attention_backward_cpu,
        "flash attention backward on CPU -> (dq, dk, dv, dbias, drel, drope)", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("offset"), py::arg("bias_requires_grad"), py::arg("rel_h") = py::none(),
        py::arg("rel_w") = py::none(), py::arg("rel_t") = py::none(), py::arg("rel_prefix") = 0,
        py::arg("rel_requires_grad") = false, py::arg("cos") = py::none(), py::arg("sin") = py::none(),
        py::arg("rope_prefix") = 0, py::arg("rotate_half") = false, py::arg("rope_requires_grad") = false);
  m.def("attention_dropout_mask_cpu", &vitkernels::attention_dropout_mask_cpu,
        "the keep-mask of the CPU kernels' dropout on a (B, H, Nq, Nk) grid", py::arg("shape"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("offset"));
  m.def(
      "window_forward_cpu",
      [](const at::Tensor& qkv, const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& qkv_bias,
         const c10::optional<at::Tensor>& index, int64_t num_heads, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& window, const std::vector<int64_t>& shift, const std::vector<int64_t>& padded,
         bool roll_after_pad, double scale, const c10::optional<at::Tensor>& logit_scale) {
        return vitkernels::window_forward_cpu(
            qkv, table, qkv_bias, index, num_heads,
            vitkernels::window_geometry(spatial, window, shift, padded, roll_after_pad), scale, logit_scale);
      },
      "shifted-window attention forward on CPU -> (out, lse)", py::arg("qkv"), py::arg("table"), py::arg("qkv_bias"),
      py::arg("index"), py::arg("num_heads"), py::arg("spatial"), py::arg("window"), py::arg("shift"),
      py::arg("padded"), py::arg("roll_after_pad"), py::arg("scale"), py::arg("logit_scale") = py::none());
  m.def(
      "window_backward_cpu",
      [](const at::Tensor& dout, const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
         const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index, const at::Tensor& out,
         const at::Tensor& lse, int64_t num_heads, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& window, const std::vector<int64_t>& shift, const std::vector<int64_t>& padded,
         bool roll_after_pad, double scale, bool need_qkv, bool need_pairs, bool need_bias,
         const c10::optional<at::Tensor>& logit_scale, bool need_logit_scale) {
        return vitkernels::window_backward_cpu(
            dout, qkv, table, qkv_bias, index, out, lse, num_heads,
            vitkernels::window_geometry(spatial, window, shift, padded, roll_after_pad), scale, need_qkv, need_pairs,
            need_bias, logit_scale, need_logit_scale);
      },
      "shifted-window attention backward on CPU -> (dqkv, d(pairs), d(qkv_bias), d(logit_scale))", py::arg("dout"),
      py::arg("qkv"), py::arg("table"), py::arg("qkv_bias"), py::arg("index"), py::arg("out"), py::arg("lse"),
      py::arg("num_heads"), py::arg("spatial"), py::arg("window"), py::arg("shift"), py::arg("padded"),
      py::arg("roll_after_pad"), py::arg("scale"), py::arg("need_qkv"), py::arg("need_pairs"), py::arg("need_bias"),
      py::arg("logit_scale") = py::none(), py::arg("need_logit_scale") = false);
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
