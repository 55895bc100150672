// Dequantize a quantized linear weight to a dense bfloat16 matrix out[N][K] (row-major,
// bit patterns as uint16), for the CPU's large-row calls (prefill, large decode batches):
// argosy.runtime.layers.linear fills one scratch matrix per call and multiplies it with
// oneDNN, instead of keeping a dense copy of every quantized layer (2 bytes a weight).
//
// Every value is computed in float32 and rounded once to bfloat16, to nearest even, the
// way the reference dequantizers in argosy.runtime.quantization compute the dense copy
// they replace (torch's float -> bfloat16 conversion; finite values only):
//
//   argosy_int4_dequant   rows [n0, n1) of W into out[n1 - n0][K]:
//                         W[n, k] = (q[n, k] - 8) * s + z, with (s, z) the bfloat16
//                         scales_and_zeros[k / G][n][0..1] PyTorch's int4 kernel reads
//                         (argosy.runtime.quantization.int4). (q - 8) * s is exact in
//                         float32 (4-bit integer times an 8-bit mantissa), so a fused
//                         multiply-add rounds exactly as a multiply and an add.
//                         q: [N][K / 2] bytes; in every 32-column chunk c, byte 16c + j
//                         holds column 32c + j in its low nibble and 32c + 16 + j in its
//                         high nibble (argosy.runtime.quantization.int4.pack_nibbles).
//   argosy_int4pack_dequant
//                         the same rows, transposed (out[K][n1 - n0]: W's columns n0..n1 of
//                         row k, which oneDNN's GEMM takes as fast as W itself), from
//                         PyTorch's CPU int4 weight itself (the output of
//                         _convert_weight_to_int4pack_for_cpu, aten/src/ATen/native/cpu/
//                         int4mm_kernel.cpp), so a layer needs no second copy of its
//                         integers: rows in blocks of B (64 where PyTorch dispatched to
//                         AVX-512, 32 otherwise), block b at byte b * B * K / 2; a whole
//                         block is [K][B / 2] bytes, byte j of column k holding row j in its
//                         low nibble and row j + B / 2 in its high one; a last block of
//                         t < B rows is [K][t / 2], byte d holding rows 2d (low) and 2d + 1
//                         (high). The layout is PyTorch's internal one and depends on the CPU
//                         capability it runs with, so the caller checks it once per process
//                         (argosy.runtime.quantization.dequant.int4pack_block) and uses
//                         argosy_int4_dequant's own layout where it does not match.
//   argosy_int8_dequant   W[n, k] = q[n, k] * s[n], q int8 [N][K], s bfloat16 [N] (the
//                         scales PyTorch's _weight_int8pack_mm reads; exact product).
//   argosy_q8_dequant     W[n, k] = q[n, k] * d (+ m), the grouped int8 tiled layout of
//                         q8_0_gemm.cpp (w [N16/16][K][16], scales and mins [N16/16][K/G]
//                         [16] float16 bits or float32): product, then sum, each rounded in
//                         float32 (no contraction into a fused multiply-add). Or the same
//                         values in the 5/6-bit layout (lowbit.h: w [N16/16][K/4][32] nibbles,
//                         hb [N16/16][P][K] high-bit planes, unsigned or two's complement),
//                         decoded per group.
//
//   argosy_gather_columns out[m][j] = x[m][perm[j]] for x [M][K] 16-bit values: a GPTQ
//                         act-order layer's input in the order of its stored columns.
//
// OpenMP over rows (tiles of 16 for the grouped layout, half blocks of B rows for
// PyTorch's int4 layout). Return 0, or 1 when K is not a multiple of the group size (and
// of 32 for int4), the group size is not a multiple of 32 (int4) or 16 (grouped int8), or
// the row range is not inside [0, N) (and, for PyTorch's layout, does not start on a block
// or end on one or at N, or B is not a multiple of 32).

#include <stdint.h>
#include <string.h>

#include "lowbit.h"

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float from_f16(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) {
        man <<= 1;
        exp--;
      }
      u = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ARGOSY_DEQUANT_AVX512 1

