// C++ CPU shifted-window attention: roll, pad, partition, relative-position bias, shift mask and reverse
// done by index arithmetic on the unpadded map, never materialised.
//
// One task per (batch, window, head): the head's q, k, v columns of the window's tokens are gathered into
// one float block (padded tokens take qkv_bias), attention runs on BLAS tiles of it (N <= a few hundred:
// all keys in one step), and the output goes straight back to the map positions (every position is in
// exactly one window and every head owns its columns, so tasks never write the same element).
// Backward: the same tasks, head-major; each chunk is one head's run of windows and sums that head's
// d(pairs) (N x N) and its columns of d(qkv_bias); the chunks are fixed by the shape alone and summed in
// order afterwards: bitwise the same at any thread count.
//
// Swin V2's cosine attention (a logit scale given): each gathered q and k row is L2-normalised (F.normalize, eps
// 1e-12; norm and division in double, rounded to float once) and q times the head's exp(min(logit_scale, log 100)).
// The backward recomputes P as the forward did and takes delta = rowsum(P dP) (logits reach ~100: the float lse and
// O would cost ~4e-6 of every probability), takes dQ / dK through the normalisation per row, and sums
// d(logit_scale) per chunk (double), the chunks of a head in order.
#include "../window_attention.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "cpu_kernels.h"

namespace vitkernels {
namespace {

using cpu::kNegInf;
using cpu::Scratch;

// Where the tokens of each window come from.
struct Layout {
  int64_t B, C3, C, heads, hd, N;
  int64_t counts[3], windows;  // windows per dim and per sample
  int64_t window[3], shift[3], spatial[3], padded[3];
  int64_t xs[5];  // qkv strides (b, t, h, w, c)
  bool roll_after_pad;

  Layout(const at::Tensor& qkv, int64_t num_heads, const WindowGeometry& g) {
    B = qkv.size(0);
    C3 = qkv.size(4);
    C = C3 / 3;
    heads = num_heads;
    hd = C / heads;
    N = 1;
    windows = 1;
    for (int d = 0; d < 3; ++d) {
      window[d] = g.window[d], shift[d] = g.shift[d], spatial[d] = g.spatial[d], padded[d] = g.padded[d];
      counts[d] = padded[d] / window[d];
      N *= window[d];
      windows *= counts[d];
    }
    for (int d = 0; d < 5; ++d) xs[d] = qkv.stride(d);
    roll_after_pad = g.roll_after_pad;
  }

