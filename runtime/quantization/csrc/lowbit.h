// The 5- and 6-bit form of the grouped int8 tiled layout (q8_0_gemm.cpp, dequant.cpp):
// GGUF's Q5_0 / Q5_1 / Q5_K / Q6_K integers held in 5 or 6 bits a weight instead of 8, as
// the file holds them (ggml-common.h: a low nibble plus one or two high bits per value), so
// that a decode step streams 0.625-0.75 bytes a weight instead of 1 (plus the scales).
//
// Layout per tile of 16 output rows (argosy.runtime.quantization.q8_0.PackedQ8.pack), K
// input columns (K a multiple of 4), each value stored as B = 4 + P bits (P = 1 or 2 planes):
//   w  [K / 4][2][16] uint8  for columns 4c .. 4c + 3: byte j of half h holds row j's low
//                            nibble of column 4c + h (bits 0-3) and of column 4c + 2 + h
//                            (bits 4-7), so one 32-byte load and two masks give the four
//                            columns as two 32-lane vectors
//   hb [P][K] uint16         bit j of hb[p][k]: bit 4 + p of row j's stored value in column k
// The value is the stored B bits read as unsigned, or, for a signed layout, as two's
// complement (the top bit weighs -2^(B-1)): Q5_1 / Q5_K integers are 0..31 (unsigned, B = 5),
// Q5_0's -16..15 (signed, 5), Q6_K's -32..31 (signed, 6). Either way the same int8 values as
// the 8-bit layout, so both give the same results bit for bit.

#pragma once

#include <stdint.h>
#include <string.h>

// The value of row r (0-15), column k of a tile of K columns.
static inline int8_t lowbit_value(const uint8_t* w, const uint16_t* hb, int P, int is_signed, int64_t K, int64_t k,
                                  int r) {
  const uint8_t byte = w[(k >> 2) * 32 + (k & 1) * 16 + r];
  int v = (k & 2) ? (byte >> 4) : (byte & 0x0F);
  for (int p = 0; p < P; p++) v += ((hb[p * K + k] >> r) & 1) << (4 + p);
  if (is_signed && v >= (1 << (3 + P))) v -= 1 << (4 + P);
  return (int8_t)v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ARGOSY_LOWBIT_AVX512 1

static inline uint32_t lowbit_load32(const uint16_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// Columns k .. k + 3 (k a multiple of 4) of a tile of K columns: a = columns k, k + 1 (lanes
// 0-15, 16-31), b = columns k + 2, k + 3, as int8 values. wq = w + (k / 4) * 32;
// add[p] = the value of plane p's bit (16 << p, or -(16 << p) for a signed layout's top plane).
template <int P>
static inline void lowbit_quad(const uint8_t* wq, const uint16_t* hb, int64_t K, int64_t k, const __m256i* add,
                               __m256i& a, __m256i& b) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)wq), nib = _mm256_set1_epi8(0x0F);
  a = _mm256_and_si256(v, nib);
  b = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  for (int p = 0; p < P; p++) {
    a = _mm256_mask_add_epi8(a, (__mmask32)lowbit_load32(hb + p * K + k), a, add[p]);
    b = _mm256_mask_add_epi8(b, (__mmask32)lowbit_load32(hb + p * K + k + 2), b, add[p]);
  }
}

static inline void lowbit_adds(int P, int is_signed, __m256i* add) {
  for (int p = 0; p < P; p++) {
    const int v = (is_signed && p == P - 1) ? -(16 << p) : (16 << p);
    add[p] = _mm256_set1_epi8((char)v);
  }
}
#endif

// Columns [k0, k0 + cols) of a tile of K columns (k0 and cols multiples of 4) into
// out[cols][16] int8: the 8-bit layout of the same values.
static inline void lowbit_decode(const uint8_t* w, const uint16_t* hb, int P, int is_signed, int64_t K, int64_t k0,
                                 int64_t cols, int8_t* out) {
#ifdef ARGOSY_LOWBIT_AVX512
  __m256i add[2];
  lowbit_adds(P, is_signed, add);
  for (int64_t c = 0; c < cols; c += 4) {
    __m256i a, b;
    const int64_t k = k0 + c;
    if (P == 1) lowbit_quad<1>(w + (k >> 2) * 32, hb, K, k, add, a, b);
    else lowbit_quad<2>(w + (k >> 2) * 32, hb, K, k, add, a, b);
    _mm256_storeu_si256((__m256i*)(out + c * 16), a);
    _mm256_storeu_si256((__m256i*)(out + (c + 2) * 16), b);
  }
#else
  for (int64_t c = 0; c < cols; c++)
    for (int r = 0; r < 16; r++) out[c * 16 + r] = lowbit_value(w, hb, P, is_signed, K, k0 + c, r);
#endif
}