// 16 float32 -> 16 bfloat16 bit patterns, rounded to nearest even like to_bf16 (integer
// arithmetic: AVX512-BF16's conversion would flush subnormals).
static inline __m256i bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// in[i]: 16 bytes; out[j] byte i = in[i] byte j (a 16 x 16 byte transpose in four rounds
// of unpacks: byte pairs, then 2-, 4- and 8-byte units).
static inline void transpose16x16(const __m128i in[16], __m128i out[16]) {
  __m128i s1[2][8], s2[2][2][4], s3[2][2][2][2];
  for (int i = 0; i < 8; i++) {
    s1[0][i] = _mm_unpacklo_epi8(in[2 * i], in[2 * i + 1]);
    s1[1][i] = _mm_unpackhi_epi8(in[2 * i], in[2 * i + 1]);
  }
  for (int h = 0; h < 2; h++)
    for (int m = 0; m < 4; m++) {
      s2[h][0][m] = _mm_unpacklo_epi16(s1[h][2 * m], s1[h][2 * m + 1]);
      s2[h][1][m] = _mm_unpackhi_epi16(s1[h][2 * m], s1[h][2 * m + 1]);
    }
  for (int h = 0; h < 2; h++)
    for (int cb = 0; cb < 2; cb++)
      for (int o = 0; o < 2; o++) {
        s3[h][cb][0][o] = _mm_unpacklo_epi32(s2[h][cb][2 * o], s2[h][cb][2 * o + 1]);
        s3[h][cb][1][o] = _mm_unpackhi_epi32(s2[h][cb][2 * o], s2[h][cb][2 * o + 1]);
      }
  for (int h = 0; h < 2; h++)
    for (int cb = 0; cb < 2; cb++)
      for (int cc = 0; cc < 2; cc++) {
        const int j = h * 8 + cb * 4 + cc * 2;
        out[j] = _mm_unpacklo_epi64(s3[h][cb][cc][0], s3[h][cb][cc][1]);
        out[j + 1] = _mm_unpackhi_epi64(s3[h][cb][cc][0], s3[h][cb][cc][1]);
      }
}
#endif

extern "C" int argosy_int4_dequant(const uint8_t* q, const uint16_t* sz, int64_t G, int64_t N, int64_t K,
                                   int64_t n0, int64_t n1, uint16_t* out) {
  if (G <= 0 || K % G || K % 32 || G % 32 || n0 < 0 || n1 > N || n0 > n1) return 1;
#pragma omp parallel for schedule(static)
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* qr = q + n * (K / 2);
    uint16_t* o = out + (n - n0) * K;
    for (int64_t g = 0; g < K / G; g++) {
      const float s = from_bf16(sz[(g * N + n) * 2]), z = from_bf16(sz[(g * N + n) * 2 + 1]);
      for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
        const uint8_t* b = qr + c / 2;
        uint16_t* oc = o + c;
#ifdef ARGOSY_DEQUANT_AVX512
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b)), eight = _mm512_set1_epi32(8);
        const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
        _mm256_storeu_si256((__m256i*)oc, bf16x16(_mm512_fmadd_ps(lo, vs, vz)));
        _mm256_storeu_si256((__m256i*)(oc + 16), bf16x16(_mm512_fmadd_ps(hi, vs, vz)));
        continue;
#endif
        for (int j = 0; j < 16; j++) {
          oc[j] = to_bf16((float)((int)(b[j] & 15) - 8) * s + z);
          oc[j + 16] = to_bf16((float)((int)(b[j] >> 4) - 8) * s + z);
        }
      }
    }
  }
  return 0;
}

