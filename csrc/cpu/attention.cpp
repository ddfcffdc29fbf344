// C++ CPU flash attention: blocked online-softmax forward and FlashAttention-2 backward with an additive
// bias (broadcast dims included) and its gradient, dropout, strided q/k/v read in place, and a decomposed
// relative-position bias (per-axis terms read by their strides, added per key-grid row; their gradients
// summed from dS inside each (batch, head) task), and rotary position embedding (q and k rows rotated in
// float as they are staged for the GEMMs, the tables read by their strides; the backward rotates dQ and dK
// back, and sums the tables' gradients per (batch, head) task, then over their broadcast dims in a fixed
// order).
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

// The decomposed relative-position terms (checks.py RelPos): rel_t / rel_h / rel_w (B, H, Nq - prefix, K), read
// by their strides (any, the last one included). Query row i >= prefix and key j >= prefix get
// rel_t[i', kt] + rel_h[i', kh] + rel_w[i', kw], i' = i - prefix, j - prefix = (kt * Kh + kh) * Kw + kw.
// A row's terms go to float once, laid out [t (Kt) | h (Kh) | w (Kw)] (t a single 0 on a 2-D grid); its
// gradient slots have the same layout.
template <typename scalar_t>
struct RelPosView {
  struct Term {
    const scalar_t* data = nullptr;
    int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, n = 1;
  };
  Term t, h, w;  // t.data null on a 2-D grid
  int64_t prefix = 0;

  RelPosView(const c10::optional<at::Tensor>& rel_h, const c10::optional<at::Tensor>& rel_w,
             const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix) {
    if (!rel_h.has_value()) return;
    prefix = rel_prefix;
    set(h, *rel_h), set(w, *rel_w);
    if (rel_t.has_value()) set(t, *rel_t);
  }
  static void set(Term& term, const at::Tensor& x) {
    term.data = x.const_data_ptr<scalar_t>();
    term.s0 = x.stride(0), term.s1 = x.stride(1), term.s2 = x.stride(2), term.s3 = x.stride(3), term.n = x.size(3);
  }

  bool active() const { return h.data != nullptr; }
  int64_t width() const { return t.n + h.n + w.n; }

  // The float terms of rel rows [r0, r0 + rows) of (b, h), width() floats a row.
  void load(int64_t b, int64_t hd, int64_t r0, int64_t rows, float* dst) const {
    for (int64_t r = r0; r < r0 + rows; ++r, dst += width()) {
      if (t.data) {
        cpu::load_strided(t.data + b * t.s0 + hd * t.s1 + r * t.s2, t.s3, t.n, dst);
      } else {
        dst[0] = 0.0f;
      }
      cpu::load_strided(h.data + b * h.s0 + hd * h.s1 + r * h.s2, h.s3, h.n, dst + t.n);
      cpu::load_strided(w.data + b * w.s0 + hd * w.s1 + r * w.s2, w.s3, w.n, dst + t.n + h.n);
    }
  }

  // f(c, kt, kh, kw0, n) for each run of keys [j0 + c, j0 + c + n) of the block [j0, j0 + cols) in one key-grid
  // row (kt, kh), from column kw0: a block edge may cut a grid row, keys before the prefix are skipped.
  template <typename F>
  void for_each_run(int64_t j0, int64_t cols, F&& f) const {
    const int64_t end = j0 + cols - prefix;
    int64_t p = std::max(j0, prefix) - prefix;
    if (p >= end) return;
    int64_t kw = p % w.n, grid_row = p / w.n;
    while (p < end) {
      const int64_t n = std::min(w.n - kw, end - p);
      f(p + prefix - j0, grid_row / h.n, grid_row % h.n, kw, n);
      p += n, kw = 0, ++grid_row;
    }
  }

  // s[c] += the terms of keys j0 + c, c < cols, for the query row whose float terms are `row`.
  void add_row(float* s, const float* row, int64_t j0, int64_t cols) const {
    const float* ww = row + t.n + h.n;
    for_each_run(j0, cols, [&](int64_t c, int64_t kt, int64_t kh, int64_t kw0, int64_t n) {
      const float th = row[kt] + row[t.n + kh];
      cpu::add_strided(s + c, &th, 0, n);
      cpu::add_strided(s + c, ww + kw0, 1, n);
    });
  }