  // For window `w` of a sample: the map offset (t, h, w strides of `strides`) of each token, -1 when the token
  // is padding; and each token's shift region (pairs in different regions are masked). Returns whether the
  // window holds more than one region.
  bool tokens(int64_t w, const int64_t* strides, int64_t* src, int32_t* region) const {
    const int64_t win[3] = {w / (counts[1] * counts[2]), (w / counts[2]) % counts[1], w % counts[2]};
    int64_t n = 0;
    bool mixed = false;
    for (int64_t a = 0; a < window[0]; ++a)
      for (int64_t b = 0; b < window[1]; ++b)
        for (int64_t c = 0; c < window[2]; ++c, ++n) {
          const int64_t off[3] = {a, b, c};
          int64_t offset = 0;
          bool pad = false;
          int32_t id = 0;
          for (int d = 0; d < 3; ++d) {
            const int64_t p = win[d] * window[d] + off[d];  // position in the shifted, padded map
            int64_t coord;
            if (roll_after_pad) {  // Video Swin: pad, then roll the padded map
              coord = (p + shift[d]) % padded[d];
              pad = pad || coord >= spatial[d];
            } else {  // timm: roll the map, then pad its end
              pad = pad || p >= spatial[d];
              coord = (p + shift[d]) % spatial[d];
            }
            offset += coord * strides[d];
            // timm's / Video Swin's mask regions over the padded map: [0, L-w), [L-w, L-s), [L-s, L)
            const int32_t r = shift[d] == 0 ? 2 : (p >= padded[d] - window[d]) + (p >= padded[d] - shift[d]);
            id = id * 3 + r;
          }
          src[n] = pad ? -1 : offset;
          region[n] = id;
          mixed = mixed || id != region[0];
        }
    return mixed;
  }
};

// The (heads, N, N) bias of every window: table rows gathered by `index` (float; zeros without a table).
template <typename scalar_t>
std::vector<float> gather_bias(const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& index,
                               const Layout& L) {
  std::vector<float> bias;
  if (!table.has_value()) return bias;
  bias.resize(L.heads * L.N * L.N);
  const scalar_t* t = table->const_data_ptr<scalar_t>();
  const int64_t ts0 = table->stride(0), ts1 = table->stride(1);
  auto idx = index->contiguous();
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  for (int64_t h = 0; h < L.heads; ++h)
    for (int64_t p = 0; p < L.N * L.N; ++p) bias[h * L.N * L.N + p] = static_cast<float>(t[ix[p] * ts0 + h * ts1]);
  return bias;
}

// qkv_bias as float (3C), zeros without one: the value of every padded token.
template <typename scalar_t>
std::vector<float> pad_value(const c10::optional<at::Tensor>& qkv_bias, int64_t C3) {
  std::vector<float> value(C3, 0.0f);
  if (qkv_bias.has_value()) cpu::load_strided(qkv_bias->const_data_ptr<scalar_t>(), qkv_bias->stride(0), C3, value.data());
  return value;
}

// Gathers the q, k, v columns of head h for the tokens of one window into a dense (N, 3 hd) float block
// [q | k | v]; padded tokens take `pad` (the qkv_bias, 3C floats).
template <typename scalar_t>
void gather_head(const scalar_t* base, const int64_t* src, const Layout& L, int64_t h, int64_t cs, const float* pad,
                 float* dst) {
  const int64_t hd = L.hd;
  for (int64_t i = 0; i < L.N; ++i) {
    float* row = dst + i * 3 * hd;
    for (int64_t part = 0; part < 3; ++part) {
      const int64_t col = part * L.C + h * hd;
      if (src[i] < 0) std::copy(pad + col, pad + col + hd, row + part * hd);
      else cpu::load_strided(base + src[i] + col * cs, cs, hd, row + part * hd);
    }
  }
}

// Columns [col, col + width) of the rows of one window (padded rows: zeros) into a dense (N, width) block.
template <typename scalar_t>
void gather_cols(const scalar_t* base, const int64_t* src, int64_t n, int64_t col, int64_t width, int64_t cs,
                 float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = dst + i * width;
    if (src[i] < 0) std::fill(row, row + width, 0.0f);
    else cpu::load_strided(base + src[i] + col * cs, cs, width, row);
  }
}

// s = scale q k^T + bias (+ -inf between shift regions) for one head of one window (N x N); `block` is the
// head's (N, 3 hd) [q | k | v].
void head_scores(const float* block, int64_t hd, int64_t h, int64_t N, float scale, const float* bias,
                 const int32_t* region, bool mixed, float* S) {
  cpu::gemm(false, true, N, N, hd, scale, block, 3 * hd, block + hd, 3 * hd, 0.0f, S, N);
  if (bias) cpu::add_strided(S, bias + h * N * N, 1, N * N);
  if (mixed)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j)
        if (region[i] != region[j]) S[i * N + j] = kNegInf;
}

// Cosine attention: the q and k rows of a gathered (N, 3 hd) block normalised in place, q then times the head's
// factor (the reference's order: normalize(q) * factor, rounded, then the product with normalize(k)). For the
// backward: the norms (before) into qnorm / knorm and the unscaled normalize(q) rows into q_hat (N, hd), when given.
void normalize_qk(float* block, int64_t N, int64_t hd, float factor, float* qnorm, float* knorm, float* q_hat) {
  for (int64_t i = 0; i < N; ++i) {
    float* row = block + i * 3 * hd;
    const float nq = cpu::normalize_row(row, hd), nk = cpu::normalize_row(row + hd, hd);
    if (qnorm) {
      qnorm[i] = nq, knorm[i] = nk;
      std::copy(row, row + hd, q_hat + i * hd);
    }
    cpu::scale_row(row, hd, factor);
  }
}

// Per head: exp(min(logit_scale, log 100)) and whether the clamp lets the gradient through (logit_scale <= log 100,
// as torch.clamp's gradient); empty without a logit scale.
struct LogitScale {
  std::vector<float> factor;
  std::vector<bool> open;
  bool active() const { return !factor.empty(); }

  LogitScale(const c10::optional<at::Tensor>& logit_scale, int64_t heads) {
    if (!logit_scale.has_value()) return;
    const at::Tensor& t = *logit_scale;
    const int64_t stride = t.dim() ? t.stride(0) : 0;
    const float max = static_cast<float>(std::log(100.0));  // the reference's clamp bound, in float
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "window_logit_scale", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      for (int64_t h = 0; h < heads; ++h) {
        const float value = static_cast<float>(p[h * stride]);
        factor.push_back(std::exp(value > max ? max : value));  // torch.clamp: NaN stays NaN
        // torch.clamp's gradient compares with the double bound: float32(log 100) is past it (gradient 0)
        open.push_back(static_cast<double>(value) <= std::log(100.0));
      }
    });
  }
};

