// Building blocks of the C++ CPU kernels (see cpu_kernels.h).
#include "cpu_kernels.h"

#include <algorithm>
#include <cstdlib>

namespace vitkernels {
namespace cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C alone for k = 0 only when beta = 1
    for (int64_t i = 0; i < m; ++i) scale_row(c + i * ldc, n, beta);
    return;
  }
  // BLAS wants a leading dim >= the stored rows' length; only a single stored row may pass less
  auto leading = [](int64_t ld, int64_t rows, int64_t length, const char* name) {
    if (rows <= 1) return std::max<int64_t>(ld, std::max<int64_t>(length, 1));
    TORCH_CHECK(ld >= length, "cpu gemm: leading dim of ", name, " (", ld, ") is below its row length (", length,
                "): rows would overlap");
    return ld;
  };
  lda = leading(lda, trans_a ? k : m, trans_a ? m : k, "A");
  ldb = leading(ldb, trans_b ? n : k, trans_b ? k : n, "B");
  ldc = leading(ldc, m, n, "C");
  constexpr int64_t kIntMax = 2147483647;
  TORCH_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax,
              "cpu gemm: a dim or leading dim exceeds the BLAS's 32-bit int");
  // VITKERNELS_CPU_NO_BLAS=1 takes the at::addmm_ path of builds whose torch exports no sgemm_ (for tests).
  static const bool no_blas = std::getenv("VITKERNELS_CPU_NO_BLAS") != nullptr;
  if (sgemm_ != nullptr && !no_blas) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same flags, operands swapped.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto A = at::from_blob(const_cast<float*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  auto B = at::from_blob(const_cast<float*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(trans_a ? A.t() : A, trans_b ? B.t() : B, beta, alpha);
}

// ---------------------------------------------------------------------------------------- conversions

VK_ISA_CLONES void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

VK_ISA_CLONES void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t w = static_cast<uint32_t>(bits[j]) << 16;
    float f;
    std::memcpy(&f, &w, sizeof(f));
    dst[j] = f;
  }
}

void to_float(const at::Half* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

VK_ISA_CLONES void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

VK_ISA_CLONES void from_float(const float* src, at::BFloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t w;
    std::memcpy(&w, &src[j], sizeof(w));
    // round to nearest even; NaN stays a (quiet) NaN
    const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
    bits[j] = (src[j] != src[j]) ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
  }
}

void from_float(const float* src, at::Half* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<at::Half>(src[j]);
}

// ---------------------------------------------------------------------------------------- row loops

namespace {

constexpr int kLanes = 16;  // independent partial sums / maxima: the loops vectorise in a fixed order

// exp(x) on [-87, 88] (Cephes' polynomial, ~1 ulp); x < -87 (and -inf) gives exactly 0, NaN stays NaN.
inline float exp_approx(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float y = p * two_n;
  return x < -87.0f ? 0.0f : (x != x ? x : y);
}

}  // namespace

VK_ISA_CLONES void add_strided(float* s, const float* b, int64_t bstride, int64_t n) {
  if (bstride == 1) {
    for (int64_t j = 0; j < n; ++j) s[j] += b[j];
  } else if (bstride == 0) {
    const float v = b[0];
    for (int64_t j = 0; j < n; ++j) s[j] += v;
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += b[j * bstride];
  }
}

VK_ISA_CLONES float row_max(const float* s, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = s[j + l] > lanes[l] ? s[j + l] : lanes[l];
  float m = kNegInf;
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

VK_ISA_CLONES float exp_shift_sum(float* s, int64_t n, float shift) {
  if (shift == kNegInf) {  // every logit is -inf: probabilities 0 (not NaN)
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] != s[j] ? s[j] : 0.0f;
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) total += s[j];
    return total;
  }
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_approx(s[j + l] - shift);
      s[j + l] = e;
      lanes[l] += e;
    }
  float total = 0.0f;
  for (; j < n; ++j) {
    s[j] = exp_approx(s[j] - shift);
    total += s[j];
  }
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

