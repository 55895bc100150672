// C++ implementations (dispatch key CPU) of the two argosy:: ops a decode step calls once per
// layer: argosy::q8_linear (runtime/quantization/q8_0.py) and argosy::paged_decode_attention
// (runtime/attention/cpu_decode.py). Their schemas, fake (meta) implementations and the
// Python implementations are defined in those modules; this library replaces the Python
// implementation, whose dispatcher -> Python -> ctypes round trip costs ~8-10 us a call
// (measured), with a direct C++ one (~1-2 us). The kernels themselves stay in their own
// libraries (built without torch headers); their entry points are handed over as function
// pointers by argosy/runtime/torch_ops.py, which also decides when to register (never twice).
//
// Checks and error messages follow the Python implementations: a shape or dtype the kernel
// does not take, or a length/block id out of range, raises ValueError (TORCH_CHECK_VALUE);
// a kernel that is not loaded raises RuntimeError.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>

namespace {

// argosy_q8_linear in q8_0_gemm.cpp
using Q8LinearFn = int (*)(const void* w, const uint16_t* hbits, int planes, int is_signed, const void* scales,
                           const void* mins, int scales_f16, int64_t group, const void* x, int x_bf16, void* out,
                           int out_bf16, int64_t M, int64_t N, int64_t K);
// argosy_paged_decode_attention_<q>[_<cache>] in paged_decode.cpp
using DecodeFn = int (*)(const void* q, const void* kv, const int32_t* bt, const int32_t* sl, void* out, int64_t B,
                         int64_t H, int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t W, float scale);

Q8LinearFn g_q8_linear = nullptr;
DecodeFn g_decode[2][3] = {};  // [query float32 / bfloat16][cache the query's dtype / e4m3 / e5m2]

constexpr int64_t kTile = 16;  // q8_0.TILE: output rows per tile of the packed layout
// cpu_decode.SUPPORTED_GROUPS / SUPPORTED_HEAD_DIMS / MAX_BLOCK_SIZE
constexpr int64_t kMaxGroup = 8, kMaxBlockSize = 64;

// dequant.q8_layout_ok: the int8 layout, or the 5/6-bit one (lowbit.h) with its high-bit planes
bool q8_layout_ok(const at::Tensor& w, const std::optional<at::Tensor>& hbits, bool is_signed, int64_t k) {
  if (w.dim() != 3 || w.size(2) != kTile || !w.is_contiguous()) return false;
  if (!hbits.has_value()) return w.scalar_type() == at::kChar && w.size(1) == k && !is_signed;
  const at::Tensor& h = *hbits;
  return w.scalar_type() == at::kByte && 2 * w.size(1) == k && k % 4 == 0 && h.scalar_type() == at::kShort &&
         h.dim() == 3 && h.size(0) == w.size(0) && (h.size(1) == 1 || h.size(1) == 2) && h.size(2) == k &&
         h.is_contiguous();
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& mins, int64_t group_size, int64_t n,
                     std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& hbits, bool is_signed) {
  TORCH_CHECK(g_q8_linear != nullptr, "the CPU grouped int8 linear kernel is not available");
  const at::ScalarType od = out_dtype.value_or(at::kFloat);
  const int64_t g = group_size;
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0;
  bool ok = x.dim() == 2 && q8_layout_ok(w, hbits, is_signed, k) && (g == 16 || g == 32) &&
            k % g == 0 && scales.dim() == 3 && scales.size(0) == w.size(0) && scales.size(1) == k / g &&
            scales.size(2) == kTile && n > 0 && n <= w.size(0) * kTile &&
            (scales.scalar_type() == at::kShort || scales.scalar_type() == at::kFloat) &&
            (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
            (od == at::kFloat || od == at::kBFloat16) && scales.is_contiguous();
  if (ok && mins.has_value()) {
    const at::Tensor& m = *mins;
    ok = m.sizes() == scales.sizes() && m.scalar_type() == scales.scalar_type() && m.is_contiguous();
  }
  TORCH_CHECK_VALUE(ok, "q8_linear: x ", x.sizes(), " ", x.scalar_type(), " does not match packed weight ",
                    w.sizes(), " ", w.scalar_type(), " / scales ", scales.sizes(), " ", scales.scalar_type(),
                    " / group ", g, " for ", n, " outputs / high bits ",
                    hbits.has_value() ? hbits->sizes() : at::IntArrayRef{}, " signed ", is_signed, " (or out_dtype ", od,
                    " is not float32/bfloat16)");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({xc.size(0), n}, xc.options().dtype(od));
  if (xc.size(0) > 0) {
    const int planes = hbits.has_value() ? (int)hbits->size(1) : 0;
    const int rc = g_q8_linear(w.data_ptr(), hbits.has_value() ? (const uint16_t*)hbits->data_ptr() : nullptr, planes,
                               (int)is_signed, scales.data_ptr(), mins.has_value() ? mins->data_ptr() : nullptr,
                               scales.scalar_type() == at::kShort, g, xc.data_ptr(),
                               xc.scalar_type() == at::kBFloat16, out.data_ptr(), od == at::kBFloat16, xc.size(0),
                               n, k);
    TORCH_CHECK_VALUE(rc == 0, "q8_linear: K=", k, " is not a multiple of the group size ", g);
  }
  return out;
}

int cache_kind(at::ScalarType cache, at::ScalarType query) {
  if (cache == query) return 0;
  if (cache == at::kFloat8_e4m3fn) return 1;
  if (cache == at::kFloat8_e5m2) return 2;
  return -1;
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(g_decode[0][0] != nullptr || g_decode[1][0] != nullptr,
              "the CPU paged decode attention kernel is not available");
  const at::ScalarType qt = query.scalar_type();
  const int qi = qt == at::kBFloat16 ? 1 : 0;
  const int ci = cache_kind(kv_cache.scalar_type(), qt);
  // cpu_decode.supports
  bool ok = (qt == at::kFloat || qt == at::kBFloat16) && ci >= 0 && query.dim() == 3 && kv_cache.dim() == 5 &&
            kv_cache.size(0) == 2 && kv_cache.is_contiguous() && query.size(-1) == kv_cache.size(-1);
  if (ok) {
    const int64_t h = query.size(1), d = query.size(2), kvh = kv_cache.size(3), bs = kv_cache.size(2);
    ok = kvh > 0 && h % kvh == 0 && h / kvh >= 1 && h / kvh <= kMaxGroup && (d == 64 || d == 128) &&
         bs <= kMaxBlockSize;
  }
  TORCH_CHECK_VALUE(ok, "paged_decode_attention: unsupported query ", query.sizes(), " ", qt, " / KV cache ",
                    kv_cache.sizes(), " ", kv_cache.scalar_type(), " (contiguous: ", kv_cache.is_contiguous(), ")");
  const int64_t b = query.size(0);
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == b && seq_lens.dim() == 1 &&
                        seq_lens.size(0) == b,
                    "paged_decode_attention: block_tables ", block_tables.sizes(), " / seq_lens ", seq_lens.sizes(),
                    " do not match ", b, " sequences");
  const DecodeFn fn = g_decode[qi][ci];
  TORCH_CHECK(fn != nullptr, "the CPU paged decode attention kernel is not available");
  const at::Tensor q = query.contiguous();
  const at::Tensor bt = block_tables.to(at::kInt).contiguous();
  const at::Tensor sl = seq_lens.to(at::kInt).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int rc = fn(q.data_ptr(), kv_cache.data_ptr(), bt.data_ptr<int32_t>(), sl.data_ptr<int32_t>(),
                    out.data_ptr(), b, q.size(1), kv_cache.size(3), q.size(2), kv_cache.size(1), kv_cache.size(2),
                    bt.size(1), static_cast<float>(scale));
  TORCH_CHECK_VALUE(rc != 1, "paged_decode_attention: unsupported shape (H=", q.size(1), ", KVH=", kv_cache.size(3),
                    ", D=", q.size(2), ", block=", kv_cache.size(2), ")");
  TORCH_CHECK_VALUE(rc != 2,
                    "paged_decode_attention: a sequence length needs more blocks than its table row holds, or a "
                    "block id is out of range");
  return out;
}

torch::Library& impl_library() {
  // created on the first registration (not at load): torch_ops.py first removes the Python
  // implementation, so the dispatcher never holds two CPU kernels for one op
  static torch::Library* lib = new torch::Library(torch::Library::IMPL, "argosy", c10::DispatchKey::CPU, __FILE__,
                                                  __LINE__);
  return *lib;
}

}  // namespace

