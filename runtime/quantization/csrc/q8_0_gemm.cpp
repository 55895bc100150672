// Q8_0 linear on the CPU: out[M, N] (float32) = x[M, K] (float32) @ W^T, where W is kept
// in GGUF's Q8_0 form: per row, groups of 32 int8 values q with one float16 scale d,
// W[n, k] = q[n, k] * d[n, k / 32] (ggml-common.h, block_q8_0; the gguf package's
// dequantizer is the test oracle). Nothing is rounded: products and sums in float32.
//
// Layout (argosy.runtime.quantization.q8_0.pack): rows in tiles of 16,
//   w      [N16 / 16][K][16] int8      (16 consecutive rows side by side per input column)
//   scales [N16 / 16][K / 32][16] fp16 (as uint16)
// so one 16-lane vector holds the 16 rows of a tile for one input column: an output tile
// is 16 lanes wide and needs no horizontal sums. Rows past N (padding) are zero and never
// stored. Per group of 32 columns each row block accumulates in t (float32), then
// acc += t * d. OpenMP over tiles; up to 8 rows of x share each converted weight vector.
//
// Returns 0, or 1 when K is not a multiple of 32.

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>

template <int MB>
static inline void tile_rows(const int8_t* w, const uint16_t* sc, const float* x, int64_t K, float* out,
                             int64_t ldo, __mmask16 keep) {
  __m512 acc[MB];
  for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / 32; g++) {
    __m512 t[MB];
    for (int i = 0; i < MB; i++) t[i] = _mm512_setzero_ps();
    const int8_t* wg = w + g * 32 * 16;
    const float* xg = x + g * 32;
#pragma GCC unroll 4
    for (int kk = 0; kk < 32; kk++) {
      __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wg + kk * 16))));
      for (int i = 0; i < MB; i++) t[i] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xg[i * K + kk]), t[i]);
    }
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sc + g * 16)));
    for (int i = 0; i < MB; i++) acc[i] = _mm512_fmadd_ps(t[i], d, acc[i]);
  }
  for (int i = 0; i < MB; i++) _mm512_mask_storeu_ps(out + i * ldo, keep, acc[i]);
}

static void tile(const int8_t* w, const uint16_t* sc, const float* x, int64_t M, int64_t K, float* out, int64_t ldo,
                 int64_t cols) {
  const __mmask16 keep = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile_rows<8>(w, sc, x + m * K, K, out + m * ldo, ldo, keep);
  const float* xm = x + m * K;
  float* om = out + m * ldo;
  switch (M - m) {
    case 1: tile_rows<1>(w, sc, xm, K, om, ldo, keep); break;
    case 2: tile_rows<2>(w, sc, xm, K, om, ldo, keep); break;
    case 3: tile_rows<3>(w, sc, xm, K, om, ldo, keep); break;
    case 4: tile_rows<4>(w, sc, xm, K, om, ldo, keep); break;
    case 5: tile_rows<5>(w, sc, xm, K, om, ldo, keep); break;
    case 6: tile_rows<6>(w, sc, xm, K, om, ldo, keep); break;
    case 7: tile_rows<7>(w, sc, xm, K, om, ldo, keep); break;
    default: break;
  }
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

static void tile(const int8_t* w, const uint16_t* sc, const float* x, int64_t M, int64_t K, float* out, int64_t ldo,
                 int64_t cols) {
  for (int64_t m = 0; m < M; m++) {
    float acc[16] = {0};
    for (int64_t g = 0; g < K / 32; g++) {
      float t[16] = {0};
      for (int kk = 0; kk < 32; kk++) {
        const float xv = x[m * K + g * 32 + kk];
        const int8_t* wr = w + (g * 32 + kk) * 16;
        for (int j = 0; j < 16; j++) t[j] += (float)wr[j] * xv;
      }
      for (int j = 0; j < 16; j++) acc[j] += t[j] * half_to_float(sc[g * 16 + j]);
    }
    for (int64_t j = 0; j < cols && j < 16; j++) out[m * ldo + j] = acc[j];
  }
}

#endif

extern "C" int argosy_q8_0_linear(const int8_t* w, const uint16_t* scales, const float* x, float* out, int64_t M,
                                  int64_t N, int64_t K) {
  if (K % 32) return 1;
  const int64_t tiles = (N + 15) / 16;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    tile(w + t * K * 16, scales + t * (K / 32) * 16, x, M, K, out + t * 16, N, N - t * 16);
  }
  return 0;
}
