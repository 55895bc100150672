// Grouped int8 linear on the CPU: out[M, N] = x[M, K] @ W^T (x float32 or bfloat16, widened
// exactly; out float32, or bfloat16 rounded to nearest even at the end), where W is
// kept as int8 values q with one scale d (and optionally one offset m) per row and group
// of G = 16 or 32 input columns:
//   W[n, k] = q[n, k] * d[n, k / G] (+ m[n, k / G]).
// This holds GGUF's Q8_0 as stored (ggml-common.h, block_q8_0: G = 32, d float16), and,
// with q re-read from their blocks without loss (argosy.runtime.quantization.q8_0), Q5_0
// (q - 16, d), Q5_1 (q, d, m), Q5_K (q, d*sc, -dmin*mn per 32) and Q6_K (q - 32, d*sc per
// 16). The gguf package's dequantizer is the test oracle. Products and sums in float32
// (only a bfloat16 output is rounded).
//
// Layout (argosy.runtime.quantization.q8_0.PackedQ8.pack): rows in tiles of 16,
//   w      [N16 / 16][K][16] int8       (16 consecutive rows side by side per input column)
//   scales [N16 / 16][K / G][16] float16 bits (uint16) or float32
//   mins   same as scales, or null
// so one 16-lane vector holds the 16 rows of a tile for one input column: an output tile
// is 16 lanes wide and needs no horizontal sums. Rows past N (padding) are zero and never
// stored. Per group each row of x accumulates t (float32), then acc += t * d (+ m * sum of
// the group's x, computed once per call). OpenMP over tiles; up to 8 rows of x share each
// converted weight vector.
//
// Or, for the 5/6-bit integers of Q5_x / Q6_K (lowbit.h), w is [N16 / 16][K / 4][32] uint8
// nibbles with hb [N16 / 16][P][K] uint16 high-bit planes (P = 1 or 2), unsigned or two's
// complement: the kernel decodes four columns at a time in registers to the same int8
// values, so both layouts give the same results bit for bit (the same sums in the same
// order), while a step streams 5/8 or 6/8 of the bytes.
//
// Returns 0, 1 when K is not a multiple of G, 2 when G is neither 16 nor 32, 3 when P is not
// 0 (the int8 layout), 1 or 2.

#include <stdint.h>
#include <string.h>

#include <vector>

#include "lowbit.h"

#if defined(ARGOSY_LOWBIT_AVX512)

#ifndef PREFETCH
#define PREFETCH 4096
#endif


