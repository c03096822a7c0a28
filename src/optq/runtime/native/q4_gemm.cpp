// optq native CPU kernels: bf16 (AVX-512 BF16 dot products) or float32 (AVX-512 or AVX2 FMA) activations x
// 4-bit codes (q4_gemm), and float32 FMAs on 8-bit codes (q8_gemm).
//
// Packed weight layout, per tile of 64 outputs: [n_tile][k_quad][sub][32 bytes], sub = 16-output subtile.
// Byte 2*i + e of a subtile holds code(k = 4q + e, n = 16 sub + i) in its low nibble and
// code(k = 4q + 2 + e, n) in its high nibble, so one zero-extension to 16-bit lanes and a mask (or a shift)
// gives the 32 (output, k-pair) values VDPBF16PS multiplies with a broadcast pair of activations.
// A code c in [0, 15] OR 0x4300 is exactly bf16(128 + c), so no conversion instruction is needed:
//   sum_k x_k s (c_k - z) = s * (sum_k x_k (128 + c_k) - (z + 128) sum_k x_k)   (per group, per output).
// scale[n_tile][g][64] = s and zp[n_tile][g][64] = z + 128 are float32; group g spans k in
// [starts[g], starts[g + 1]), every start a multiple of 4.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

// The library is compiled for AVX2 + FMA (the least a CPU needs to load it); the AVX-512 kernels ask for
// AVX-512 themselves and run only where the CPU has it (gemm checks; bf16 activations: the caller checks for
// AVX-512 BF16), so one build serves every CPU from AVX2 up.
#define OPTQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define OPTQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

#ifndef OPTQ_PREFETCH
#define OPTQ_PREFETCH 1024  // bytes ahead in a tile's weight stream
#endif

namespace {

constexpr int TILE_N = 64;

OPTQ_BF16 inline __m512i unpack_lo(__m256i b) {
  __m512i w = _mm512_cvtepu8_epi16(b);
  return _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000F)), _mm512_set1_epi16(0x4300));
}
OPTQ_BF16 inline __m512i unpack_hi(__m256i b) {
  __m512i w = _mm512_cvtepu8_epi16(b);
  return _mm512_or_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi16(0x4300));
}
OPTQ_BF16 inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
OPTQ_BF16 inline __m512bh bcast_pair(const uint16_t* x) {
  uint32_t v;
  std::memcpy(&v, x, 4);
  return (__m512bh)_mm512_set1_epi32((int)v);
}

// Rows [m0, m0 + MB) of x against one 64-output tile; out_f is [MB][64] float.
template <int MB>
OPTQ_BF16 void tile_kernel(const uint16_t* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zp,
                 const int32_t* starts, int64_t groups, const float* xsum, int64_t ldxs, float* out_f) {
  __m512 out[MB][4];
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) out[r][s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][4][2];
    for (int r = 0; r < MB; ++r)
      for (int s = 0; s < 4; ++s) acc[r][s][0] = acc[r][s][1] = _mm512_setzero_ps();
    for (int64_t q = starts[g] / 4; q < starts[g + 1] / 4; ++q) {
      const uint8_t* wq = w + q * 128;
      _mm_prefetch((const char*)(wq + OPTQ_PREFETCH), _MM_HINT_T0);
      __m512bh xa[MB], xb[MB];
      for (int r = 0; r < MB; ++r) {
        xa[r] = bcast_pair(x + r * ldx + 4 * q);
        xb[r] = bcast_pair(x + r * ldx + 4 * q + 2);
      }
      for (int s = 0; s < 4; ++s) {
        __m256i b = _mm256_loadu_si256((const __m256i*)(wq + 32 * s));
        __m512bh lo = as_bh(unpack_lo(b)), hi = as_bh(unpack_hi(b));
        for (int r = 0; r < MB; ++r) {
          acc[r][s][0] = _mm512_dpbf16_ps(acc[r][s][0], lo, xa[r]);
          acc[r][s][1] = _mm512_dpbf16_ps(acc[r][s][1], hi, xb[r]);
        }
      }
    }
    const float* sg = scale + g * TILE_N;
    const float* zg = zp + g * TILE_N;
    for (int r = 0; r < MB; ++r) {
      __m512 xs = _mm512_set1_ps(xsum[r * ldxs + g]);
      for (int s = 0; s < 4; ++s) {
        __m512 dot = _mm512_add_ps(acc[r][s][0], acc[r][s][1]);
        __m512 v = _mm512_fnmadd_ps(_mm512_loadu_ps(zg + 16 * s), xs, dot);
        out[r][s] = _mm512_fmadd_ps(_mm512_loadu_ps(sg + 16 * s), v, out[r][s]);
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) _mm512_storeu_ps(out_f + r * TILE_N + 16 * s, out[r][s]);
}

