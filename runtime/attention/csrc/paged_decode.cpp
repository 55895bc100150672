// Paged decode attention on the CPU (argosy.runtime.attention.cpu_decode builds and loads it).
//
// One query token per sequence reads its context in place from the paged KV cache
// (PagedAttention, Kwon et al., SOSP 2023): no gather into a padded dense tensor, each
// sequence reads only its own seq_len tokens. Softmax is computed online per KV block
// (running max and sum, as in FlashAttention, Dao et al., NeurIPS 2022), in float32.
// GQA: the G = H / KVH query heads of a KV head share each K/V load. Parallel over
// (sequence, KV head) with OpenMP (torch's own runtime, already loaded in the process).
//
// Layouts (all contiguous, row-major):
//   q        [B, H, D]                      float32 or bfloat16 (raw uint16 bits)
//   kv       [2, NB, BS, KVH, D]            same dtype as q, or FP8 (--kv-cache-dtype fp8:
//                                           OCP E4M3 or E5M2 bytes, widened to float32
//                                           exactly as each row is read) (K = kv[0], V = kv[1])
//   bt       [B, W] int32                   physical block ids (entries past a sequence's
//                                           ceil(seq_len / BS) blocks are never read)
//   seq_lens [B] int32                      context length in tokens, >= 1
//   out      [B, H, D]                      same dtype as q
// Return codes: 0 ok; 1 unsupported shape (G not in 1..8, D not 64/128, BS > 64);
// 2 a seq_len < 1 or needing more than W blocks, or a block id outside [0, NB).
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float ld(float x) { return x; }
static inline float ld(uint16_t x) { return bf16_to_f32(x); }
static inline void st(float* p, float x) { *p = x; }
static inline void st(uint16_t* p, float x) { *p = f32_to_bf16(x); }

// FP8 cache elements (OCP 8-bit floating point formats, v1.0). Each byte is re-encoded as
// an IEEE binary16 and widened exactly: E5M2 is binary16's top byte; E4M3 (bias 7) moves
// its exponent and mantissa bits into binary16's (bias 15), which scales the value by
// 2^-8, normals and subnormals alike, undone by one multiply. The cache stores saturated
// values, so the only non-finite bytes are NaNs the model itself produced: they read back as
// NaN (E4M3 S.1111.111; E5M2 infinities and NaNs as binary16's), as in the torch path.
struct fp8_e4m3 { uint8_t b; };
struct fp8_e5m2 { uint8_t b; };

static inline float half_bits_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float f;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    f = (float)man * 5.9604644775390625e-08f;
    uint32_t u; memcpy(&u, &f, 4); u |= sign; memcpy(&f, &u, 4);
    return f;
  }
  const uint32_t u = exp == 31 ? (sign | 0x7F800000u | (man << 13))        // infinity, NaN
                               : (sign | ((exp + 112u) << 23) | (man << 13));  // 112 = 127 - 15
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t e4m3_half_bits(uint8_t b) { return (uint16_t)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7)); }
static inline float ld(fp8_e4m3 x) {
  return (x.b & 0x7Fu) == 0x7Fu ? NAN : half_bits_to_f32(e4m3_half_bits(x.b)) * 256.f;
}
static inline float ld(fp8_e5m2 x) { return half_bits_to_f32((uint16_t)(x.b << 8)); }

// One cache row of D values as float32.
template <typename C, int D>
static inline void load_row(const C* p, float* dst) {
#pragma omp simd
  for (int d = 0; d < D; ++d) dst[d] = ld(p[d]);
}
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
template <>
inline void load_row<fp8_e4m3, 64>(const fp8_e4m3* p, float* dst) {
  for (int d = 0; d < 64; d += 16) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(p + d)));
    const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7F));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(mag, 7));
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7F));  // S.1111.111
    const __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
    _mm512_storeu_ps(dst + d, _mm512_mask_blend_ps(nan, f, _mm512_set1_ps(NAN)));
  }
}
template <>
inline void load_row<fp8_e5m2, 64>(const fp8_e5m2* p, float* dst) {
  for (int d = 0; d < 64; d += 16) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(p + d)));
    _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_slli_epi16(b, 8)));
  }
}
template <>
inline void load_row<fp8_e4m3, 128>(const fp8_e4m3* p, float* dst) {
  load_row<fp8_e4m3, 64>(p, dst);
  load_row<fp8_e4m3, 64>(p + 64, dst + 64);
}
template <>
inline void load_row<fp8_e5m2, 128>(const fp8_e5m2* p, float* dst) {
  load_row<fp8_e5m2, 64>(p, dst);
  load_row<fp8_e5m2, 64>(p + 64, dst + 64);
}
#endif

// exp(x) for x <= 0: 2^(x log2 e) = 2^n 2^f, n = round(x log2 e), |f| <= 1/2, 2^f by its
// Taylor series to degree 7 (series error < 1e-8 for |f| <= 1/2; rounding x log2 e in
// single precision adds a relative error up to ~|x| 6e-8, ~5e-6 near x = -87, far below
// the bfloat16 output's 4e-3); inputs below -87 are clamped (exp(-87) ~ 1.6e-38, i.e. 0
// next to the block's largest weight 1). Vectorizes (no libm call).
static inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.4426950408889634f;
  const float n = __builtin_rintf(t);
  const float f = t - n;
  float p = 1.5252733804059841e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale; memcpy(&scale, &bits, 4);
  return p * scale;
}

enum { MAX_BS = 64 };

