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
//   kv       [2, NB, BS, KVH, D]            same dtype as q (K = kv[0], V = kv[1])
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

template <typename T, int G, int D>
static void run(const T* q, const T* kv, const int32_t* bt, const int32_t* seq_lens, T* out,
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
        const T* kb = kv + blk * block_stride + hk * D;
        const T* vb = kb + v_off;
        if (j + 1 < nblk) {  // the next block's rows of this head, while this one is computed
          const T* nk = kv + (int64_t)bt[b * W + j + 1] * block_stride + hk * D;
          for (int64_t t = 0; t < BS; ++t) {
            for (int64_t c = 0; c < (int64_t)(D * sizeof(T)); c += 64) {
              __builtin_prefetch((const char*)(nk + t * tok_stride) + c);
              __builtin_prefetch((const char*)(nk + v_off + t * tok_stride) + c);
            }
          }
        }
        for (int64_t t = 0; t < ntok; ++t) {
          const T* kp = kb + t * tok_stride;
          float kf[D];
#pragma omp simd
          for (int d = 0; d < D; ++d) kf[d] = ld(kp[d]);
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
          const T* vp = vb + t * tok_stride;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const float v = ld(vp[d]);
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

template <typename T, int D>
static int dispatch_g(const T* q, const T* kv, const int32_t* bt, const int32_t* sl, T* out, int64_t B, int64_t G,
                      int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale) {
  switch (G) {
    case 1: run<T, 1, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 2: run<T, 2, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 3: run<T, 3, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 4: run<T, 4, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 5: run<T, 5, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 6: run<T, 6, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 7: run<T, 7, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    case 8: run<T, 8, D>(q, kv, bt, sl, out, B, KVH, NB, BS, W, scale); return 0;
    default: return 1;
  }
}

template <typename T>
static int dispatch(const T* q, const T* kv, const int32_t* bt, const int32_t* sl, T* out, int64_t B, int64_t H,
                    int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t W, float scale) {
  if (KVH <= 0 || H % KVH || BS <= 0 || BS > MAX_BS) return 1;
  for (int64_t b = 0; b < B; ++b) {  // every block the kernel will read must exist
    const int64_t len = sl[b];
    const int64_t nblk = (len + BS - 1) / BS;
    if (len < 1 || nblk > W) return 2;
    for (int64_t j = 0; j < nblk; ++j)
      if (bt[b * W + j] < 0 || bt[b * W + j] >= NB) return 2;
  }
  if (D == 64) return dispatch_g<T, 64>(q, kv, bt, sl, out, B, H / KVH, KVH, NB, BS, W, scale);
  if (D == 128) return dispatch_g<T, 128>(q, kv, bt, sl, out, B, H / KVH, KVH, NB, BS, W, scale);
  return 1;
}

extern "C" {
int argosy_paged_decode_attention_f32(const float* q, const float* kv, const int32_t* bt, const int32_t* sl,
                                      float* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t NB,
                                      int64_t BS, int64_t W, float scale) {
  return dispatch(q, kv, bt, sl, out, B, H, KVH, D, NB, BS, W, scale);
}
int argosy_paged_decode_attention_bf16(const uint16_t* q, const uint16_t* kv, const int32_t* bt, const int32_t* sl,
                                       uint16_t* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t NB,
                                       int64_t BS, int64_t W, float scale) {
  return dispatch(q, kv, bt, sl, out, B, H, KVH, D, NB, BS, W, scale);
}
}
