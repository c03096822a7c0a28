// Causal self-attention over bf16 queries, keys and values with AVX-512 BF16 dot products (VDPBF16PS).
//
// torch 2.13's CPU flash-attention kernel does its bf16 GEMMs through MKL's gemm_bf16bf16f32, which on a
// CPU without AMX that MKL does not treat as Intel runs a generic float32 SGEMM (32 ms for 9 heads x 2048
// tokens x 64 here, ~1/6 of the bf16 rate). This kernel keeps PyTorch's arithmetic: S = Q K^T from exact bf16
// products summed in float32, scaled in float32, an online (flash) softmax in float32 whose probabilities
// are rounded to bf16 (round to nearest even) for P V, again summed in float32, and the row sums taken
// from the float32 probabilities. Only the summation order and exp's last bit differ.
//
// float32 q, k, v take an AVX2/FMA path (attend_block_f32) with the same blocking and work split: S = Q K^T
// and O += P V in float32 FMAs, the same online softmax, nothing rounded. torch's fp32 flash kernel takes
// ~55 ms for 9 heads x 2048 tokens x 64 on a 2-core AVX2 EPYC; the matmuls alone are ~30 ms there.
//
// Layout: q [B, H, L, D], k and v [B, Hkv, L, D] (any strides, the last one 1), H a multiple of Hkv,
// D a multiple of 16 up to 256. Output [B, L, H, D] contiguous (what Transformers' attention returns).
// Work items are (batch, head, block of 64 queries), taken from a shared counter heaviest first, so the
// causal triangle balances over the threads; every output row is computed by one item alone, so the result
// does not depend on the number of threads.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#define OPTQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define OPTQ_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int BQ = 64;  // queries per work item
constexpr int BK = 64;  // keys per block

// Cephes' expf: the clamp, the range reduction x = n ln 2 + r (ln 2 in a high and a low part), and the
// polynomial on r, highest degree first.
constexpr float kExpMin = -87.0f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp on 16 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial), ~1 ulp.
// Inputs below -87 give exp(-87) (callers zero the masked lanes themselves).
OPTQ_BF16 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

OPTQ_BF16 inline __m512bh pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32((int)v);
}

// Keys of one (batch, kv head) as [block][D/2][BK][2] (pairs along D: the S GEMM's B operand) and values as
// [block][BK/2][D][2] (pairs along keys: the P V GEMM's B operand); rows past L are zero.
void pack_kv(const uint16_t* k, int64_t k_row, const uint16_t* v, int64_t v_row, int64_t L, int64_t D,
             uint16_t* kp, uint16_t* vp) {
  const int64_t blocks = (L + BK - 1) / BK;
  std::memset(kp, 0, sizeof(uint16_t) * blocks * BK * D);
  std::memset(vp, 0, sizeof(uint16_t) * blocks * BK * D);
  for (int64_t j = 0; j < L; ++j) {
    const int64_t b = j / BK, jj = j % BK;
    const uint16_t* kr = k + j * k_row;
    const uint16_t* vr = v + j * v_row;
    uint16_t* kb = kp + b * BK * D;
    uint16_t* vb = vp + b * BK * D;
    for (int64_t d = 0; d < D; ++d) {
      kb[((d / 2) * BK + jj) * 2 + (d & 1)] = kr[d];
      vb[((jj / 2) * D + d) * 2 + (jj & 1)] = vr[d];
    }
  }
}

// s[BQ][BK] = q[BQ][D] . kblock^T, four query rows x 64 keys at a time.
OPTQ_BF16 void scores(const uint16_t* q, const uint16_t* kb, int64_t D, int rows, float* s) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D / 2; ++p) {
      const uint16_t* kr = kb + p * BK * 2;
      __m512bh kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kr + c * 32);
      for (int r = 0; r < 4; ++r) {
        __m512bh qp = pair(q + (r0 + r) * D + 2 * p);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qp, kv[c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + (r0 + r) * BK + c * 16, acc[r][c]);
  }
}