  // The gradient slots of one query row ([dt | dh | dw]) += dS of keys j0 + c, c < cols, summed over each
  // key-grid frame / row / column, in key order.
  void add_grad_row(float* slot, const float* ds, int64_t j0, int64_t cols) const {
    float* dw = slot + t.n + h.n;
    for_each_run(j0, cols, [&](int64_t c, int64_t kt, int64_t kh, int64_t kw0, int64_t n) {
      float total = 0.0f;
      for (int64_t j = 0; j < n; ++j) total += ds[c + j];
      slot[kt] += total;
      slot[t.n + kh] += total;
      cpu::add_strided(dw + kw0, ds + c, 1, n);
    });
  }
};

// The rotary tables (checks.py Rope): cos and sin (1|B, 1|H, Nq - prefix, D), float32 or q's dtype, any strides
// (the broadcast dims read with stride 0), read in place. Token n >= prefix of (b, h) is rotated by table row
// n - prefix: x * cos + rot(x) * sin in float (rot: interleaved pairs or halves, cpu::rope_rotate_pairs).
template <typename scalar_t>
struct RopeView {
  struct Table {
    const void* data = nullptr;
    int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  };
  Table cos, sin;
  bool table_float = false, rotate_half = false;
  int64_t prefix = 0, D = 0;

  RopeView(const c10::optional<at::Tensor>& cos_t, const c10::optional<at::Tensor>& sin_t, int64_t rope_prefix,
           bool half, const Shape& g) {
    if (!cos_t.has_value()) return;
    prefix = rope_prefix, rotate_half = half, D = g.D;
    table_float = cos_t->scalar_type() == at::kFloat;
    set(cos, *cos_t, g), set(sin, *sin_t, g);
  }
  void set(Table& t, const at::Tensor& x, const Shape& g) const {
    const at::Tensor e = x.expand({g.B, g.H, g.Nq - prefix, g.D});  // a view: stride 0 on the broadcast dims
    t.data = x.const_data_ptr();
    t.s0 = e.stride(0), t.s1 = e.stride(1), t.s2 = e.stride(2), t.s3 = e.stride(3);
  }

  bool active() const { return cos.data != nullptr; }
  // Scratch floats the row functions below need.
  int64_t work_size() const { return 5 * D; }

  void load(const Table& t, int64_t b, int64_t h, int64_t r, float* dst) const {
    const int64_t off = b * t.s0 + h * t.s1 + r * t.s2;
    if (table_float) {
      cpu::load_strided(static_cast<const float*>(t.data) + off, t.s3, D, dst);
    } else {
      cpu::load_strided(static_cast<const scalar_t*>(t.data) + off, t.s3, D, dst);
    }
  }

  // Rotates the float rows x (row stride ld) of tokens [n0, n0 + rows) of (b, h) in place; prefix rows stay.
  void rotate_rows(float* x, int64_t ld, int64_t b, int64_t h, int64_t n0, int64_t rows, float* work) const {
    float* c = work;
    float* s = work + D;
    for (int64_t r = std::max<int64_t>(0, prefix - n0); r < rows; ++r) {
      load(cos, b, h, n0 + r - prefix, c);
      load(sin, b, h, n0 + r - prefix, s);
      cpu::rope_rotate(x + r * ld, c, s, D, rotate_half, work + 2 * D);
    }
  }