template <bool F16>
static inline __m512 load16(const void* p, int64_t i) {
  if (F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
  return _mm512_loadu_ps((const float*)p + i);
}

// U independent partial sums per row of x (columns kk, kk + 1, ... taken in turn), so that
// with few rows the FMA latency chain does not bound the loop: one row alone measured 7.8
// GB/s of weights per core with a single chain. P = 0: int8 layout; 1, 2: the 5/6-bit one
// (columns decoded two at a time, summed in the same order as the int8 layout's).
template <int MB, int G, bool F16, bool MIN, int P>
static inline void tile_rows(const uint8_t* w, const uint16_t* hb, int is_signed, const void* sc, const void* mn,
                             const float* x, const float* xs, int64_t K, float* out, int64_t ldo, __mmask16 keep) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  constexpr int STEP = P == 0 ? U : 4;            // columns per inner iteration (U divides 4)
  constexpr int64_t COL_BYTES = P == 0 ? 16 : 8;  // weight bytes per input column
  const int64_t groups = K / G;
  __m256i add[2];
  if (P) lowbit_adds(P, is_signed, add);
  __m512 acc[MB];
  for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m512 t[MB * U];
    for (int i = 0; i < MB * U; i++) t[i] = _mm512_setzero_ps();
    const uint8_t* wg = w + g * G * COL_BYTES;
    const float* xg = x + g * G;
    // A hint only: on x86 a prefetch never faults, so running past the weight's end on the
    // last tiles is harmless (the address is formed as an integer, not a pointer).
    for (int l = 0; l < G * COL_BYTES; l += 64)
      _mm_prefetch((const char*)((uintptr_t)wg + PREFETCH + l), _MM_HINT_T0);
    for (int p = 0; p < P; p++)  // the planes advance 2 bytes a column against the nibbles' 8
      _mm_prefetch((const char*)((uintptr_t)(hb + p * K + g * G) + PREFETCH / 4), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int kk = 0; kk < G; kk += STEP) {
      if (P == 0) {
        for (int u = 0; u < U; u++) {
          __m512 wv = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wg + (kk + u) * 16))));
          for (int i = 0; i < MB; i++)
            t[i * U + u] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xg[i * K + kk + u]), t[i * U + u]);
        }
      } else {
        __m256i a8, b8;  // columns kk, kk + 1 | kk + 2, kk + 3
        lowbit_quad<P ? P : 1>(wg + kk * 8, hb, K, g * G + kk, add, a8, b8);
        const __m512 wv[4] = {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(a8))),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(a8, 1))),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b8))),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b8, 1)))};
        for (int c = 0; c < 4; c++)
          for (int i = 0; i < MB; i++)
            t[i * U + c % U] = _mm512_fmadd_ps(wv[c], _mm512_set1_ps(xg[i * K + kk + c]), t[i * U + c % U]);
      }
    }
    const __m512 d = load16<F16>(sc, g * 16);
    for (int i = 0; i < MB; i++) {
      __m512 ti = t[i * U];
      for (int u = 1; u < U; u++) ti = _mm512_add_ps(ti, t[i * U + u]);
      acc[i] = _mm512_fmadd_ps(ti, d, acc[i]);
    }
    if (MIN) {
      const __m512 m = load16<F16>(mn, g * 16);
      for (int i = 0; i < MB; i++) acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i * groups + g]), acc[i]);
    }
  }
  for (int i = 0; i < MB; i++) _mm512_mask_storeu_ps(out + i * ldo, keep, acc[i]);
}

template <int G, bool F16, bool MIN, int P>
static void tile_t(const uint8_t* w, const uint16_t* hb, int is_signed, const void* sc, const void* mn, const float* x,
                   const float* xs, int64_t M, int64_t K, float* out, int64_t ldo, int64_t cols) {
  const __mmask16 keep = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
  const int64_t groups = K / G;
  int64_t m = 0;
  for (; m + 8 <= M; m += 8)
    tile_rows<8, G, F16, MIN, P>(w, hb, is_signed, sc, mn, x + m * K, xs + m * groups, K, out + m * ldo, ldo, keep);
  const float* xm = x + m * K;
  const float* xsm = xs + m * groups;
  float* om = out + m * ldo;
  switch (M - m) {
#define ARGOSY_ROWS(R) \
  case R: tile_rows<R, G, F16, MIN, P>(w, hb, is_signed, sc, mn, xm, xsm, K, om, ldo, keep); break;
    ARGOSY_ROWS(1) ARGOSY_ROWS(2) ARGOSY_ROWS(3) ARGOSY_ROWS(4) ARGOSY_ROWS(5) ARGOSY_ROWS(6) ARGOSY_ROWS(7)
#undef ARGOSY_ROWS
    default: break;
  }
}

typedef void (*tile_fn)(const uint8_t*, const uint16_t*, int, const void*, const void*, const float*,
                        const float*, int64_t, int64_t, float*, int64_t, int64_t);

template <int G, bool F16, bool MIN>
static tile_fn pick_p(int P) {
  return P == 0 ? tile_t<G, F16, MIN, 0> : (P == 1 ? tile_t<G, F16, MIN, 1> : tile_t<G, F16, MIN, 2>);
}

static tile_fn pick(int64_t G, bool f16, bool has_min, int P) {
  if (G == 16) {
    if (f16) return has_min ? pick_p<16, true, true>(P) : pick_p<16, true, false>(P);
    return has_min ? pick_p<16, false, true>(P) : pick_p<16, false, false>(P);
  }
  if (f16) return has_min ? pick_p<32, true, true>(P) : pick_p<32, true, false>(P);
  return has_min ? pick_p<32, false, true>(P) : pick_p<32, false, false>(P);
}