// o[BQ][D] += p[BQ][BK] . vblock, four rows x NV*16 output columns at a time.
template <int NV>
OPTQ_BF16 void accumulate(const uint16_t* p, const uint16_t* vb, int64_t D, int64_t d0, int rows, float* o) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][NV];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * D + d0 + c * 16);
    for (int t = 0; t < BK / 2; ++t) {
      const uint16_t* vr = vb + (t * D + d0) * 2;
      __m512bh vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vr + c * 32);
      for (int r = 0; r < 4; ++r) {
        __m512bh pp = pair(p + (r0 + r) * BK + 2 * t);
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pp, vv[c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + (r0 + r) * D + d0 + c * 16, acc[r][c]);
  }
}

// One work item: queries [q0, q0 + BQ) of one head.
OPTQ_BF16 void attend_block(const uint16_t* q, int64_t q_row, const uint16_t* kp, const uint16_t* vp, int64_t L,
                            int64_t D, int64_t q0, float scale, uint16_t* out, int64_t out_row) {
  const int rows = (int)std::min<int64_t>(BQ, L - q0);
  const int rows4 = (rows + 3) / 4 * 4;
  alignas(64) uint16_t qb[BQ * 256];
  alignas(64) float s[BQ * BK];
  alignas(64) uint16_t pb[BQ * BK];
  alignas(64) float o[BQ * 256];
  float m[BQ], l[BQ];
  std::memset(qb, 0, sizeof(uint16_t) * rows4 * D);
  for (int r = 0; r < rows; ++r) std::memcpy(qb + r * D, q + (q0 + r) * q_row, sizeof(uint16_t) * D);
  std::memset(o, 0, sizeof(float) * rows4 * D);
  for (int r = 0; r < BQ; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.0f;
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t last = (q0 + rows - 1) / BK;  // the block holding the last query's own key
  for (int64_t kb = 0; kb <= last; ++kb) {
    const int64_t k0 = kb * BK;
    scores(qb, kp + kb * BK * D, D, rows4, s);
    for (int r = 0; r < rows4; ++r) {
      // keys k0 + j with j < visible are at or before this query
      const int64_t visible = r < rows ? std::min<int64_t>(BK, q0 + r - k0 + 1) : 0;
      __m512 x[4];
      __mmask16 keep[4];
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int c = 0; c < 4; ++c) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, visible - c * 16));
        keep[c] = (__mmask16)(n >= 16 ? 0xFFFF : ((1u << n) - 1));
        x[c] = _mm512_mul_ps(_mm512_loadu_ps(s + r * BK + c * 16), vscale);
        mx = _mm512_mask_max_ps(mx, keep[c], mx, x[c]);
      }
      if (visible <= 0) {  // padding row (or no visible key): contributes nothing, never written out
        std::memset(pb + r * BK, 0, sizeof(uint16_t) * BK);
        continue;
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        x[c] = _mm512_maskz_mov_ps(keep[c], exp_ps(_mm512_sub_ps(x[c], vm)));
        sum = _mm512_add_ps(sum, x[c]);
      }
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
      if (alpha != 1.0f) {
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), va));
      }
      _mm512_storeu_si512(pb + r * BK, (__m512i)_mm512_cvtne2ps_pbh(x[1], x[0]));
      _mm512_storeu_si512(pb + r * BK + 32, (__m512i)_mm512_cvtne2ps_pbh(x[3], x[2]));
    }
    const uint16_t* vb = vp + kb * BK * D;
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) accumulate<4>(pb, vb, D, d0, rows4, o);
    if (d0 + 32 <= D) accumulate<2>(pb, vb, D, d0, rows4, o), d0 += 32;
    if (d0 < D) accumulate<1>(pb, vb, D, d0, rows4, o);
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    uint16_t* dst = out + (q0 + r) * out_row;
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256((__m256i*)(dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), inv)));
  }
}


// Runs attend(b, h, kv head, first query) for every (batch, head, block of BQ queries), items taken from a
// shared counter heaviest (last) query blocks first, so the causal triangle balances over the threads.
template <typename Attend>
void for_each_item(int64_t B, int64_t H, int64_t Hkv, int64_t L, const Attend& attend) {
  const int64_t qblocks = (L + BQ - 1) / BQ, items = B * H * qblocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < items;) {
      const int64_t qblock = qblocks - 1 - t / (B * H);
      const int64_t bh = t % (B * H), b = bh / H, h = bh % H;
      attend(b, h, h / (H / Hkv), qblock * BQ);
    }
  });
}

