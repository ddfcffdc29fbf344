// C++ CPU flash attention: blocked online-softmax forward and FlashAttention-2 backward with an additive
// bias (broadcast dims included) and its gradient, dropout, strided q/k/v read in place.
//
// Forward: one task per (batch, head, block of kBlockQ query rows); keys in blocks of kBlockK, the row max
// and sum carried across blocks, nothing Nq x Nk stored. Backward: one task per (batch, head), key blocks
// outer and query blocks inner, so dK/dV of a block and dQ of the whole head are sums in a fixed order
// (bitwise the same at any thread count). GEMMs in float on BLAS; bf16/fp16 tiles are widened to float
// first (float accumulation, as SDPA's math).
#include "../attention.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "cpu_kernels.h"

namespace vitkernels {
namespace {

using cpu::kNegInf;
using cpu::Scratch;

constexpr int64_t kBlockQ = 64;          // query rows per forward task, per backward step
constexpr int64_t kBlockK = 512;         // keys per online-softmax step (forward)
constexpr int64_t kBlockKBackward = 128; // keys per backward step (dK, dV accumulators stay in cache)

struct Shape {
  int64_t B, H, Nq, Nk, D;
};

// A (B, H, Nq, Nk) view of the bias (stride 0 on its broadcast dims); data null without one.
template <typename scalar_t>
struct BiasView {
  const scalar_t* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  BiasView(const c10::optional<at::Tensor>& bias, const Shape& g) {
    if (!bias.has_value()) return;
    at::Tensor b = *bias;
    while (b.dim() < 4) b = b.unsqueeze(0);
    b = b.expand({g.B, g.H, g.Nq, g.Nk});
    data = b.const_data_ptr<scalar_t>();
    s0 = b.stride(0), s1 = b.stride(1), s2 = b.stride(2), s3 = b.stride(3);
  }

  // s[j] += bias[b, h, i, j0 + j] for j < n.
  void add_row(float* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* tmp) const {
    const scalar_t* row = data + b * s0 + h * s1 + i * s2 + j0 * s3;
    if constexpr (std::is_same<scalar_t, float>::value) {
      cpu::add_strided(s, row, s3, n);
    } else {
      cpu::load_strided(row, s3, n, tmp);
      cpu::add_strided(s, tmp, 1, n);
    }
  }
};

// Rows [r0, r0 + rows) of one (b, h) slice as a float block: the tensor itself when it is float and its rows
// do not overlap (the GEMMs read it in place with its row stride), else copied / widened into `buffer` (a
// row stride below D: an expanded or overlapping view).
template <typename scalar_t>
const float* float_rows(const scalar_t* base, int64_t ld, int64_t r0, int64_t rows, int64_t D, Scratch& buffer,
                        int64_t* ld_out) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (ld >= D || rows <= 1) {
      *ld_out = ld;
      return base + r0 * ld;
    }
  }
  {
    float* dst = buffer.get(rows * D);
    cpu::load_rows(base + r0 * ld, ld, rows, D, dst);
    *ld_out = D;
    return dst;
  }
}