// Float32 activations: codes widened to int32 lanes and converted, one FMA per weight. In the 16 dwords of a
// zero-extended subtile, dword i = byte(2i) | byte(2i + 1) << 16, so k = 4q, 4q+1, 4q+2, 4q+3 sit at bit
// offsets 0, 16, 4, 20. Group sums use the codes themselves: s * (sum_k x_k c_k - z sum_k x_k), z = zp - 128.
template <int MB>
OPTQ_AVX512 void tile_kernel_f32(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zp,
                     const int32_t* starts, int64_t groups, const float* xsum, int64_t ldxs, float* out_f) {
  const __m512i nib = _mm512_set1_epi32(0xF);
  const __m512 off = _mm512_set1_ps(128.f);
  __m512 out[MB][4];
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) out[r][s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][4][2];
    for (int r = 0; r < MB; ++r)
      for (int s = 0; s < 4; ++s) acc[r][s][0] = acc[r][s][1] = _mm512_setzero_ps();
    for (int64_t q = starts[g] / 4; q < starts[g + 1] / 4; ++q) {
      const uint8_t* wq = w + q * 128;
      _mm_prefetch((const char*)(wq + OPTQ_PREFETCH), _MM_HINT_T0);
      for (int s = 0; s < 4; ++s) {
        __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wq + 32 * s)));
        __m512 c0 = _mm512_cvtepi32_ps(_mm512_and_si512(d, nib));
        __m512 c1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 16), nib));
        __m512 c2 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 4), nib));
        __m512 c3 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, 20), nib));
        for (int r = 0; r < MB; ++r) {
          const float* xr = x + r * ldx + 4 * q;
          acc[r][s][0] = _mm512_fmadd_ps(_mm512_set1_ps(xr[0]), c0, acc[r][s][0]);
          acc[r][s][1] = _mm512_fmadd_ps(_mm512_set1_ps(xr[1]), c1, acc[r][s][1]);
          acc[r][s][0] = _mm512_fmadd_ps(_mm512_set1_ps(xr[2]), c2, acc[r][s][0]);
          acc[r][s][1] = _mm512_fmadd_ps(_mm512_set1_ps(xr[3]), c3, acc[r][s][1]);
        }
      }
    }
    const float* sg = scale + g * TILE_N;
    const float* zg = zp + g * TILE_N;
    for (int r = 0; r < MB; ++r) {
      __m512 xs = _mm512_set1_ps(xsum[r * ldxs + g]);
      for (int s = 0; s < 4; ++s) {
        __m512 dot = _mm512_add_ps(acc[r][s][0], acc[r][s][1]);
        __m512 z = _mm512_sub_ps(_mm512_loadu_ps(zg + 16 * s), off);
        __m512 v = _mm512_fnmadd_ps(z, xs, dot);
        out[r][s] = _mm512_fmadd_ps(_mm512_loadu_ps(sg + 16 * s), v, out[r][s]);
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) _mm512_storeu_ps(out_f + r * TILE_N + 16 * s, out[r][s]);
}

// 8-bit codes: per tile, [K][64] bytes (one per output), widened to int32 lanes and converted; one FMA per
// weight with float32 activations (bf16 ones are widened once per call). Bound by memory at one byte/weight.
template <int MB>
OPTQ_AVX512 void tile_kernel_u8(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zp,
                    const int32_t* starts, int64_t groups, const float* xsum, int64_t ldxs, float* out_f) {
  const __m512 off = _mm512_set1_ps(128.f);
  __m512 out[MB][4];
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) out[r][s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][4][2];
    for (int r = 0; r < MB; ++r)
      for (int s = 0; s < 4; ++s) acc[r][s][0] = acc[r][s][1] = _mm512_setzero_ps();
    for (int64_t k = starts[g]; k < starts[g + 1]; k += 2) {
      const uint8_t* wk = w + k * TILE_N;
      _mm_prefetch((const char*)(wk + OPTQ_PREFETCH), _MM_HINT_T0);
      for (int s = 0; s < 4; ++s) {
        __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wk + 16 * s))));
        __m512 c1 = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wk + TILE_N + 16 * s))));
        for (int r = 0; r < MB; ++r) {
          const float* xr = x + r * ldx + k;
          acc[r][s][0] = _mm512_fmadd_ps(_mm512_set1_ps(xr[0]), c0, acc[r][s][0]);
          acc[r][s][1] = _mm512_fmadd_ps(_mm512_set1_ps(xr[1]), c1, acc[r][s][1]);
        }
      }
    }
    const float* sg = scale + g * TILE_N;
    const float* zg = zp + g * TILE_N;
    for (int r = 0; r < MB; ++r) {
      __m512 xs = _mm512_set1_ps(xsum[r * ldxs + g]);
      for (int s = 0; s < 4; ++s) {
        __m512 dot = _mm512_add_ps(acc[r][s][0], acc[r][s][1]);
        __m512 z = _mm512_sub_ps(_mm512_loadu_ps(zg + 16 * s), off);
        out[r][s] = _mm512_fmadd_ps(_mm512_loadu_ps(sg + 16 * s), _mm512_fnmadd_ps(z, xs, dot), out[r][s]);
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int s = 0; s < 4; ++s) _mm512_storeu_ps(out_f + r * TILE_N + 16 * s, out[r][s]);
}