// Tasks are (batch, window, head): enough of them even for one window (Swin's last stage at batch 1).
template <typename scalar_t>
void forward_kernel(const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                    const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index,
                    const Layout& L, float scale, const LogitScale& ls, at::Tensor& out, at::Tensor& lse) {
  const std::vector<float> bias = gather_bias<scalar_t>(table, index, L);
  const std::vector<float> pad = pad_value<scalar_t>(qkv_bias, L.C3);
  const scalar_t* x = qkv.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  float* lse_p = lse.mutable_data_ptr<float>();
  const int64_t os[3] = {out.stride(1), out.stride(2), out.stride(3)};
  const int64_t N = L.N, hd = L.hd;

  at::parallel_for(0, L.B * L.windows * L.heads, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    std::vector<int64_t> src(N), dst(N);
    std::vector<int32_t> region(N);
    Scratch block_buf, s_buf, o_buf;
    float* block = block_buf.get(N * 3 * hd);
    float* S = s_buf.get(N * N);
    float* O = o_buf.get(N * hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bw = task / L.heads, h = task % L.heads, b = bw / L.windows, w = bw % L.windows;
      const bool mixed = L.tokens(w, L.xs + 1, src.data(), region.data());
      L.tokens(w, os, dst.data(), region.data());
      gather_head(x + b * L.xs[0], src.data(), L, h, L.xs[4], pad.data(), block);
      if (ls.active()) normalize_qk(block, N, hd, ls.factor[h], nullptr, nullptr, nullptr);
      head_scores(block, hd, h, N, scale, bias.empty() ? nullptr : bias.data(), region.data(), mixed, S);
      float* lse_row = lse_p + task * N;  // (B * windows, heads, N)
      for (int64_t i = 0; i < N; ++i) {
        float* srow = S + i * N;
        const float m = cpu::row_max(srow, N);
        const float l = cpu::exp_shift_sum(srow, N, m);
        cpu::scale_row(srow, N, l == 0.0f ? 0.0f : 1.0f / l);  // P; a row of all -inf gives zeros
        lse_row[i] = l == 0.0f ? kNegInf : m + std::log(l);
      }
      cpu::gemm(false, false, N, hd, N, 1.0f, S, N, block + 2 * hd, 3 * hd, 0.0f, O, hd);  // O = P V
      scalar_t* ob = o + b * out.stride(0) + h * hd * out.stride(4);
      for (int64_t i = 0; i < N; ++i)
        if (src[i] >= 0) cpu::from_float(O + i * hd, ob + dst[i], hd);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                     const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index,
                     const at::Tensor& out, const at::Tensor& lse, const Layout& L, float scale, const LogitScale& ls,
                     scalar_t* dqkv, float* dpairs_chunks, float* dbias_chunks, double* dscale_chunks,
                     int64_t chunks_per_head) {
  const std::vector<float> bias = gather_bias<scalar_t>(table, index, L);
  const std::vector<float> pad = pad_value<scalar_t>(qkv_bias, L.C3);
  const scalar_t* x = qkv.const_data_ptr<scalar_t>();
  const scalar_t* go = dout.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  const float* lse_p = lse.const_data_ptr<float>();
  const int64_t ds[3] = {dout.stride(1), dout.stride(2), dout.stride(3)};
  const int64_t os[3] = {out.stride(1), out.stride(2), out.stride(3)};
  const int64_t gs[3] = {L.spatial[1] * L.spatial[2] * L.C3, L.spatial[2] * L.C3, L.C3};  // dqkv, contiguous
  const int64_t N = L.N, C = L.C, hd = L.hd, per_head = L.B * L.windows;
  const int64_t per_chunk = (per_head + chunks_per_head - 1) / chunks_per_head;

  at::parallel_for(0, L.heads * chunks_per_head, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    std::vector<int64_t> src(N), dsrc(N), osrc(N), gsrc(N);
    std::vector<int32_t> region(N);
    Scratch block_buf, do_buf, o_buf, g_buf, s_buf, dp_buf, delta_buf, norm_buf, q_hat_buf;
    float* block = block_buf.get(N * 3 * hd);
    float* dO = do_buf.get(N * hd);
    float* O = o_buf.get(N * hd);
    float* G = g_buf.get(N * 3 * hd);  // d[q | k | v] of the head
    float* S = s_buf.get(N * N);
    float* dP = dp_buf.get(N * N);
    float* delta = delta_buf.get(N);
    float* qnorm = norm_buf.get(2 * N);  // cosine: the q and k rows' norms
    float* knorm = qnorm + N;
    float* q_hat = q_hat_buf.get(ls.active() ? N * hd : 0);  // cosine: normalize(q) before the factor
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t h = chunk / chunks_per_head, first = (chunk % chunks_per_head) * per_chunk;
      float* dpairs = dpairs_chunks ? dpairs_chunks + chunk * N * N : nullptr;  // this head's N x N
      float* dbias = dbias_chunks ? dbias_chunks + chunk * L.C3 : nullptr;
      if (dpairs) std::fill(dpairs, dpairs + N * N, 0.0f);
      if (dbias) std::fill(dbias, dbias + L.C3, 0.0f);
      double dscale = 0.0;  // this chunk's d(factor) of head h: sum over its windows of dQ_scaled . q_hat
      for (int64_t bw = first; bw < std::min(per_head, first + per_chunk); ++bw) {
        const int64_t task = bw * L.heads + h, b = bw / L.windows, w = bw % L.windows;  // lse's (bw, h) row
        const bool mixed = L.tokens(w, L.xs + 1, src.data(), region.data());
        L.tokens(w, ds, dsrc.data(), region.data());
        L.tokens(w, os, osrc.data(), region.data());
        L.tokens(w, gs, gsrc.data(), region.data());
        gather_head(x + b * L.xs[0], src.data(), L, h, L.xs[4], pad.data(), block);
        gather_cols(go + b * dout.stride(0), dsrc.data(), N, h * hd, hd, dout.stride(4), dO);  // padded: dO 0
        if (!ls.active()) {  // (cosine: delta from P and dP below)
          gather_cols(o + b * out.stride(0), osrc.data(), N, h * hd, hd, out.stride(4), O);
          for (int64_t i = 0; i < N; ++i) delta[i] = cpu::dot(dO + i * hd, O + i * hd, hd);
        }
        if (ls.active()) normalize_qk(block, N, hd, ls.factor[h], qnorm, knorm, q_hat);
        head_scores(block, hd, h, N, scale, bias.empty() ? nullptr : bias.data(), region.data(), mixed, S);
        const float* lse_row = lse_p + task * N;
        if (ls.active()) {
          // P recomputed as the forward did (bitwise its P): at logits ~100 the float lse is only good to ~4e-6,
          // which exp(S - lse) would carry into every probability of the row
          for (int64_t i = 0; i < N; ++i) {
            float* srow = S + i * N;
            const float l = cpu::exp_shift_sum(srow, N, cpu::row_max(srow, N));
            cpu::scale_row(srow, N, l == 0.0f ? 0.0f : 1.0f / l);
          }
        } else {
          for (int64_t i = 0; i < N; ++i) cpu::exp_shift_sum(S + i * N, N, lse_row[i]);  // P, recomputed
        }
        const int64_t ld = 3 * hd;
        cpu::gemm(true, false, N, hd, N, 1.0f, S, N, dO, hd, 0.0f, G + 2 * hd, ld);         // dV = P^T dO
        cpu::gemm(false, true, N, N, hd, 1.0f, dO, hd, block + 2 * hd, ld, 0.0f, dP, N);    // dP = dO V^T
        if (ls.active())  // delta = rowsum(P dP), consistent with P (dO . O would carry O's rounding)
          for (int64_t i = 0; i < N; ++i) delta[i] = cpu::dot(S + i * N, dP + i * N, N);
        for (int64_t i = 0; i < N; ++i) cpu::softmax_grad_row(S + i * N, dP + i * N, N, delta[i]);  // dS
        if (dpairs) cpu::add_strided(dpairs, dP, 1, N * N);
        // cosine: the block holds factor q_hat and k_hat, so dQ is w.r.t. factor q_hat (the reference's
        // dq_scaled) and dK w.r.t. k_hat
        cpu::gemm(false, false, N, hd, N, scale, dP, N, block + hd, ld, 0.0f, G, ld);      // dQ = dS K
        cpu::gemm(true, false, N, hd, N, scale, dP, N, block, ld, 0.0f, G + hd, ld);       // dK = dS^T Q
        if (ls.active()) {  // through the logit scale and the normalisation, row by row
          const float f = ls.factor[h];
          for (int64_t i = 0; i < N; ++i) {
            float* gq = G + i * ld;
            if (dscale_chunks) dscale += static_cast<double>(cpu::dot(gq, q_hat + i * hd, hd));
            cpu::scale_row(gq, hd, f);  // d(q_hat) = factor * d(factor q_hat)
            cpu::normalize_row_backward(gq, q_hat + i * hd, qnorm[i], hd);
            cpu::normalize_row_backward(gq + hd, block + i * ld + hd, knorm[i], hd);
          }
        }
        scalar_t* gb = dqkv ? dqkv + b * L.spatial[0] * gs[0] : nullptr;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t part = 0; part < 3; ++part) {
            const int64_t col = part * C + h * hd;
            if (src[i] >= 0) {
              if (gb) cpu::from_float(G + i * ld + part * hd, gb + gsrc[i] + col, hd);
            } else if (dbias) {
              cpu::add_strided(dbias + col, G + i * ld + part * hd, 1, hd);  // padded: the grad goes to qkv_bias
            }
          }
      }
      if (dscale_chunks) dscale_chunks[chunk] = dscale;
    }
  });
}