template <typename scalar_t>
const scalar_t* slice(const at::Tensor& t, int64_t b, int64_t h) {
  return t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& bias, float scale, const cpu::Dropout& drop, at::Tensor& out,
                    at::Tensor& lse) {
  const Shape g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const BiasView<scalar_t> bv(bias, g);
  const int64_t q_blocks = (g.Nq + kBlockQ - 1) / kBlockQ, D = g.D;
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  float* lse_p = lse.mutable_data_ptr<float>();

  at::parallel_for(0, g.B * g.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    Scratch q_buf, k_buf, v_buf, s_buf, o_buf, stats, row_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / g.H, h = bh % g.H;
      const int64_t i0 = (task % q_blocks) * kBlockQ, rows = std::min(kBlockQ, g.Nq - i0);
      int64_t ldq, ldk, ldv;
      const float* Q = float_rows(slice<scalar_t>(q, b, h), q.stride(2), i0, rows, D, q_buf, &ldq);
      float* O = o_buf.get(rows * D);
      std::fill(O, O + rows * D, 0.0f);
      float* m = stats.get(2 * rows);  // running row max, then running row sum
      float* l = m + rows;
      std::fill(m, m + rows, kNegInf);
      std::fill(l, l + rows, 0.0f);
      const int64_t block = std::min(kBlockK, g.Nk);
      float* S = s_buf.get(rows * block);
      float* tmp = row_buf.get(block);
      for (int64_t j0 = 0; j0 < g.Nk; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, g.Nk - j0);
        const float* K = float_rows(slice<scalar_t>(k, b, h), k.stride(2), j0, cols, D, k_buf, &ldk);
        const float* V = float_rows(slice<scalar_t>(v, b, h), v.stride(2), j0, cols, D, v_buf, &ldv);
        cpu::gemm(false, true, rows, cols, D, scale, Q, ldq, K, ldk, 0.0f, S, cols);  // S = scale Q K^T
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = S + r * cols;
          if (bv.data) bv.add_row(srow, b, h, i0 + r, j0, cols, tmp);
          const float block_max = cpu::row_max(srow, cols);
          const float m_new = block_max > m[r] ? block_max : m[r];
          // rescale what earlier blocks accumulated; nothing to rescale while the row max is -inf
          const float rescale = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
          l[r] = l[r] * rescale + cpu::exp_shift_sum(srow, cols, m_new);
          if (rescale != 1.0f) cpu::scale_row(O + r * D, D, rescale);
          m[r] = m_new;
          if (drop.active) {  // the sum above is of the undropped probabilities
            drop.row_factors(static_cast<uint64_t>(bh * g.Nq + i0 + r), g.Nk, j0, cols, tmp);
            cpu::multiply(srow, tmp, cols);
          }
        }
        cpu::gemm(false, false, rows, D, cols, 1.0f, S, cols, V, ldv, 1.0f, O, D);  // O += P V
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        // a row of all -inf logits: sum 0, output 0, lse -inf (never NaN)
        const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
        lse_p[bh * g.Nq + i] = l[r] == 0.0f ? kNegInf : m[r] + std::log(l[r]);
        cpu::scale_row(O + r * D, D, inv);  // inv 0 writes zeros
        cpu::from_float(O + r * D, out_p + (bh * g.Nq + i) * D, D);
      }
    }
  });
}