// ---- float32 (AVX2 + FMA) ----------------------------------------------------------------------------------

// exp on 8 floats, as exp_ps (Cephes' expf); 2^n is built in the exponent bits (n >= -126 after the clamp).
OPTQ_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

OPTQ_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

OPTQ_AVX2 inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Keys of one (batch, kv head) as [block][D][BK] (keys along the lanes: the S GEMM's B operand); rows past
// L are zero. Values are read in place ([L][D] rows: the P V GEMM's B operand already).
void pack_k_f32(const float* k, int64_t k_row, int64_t L, int64_t D, float* kp) {
  const int64_t blocks = (L + BK - 1) / BK;
  std::memset(kp, 0, sizeof(float) * blocks * BK * D);
  for (int64_t j = 0; j < L; ++j) {
    float* kb = kp + (j / BK) * BK * D + j % BK;
    const float* kr = k + j * k_row;
    for (int64_t d = 0; d < D; ++d) kb[d * BK] = kr[d];
  }
}

// s[rows][BK] = q[rows][D] . kblock^T, four query rows x 16 keys at a time.
OPTQ_AVX2 void scores_f32(const float* q, const float* kb, int64_t D, int rows, float* s) {
  for (int r0 = 0; r0 < rows; r0 += 4)
    for (int c0 = 0; c0 < BK; c0 += 16) {
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m256 k0 = _mm256_loadu_ps(kb + d * BK + c0), k1 = _mm256_loadu_ps(kb + d * BK + c0 + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 qv = _mm256_broadcast_ss(q + (r0 + r) * D + d);
          acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(s + (r0 + r) * BK + c0, acc[r][0]);
        _mm256_storeu_ps(s + (r0 + r) * BK + c0 + 8, acc[r][1]);
      }
    }
}

// o[rows][D] += p[rows][BK] . v[keys k0 .. k0 + n), four rows x 16 output columns at a time.
OPTQ_AVX2 void accumulate_f32(const float* p, const float* v, int64_t v_row, int n, int64_t D, int rows, float* o) {
  for (int r0 = 0; r0 < rows; r0 += 4)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) {
        acc[r][0] = _mm256_loadu_ps(o + (r0 + r) * D + d0);
        acc[r][1] = _mm256_loadu_ps(o + (r0 + r) * D + d0 + 8);
      }
      for (int t = 0; t < n; ++t) {
        const float* vr = v + t * v_row + d0;
        const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 pv = _mm256_broadcast_ss(p + (r0 + r) * BK + t);
          acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(o + (r0 + r) * D + d0, acc[r][0]);
        _mm256_storeu_ps(o + (r0 + r) * D + d0 + 8, acc[r][1]);
      }
    }
}

// One work item: queries [q0, q0 + BQ) of one head, float32 throughout.
OPTQ_AVX2 void attend_block_f32(const float* q, int64_t q_row, const float* kp, const float* v, int64_t v_row,
                                int64_t L, int64_t D, int64_t q0, float scale, float* out, int64_t out_row) {
  const int rows = (int)std::min<int64_t>(BQ, L - q0);
  const int rows4 = (rows + 3) / 4 * 4;
  alignas(64) float qb[BQ * 256];
  alignas(64) float s[BQ * BK];
  alignas(64) float o[BQ * 256];
  float m[BQ], l[BQ];
  std::memset(qb, 0, sizeof(float) * rows4 * D);
  for (int r = 0; r < rows; ++r) std::memcpy(qb + r * D, q + (q0 + r) * q_row, sizeof(float) * D);
  std::memset(o, 0, sizeof(float) * rows4 * D);
  for (int r = 0; r < BQ; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.0f;
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t last = (q0 + rows - 1) / BK;  // the block holding the last query's own key
  for (int64_t kb = 0; kb <= last; ++kb) {
    const int64_t k0 = kb * BK;
    const int n = (int)std::min<int64_t>(BK, L - k0);
    scores_f32(qb, kp + kb * BK * D, D, rows4, s);
    for (int r = 0; r < rows4; ++r) {
      // keys k0 + j with j < visible are at or before this query
      const int64_t visible = r < rows ? std::min<int64_t>(BK, q0 + r - k0 + 1) : 0;
      float* sr = s + r * BK;
      if (visible <= 0) {  // padding row (or no visible key): contributes nothing, never written out
        std::memset(sr, 0, sizeof(float) * BK);
        continue;
      }
      __m256 x[BK / 8], keep[BK / 8];
      __m256 mx = ninf;
      for (int c = 0; c < BK / 8; ++c) {
        keep[c] = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(visible - c * 8)), _CMP_LT_OQ);
        x[c] = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sr + c * 8), vscale), keep[c]);
        mx = _mm256_max_ps(mx, x[c]);
      }
      const float m_new = std::max(m[r], hmax8(mx));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
      const __m256 vm = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int c = 0; c < BK / 8; ++c) {
        x[c] = _mm256_and_ps(keep[c], exp8(_mm256_sub_ps(x[c], vm)));
        sum = _mm256_add_ps(sum, x[c]);
        _mm256_storeu_ps(sr + c * 8, x[c]);
      }
      l[r] = l[r] * alpha + hsum8(sum);
      m[r] = m_new;
      if (alpha != 1.0f) {
        const __m256 va = _mm256_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), va));
      }
    }
    // keys past the last query's own are zero in every row's p: only the visible span is read
    const int span = (int)std::min<int64_t>(n, q0 + rows - k0);
    accumulate_f32(s, v + k0 * v_row, v_row, span, D, rows4, o);
  }
  for (int r = 0; r < rows; ++r) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
    float* dst = out + (q0 + r) * out_row;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), inv));
  }
}