// What the kernels index with: every shape they rely on (the Python checks come first; these keep a direct
// call of the extension from reading or writing out of bounds).
void check_window_operands(const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                           const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index,
                           int64_t num_heads, const WindowGeometry& geo) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.device().is_cpu(), "window_cpu: qkv must be (B, T, H, W, 3C) on CPU");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(qkv.size(1 + d) == geo.spatial[d], "window_cpu: qkv's map ", qkv.sizes(), " is not the geometry's");
  TORCH_CHECK(num_heads >= 1 && qkv.size(4) % (3 * num_heads) == 0, "window_cpu: qkv's last dim ", qkv.size(4),
              " is not 3 * num_heads * head_dim for num_heads=", num_heads);
  TORCH_CHECK(table.has_value() == index.has_value(), "window_cpu: table and index go together");
  int64_t n = 1;
  for (int d = 0; d < 3; ++d) n *= geo.window[d];
  if (table.has_value()) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == num_heads && table->scalar_type() == qkv.scalar_type(),
                "window_cpu: table must be (rows, num_heads) in qkv's dtype, got ", table->sizes());
    TORCH_CHECK(index->dim() == 2 && index->size(0) == n && index->size(1) == n &&
                    index->scalar_type() == at::kLong,
                "window_cpu: index must be (N, N) int64 for N = ", n, " tokens per window");
    if (n > 0)
      TORCH_CHECK(index->min().item<int64_t>() >= 0 && index->max().item<int64_t>() < table->size(0),
                  "window_cpu: index holds rows outside the table's ", table->size(0));
  }
  if (qkv_bias.has_value())
    TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == qkv.size(4) && qkv_bias->scalar_type() == qkv.scalar_type(),
                "window_cpu: qkv_bias must be (3C,) in qkv's dtype");
}