// AVX2 (8 float lanes, 16 registers): the tile is taken in two halves of 32 outputs, vector v of half h
// holding outputs 32h + 8v .. +7. For 4-bit codes those are the 16 bytes at 32 (2h + v/2) + 16 (v % 2) of a
// k-quad's 128: zero-extended to 16-bit lanes they give the dword layout of tile_kernel_f32 (k = 4q .. 4q+3 at
// bit offsets 0, 16, 4, 20). For 8-bit codes, the 8 bytes at 32h + 8v of a row. One row keeps two
// accumulators per vector (8 FMA chains), two rows one each; out_f accumulates over the groups.
// One group's half tile into out_f: out += s * (sum x c - (zp - 128) sum x), per row r and vector v.
template <int MB, int A>
inline void add_group_avx2(__m256 (&acc)[MB][4][A], const float* sg, const float* zg, const float* xsum,
                           int64_t ldxs, float* out_f) {
  const __m256 off = _mm256_set1_ps(128.f);
  for (int r = 0; r < MB; ++r) {
    __m256 xs = _mm256_set1_ps(xsum[r * ldxs]);
    for (int v = 0; v < 4; ++v) {
      __m256 dot = A == 2 ? _mm256_add_ps(acc[r][v][0], acc[r][v][A - 1]) : acc[r][v][0];
      __m256 z = _mm256_sub_ps(_mm256_loadu_ps(zg + 8 * v), off);
      float* o = out_f + r * TILE_N + 8 * v;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(sg + 8 * v), _mm256_fnmadd_ps(z, xs, dot),
                                          _mm256_loadu_ps(o)));
    }
  }
}

template <int MB>
void tile_kernel_f32_avx2(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zp,
                          const int32_t* starts, int64_t groups, const float* xsum, int64_t ldxs, float* out_f) {
  constexpr int A = MB == 1 ? 2 : 1;
  const __m256i nib = _mm256_set1_epi32(0xF);
  std::memset(out_f, 0, sizeof(float) * MB * TILE_N);
  for (int64_t g = 0; g < groups; ++g) {
    for (int h = 0; h < 2; ++h) {
      __m256 acc[MB][4][A];
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < 4; ++v)
          for (int a = 0; a < A; ++a) acc[r][v][a] = _mm256_setzero_ps();
      for (int64_t q = starts[g] / 4; q < starts[g + 1] / 4; ++q) {
        const uint8_t* wq = w + q * 128 + 64 * h;
        _mm_prefetch((const char*)(wq + OPTQ_PREFETCH), _MM_HINT_T0);
        for (int v = 0; v < 4; ++v) {
          __m256i d = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wq + 16 * v)));
          __m256 c0 = _mm256_cvtepi32_ps(_mm256_and_si256(d, nib));
          __m256 c1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 16), nib));
          __m256 c2 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 4), nib));
          __m256 c3 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 20), nib));
          for (int r = 0; r < MB; ++r) {
            const float* xr = x + r * ldx + 4 * q;
            acc[r][v][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr), c0, acc[r][v][0]);
            acc[r][v][A - 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), c1, acc[r][v][A - 1]);
            acc[r][v][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 2), c2, acc[r][v][0]);
            acc[r][v][A - 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 3), c3, acc[r][v][A - 1]);
          }
        }
      }
      add_group_avx2<MB, A>(acc, scale + g * TILE_N + 32 * h, zp + g * TILE_N + 32 * h, xsum + g, ldxs,
                            out_f + 32 * h);
    }
  }
}