template <typename T, typename C, int G, int D>
static void run(const T* q, const C* kv, const int32_t* bt, const int32_t* seq_lens, T* out,
                int64_t B, int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale) {
  const int64_t H = KVH * G;
  const int64_t block_stride = BS * KVH * D;
  const int64_t tok_stride = KVH * D;
  const int64_t v_off = NB * block_stride;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t hk = 0; hk < KVH; ++hk) {
      alignas(64) float qf[G][D];
      alignas(64) float acc[G][D];
      alignas(64) float s[G][MAX_BS];
      float m[G], l[G];
      for (int g = 0; g < G; ++g) {
        const T* qp = q + (b * H + hk * G + g) * D;
        for (int64_t d = 0; d < D; ++d) { qf[g][d] = ld(qp[d]) * scale; acc[g][d] = 0.f; }
        m[g] = 0.f;  // set from the first block's scores
        l[g] = 0.f;
      }
      const int64_t len = seq_lens[b];
      const int64_t nblk = (len + BS - 1) / BS;
      for (int64_t j = 0; j < nblk; ++j) {
        const int64_t blk = bt[b * W + j];
        const int64_t ntok = len - j * BS < BS ? len - j * BS : BS;
        const C* kb = kv + blk * block_stride + hk * D;
        const C* vb = kb + v_off;
        if (j + 1 < nblk) {  // the next block's rows of this head, while this one is computed
          const C* nk = kv + (int64_t)bt[b * W + j + 1] * block_stride + hk * D;
          for (int64_t t = 0; t < BS; ++t) {
            for (int64_t c = 0; c < (int64_t)(D * sizeof(C)); c += 64) {
              __builtin_prefetch((const char*)(nk + t * tok_stride) + c);
              __builtin_prefetch((const char*)(nk + v_off + t * tok_stride) + c);
            }
          }
        }
        for (int64_t t = 0; t < ntok; ++t) {
          alignas(64) float kf[D];
          load_row<C, D>(kb + t * tok_stride, kf);
          for (int g = 0; g < G; ++g) {
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int d = 0; d < D; ++d) sum += qf[g][d] * kf[d];
            s[g][t] = sum;
          }
        }
        float corr[G];
        for (int g = 0; g < G; ++g) {
          float bm = j == 0 ? s[g][0] : m[g];
          for (int64_t t = 0; t < ntok; ++t) bm = s[g][t] > bm ? s[g][t] : bm;
          corr[g] = j == 0 ? 1.f : exp_nonpos(m[g] - bm);
          m[g] = bm;
          float psum = 0.f;
#pragma omp simd reduction(+ : psum)
          for (int64_t t = 0; t < ntok; ++t) { const float e = exp_nonpos(s[g][t] - bm); s[g][t] = e; psum += e; }
          l[g] = l[g] * corr[g] + psum;
        }
        for (int g = 0; g < G; ++g) {
          const float c = corr[g];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[g][d] *= c;
        }
        for (int64_t t = 0; t < ntok; ++t) {
          alignas(64) float vf[D];
          load_row<C, D>(vb + t * tok_stride, vf);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const float v = vf[d];
            for (int g = 0; g < G; ++g) acc[g][d] += s[g][t] * v;
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        T* op = out + (b * H + hk * G + g) * D;
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < D; ++d) st(op + d, acc[g][d] * inv);
      }
    }
  }
}

template <typename T, typename C, int D>
static int dispatch_g(const T* q, const C* kv, const int32_t* bt, const int32_t* sl, T* out, int64_t B, int64_t G,
                      int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale) {
  switch (G) {
    case 1: run<T, C, 1, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 2: run<T, C, 2, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 3: run<T, C, 3, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 4: run<T, C, 4, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 5: run<T, C, 5, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 6: run<T, C, 6, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 7: run<T, C, 7, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 8: run<T, C, 8, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    default: return 1;
  }
}

template <typename T, typename C>
static int dispatch(const T* q, const C* kv, const int32_t* bt, const int32_t* sl, T* out, int64_t B, int64_t H,
                    int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t W, float scale) {
  if (KVH <= 0 || H % KVH || BS <= 0 || BS > MAX_BS) return 1;
  for (int64_t b = 0; b < B; ++b) {  // every block the kernel will read must exist
    const int64_t len = sl[b];
    const int64_t nblk = (len + BS - 1) / BS;
    if (len < 1 || nblk > W) return 2;
    for (int64_t j = 0; j < nblk; ++j)
      if (bt[b * W + j] < 0 || bt[b * W + j] >= NB) return 2;
  }
  if (D == 64) return dispatch_g<T, C, 64>(q, kv, bt, sl, out, B, H / KVH, KVH, NB, BS, W, scale);
  if (D == 128) return dispatch_g<T, C, 128>(q, kv, bt, sl, out, B, H / KVH, KVH, NB, BS, W, scale);
  return 1;
}

// Entry points, one per (query/output type, cache type): argosy_paged_decode_attention_<q>
// with the cache in the query's type, _<q>_<cache> for an FP8 cache.
#define ENTRY(NAME, TQ, TC)                                                                            \
  int NAME(const TQ* q, const TC* kv, const int32_t* bt, const int32_t* sl, TQ* out, int64_t B, int64_t H, \
           int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t W, float scale) {                  \
    return dispatch(q, kv, bt, sl, out, B, H, KVH, D, NB, BS, W, scale);                              \
  }
extern "C" {
ENTRY(argosy_paged_decode_attention_f32, float, float)
ENTRY(argosy_paged_decode_attention_bf16, uint16_t, uint16_t)
ENTRY(argosy_paged_decode_attention_f32_e4m3, float, fp8_e4m3)
ENTRY(argosy_paged_decode_attention_bf16_e4m3, uint16_t, fp8_e4m3)
ENTRY(argosy_paged_decode_attention_f32_e5m2, float, fp8_e5m2)
ENTRY(argosy_paged_decode_attention_bf16_e5m2, uint16_t, fp8_e5m2)
}