void check_logit_scale(const at::Tensor& qkv, const c10::optional<at::Tensor>& logit_scale, int64_t num_heads) {
  if (!logit_scale.has_value()) return;
  const at::Tensor& t = *logit_scale;
  bool shape_ok = t.dim() >= 1 && t.size(0) == num_heads;
  for (int64_t d = 1; d < t.dim(); ++d) shape_ok = shape_ok && t.size(d) == 1;
  const bool dtype_ok = t.scalar_type() == qkv.scalar_type() || t.scalar_type() == at::kFloat;
  TORCH_CHECK(shape_ok && dtype_ok && t.device().is_cpu(),
              "window_cpu: logit_scale must be (num_heads,) or (num_heads, 1, ..., 1) on CPU, float32 or qkv's dtype; "
              "got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_forward_cpu(const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                                                      const c10::optional<at::Tensor>& qkv_bias,
                                                      const c10::optional<at::Tensor>& index, int64_t num_heads,
                                                      const WindowGeometry& geo, double scale,
                                                      const c10::optional<at::Tensor>& logit_scale) {
  check_window_operands(qkv, table, qkv_bias, index, num_heads, geo);
  check_logit_scale(qkv, logit_scale, num_heads);
  const Layout L(qkv, num_heads, geo);
  const LogitScale ls(logit_scale, num_heads);
  auto out = at::empty({L.B, geo.spatial[0], geo.spatial[1], geo.spatial[2], L.C}, qkv.options());
  auto lse = at::empty({L.B * L.windows, L.heads, L.N}, qkv.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_forward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "window_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      forward_kernel<scalar_t>(qkv, table, qkv_bias, index, L, static_cast<float>(scale), ls, out, lse);
  });
  return {out, lse};
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>
window_backward_cpu(const at::Tensor& dout, const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                    const c10::optional<at::Tensor>& qkv_bias, const c10::optional<at::Tensor>& index,
                    const at::Tensor& out, const at::Tensor& lse, int64_t num_heads, const WindowGeometry& geo,
                    double scale, bool need_qkv, bool need_pairs, bool need_bias,
                    const c10::optional<at::Tensor>& logit_scale, bool need_logit_scale) {
  check_window_operands(qkv, table, qkv_bias, index, num_heads, geo);
  check_logit_scale(qkv, logit_scale, num_heads);
  const Layout L(qkv, num_heads, geo);
  const LogitScale ls(logit_scale, num_heads);
  need_logit_scale = need_logit_scale && ls.active();
  const std::vector<int64_t> out_shape = {L.B, geo.spatial[0], geo.spatial[1], geo.spatial[2], L.C};
  for (const at::Tensor* t : {&dout, &out})
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape) && t->scalar_type() == qkv.scalar_type(),
                "window_backward_cpu: dout and out must be (B, T, H, W, C) in qkv's dtype, got ", t->sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == L.B * L.windows * L.heads * L.N,
              "window_backward_cpu: lse must be the forward's contiguous (B * windows, heads, N) float32");
  need_pairs = need_pairs && table.has_value();
  // Per head, chunks of consecutive windows, fixed by the shape: about 64 chunks in all to keep every core
  // busy, at least one per head, and their d(pairs) (N x N each) under ~32 MB together where that allows.
  const int64_t per_head = L.B * L.windows;
  const int64_t pair_bytes = need_pairs ? L.N * L.N * 4 : 1;
  const int64_t chunks_per_head = std::max<int64_t>(
      1, std::min<int64_t>({per_head, (64 + L.heads - 1) / L.heads, (32LL << 20) / (pair_bytes * L.heads)}));
  const int64_t chunks = L.heads * chunks_per_head;
  c10::optional<at::Tensor> dqkv, dpairs, dbias, dlogit_scale;
  at::Tensor pair_chunks, bias_chunks;
  std::vector<double> scale_chunks(need_logit_scale ? chunks : 0);
  auto fopts = qkv.options().dtype(at::kFloat);
  if (need_qkv) dqkv = at::empty(qkv.sizes(), qkv.options());
  if (need_pairs) pair_chunks = at::empty({chunks, L.N * L.N}, fopts);
  if (need_bias) bias_chunks = at::empty({chunks, L.C3}, fopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_backward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "window_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      backward_kernel<scalar_t>(dout, qkv, table, qkv_bias, index, out, lse, L, static_cast<float>(scale), ls,
                                need_qkv ? dqkv->mutable_data_ptr<scalar_t>() : nullptr,
                                need_pairs ? pair_chunks.mutable_data_ptr<float>() : nullptr,
                                need_bias ? bias_chunks.mutable_data_ptr<float>() : nullptr,
                                need_logit_scale ? scale_chunks.data() : nullptr, chunks_per_head);
  });
  if (need_pairs) {
    dpairs = at::empty({L.heads, L.N, L.N}, fopts);
    const int64_t NN = L.N * L.N;
    for (int64_t h = 0; h < L.heads; ++h)  // each head: its chunks in order
      cpu::sum_slots(pair_chunks.const_data_ptr<float>() + h * chunks_per_head * NN, chunks_per_head, NN, NN,
                     dpairs->mutable_data_ptr<float>() + h * NN);
  }
  if (need_bias) {
    dbias = at::empty({L.C3}, fopts);
    cpu::sum_slots(bias_chunks.const_data_ptr<float>(), chunks, L.C3, L.C3, dbias->mutable_data_ptr<float>());
  }
  if (need_logit_scale) {  // per head: its chunks in order, then d(factor) * factor where the clamp is open
    dlogit_scale = at::empty({L.heads}, fopts);
    float* d = dlogit_scale->mutable_data_ptr<float>();
    for (int64_t h = 0; h < L.heads; ++h) {
      double total = 0.0;
      for (int64_t c = 0; c < chunks_per_head; ++c) total += scale_chunks[h * chunks_per_head + c];
      d[h] = ls.open[h] ? static_cast<float>(total) * ls.factor[h] : 0.0f;
    }
  }
  return {dqkv, dpairs, dbias, dlogit_scale};
}

}  // namespace vitkernels