#else  // portable code (the compiler vectorizes what it can)

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float value(const void* p, int64_t i, bool f16) {
  return f16 ? half_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

// The group size, scale type and offsets come as arguments (no globals: calls from
// several threads at once stay independent).
static void tile_any(const uint8_t* w, const uint16_t* hb, int P, int is_signed, const void* sc, const void* mn,
                     const float* x, const float* xs, int64_t M, int64_t K, float* out, int64_t ldo, int64_t cols,
                     int64_t G, bool f16) {
  const int64_t groups = K / G;
  for (int64_t m = 0; m < M; m++) {
    float acc[16] = {0};
    for (int64_t g = 0; g < groups; g++) {
      float t[16] = {0};
      for (int64_t kk = 0; kk < G; kk++) {
        const float xv = x[m * K + g * G + kk];
        const int64_t k = g * G + kk;
        for (int j = 0; j < 16; j++)
          t[j] += (float)(P ? lowbit_value(w, hb, P, is_signed, K, k, j) : ((const int8_t*)w)[k * 16 + j]) * xv;
      }
      for (int j = 0; j < 16; j++) {
        acc[j] += t[j] * value(sc, g * 16 + j, f16);
        if (mn) acc[j] += value(mn, g * 16 + j, f16) * xs[m * groups + g];
      }
    }
    for (int64_t j = 0; j < cols && j < 16; j++) out[m * ldo + j] = acc[j];
  }
}

#endif

static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x7FFFFFu)) return (uint16_t)((bits >> 16) | 0x40u);  // NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// x: [M, K] float32, or bfloat16 when x_bf16 (widened exactly); out: [M, N] float32, or
// bfloat16 when out_bf16 (rounded to nearest even at the end, as torch rounds).
// w: int8 [N16 / 16][K][16] (planes 0, hbits unused) or the 5/6-bit layout (planes 1 or 2,
// lowbit.h) with hbits, unsigned or (is_signed) two's complement.
extern "C" int argosy_q8_linear(const void* w_in, const uint16_t* hbits, int planes, int is_signed, const void* scales,
                                const void* mins, int scales_f16, int64_t group, const void* x_in, int x_bf16,
                                void* out_p, int out_bf16, int64_t M, int64_t N, int64_t K) {
  if (group != 16 && group != 32) return 2;
  if (K % group) return 1;
  if (planes < 0 || planes > 2) return 3;
  const uint8_t* w = (const uint8_t*)w_in;
  const int64_t tile_bytes = planes ? K * 8 : K * 16;
  const int64_t groups = K / group;
  std::vector<float> xbuf, obuf;
  const float* x = (const float*)x_in;
  if (x_bf16) {
    xbuf.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) xbuf[i] = bf16_to_float(((const uint16_t*)x_in)[i]);
    x = xbuf.data();
  }
  float* out = (float*)out_p;
  if (out_bf16) {
    obuf.resize(M * N);
    out = obuf.data();
  }
  std::vector<float> xs;  // per row of x, the sum of each group's values (for the offsets)
  if (mins) {
    xs.assign(M * groups, 0.0f);
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < groups; g++) {
        float s = 0.0f;
        for (int64_t kk = 0; kk < group; kk++) s += x[m * K + g * group + kk];
        xs[m * groups + g] = s;
      }
  }
#if defined(ARGOSY_LOWBIT_AVX512)
  const tile_fn fn = pick(group, scales_f16 != 0, mins != nullptr, planes);
#endif
  const float* xsp = mins ? xs.data() : nullptr;
  const int64_t tiles = (N + 15) / 16;
  const int64_t sstride = groups * 16 * (scales_f16 ? 2 : 4);  // bytes of scales per tile
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const char* sc = (const char*)scales + t * sstride;
    const char* mn = mins ? (const char*)mins + t * sstride : nullptr;
#if defined(ARGOSY_LOWBIT_AVX512)
    fn(w + t * tile_bytes, hbits + t * K * planes, is_signed, sc, mn, x, xsp, M, K, out + t * 16, N, N - t * 16);
#else
    tile_any(w + t * tile_bytes, hbits + t * K * planes, planes, is_signed, sc, mn, x, xsp, M, K, out + t * 16, N,
             N - t * 16, group, scales_f16 != 0);
#endif
  }
  if (out_bf16)
    for (int64_t i = 0; i < M * N; i++) ((uint16_t*)out_p)[i] = float_to_bf16(out[i]);
  return 0;
}