template <int MB>
void tile_kernel_u8_avx2(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zp,
                         const int32_t* starts, int64_t groups, const float* xsum, int64_t ldxs, float* out_f) {
  constexpr int A = MB == 1 ? 2 : 1;
  std::memset(out_f, 0, sizeof(float) * MB * TILE_N);
  for (int64_t g = 0; g < groups; ++g) {
    for (int h = 0; h < 2; ++h) {
      __m256 acc[MB][4][A];
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < 4; ++v)
          for (int a = 0; a < A; ++a) acc[r][v][a] = _mm256_setzero_ps();
      for (int64_t k = starts[g]; k < starts[g + 1]; k += 2) {
        const uint8_t* wk = w + k * TILE_N + 32 * h;
        _mm_prefetch((const char*)(wk + OPTQ_PREFETCH), _MM_HINT_T0);
        for (int v = 0; v < 4; ++v) {
          __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wk + 8 * v))));
          __m256 c1 = _mm256_cvtepi32_ps(
              _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wk + TILE_N + 8 * v))));
          for (int r = 0; r < MB; ++r) {
            const float* xr = x + r * ldx + k;
            acc[r][v][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr), c0, acc[r][v][0]);
            acc[r][v][A - 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), c1, acc[r][v][A - 1]);
          }
        }
      }
      add_group_avx2<MB, A>(acc, scale + g * TILE_N + 32 * h, zp + g * TILE_N + 32 * h, xsum + g, ldxs,
                            out_f + 32 * h);
    }
  }
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

OPTQ_BF16 void store_bf16(uint16_t* dst, const float* src) {
  for (int s = 0; s < 4; ++s)
    _mm256_storeu_si256((__m256i*)(dst + 16 * s), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(src + 16 * s)));
}

// x: [M, K] bf16 or float32, contiguous; packed: [N/64, K/4, 128] uint8 (4-bit) or [N/64, K, 64] (8-bit); scale, zp: [N/64, G, 64] float32;
// starts: [G + 1] int32. Returns [M, N] bf16.
at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zp,
                const at::Tensor& starts, int bits) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == at::kFloat) && x.dim() == 2 && x.is_contiguous(),
              "x: contiguous 2-D bf16 or float32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(), "packed");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zp.scalar_type() == at::kFloat, "scale/zp float32");
  TORCH_CHECK(starts.scalar_type() == at::kInt && starts.dim() == 1, "starts int32");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), G = starts.size(0) - 1;
  if (bits == 4) {
    TORCH_CHECK(packed.size(1) * 4 == K && packed.size(2) == 128, "packed shape does not match x");
  } else {
    TORCH_CHECK(packed.size(1) == K && packed.size(2) == TILE_N, "packed shape does not match x");
  }
  TORCH_CHECK(scale.size(0) == tiles && scale.size(1) == G && scale.size(2) == TILE_N, "scale shape");
  TORCH_CHECK(zp.sizes() == scale.sizes(), "zp shape");
  const int32_t* st = starts.data_ptr<int32_t>();
  TORCH_CHECK(st[0] == 0 && st[G] == K, "group starts must cover [0, K)");
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(st[g] % 4 == 0 && st[g] <= st[g + 1], "group starts");
  // Per-row, per-group activation sums (float32), the zero-point term's other factor.
  const at::Tensor xf = bf16 ? x.to(at::kFloat) : x;
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
  {
    const float* xp = xf.data_ptr<float>();
    float* sp = xsum.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t k = st[g]; k < st[g + 1]; ++k) acc += xp[m * K + k];
        sp[m * G + g] = acc;
      }
  }
  const int64_t N = tiles * TILE_N;
  const bool avx512 = has_avx512();
  TORCH_CHECK(avx512 || !bf16, "bf16 activations need AVX-512 BF16");
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zpp = zp.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float buf[2 * TILE_N];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = wp + t * K * (bits == 4 ? 32 : TILE_N);
      const float* stile = sp + t * G * TILE_N;
      const float* ztile = zpp + t * G * TILE_N;
      for (int64_t m = 0; m < M;) {
        const int rows = M - m >= 2 ? 2 : 1;
        if (bits == 8) {
          const float* xp = xf.data_ptr<float>() + m * K;
          if (!avx512 && rows == 2) tile_kernel_u8_avx2<2>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else if (!avx512) tile_kernel_u8_avx2<1>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else if (rows == 2) tile_kernel_u8<2>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else tile_kernel_u8<1>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          for (int r = 0; r < rows; ++r) {
            if (bf16) store_bf16((uint16_t*)y.data_ptr() + (m + r) * N + t * TILE_N, buf + r * TILE_N);
            else std::memcpy(y.data_ptr<float>() + (m + r) * N + t * TILE_N, buf + r * TILE_N, TILE_N * 4);
          }
        } else if (bf16) {
          const uint16_t* xp = (const uint16_t*)x.data_ptr() + m * K;
          if (rows == 2) tile_kernel<2>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else tile_kernel<1>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          for (int r = 0; r < rows; ++r)
            store_bf16((uint16_t*)y.data_ptr() + (m + r) * N + t * TILE_N, buf + r * TILE_N);
        } else {
          const float* xp = xf.data_ptr<float>() + m * K;
          if (!avx512 && rows == 2) tile_kernel_f32_avx2<2>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else if (!avx512) tile_kernel_f32_avx2<1>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else if (rows == 2) tile_kernel_f32<2>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          else tile_kernel_f32<1>(xp, K, wt, stile, ztile, st, G, xsp + m * G, G, buf);
          for (int r = 0; r < rows; ++r)
            std::memcpy(y.data_ptr<float>() + (m + r) * N + t * TILE_N, buf + r * TILE_N, TILE_N * sizeof(float));
        }
        m += rows;
      }
    }
  });
  return y;
}

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zp,
                   const at::Tensor& starts) {
  return gemm(x, packed, scale, zp, starts, 4);
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zp,
                   const at::Tensor& starts) {
  return gemm(x, packed, scale, zp, starts, 8);
}

