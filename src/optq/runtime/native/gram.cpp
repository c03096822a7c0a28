// X^T X of bf16 calibration activations X [n, d], added into a float32 [d, d] running sum: the GPTQ Hessian's
// accumulation, with AVX-512 BF16 dot products (VDPBF16PS).
//
// The products of bf16 values are exact in float32, so the result is the float32 sum of exact products, as in
// oneDNN's bf16 matmul mode; only the summation order differs (fixed here: tokens in pairs, in order, so the
// result does not depend on the number of threads). Only tiles that touch the upper triangle (j >= i) are
// computed, about half of the full product; the caller mirrors the upper triangle into the lower one.
// On a 2-core EPYC (Zen 4) torch's float32 addmm in bf16 math mode ran this at ~200-290 GFLOP/s of full-product
// work while the bf16 GEMM rate was ~410: it converts and reorders its operands on every call, and a symmetric
// product cannot be asked for.
//
// Layout: the tokens are packed in pairs, P[t/2][j] = (x[t][j], x[t+1][j]) as one 32-bit word (an odd last token
// is paired with zero), columns padded with zeros to a multiple of the tile width. A tile of MR rows x NR
// columns then takes, per pair of tokens, NV vector loads of P's row (the B operand) and MR broadcast words
// (the A operand: the same row of P, at the tile's rows).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <cstring>

#define OPTQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

constexpr int MR = 8;         // rows of a tile
constexpr int NV = 3;         // 16-float vectors across a tile
constexpr int NR = 16 * NV;   // columns of a tile
// Token pairs per pass over a tile. Each pass sums its pairs in registers from zero and adds that partial sum to
// `out`: shorter float32 running sums. Largest error against a float64 sum, relative to the largest entry, for a
// 2048-token window: 1024-pair passes 4.6-5.0e-6, 256-pair 1.2-1.3e-6, 128-pair 3.6-4.5e-7, with no time
// difference measured between them.
constexpr int64_t KB = 128;

// c[MR][NR] = sum over token pairs k0..k1 of P[k][i0 + r] . P[k][j0 + c] (dot products of bf16 pairs).
OPTQ_BF16 void tile(const uint32_t* P, int64_t dp, int64_t k0, int64_t k1, int64_t i0, int64_t j0, float* c) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const uint32_t* row = P + k * dp;
    __m512bh b[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(row + j0 + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)row[i0 + r]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * NR + 16 * v, acc[r][v]);
}

// out[r][0..cols) += c[r][0..cols) for the tile's first mr rows (out's rows `ld` floats apart).
OPTQ_BF16 void add_tile(const float* c, int64_t mr, int64_t cols, float* out, int64_t ld) {
  for (int64_t r = 0; r < mr; ++r) {
    float* o = out + r * ld;
    for (int v = 0; v < NV; ++v) {
      const int64_t left = cols - 16 * v;
      if (left <= 0) break;
      const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, o + 16 * v), _mm512_loadu_ps(c + r * NR + 16 * v));
      _mm512_mask_storeu_ps(o + 16 * v, m, sum);
    }
  }
}

OPTQ_BF16 void gram_upper(const uint16_t* x, int64_t n, int64_t d, int64_t row_stride, float* out) {
  const int64_t dp = (d + NR - 1) / NR * NR;  // a multiple of MR too
  const int64_t pairs = (n + 1) / 2;
  auto packed = at::empty({pairs, dp}, at::kInt);
  auto* P = reinterpret_cast<uint32_t*>(packed.data_ptr());
  at::parallel_for(0, pairs, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* lo = x + 2 * p * row_stride;
      const uint16_t* hi = 2 * p + 1 < n ? lo + row_stride : nullptr;
      uint32_t* dst = P + p * dp;
      for (int64_t j = 0; j < d; ++j) dst[j] = (uint32_t)lo[j] | (hi ? (uint32_t)hi[j] << 16 : 0u);
      for (int64_t j = d; j < dp; ++j) dst[j] = 0;
    }
  });
  // Column strips of NR, heaviest (rightmost: most rows above the diagonal) first, taken from a shared
  // counter; each strip's entries of `out` are written by the one thread that took it.
  const int64_t strips = dp / NR;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    alignas(64) float c[MR * NR];
    for (int64_t s; (s = next.fetch_add(1)) < strips;) {
      const int64_t j0 = (strips - 1 - s) * NR;
      const int64_t rows = std::min(j0 + NR, d);  // rows i < rows have entries j >= i in this strip
      const int64_t cols = std::min<int64_t>(NR, d - j0);
      for (int64_t k0 = 0; k0 < pairs; k0 += KB) {
        const int64_t k1 = std::min(pairs, k0 + KB);
        for (int64_t i0 = 0; i0 < rows; i0 += MR) {
          tile(P, dp, k0, k1, i0, j0, c);
          const int64_t mr = std::min<int64_t>(MR, d - i0);
          add_tile(c, mr, cols, out + i0 * d + j0, d);
        }
      }
    }
  });
}

// out[i, j] += sum_t x[t, i] x[t, j] for every j >= i (and some entries below the diagonal, inside the
// diagonal tiles); returns out.
at::Tensor gram_bf16_(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "gram_bf16_: x must be a bfloat16 [n, d] matrix with contiguous rows");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == d && out.size(1) == d && out.scalar_type() == at::kFloat &&
              out.is_contiguous(), "gram_bf16_: out must be a contiguous float32 [d, d] matrix");
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "gram_bf16_: this CPU has no AVX-512 BF16");
  if (n == 0 || d == 0) return out;
  gram_upper(reinterpret_cast<const uint16_t*>(x.data_ptr()), n, d, x.stride(0), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optq_native, m) {
  m.def("gram_bf16_(Tensor(a!) out, Tensor x) -> Tensor(a!)");
}
TORCH_LIBRARY_IMPL(optq_native, CPU, m) {
  m.impl("gram_bf16_", gram_bf16_);
}