// Where a (b, h) task puts d(bias): a (Nq_b, Nk_b) slot, summed over the bias's broadcast query/key dims.
struct BiasGradSlots {
  float* data = nullptr;
  int64_t nq = 0, nk = 0;  // 1 or Nq, 1 or Nk
  float* slot(int64_t bh) const { return data + bh * nq * nk; }
};

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, float scale,
                     const cpu::Dropout& drop, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     const BiasGradSlots& dbias) {
  const Shape g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const BiasView<scalar_t> bv(bias, g);
  const int64_t D = g.D;
  const float* lse_p = lse.const_data_ptr<float>();
  scalar_t* dq_p = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dk_p = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv_p = dv.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    Scratch q_buf, k_buf, v_buf, do_buf, o_row, dq_buf, dkv_buf, s_buf, p_buf, dp_buf, keep_buf, delta_buf, tmp_buf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      int64_t ldq, lddo, ldk, ldv;
      // whole-head Q and dO (float), delta_i = dO_i . O_i, the dQ accumulator
      const float* Q = float_rows(slice<scalar_t>(q, b, h), q.stride(2), 0, g.Nq, D, q_buf, &ldq);
      const float* dO = float_rows(slice<scalar_t>(dout, b, h), dout.stride(2), 0, g.Nq, D, do_buf, &lddo);
      float* delta = delta_buf.get(g.Nq);
      float* orow = o_row.get(D);
      const scalar_t* o_slice = slice<scalar_t>(out, b, h);
      for (int64_t i = 0; i < g.Nq; ++i) {
        cpu::load_rows(o_slice + i * out.stride(2), 0, 1, D, orow);
        delta[i] = cpu::dot(dO + i * lddo, orow, D);
      }
      float* dQ = dq_buf.get(g.Nq * D);
      std::fill(dQ, dQ + g.Nq * D, 0.0f);
      float* slot = dbias.data ? dbias.slot(bh) : nullptr;
      if (slot) std::fill(slot, slot + dbias.nq * dbias.nk, 0.0f);
      const float* lse_row = lse_p + bh * g.Nq;
      const int64_t kblock = std::min(kBlockKBackward, g.Nk), qblock = std::min(kBlockQ, g.Nq);
      float* dKV = dkv_buf.get(2 * kblock * D);
      float* S = s_buf.get(qblock * kblock);
      float* Pd = p_buf.get(qblock * kblock);
      float* dP = dp_buf.get(qblock * kblock);
      float* keep = keep_buf.get(drop.active ? qblock * kblock : 1);
      float* tmp = tmp_buf.get(kblock);
      for (int64_t j0 = 0; j0 < g.Nk; j0 += kBlockKBackward) {
        const int64_t cols = std::min(kBlockKBackward, g.Nk - j0);
        const float* K = float_rows(slice<scalar_t>(k, b, h), k.stride(2), j0, cols, D, k_buf, &ldk);
        const float* V = float_rows(slice<scalar_t>(v, b, h), v.stride(2), j0, cols, D, v_buf, &ldv);
        float* dK = dKV;
        float* dV = dKV + cols * D;
        std::fill(dKV, dKV + 2 * cols * D, 0.0f);
        for (int64_t i0 = 0; i0 < g.Nq; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, g.Nq - i0);
          const float* Qi = Q + i0 * ldq;
          const float* dOi = dO + i0 * lddo;
          // P = exp(scale Q K^T + bias - lse): the forward's probabilities, recomputed
          cpu::gemm(false, true, rows, cols, D, scale, Qi, ldq, K, ldk, 0.0f, S, cols);
          for (int64_t r = 0; r < rows; ++r) {
            float* srow = S + r * cols;
            if (bv.data) bv.add_row(srow, b, h, i0 + r, j0, cols, tmp);
            cpu::exp_shift_sum(srow, cols, lse_row[i0 + r]);
          }
          const float* P_for_v = S;
          if (drop.active) {
            for (int64_t r = 0; r < rows; ++r) {
              drop.row_factors(static_cast<uint64_t>(bh * g.Nq + i0 + r), g.Nk, j0, cols, keep + r * cols);
              std::copy(S + r * cols, S + (r + 1) * cols, Pd + r * cols);
              cpu::multiply(Pd + r * cols, keep + r * cols, cols);
            }
            P_for_v = Pd;
          }
          cpu::gemm(true, false, cols, D, rows, 1.0f, P_for_v, cols, dOi, lddo, 1.0f, dV, D);  // dV += P^T dO
          cpu::gemm(false, true, rows, cols, D, 1.0f, dOi, lddo, V, ldv, 0.0f, dP, cols);      // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            float* dprow = dP + r * cols;
            if (drop.active) cpu::multiply(dprow, keep + r * cols, cols);
            cpu::softmax_grad_row(S + r * cols, dprow, cols, delta[i0 + r]);  // dS = P (dP - delta)
          }
          if (slot) {  // d(bias) += dS, summed over the bias's broadcast query / key dims in a fixed order
            for (int64_t r = 0; r < rows; ++r) {
              const float* dsrow = dP + r * cols;
              if (dbias.nk == 1) {
                float total = 0.0f;
                for (int64_t j = 0; j < cols; ++j) total += dsrow[j];
                slot[dbias.nq == 1 ? 0 : i0 + r] += total;
              } else {
                float* dst = slot + (dbias.nq == 1 ? 0 : (i0 + r) * g.Nk) + j0;
                cpu::add_strided(dst, dsrow, 1, cols);
              }
            }
          }
          cpu::gemm(false, false, rows, D, cols, scale, dP, cols, K, ldk, 1.0f, dQ + i0 * D, D);  // dQ += dS K
          cpu::gemm(true, false, cols, D, rows, scale, dP, cols, Qi, ldq, 1.0f, dK, D);          // dK += dS^T Q
        }
        const int64_t row0 = bh * g.Nk + j0;
        cpu::from_float(dK, dk_p + row0 * D, cols * D);
        cpu::from_float(dV, dv_p + row0 * D, cols * D);
      }
      cpu::from_float(dQ, dq_p + bh * g.Nq * D, g.Nq * D);
    }
  });
}