VK_ISA_CLONES void scale_row(float* y, int64_t n, float a) {
  if (a == 0.0f) {  // beta = 0 semantics: overwrite (stale NaN in scratch must not survive)
    for (int64_t j = 0; j < n; ++j) y[j] = 0.0f;
    return;
  }
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

VK_ISA_CLONES float dot(const float* x, const float* y, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[j + l] * y[j + l];
  float total = 0.0f;
  for (; j < n; ++j) total += x[j] * y[j];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

VK_ISA_CLONES void multiply(float* y, const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] *= x[j];
}

VK_ISA_CLONES void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// ---------------------------------------------------------------------------------------- rope, normalisation

VK_ISA_CLONES void rope_rotate_pairs(const float* x, float* out, int64_t D, bool rotate_half) {
  if (rotate_half) {
    const int64_t h = D / 2;
    for (int64_t j = 0; j < h; ++j) out[j] = -x[j + h];
    for (int64_t j = 0; j < h; ++j) out[j + h] = x[j];
  } else {
    for (int64_t j = 0; j + 1 < D; j += 2) {
      out[j] = -x[j + 1];
      out[j + 1] = x[j];
    }
  }
}

VK_ISA_CLONES void rope_rotate(float* x, const float* c, const float* s, int64_t D, bool rotate_half, float* work) {
  rope_rotate_pairs(x, work, D, rotate_half);
  for (int64_t j = 0; j < D; ++j) x[j] = x[j] * c[j] + work[j] * s[j];
}

VK_ISA_CLONES void rope_rotate_back(float* g, const float* c, const float* s, int64_t D, bool rotate_half,
                                    float* work) {
  float* gs = work;
  float* r = work + D;
  for (int64_t j = 0; j < D; ++j) gs[j] = g[j] * s[j];
  rope_rotate_pairs(gs, r, D, rotate_half);
  for (int64_t j = 0; j < D; ++j) g[j] = g[j] * c[j] - r[j];
}

VK_ISA_CLONES void rope_table_grad(const float* g, const float* x, float* dc, float* ds, int64_t D, bool rotate_half,
                                   float* work) {
  rope_rotate_pairs(x, work, D, rotate_half);
  for (int64_t j = 0; j < D; ++j) {
    dc[j] += g[j] * x[j];
    ds[j] += g[j] * work[j];
  }
}

// In double: the cosine logits are these rows' dot products times up to 100, so their rounding shows.
float normalize_row(float* x, int64_t n) {
  double sq = 0.0;
  for (int64_t j = 0; j < n; ++j) sq += static_cast<double>(x[j]) * x[j];
  const double norm = std::sqrt(sq);
  const double d = norm < static_cast<double>(kNormEps) ? static_cast<double>(kNormEps) : norm;  // NaN stays NaN
  for (int64_t j = 0; j < n; ++j) x[j] = static_cast<float>(x[j] / d);
  return static_cast<float>(norm);
}

void normalize_row_backward(float* g, const float* x_hat, float norm, int64_t n) {
  if (norm <= kNormEps) {  // clamped, as F.normalize's clamp_min (a NaN norm goes on to give NaN)
    for (int64_t j = 0; j < n; ++j) g[j] /= kNormEps;
    return;
  }
  double proj = 0.0;
  for (int64_t j = 0; j < n; ++j) proj += static_cast<double>(x_hat[j]) * g[j];
  for (int64_t j = 0; j < n; ++j) g[j] = static_cast<float>((g[j] - x_hat[j] * proj) / norm);
}

// ---------------------------------------------------------------------------------------- dropout

namespace {

inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * ctr[2];
    const uint32_t c0 = static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ k0;
    const uint32_t c2 = static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ k1;
    ctr[1] = static_cast<uint32_t>(p1);
    ctr[3] = static_cast<uint32_t>(p0);
    ctr[0] = c0;
    ctr[2] = c2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

}  // namespace

void Dropout::row_factors(uint64_t row, int64_t row_len, int64_t j0, int64_t n, float* keep) const {
  const uint64_t padded = static_cast<uint64_t>((row_len + 3) / 4) * 4;
  const uint64_t first = row * padded + static_cast<uint64_t>(j0);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  int64_t j = 0;
  while (j < n) {
    const uint64_t index = first + static_cast<uint64_t>(j);
    const uint64_t group = index >> 2;
    uint32_t ctr[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
    philox4x32_10(ctr, k0, k1);
    for (uint64_t lane = index & 3; lane < 4 && j < n; ++lane, ++j) {
      const float u = static_cast<float>(ctr[lane] >> 8) * (1.0f / 16777216.0f);  // [0, 1)
      keep[j] = u >= p ? keep_scale : 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------- reduction

void sum_slots(const float* slots, int64_t count, int64_t slot_stride, int64_t size, float* out) {
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) out[o] = 0.0f;
    for (int64_t s = 0; s < count; ++s) {
      const float* slot = slots + s * slot_stride;
      for (int64_t o = begin; o < end; ++o) out[o] += slot[o];
    }
  });
}

}  // namespace cpu
}  // namespace vitkernels