  // The gradient rows g (row stride ld) of the rotated tokens [n0, n0 + rows) become those of the unrotated
  // rows, in place. With dcos / dsin (this (b, h)'s (Nq - prefix, D) float slots), the tables' gradient of
  // each row is added first, from the unrotated rows x (the input tensor's, row stride ldx).
  void rotate_back_rows(float* g, int64_t ld, int64_t b, int64_t h, int64_t n0, int64_t rows, const scalar_t* x,
                        int64_t ldx, float* dcos, float* dsin, float* work) const {
    float* c = work;
    float* s = work + D;
    float* xr = work + 2 * D;
    for (int64_t r = std::max<int64_t>(0, prefix - n0); r < rows; ++r) {
      const int64_t row = n0 + r - prefix;
      float* gr = g + r * ld;
      if (dcos) {
        cpu::load_strided(x + (n0 + r) * ldx, 1, D, xr);
        cpu::rope_table_grad(gr, xr, dcos + row * D, dsin + row * D, D, rotate_half, work + 3 * D);
      }
      load(cos, b, h, row, c);
      load(sin, b, h, row, s);
      cpu::rope_rotate_back(gr, c, s, D, rotate_half, work + 3 * D);
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

// float_rows, rotated by the rope tables when there are some (then always a copy: the rows of (b, h) from r0).
template <typename scalar_t>
const float* staged_rows(const scalar_t* base, int64_t ld, int64_t r0, int64_t rows, int64_t D, Scratch& buffer,
                         int64_t* ld_out, const RopeView<scalar_t>& rope, int64_t b, int64_t h, float* work) {
  if (!rope.active()) return float_rows(base, ld, r0, rows, D, buffer, ld_out);
  float* dst = buffer.get(rows * D);
  cpu::load_rows(base + r0 * ld, ld, rows, D, dst);
  rope.rotate_rows(dst, D, b, h, r0, rows, work);
  *ld_out = D;
  return dst;
}

template <typename scalar_t>
const scalar_t* slice(const at::Tensor& t, int64_t b, int64_t h) {
  return t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& bias, const RelPosView<scalar_t>& rel,
                    const RopeView<scalar_t>& rope, float scale, const cpu::Dropout& drop, at::Tensor& out,
                    at::Tensor& lse) {
  const Shape g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const BiasView<scalar_t> bv(bias, g);
  const int64_t q_blocks = (g.Nq + kBlockQ - 1) / kBlockQ, D = g.D;
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  float* lse_p = lse.mutable_data_ptr<float>();

  at::parallel_for(0, g.B * g.H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    Scratch q_buf, k_buf, v_buf, s_buf, o_buf, stats, row_buf, rel_buf, rope_buf;
    float* work = rope_buf.get(rope.work_size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / g.H, h = bh % g.H;
      const int64_t i0 = (task % q_blocks) * kBlockQ, rows = std::min(kBlockQ, g.Nq - i0);
      int64_t ldq, ldk, ldv;
      const float* Q = staged_rows(slice<scalar_t>(q, b, h), q.stride(2), i0, rows, D, q_buf, &ldq, rope, b, h, work);
      float* O = o_buf.get(rows * D);
      std::fill(O, O + rows * D, 0.0f);
      float* m = stats.get(2 * rows);  // running row max, then running row sum
      float* l = m + rows;
      std::fill(m, m + rows, kNegInf);
      std::fill(l, l + rows, 0.0f);
      const int64_t block = std::min(kBlockK, g.Nk);
      float* S = s_buf.get(rows * block);
      float* tmp = row_buf.get(block);
      // the block's rel terms as float, once for all its key steps: rows from rel_first on have them
      const int64_t rel_first = std::max(i0, rel.prefix);
      const int64_t rel_rows = rel.active() ? std::max<int64_t>(0, i0 + rows - rel_first) : 0;
      float* rel_f = rel_buf.get(rel_rows * rel.width());
      if (rel_rows) rel.load(b, h, rel_first - rel.prefix, rel_rows, rel_f);
      for (int64_t j0 = 0; j0 < g.Nk; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, g.Nk - j0);
        const float* K = staged_rows(slice<scalar_t>(k, b, h), k.stride(2), j0, cols, D, k_buf, &ldk, rope, b, h, work);
        const float* V = float_rows(slice<scalar_t>(v, b, h), v.stride(2), j0, cols, D, v_buf, &ldv);
        cpu::gemm(false, true, rows, cols, D, scale, Q, ldq, K, ldk, 0.0f, S, cols);  // S = scale Q K^T
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = S + r * cols;
          if (bv.data) bv.add_row(srow, b, h, i0 + r, j0, cols, tmp);
          if (rel_rows && i0 + r >= rel_first) rel.add_row(srow, rel_f + (i0 + r - rel_first) * rel.width(), j0, cols);
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

// Where a (b, h) task sums the rope tables' gradient: (Nq - prefix, D) float slots for cos and for sin, then
// summed over the tables' broadcast dims; null when not asked for.
struct RopeGradSlots {
  float* cos = nullptr;
  float* sin = nullptr;
  int64_t size = 0;  // (Nq - prefix) * D
};

// The rel terms' gradients, contiguous (B, H, Nq - prefix, K) in the terms' dtype; undefined when not asked for
// (t also on a 2-D grid).
struct RelGrads {
  at::Tensor t, h, w;
};

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, const RelPosView<scalar_t>& rel,
                     const RopeView<scalar_t>& rope, const at::Tensor& out, const at::Tensor& lse, float scale,
                     const cpu::Dropout& drop, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     const BiasGradSlots& dbias, RelGrads& drel, const RopeGradSlots& drope) {
  const Shape g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const BiasView<scalar_t> bv(bias, g);
  const int64_t D = g.D;
  const float* lse_p = lse.const_data_ptr<float>();
  scalar_t* dq_p = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dk_p = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv_p = dv.mutable_data_ptr<scalar_t>();
  const int64_t rel_rows = rel.active() ? g.Nq - rel.prefix : 0, W = rel.width();
  const bool rel_grad = rel_rows > 0 && drel.h.defined();
  scalar_t* drel_p[3] = {drel.t.defined() ? drel.t.mutable_data_ptr<scalar_t>() : nullptr,
                         rel_grad ? drel.h.mutable_data_ptr<scalar_t>() : nullptr,
                         rel_grad ? drel.w.mutable_data_ptr<scalar_t>() : nullptr};

  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    const cpu::OneBlasThread one_blas_thread;
    Scratch q_buf, k_buf, v_buf, do_buf, o_row, dq_buf, dkv_buf, s_buf, p_buf, dp_buf, keep_buf, delta_buf, tmp_buf;
    Scratch rel_buf, rel_slot_buf, rope_buf;
    float* work = rope_buf.get(rope.work_size());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      int64_t ldq, lddo, ldk, ldv;
      // whole-head Q (rotated) and dO (float), delta_i = dO_i . O_i, the dQ accumulator
      const float* Q = staged_rows(slice<scalar_t>(q, b, h), q.stride(2), 0, g.Nq, D, q_buf, &ldq, rope, b, h, work);
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
      // the head's rel terms as float (every key step reads every row), and its own d(rel) slots: this task
      // alone writes them, in a fixed order
      float* rel_f = rel_buf.get(rel_rows * W);
      if (rel_rows) rel.load(b, h, 0, rel_rows, rel_f);
      float* rel_slot = rel_grad ? rel_slot_buf.get(rel_rows * W) : nullptr;
      if (rel_slot) std::fill(rel_slot, rel_slot + rel_rows * W, 0.0f);
      // this task's d(cos), d(sin) slots: dK's rows, key block by key block, then dQ's
      float* dcos = drope.cos ? drope.cos + bh * drope.size : nullptr;
      float* dsin = drope.cos ? drope.sin + bh * drope.size : nullptr;
      if (dcos) std::fill(dcos, dcos + drope.size, 0.0f), std::fill(dsin, dsin + drope.size, 0.0f);
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
        const float* K = staged_rows(slice<scalar_t>(k, b, h), k.stride(2), j0, cols, D, k_buf, &ldk, rope, b, h, work);
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
            if (rel_rows && i0 + r >= rel.prefix) rel.add_row(srow, rel_f + (i0 + r - rel.prefix) * W, j0, cols);
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
          if (rel_slot) {  // d(rel) += dS summed over each key-grid frame / row / column
            for (int64_t r = std::max<int64_t>(0, rel.prefix - i0); r < rows; ++r)
              rel.add_grad_row(rel_slot + (i0 + r - rel.prefix) * W, dP + r * cols, j0, cols);
          }
          cpu::gemm(false, false, rows, D, cols, scale, dP, cols, K, ldk, 1.0f, dQ + i0 * D, D);  // dQ += dS K
          cpu::gemm(true, false, cols, D, rows, scale, dP, cols, Qi, ldq, 1.0f, dK, D);          // dK += dS^T Q
        }
        const int64_t row0 = bh * g.Nk + j0;
        if (rope.active())  // dK of the rotated keys -> of k (and the tables' share of these rows)
          rope.rotate_back_rows(dK, D, b, h, j0, cols, slice<scalar_t>(k, b, h), k.stride(2), dcos, dsin, work);
        cpu::from_float(dK, dk_p + row0 * D, cols * D);
        cpu::from_float(dV, dv_p + row0 * D, cols * D);
      }
      if (rope.active())
        rope.rotate_back_rows(dQ, D, b, h, 0, g.Nq, slice<scalar_t>(q, b, h), q.stride(2), dcos, dsin, work);
      cpu::from_float(dQ, dq_p + bh * g.Nq * D, g.Nq * D);
      if (rel_slot) {  // [dt | dh | dw] rows -> the three contiguous gradients
        const int64_t offsets[3] = {0, rel.t.n, rel.t.n + rel.h.n}, widths[3] = {rel.t.n, rel.h.n, rel.w.n};
        for (int term = 0; term < 3; ++term) {
          if (!drel_p[term]) continue;
          for (int64_t r = 0; r < rel_rows; ++r)
            cpu::from_float(rel_slot + r * W + offsets[term], drel_p[term] + (bh * rel_rows + r) * widths[term],
                            widths[term]);
        }
      }
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

void check_rel_pos(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& rel_h,
                   const c10::optional<at::Tensor>& rel_w, const c10::optional<at::Tensor>& rel_t, int64_t prefix) {
  if (!rel_h.has_value()) {
    TORCH_CHECK(!rel_w.has_value() && !rel_t.has_value(), "attention_cpu: rel_w / rel_t without rel_h");
    return;
  }
  TORCH_CHECK(rel_w.has_value(), "attention_cpu: rel_h without rel_w");
  const int64_t Nq = q.size(2), Nk = k.size(2);
  TORCH_CHECK(prefix >= 0 && prefix <= std::min(Nq, Nk), "attention_cpu: rel prefix ", prefix,
              " must be in [0, min(Nq, Nk)]");
  int64_t keys = 1;
  for (const auto* term : {&rel_t, &rel_h, &rel_w}) {
    if (!term->has_value()) continue;
    const at::Tensor& t = **term;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == q.scalar_type() && t.dim() == 4 && t.size(0) == q.size(0) &&
                    t.size(1) == q.size(1) && t.size(2) == Nq - prefix && t.size(3) >= 1,
                "attention_cpu: rel terms must be (B, H, Nq - prefix, K) CPU tensors of q's dtype; got ", t.sizes());
    keys *= t.size(3);
  }
  TORCH_CHECK(keys == Nk - prefix, "attention_cpu: the rel key grid has ", keys, " keys, Nk - prefix is ",
              Nk - prefix);
}

void check_rope(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& cos,
                const c10::optional<at::Tensor>& sin, int64_t prefix) {
  if (!cos.has_value()) {
    TORCH_CHECK(!sin.has_value(), "attention_cpu: rope sin without cos");
    return;
  }
  TORCH_CHECK(sin.has_value(), "attention_cpu: rope cos without sin");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(2) == Nq, "attention_cpu: rope needs Nq == Nk, got ", Nq, " and ", k.size(2));
  TORCH_CHECK(prefix >= 0 && prefix <= Nq, "attention_cpu: rope prefix ", prefix, " must be in [0, Nq]");
  TORCH_CHECK(D % 2 == 0, "attention_cpu: rope needs an even head dim, got ", D);
  for (const at::Tensor* t : {&*cos, &*sin}) {
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == q.scalar_type() || t->scalar_type() == at::kFloat) &&
                    t->dim() == 4 && (t->size(0) == 1 || t->size(0) == B) && (t->size(1) == 1 || t->size(1) == H) &&
                    t->size(2) == Nq - prefix && t->size(3) == D,
                "attention_cpu: rope cos / sin must be (1|B, 1|H, Nq - prefix, D) CPU tensors of q's dtype or float32; "
                "got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(cos->sizes() == sin->sizes() && cos->scalar_type() == sin->scalar_type(),
              "attention_cpu: rope cos and sin must share their shape and dtype");
}

// Per-(b, h) float slots (B, H, E), contiguous, summed over the broadcast batch / head dims of an operand
// (Bb, Hb, E) in a fixed order: a (Bb, Hb, E) float tensor (the slots themselves when nothing broadcasts).
at::Tensor sum_broadcast_slots(const at::Tensor& slots, int64_t B, int64_t H, int64_t Bb, int64_t Hb, int64_t E) {
  const bool over_b = Bb == 1 && B > 1, over_h = Hb == 1 && H > 1;
  if (!over_b && !over_h) return slots.view({Bb, Hb, E});
  at::Tensor total = at::empty({Bb, Hb, E}, slots.options());
  const float* s = slots.const_data_ptr<float>();
  float* t = total.mutable_data_ptr<float>();
  if (over_b && over_h) {
    cpu::sum_slots(s, B * H, E, E, t);
  } else if (over_b) {
    cpu::sum_slots(s, B, H * E, H * E, t);
  } else {
    for (int64_t b = 0; b < B; ++b) cpu::sum_slots(s + b * H * E, H, E, E, t + b * E);
  }
  return total;
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
                                                         double dropout_p, int64_t seed, int64_t offset,
                                                         const c10::optional<at::Tensor>& rel_h,
                                                         const c10::optional<at::Tensor>& rel_w,
                                                         const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix,
                                                         const c10::optional<at::Tensor>& cos,
                                                         const c10::optional<at::Tensor>& sin, int64_t rope_prefix,
                                                         bool rotate_half) {
  check_operands(q, k, v, bias);
  check_rel_pos(q, k, rel_h, rel_w, rel_t, rel_prefix);
  check_rope(q, k, cos, sin, rope_prefix);
  const Shape shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  auto out = at::empty(q.sizes(), q.options());  // B, H, Nq, D
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto drop = make_dropout(dropout_p, seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "attention_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      forward_kernel<scalar_t>(q, k, v, bias, RelPosView<scalar_t>(rel_h, rel_w, rel_t, rel_prefix),
                               RopeView<scalar_t>(cos, sin, rope_prefix, rotate_half, shape), static_cast<float>(scale),
                               drop, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<RelPosGrads>,
           c10::optional<RopeGrads>>
attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse,
                       double scale, double dropout_p, int64_t seed, int64_t offset, bool bias_requires_grad,
                       const c10::optional<at::Tensor>& rel_h, const c10::optional<at::Tensor>& rel_w,
                       const c10::optional<at::Tensor>& rel_t, int64_t rel_prefix, bool rel_requires_grad,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, int64_t rope_prefix,
                       bool rotate_half, bool rope_requires_grad) {
  check_operands(q, k, v, bias);
  check_rel_pos(q, k, rel_h, rel_w, rel_t, rel_prefix);
  check_rope(q, k, cos, sin, rope_prefix);
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
  RelGrads drel;
  if (rel_h.has_value() && rel_requires_grad) {
    auto grad_like = [](const at::Tensor& t) { return at::empty(t.sizes(), t.options()); };  // contiguous
    drel.h = grad_like(*rel_h), drel.w = grad_like(*rel_w);
    if (rel_t.has_value()) drel.t = grad_like(*rel_t);
  }
  // d(cos), d(sin): per (b, h) float slots, then summed over the tables' broadcast batch / head dims
  RopeGradSlots rope_slots;
  at::Tensor cos_slots, sin_slots;
  const Shape shape{B, H, Nq, Nk, q.size(3)};
  if (cos.has_value() && rope_requires_grad) {
    rope_slots.size = (Nq - rope_prefix) * q.size(3);
    cos_slots = at::empty({B, H, rope_slots.size}, q.options().dtype(at::kFloat));
    sin_slots = at::empty({B, H, rope_slots.size}, q.options().dtype(at::kFloat));
    rope_slots.cos = cos_slots.mutable_data_ptr<float>();
    rope_slots.sin = sin_slots.mutable_data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    TORCH_CHECK((!std::is_same<scalar_t, double>::value), "attention_cpu: fp64 runs on the reference backend");
    if constexpr (!std::is_same<scalar_t, double>::value)
      backward_kernel<scalar_t>(dout, q, k, v, bias, RelPosView<scalar_t>(rel_h, rel_w, rel_t, rel_prefix),
                                RopeView<scalar_t>(cos, sin, rope_prefix, rotate_half, shape), out, lse,
                                static_cast<float>(scale), drop, dq, dk, dv, slot_view, drel, rope_slots);
  });
  if (slot_view.data) {
    const at::Tensor total = sum_broadcast_slots(slots, B, H, Bb, Hb, slot_view.nq * slot_view.nk);
    dbias = total.to(q.scalar_type()).view(bias->sizes());
  }
  c10::optional<RopeGrads> rope_grads;
  if (rope_slots.cos) {
    const int64_t Bc = cos->size(0), Hc = cos->size(1);
    auto reduce = [&](const at::Tensor& slots_t) {
      return sum_broadcast_slots(slots_t, B, H, Bc, Hc, rope_slots.size).to(cos->scalar_type()).view(cos->sizes());
    };
    rope_grads = RopeGrads{reduce(cos_slots), reduce(sin_slots)};
  }
  c10::optional<RelPosGrads> rel_grads;
  if (drel.h.defined())
    rel_grads = RelPosGrads{drel.h, drel.w, drel.t.defined() ? c10::optional<at::Tensor>(drel.t) : c10::nullopt};
  return {dq, dk, dv, dbias, rel_grads, rope_grads};
}

}  // namespace vitkernels