// The dense bfloat16 weight [tiles * 64, K] (output rows, input columns in the kernel's order) of a q4_gemm
// layout: w = s * (c + 128 - zp), the checkpoint's s * (c - z) exactly in float32, then rounded to bf16. For
// prompts on CPUs whose bf16 matmuls are fast (AMX): one dequantization per call and PyTorch's matmul beat
// q4_gemm's per-row work there.
at::Tensor q4_dequant(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zp,
                      const at::Tensor& starts) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 128, "packed layout");
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zp.is_contiguous(), "contiguous tensors");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zp.scalar_type() == at::kFloat, "scale/zp float32");
  TORCH_CHECK(starts.scalar_type() == at::kInt && starts.dim() == 1, "starts int32");
  const int64_t tiles = packed.size(0), K = packed.size(1) * 4, G = starts.size(0) - 1;
  TORCH_CHECK(scale.size(0) == tiles && scale.size(1) == G && scale.size(2) == TILE_N, "scale shape");
  TORCH_CHECK(zp.sizes() == scale.sizes(), "zp shape");
  const int32_t* st = starts.data_ptr<int32_t>();
  TORCH_CHECK(st[0] == 0 && st[G] == K, "group starts must cover [0, K)");
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(st[g] % 4 == 0 && st[g] <= st[g + 1], "group starts");
  at::Tensor w = at::empty({tiles * TILE_N, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zpp = zp.data_ptr<float>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, tiles * TILE_N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = n / TILE_N, j = n % TILE_N, sub = j / 16, i = j % 16;
      const uint8_t* wt = wp + t * K * 32 + sub * 32 + 2 * i;
      at::BFloat16* row = out + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const float s = sp[(t * G + g) * TILE_N + j], z = zpp[(t * G + g) * TILE_N + j] - 128.f;
        for (int64_t q = st[g] / 4; q < st[g + 1] / 4; ++q) {
          for (int e = 0; e < 2; ++e) {
            const uint8_t b = wt[q * 128 + e];
            row[4 * q + e] = at::BFloat16(s * (float(b & 15) - z));
            row[4 * q + 2 + e] = at::BFloat16(s * (float(b >> 4) - z));
          }
        }
      }
    }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(optq_native, m) {
  m.def("q4_gemm(Tensor x, Tensor packed, Tensor scale, Tensor zp, Tensor starts) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor packed, Tensor scale, Tensor zp, Tensor starts) -> Tensor");
  m.def("q4_dequant(Tensor packed, Tensor scale, Tensor zp, Tensor starts) -> Tensor");
}
TORCH_LIBRARY_IMPL(optq_native, CPU, m) {
  m.impl("q4_gemm", &q4_gemm);
  m.impl("q8_gemm", &q8_gemm);
  m.impl("q4_dequant", &q4_dequant);
}
