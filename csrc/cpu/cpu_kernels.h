// Building blocks of the C++ CPU kernels: row-major GEMM on BLAS, vectorised row loops (exp, softmax
// pieces, dtype conversion), counter-based dropout and a fixed-order reduction.
//
// The element-wise loops are compiled once per x86 ISA level (AVX-512, AVX2+FMA, baseline) through GCC's
// target_clones and picked when the library loads, so one wheel is fast on any x86-64 CPU; torch's own
// at::vec would be compiled here for the baseline only. Every loop has a fixed order: results never depend
// on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VK_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VK_ISA_CLONES
#endif

// Fortran BLAS sgemm of the BLAS torch links (MKL in the x86 wheels), resolved from libtorch_cpu when it
// exports it; otherwise null and the GEMMs go through at::addmm_.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count, C interface (returns the previous setting; 0 = the global one), when
// libtorch_cpu exports it (its lower-case alias is the Fortran one, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace vitkernels {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, op = transpose when the flag is set.
// Every leading dim must cover its row (a single-row operand may pass less). Called from inside
// at::parallel_for tasks, each under OneBlasThread: the BLAS runs on the calling thread only, so a product
// never depends on how many threads there are.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// For the lifetime of the guard, this thread's BLAS calls use one thread (MKL's thread-local setting; a
// task that runs inline, outside an OpenMP region, would otherwise let MKL split its products).
struct OneBlasThread {
  int previous = 0;
  bool active = false;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      previous = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~OneBlasThread() {
    if (active) MKL_Set_Num_Threads_Local(previous);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;
};
// Rows of each storage dtype to and from float (bf16/fp16: round to nearest even).
void to_float(const float* src, float* dst, int64_t n);
void to_float(const at::BFloat16* src, float* dst, int64_t n);
void to_float(const at::Half* src, float* dst, int64_t n);
void from_float(const float* src, float* dst, int64_t n);
void from_float(const float* src, at::BFloat16* dst, int64_t n);
void from_float(const float* src, at::Half* dst, int64_t n);

// Copies `rows` rows of `cols` elements (source row stride `ld`) into a dense float block.
template <typename T>
void load_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) to_float(src + r * ld, dst + r * cols, cols);
}

// dst[j] = src[j * stride] as float, for j < n (any stride, 0 included).
template <typename T>
void load_strided(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    to_float(src, dst, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
}

// ---- vectorised row loops (target_clones; see the .cpp)

// s[j] += b[j * bstride] for j < n (bstride 0: one value broadcast).
void add_strided(float* s, const float* b, int64_t bstride, int64_t n);
// max over s[0, n).
float row_max(const float* s, int64_t n);
// s[j] = exp(s[j] - shift); returns the sum of the new values (shift -inf: every value becomes 0).
float exp_shift_sum(float* s, int64_t n, float shift);
// y[j] *= a.
void scale_row(float* y, int64_t n, float a);
// sum_j x[j] * y[j].
float dot(const float* x, const float* y, int64_t n);
// y[j] *= x[j].
void multiply(float* y, const float* x, int64_t n);
// ds[j] = p[j] * (dp[j] - delta).
void softmax_grad_row(const float* p, float* dp, int64_t n, float delta);

// ---- rotary position embedding (flash_attention's rope) and L2 normalisation (Swin V2 cosine attention)

// rot(x) (D floats) into out: interleaved pairs [-x1, x0, -x3, x2, ...], or halves [-x[D/2:], x[:D/2]].
// Its adjoint is -rot.
void rope_rotate_pairs(const float* x, float* out, int64_t D, bool rotate_half);
// x = x * c + rot(x) * s in place (one row of D floats); work: D floats.
void rope_rotate(float* x, const float* c, const float* s, int64_t D, bool rotate_half, float* work);
// g, the gradient of a rotated row, becomes that of the row before the rotation, in place:
// g = g * c - rot(g * s) (the adjoint); work: 2 D floats.
void rope_rotate_back(float* g, const float* c, const float* s, int64_t D, bool rotate_half, float* work);
// The tables' gradient of one row: dc += g * x, ds += g * rot(x), g the gradient of the rotated row and x the
// row before the rotation; work: D floats.
void rope_table_grad(const float* g, const float* x, float* dc, float* ds, int64_t D, bool rotate_half, float* work);

constexpr float kNormEps = 1e-12f;  // F.normalize's default
// x = x / max(||x||, eps) in place; returns ||x|| (before).
float normalize_row(float* x, int64_t n);
// The adjoint of normalize_row at a row whose normalised value is x_hat and norm `norm`, in place on g:
// (g - x_hat (x_hat . g)) / norm, or g / eps where the norm was clamped (norm <= eps).
void normalize_row_backward(float* g, const float* x_hat, float norm, int64_t n);

// ---- dropout: Philox4x32-10 keyed by the call's seed; element `index` of the (B, H, Nq, Nk) grid (rows
// padded to a multiple of 4) is kept when its uniform is >= p. All four outputs of each draw are used.
struct Dropout {
  bool active = false;
  float p = 0.f, keep_scale = 1.f;
  uint64_t seed = 0, offset = 0;
  // keep[j] = 1/(1-p) (kept) or 0 (dropped) for the n keys of row `row` starting at key `j0`.
  void row_factors(uint64_t row, int64_t row_len, int64_t j0, int64_t n, float* keep) const;
};

// out[o] = sum over the `count` slots s (in index order) of slots[s * slot_stride + o], for o < size.
void sum_slots(const float* slots, int64_t count, int64_t slot_stride, int64_t size, float* out);

// A float scratch block owned by one task (no allocation per task inside the hot loops).
struct Scratch {
  std::vector<float> data;
  float* get(int64_t n) {
    if (static_cast<int64_t>(data.size()) < n) data.resize(n);
    return data.data();
  }
};

}  // namespace cpu
}  // namespace vitkernels