cpu::Dropout make_dropout(double dropout_p, int64_t seed, int64_t offset) {
  cpu::Dropout drop;
  drop.active = dropout_p > 0.0;
  drop.p = static_cast<float>(dropout_p);
  drop.keep_scale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  drop.seed = static_cast<uint64_t>(seed);
  drop.offset = static_cast<uint64_t>(offset);
  return drop;
}

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4, "attention_cpu: q, k, v must be 4-D CPU tensors");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attention_cpu: q, k, v must share a dtype");
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "attention_cpu: q, k, v need a unit last stride");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "attention_cpu: k and v must be (B, H, Nk, D) with q's B, H and D; got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == q.scalar_type() && bias->dim() <= 4 && bias->device().is_cpu(),
                "attention_cpu: bias must be a CPU tensor of q's dtype with at most 4 dims");
    at::Tensor b4 = *bias;
    while (b4.dim() < 4) b4 = b4.unsqueeze(0);
    const int64_t target[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(b4.size(d) == 1 || b4.size(d) == target[d], "attention_cpu: bias ", bias->sizes(),
                  " does not broadcast to (B, H, Nq, Nk)");
  }
}

}  // namespace

at::Tensor attention_dropout_mask_cpu(std::vector<int64_t> shape, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(shape.size() == 4, "attention_dropout_mask_cpu: shape must be (B, H, Nq, Nk)");
  auto drop = make_dropout(dropout_p, seed, offset);
  drop.keep_scale = 1.0f;  // the draw alone (at p = 1 every factor is 0 anyway)
  const int64_t rows = shape[0] * shape[1] * shape[2], nk = shape[3];
  auto mask = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.mutable_data_ptr<bool>();
  std::vector<float> keep(nk);
  for (int64_t row = 0; row < rows; ++row) {
    if (drop.active) drop.row_factors(static_cast<uint64_t>(row), nk, 0, nk, keep.data());
    for (int64_t j = 0; j < nk; ++j) m[row * nk + j] = !drop.active || keep[j] != 0.0f;
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const c10::optional<at::Tensor>& bias, double scale,
                                                         double dropout_p, int64_t seed, int64_t offset) {
  check_operands(q, k, v, bias);
  auto out = at::empty(q.sizes(), q.options());  // B, H, Nq, D
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto drop = make_dropout(dropout_p, seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "attention_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      forward_kernel<scalar_t>(q, k, v, bias, static_cast<float>(scale), drop, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool bias_requires_grad) {
  check_operands(q, k, v, bias);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  (dout.size(3) <= 1 || dout.stride(3) == 1),
              "attention_cpu: dout must match q with a unit last stride");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "attention_cpu: lse must be the forward's contiguous (B, H, Nq) float32");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && (out.size(3) <= 1 || out.stride(3) == 1),
              "attention_cpu: out must be the forward's output (q's shape and dtype, unit last stride)");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const auto drop = make_dropout(dropout_p, seed, offset);

  // d(bias): per (b, h) slots of the bias's (Nq_b, Nk_b), then summed over its broadcast batch / head dims
  c10::optional<at::Tensor> dbias;
  at::Tensor slots;
  BiasGradSlots slot_view;
  int64_t Bb = 1, Hb = 1;
  if (bias.has_value() && bias_requires_grad) {
    at::Tensor b4 = *bias;
    while (b4.dim() < 4) b4 = b4.unsqueeze(0);
    Bb = b4.size(0), Hb = b4.size(1);
    slot_view.nq = b4.size(2), slot_view.nk = b4.size(3);
    slots = at::empty({B, H, slot_view.nq, slot_view.nk}, q.options().dtype(at::kFloat));
    slot_view.data = slots.mutable_data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "attention_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      backward_kernel<scalar_t>(dout, q, k, v, bias, out, lse, static_cast<float>(scale), drop, dq, dk, dv,
                                slot_view);
  });
  if (slot_view.data) {
    const int64_t E = slot_view.nq * slot_view.nk;
    at::Tensor total = at::empty({Bb, Hb, slot_view.nq, slot_view.nk}, slots.options());
    const float* s = slots.const_data_ptr<float>();
    float* t = total.mutable_data_ptr<float>();
    const bool over_b = Bb == 1 && B > 1, over_h = Hb == 1 && H > 1;
    if (over_b && over_h) {
      cpu::sum_slots(s, B * H, E, E, t);
    } else if (over_b) {
      cpu::sum_slots(s, B, H * E, H * E, t);
    } else if (over_h) {
      for (int64_t b = 0; b < B; ++b) cpu::sum_slots(s + b * H * E, H, E, E, t + b * E);
    } else {
      total = slots.view({Bb, Hb, slot_view.nq, slot_view.nk});
    }
    dbias = total.to(q.scalar_type()).view(bias->sizes());
  }
  return {dq, dk, dv, dbias};
}

}  // namespace vitkernels