extern "C" int argosy_int4pack_dequant(const uint8_t* p, const uint16_t* sz, int64_t G, int64_t N, int64_t K,
                                       int64_t B, int64_t n0, int64_t n1, uint16_t* out) {
  if (G <= 0 || K % G || K % 32 || G % 32 || B <= 0 || B % 32 || N % 2 || n0 < 0 || n1 > N || n0 > n1 || n0 % B
      || (n1 % B && n1 != N))
    return 1;
  const int64_t H = B / 2, b0 = n0 / B, b1 = (n1 + B - 1) / B, ld = n1 - n0;  // out: [K][n1 - n0]
  // a unit is one block's half of the columns (two per block, for an even share between
  // threads when a layer has few blocks): it reads its bytes in order and writes B
  // consecutive outputs of each of its rows of out
  const int64_t steps = K / 32, split = steps >= 2 ? 2 : 1, units = (b1 - b0) * split;
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < units; u++) {
    const int64_t b = b0 + u / split, part = u % split;
    const int64_t ks = steps * part / split * 32, ke = steps * (part + 1) / split * 32;
    const int64_t rows = N - b * B < B ? N - b * B : B;
    const uint8_t* pb = p + b * B * (K / 2);
    uint16_t* ob = out + (b * B - n0);
    if (rows < B) {
      const int64_t t2 = rows / 2;
      for (int64_t k = ks; k < ke; k++) {
        const uint16_t* szg = sz + ((k / G) * N + b * B) * 2;
        for (int64_t r = 0; r < rows; r++) {
          const int q = (pb[k * t2 + r / 2] >> ((r & 1) * 4)) & 15;
          ob[k * ld + r] = to_bf16((float)(q - 8) * from_bf16(szg[2 * r]) + from_bf16(szg[2 * r + 1]));
        }
      }
      continue;
    }
    for (int64_t g0 = ks; g0 < ke; g0 += 32) {  // 32 columns, inside one group (G a multiple of 32)
      const uint16_t* szg = sz + ((g0 / G) * N + b * B) * 2;
#ifdef ARGOSY_DEQUANT_AVX512
      if (H == 32) {
        // (scale, zero) pairs of the block's 64 rows as 32-bit words: scale the low half, zero the high
        __m512 s[4], z[4];
        for (int c = 0; c < 4; c++) {
          const __m512i w = _mm512_loadu_si512((const void*)(szg + 32 * c));
          s[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
          z[c] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
        }
        const __m512i eight = _mm512_set1_epi32(8), fifteen = _mm512_set1_epi32(15);
        for (int64_t k = g0; k < g0 + 32; k++) {
          for (int c = 0; c < 2; c++) {  // bytes 16c..16c+15: rows 16c.. (low nibbles) and 32 + 16c.. (high)
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(pb + k * 32 + 16 * c)));
            const __m512 flo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, fifteen), eight));
            const __m512 fhi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
            _mm256_storeu_si256((__m256i*)(ob + k * ld + 16 * c), bf16x16(_mm512_fmadd_ps(flo, s[c], z[c])));
            _mm256_storeu_si256((__m256i*)(ob + k * ld + 32 + 16 * c),
                                bf16x16(_mm512_fmadd_ps(fhi, s[c + 2], z[c + 2])));
          }
        }
        continue;
      }
#endif
      for (int64_t k = g0; k < g0 + 32; k++)
        for (int64_t j = 0; j < H; j++) {
          const uint8_t byte = pb[k * H + j];
          ob[k * ld + j] = to_bf16((float)((int)(byte & 15) - 8) * from_bf16(szg[2 * j]) + from_bf16(szg[2 * j + 1]));
          ob[k * ld + H + j] =
              to_bf16((float)((int)(byte >> 4) - 8) * from_bf16(szg[2 * (H + j)]) + from_bf16(szg[2 * (H + j) + 1]));
        }
    }
  }
  return 0;
}

extern "C" int argosy_int8_dequant(const int8_t* q, const uint16_t* s, int64_t N, int64_t K, uint16_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const float d = from_bf16(s[n]);
    const int8_t* qr = q + n * K;
    uint16_t* o = out + n * K;
    int64_t k = 0;
#ifdef ARGOSY_DEQUANT_AVX512
    const __m512 vd = _mm512_set1_ps(d);
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256((__m256i*)(o + k), bf16x16(_mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qr + k)))), vd)));
#endif
    for (; k < K; k++) o[k] = to_bf16((float)qr[k] * d);
  }
  return 0;
}