extern "C" {

void argosy_set_q8_linear(void* fn) { g_q8_linear = reinterpret_cast<Q8LinearFn>(fn); }

// query_bf16: 0 float32, 1 bfloat16; cache_kind: 0 the query's dtype, 1 float8_e4m3fn, 2 float8_e5m2
int argosy_set_paged_decode_attention(int query_bf16, int cache_kind, void* fn) {
  if (query_bf16 < 0 || query_bf16 > 1 || cache_kind < 0 || cache_kind > 2) return 1;
  g_decode[query_bf16][cache_kind] = reinterpret_cast<DecodeFn>(fn);
  return 0;
}

// Registers the C++ implementation of argosy::<op> for CPU: 0 done, 1 unknown op, 2 the
// registration threw (e.g. no schema defined for the op). (A CPU kernel still registered
// would not make it fail: the dispatcher would warn and override, which is why
// torch_ops.py removes the Python registration first.)
int argosy_register(const char* op) {
  try {
    if (std::strcmp(op, "q8_linear") == 0) {
      impl_library().impl("q8_linear", TORCH_FN(q8_linear));
    } else if (std::strcmp(op, "paged_decode_attention") == 0) {
      impl_library().impl("paged_decode_attention", TORCH_FN(paged_decode_attention));
    } else {
      return 1;
    }
  } catch (...) {
    return 2;
  }
  return 0;
}
}