at::Tensor causal_attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  auto out = at::empty({B, L, H, D}, q.options());
  if (L == 0 || B == 0 || H == 0) return out;
  const int64_t blocks = (L + BK - 1) / BK;
  std::vector<float> kp((size_t)(B * Hkv * blocks * BK * D));
  const auto* qd = q.data_ptr<float>();
  const auto* kd = k.data_ptr<float>();
  const auto* vd = v.data_ptr<float>();
  auto* od = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      pack_k_f32(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), L, D, kp.data() + i * blocks * BK * D);
    }
  });
  for_each_item(B, H, Hkv, L, [&](int64_t b, int64_t h, int64_t hk, int64_t q0) {
    attend_block_f32(qd + b * q.stride(0) + h * q.stride(1), q.stride(2),
                     kp.data() + (b * Hkv + hk) * blocks * BK * D, vd + b * v.stride(0) + hk * v.stride(1),
                     v.stride(2), L, D, q0, (float)scale, od + b * L * H * D + h * D, H * D);
  });
  return out;
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attention: q, k, v must be [B, H, L, D]");
  const bool f32 = q.scalar_type() == at::kFloat;
  TORCH_CHECK((q.scalar_type() == at::kBFloat16 || f32) && k.scalar_type() == q.scalar_type() &&
              v.scalar_type() == q.scalar_type(), "causal_attention: q, k, v must all be bfloat16 or all float32");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(2) == L && v.size(2) == L &&
              k.size(3) == D && v.size(3) == D, "causal_attention: k and v must be [B, Hkv, L, D] like q");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "causal_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(D % 16 == 0 && D <= 256, "causal_attention: head dim must be a multiple of 16 up to 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "causal_attention: last dim must be contiguous");
  if (f32) return causal_attention_f32(q, k, v, scale);
  auto out = at::empty({B, L, H, D}, q.options());
  if (L == 0 || B == 0 || H == 0) return out;
  const int64_t blocks = (L + BK - 1) / BK;
  std::vector<uint16_t> kp((size_t)(B * Hkv * blocks * BK * D)), vp(kp.size());
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      pack_kv(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), vd + b * v.stride(0) + h * v.stride(1),
              v.stride(2), L, D, kp.data() + i * blocks * BK * D, vp.data() + i * blocks * BK * D);
    }
  });
  for_each_item(B, H, Hkv, L, [&](int64_t b, int64_t h, int64_t hk, int64_t q0) {
    const int64_t packed = (b * Hkv + hk) * blocks * BK * D;
    attend_block(qd + b * q.stride(0) + h * q.stride(1), q.stride(2), kp.data() + packed, vp.data() + packed, L, D,
                 q0, (float)scale, od + b * L * H * D + h * D, H * D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optq_native, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(optq_native, CPU, m) {
  m.impl("causal_attention", causal_attention);
}