template <bool F16, bool MIN>
__attribute__((optimize("fp-contract=off"))) static void q8_rows(const uint8_t* w, const uint16_t* hb, int P, int is_signed,
                                                                 const void* sc, const void* mn, int64_t G, int64_t N,
                                                                 int64_t K, uint16_t* out) {
  const int64_t tiles = (N + 15) / 16, groups = K / G;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const int rows = (int)(N - t * 16 < 16 ? N - t * 16 : 16);
    int8_t buf[32 * 16];  // a group of the 5/6-bit layout decoded (G <= 32)
    for (int64_t g = 0; g < groups; g++) {
      const int64_t k_start = g * G;
      const int8_t* wg;  // the group's columns as [G][16] int8
      if (P) {
        lowbit_decode(w + t * K * 8, hb + t * K * P, P, is_signed, K, k_start, G, buf);
        wg = buf;
      } else {
        wg = (const int8_t*)w + (t * K + k_start) * 16;
      }
      float d[16], m[16];
      for (int r = 0; r < 16; r++) {
        const int64_t i = (t * groups + g) * 16 + r;
        d[r] = F16 ? from_f16(((const uint16_t*)sc)[i]) : ((const float*)sc)[i];
        m[r] = MIN ? (F16 ? from_f16(((const uint16_t*)mn)[i]) : ((const float*)mn)[i]) : 0.0f;
      }
#ifdef ARGOSY_DEQUANT_AVX512
      for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 16) {  // G is 16 or 32: whole 16-column blocks
        __m128i cols[16], rws[16];
        for (int i = 0; i < 16; i++) cols[i] = _mm_loadu_si128((const __m128i*)(wg + (k0 - k_start + i) * 16));
        transpose16x16(cols, rws);
        for (int r = 0; r < rows; r++) {
          __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(rws[r])), _mm512_set1_ps(d[r]));
          if (MIN) v = _mm512_add_ps(v, _mm512_set1_ps(m[r]));
          _mm256_storeu_si256((__m256i*)(out + (t * 16 + r) * K + k0), bf16x16(v));
        }
      }
      if (G % 16 == 0) continue;
#endif
      for (int r = 0; r < rows; r++) {
        uint16_t* o = out + (t * 16 + r) * K;
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
          float v = (float)wg[(k - k_start) * 16 + r] * d[r];
          if (MIN) v = v + m[r];
          o[k] = to_bf16(v);
        }
      }
    }
  }
}

extern "C" int argosy_q8_dequant(const void* w_in, const uint16_t* hbits, int planes, int is_signed, const void* scales,
                                 const void* mins, int f16, int64_t G, int64_t N, int64_t K, uint16_t* out) {
  if ((G != 16 && G != 32) || K % G) return 1;  // the layout's groups (q8_0_gemm.cpp)
  if (planes < 0 || planes > 2) return 1;
  const uint8_t* w = (const uint8_t*)w_in;
  if (f16) {
    if (mins) q8_rows<true, true>(w, hbits, planes, is_signed, scales, mins, G, N, K, out);
    else q8_rows<true, false>(w, hbits, planes, is_signed, scales, mins, G, N, K, out);
  } else {
    if (mins) q8_rows<false, true>(w, hbits, planes, is_signed, scales, mins, G, N, K, out);
    else q8_rows<false, false>(w, hbits, planes, is_signed, scales, mins, G, N, K, out);
  }
  return 0;
}

extern "C" int argosy_gather_columns(const uint16_t* x, const int64_t* perm, int64_t M, int64_t K, uint16_t* out) {
  for (int64_t j = 0; j < K; j++)
    if (perm[j] < 0 || perm[j] >= K) return 1;
#pragma omp parallel for schedule(static) if (M * K >= 65536)
  for (int64_t m = 0; m < M; m++) {
    const uint16_t* xr = x + m * K;
    uint16_t* o = out + m * K;
    for (int64_t j = 0; j < K; j++) o[j] = xr[perm[j]];
  }
  return 0;
}
