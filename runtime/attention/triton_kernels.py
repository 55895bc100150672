"""Triton kernels for the CUDA path: paged KV store, paged attention, RMSNorm, rotary.

These kernels compute the same functions as the pure-torch oracle in
:mod:`argosy.runtime.attention.torch_paged` (and ``RMSNorm`` / ``RotaryEmbedding`` in
:mod:`argosy.runtime.models.llama`) and take the same :class:`AttentionMetadata`.

Sources of the algorithms:

* PagedAttention: W. Kwon et al., "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", SOSP 2023. Keys/values live in fixed-size blocks; a
  sequence's context is the concatenation of the blocks named by its block table.
* FlashAttention-2: T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism
  and Work Partitioning", 2023. Tiles of keys are streamed through on-chip memory while
  an online (running-max) softmax is kept in fp32, so the ``[q, k]`` score matrix is
  never materialised; the output is rescaled once at the end.

Limits shared by the kernels (checked by the Python wrappers):

* dtypes: float16, bfloat16 and float32 (query, cache and output share one dtype;
  accumulation is always fp32). fp32 matmuls use IEEE precision (no TF32). The cache may
  instead be FP8 (``--kv-cache-dtype fp8``: ``float8_e4m3fn`` or ``float8_e5m2``, one
  byte a value): :func:`store_kv` converts the new keys and values with PyTorch
  (saturated, rounded to nearest: :func:`~.torch_paged.to_cache_dtype`, the CPU path's
  conversion) and copies the bytes; the attention kernels load the bytes and widen them
  in registers with integer operations (:func:`_fp8_to_f32`, exact, on every
  architecture: sm_80 has no E4M3 conversion instruction), then run as for the model
  dtype.
* ``head_dim``: any value from 16 to 256 (padded internally to a power of two; a
  power of two wastes nothing).
* ``block_size`` (KV cache block): any positive integer; tiles of keys may span blocks.
* the last dimension of every tensor must be contiguous.

On a machine without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which the test-suite uses.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata
from .torch_paged import to_cache_dtype

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: FP8 cache element types -> the kernels' ``KV_FP8`` constexpr (0: the query's dtype).
_FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}


def _interpreting() -> bool:
    """Whether ``@triton.jit`` kernels run under Triton's CPU interpreter."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # older triton
        import os

        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_fp32(query: torch.Tensor) -> bool:
    """Whether the attention kernels do their ``tl.dot`` in IEEE fp32: for fp32 inputs
    (no TF32), and under the interpreter, whose ``tl.dot`` does not handle bf16
    operands. Upcasting 16-bit operands is exact (their products fit fp32) and the
    accumulation is fp32 either way, so the interpreter computes what the GPU does."""
    return query.dtype == torch.float32 or _interpreting()


def _cache_view(kv_cache: torch.Tensor, query_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``(cache to pass to the kernels, KV_FP8 code)``: an FP8 cache as its bytes (uint8
    view) with its code, any other cache as is (it must have the query's dtype).

    Raises:
        TypeError: a cache dtype that is neither the query's nor FP8.
    """
    code = _FP8_CODES.get(kv_cache.dtype, 0)
    if code:
        if kv_cache.stride(-1) != 1:
            raise ValueError("the last dimension must be contiguous")
        return kv_cache.view(torch.uint8), code
    _check_dtype(kv_cache)
    if kv_cache.dtype != query_dtype:
        raise TypeError(f"the cache ({kv_cache.dtype}) must have the query's dtype ({query_dtype}) or be FP8")
    return kv_cache, 0


@triton.jit
def _fp8_to_f32(b, KV_FP8: tl.constexpr):
    """FP8 bytes (uint8) -> fp32, exactly: E4M3 (``KV_FP8 == 1``: bias 7, no infinities,
    S.1111.111 is NaN; OCP FP8 spec) or E5M2 (``2``: bias 15, IEEE-like infinities and
    NaNs). Normals become fp32 bit patterns (exponent rebiased to 127, mantissa shifted
    to the top); subnormals are ``mantissa x 2^(1 - bias - mantissa bits)``."""
    x = b.to(tl.int32)
    sign = (x >> 7) & 1
    if KV_FP8 == 1:
        e = (x >> 3) & 0xF
        m = x & 0x7
        normal = ((e + (127 - 7)) << 23) | (m << 20)
        sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
        mag = tl.where(e == 0, sub, normal.to(tl.float32, bitcast=True))
        mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
    else:
        e = (x >> 2) & 0x1F
        m = x & 0x3
        normal = ((e + (127 - 15)) << 23) | (m << 21)
        sub = m.to(tl.float32) * 0.0000152587890625  # m * 2^-16
        mag = tl.where(e == 0, sub, normal.to(tl.float32, bitcast=True))
        mag = tl.where(e == 31, tl.where(m == 0, float("inf"), float("nan")), mag)
    return tl.where(sign == 1, -mag, mag)


def _check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"Triton kernels support float16/bfloat16/float32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError("the last dimension must be contiguous")


# ----------------------------------------------------------------------------- KV store
@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slots = tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot  # -1: padding, store nothing
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM) & (slots >= 0)
    k = tl.load(key_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = blk * stride_cb + off * stride_cs + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write the step's new keys/values into the paged cache (Triton).

    One program per token copies its ``[num_kv_heads, head_dim]`` key and value rows to
    cache slot ``slot_mapping[t]`` (``block = slot // block_size``,
    ``offset = slot % block_size``); programs whose slot is -1 (padding) store nothing.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype
            (fp16/bf16/fp32), last dim contiguous (other strides free: q/k/v slices of a
            fused projection are fine); with an FP8 cache, the model dtype (converted).
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, modified in place.
        meta: its ``slot_mapping`` (``[num_tokens] int64``, -1 = skip) is used.
    """
    num_tokens, kvh, d = key.shape
    if num_tokens == 0:
        return
    if kv_cache.dtype in _FP8_CODES:  # convert with PyTorch (saturate, round to nearest), copy the bytes
        key, value = (to_cache_dtype(t, kv_cache.dtype).view(torch.uint8) for t in (key, value))
        kv_cache = kv_cache.view(torch.uint8)
    else:
        _check_dtype(key, value, kv_cache)
    kc, vc = kv_cache[0], kv_cache[1]
    assert kc.stride() == vc.stride() and kc.shape[-2:] == (kvh, d)
    assert key.dtype == value.dtype == kv_cache.dtype, "key/value must have the cache dtype"
    _store_kv_kernel[(num_tokens,)](
        key, value, kc, vc, meta.slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        NUM_KV_HEADS=kvh, HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(d),
        BLOCK_SIZE=kc.shape[1],
    )


# ----------------------------------------------------------------------- paged attention
@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, KV_FP8: tl.constexpr = 0,
):
    # Program (q_block, seq, kv_head). Its BLOCK_M tile rows are BLOCK_Q query tokens x
    # the QUERIES_PER_KV query heads that share kv_head (row r: token r // G, head r % G),
    # so each key/value tile is loaded once for the whole GQA group.
    qb = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + r // QUERIES_PER_KV
    head = kvh * QUERIES_PER_KV + r % QUERIES_PER_KV
    row_ok = (r < BLOCK_Q * QUERIES_PER_KV) & (tok < q_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx_len + tok  # absolute position of each row's token in its sequence

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Keys this tile needs: all cached ones plus new ones up to its last token (causal).
    # A program past the end of its sequence's queries loops zero times and stores nothing.
    kv_end = tl.minimum(seq_len, ctx_len + (qb + 1) * BLOCK_Q)
    kv_end = tl.where(qb * BLOCK_Q < q_len, kv_end, 0)
    bt_row = block_tables_ptr + seq * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0)
        kv_off = blk.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if KV_FP8:  # bytes, widened exactly to the query's dtype
            k = _fp8_to_f32(tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0),
                            KV_FP8).to(q.dtype)
        else:
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:  # fp32 operands, IEEE (no TF32)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale  # [BLOCK_M, BLOCK_N] fp32
        s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        # Online softmax. Key 0 is visible to every row, so after the first tile m_i is
        # finite and no -inf - -inf arises.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            v = _fp8_to_f32(tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0),
                            KV_FP8).to(q.dtype)
        else:
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:  # P rounded to the value dtype first, as the 16-bit MMA path does
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale, part_len,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    KV_FP8: tl.constexpr = 0,
):
    # Split-KV decode (flash-decoding): program (split, seq, kv_head) attends the one
    # query token of `seq` (its GQA group of heads as rows) to keys
    # [split * part_len, (split + 1) * part_len) and writes the unnormalised partial
    # output plus its running max and sum; _combine_splits_kernel merges the splits.
    split = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    tok = tl.load(query_start_loc_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    r = tl.arange(0, BLOCK_M)
    head = kvh * QUERIES_PER_KV + r
    row_ok = r < QUERIES_PER_KV
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_start = split * part_len
    kv_end = tl.minimum(seq_len, kv_start + part_len)
    bt_row = block_tables_ptr + seq * stride_bt
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0)
        kv_off = blk.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if KV_FP8:  # bytes, widened exactly to the query's dtype
            k = _fp8_to_f32(tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0),
                            KV_FP8).to(q.dtype)
        else:
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            v = _fp8_to_f32(tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0),
                            KV_FP8).to(q.dtype)
        else:
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:  # P rounded to the value dtype first, as the 16-bit MMA path does
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # partials: acc [num_seqs, H, NUM_SPLITS, BLOCK_D], (m, l) [num_seqs, H, NUM_SPLITS, 2]
    base = (seq * NUM_HEADS + head) * NUM_SPLITS + split
    tl.store(part_acc_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, query_start_loc_ptr,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (seq, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + seq)
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < NUM_SPLITS
    base = (seq * NUM_HEADS + head) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + base * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + base * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)  # split 0 always holds key 0, so m_max is finite
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + base[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _auto_num_splits(query: torch.Tensor, meta: AttentionMetadata, kvh: int, block_n: int) -> int:
    """Splits of the context for a decode-only step: enough programs to fill the GPU
    (about 4 per SM), none shorter than 256 keys, at most 64."""
    if not query.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    programs = meta.num_seqs * kvh
    if programs >= 2 * sms:
        return 1
    want = -(-4 * sms // programs)
    return max(1, min(want, meta.max_seq_len // 256, 64))


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Paged attention for a step mixing decodes and prefill chunks (one Triton kernel).

    Query ``i`` of a sequence with ``q_len`` new tokens and ``seq_len`` total tokens sits
    at position ``seq_len - q_len + i`` and attends to every context position ``<=`` its
    own (causal within the new tokens, full over the cached ones). Query head ``h`` reads
    KV head ``h // (H / H_kv)`` (GQA/MQA). Softmax is FlashAttention-2's online softmax
    in fp32 over key tiles of ``block_n`` tokens gathered through the block table
    (PagedAttention). Grid: ``(cdiv(max_query_len, BLOCK_Q), num_seqs, H_kv)``; each
    program handles ``BLOCK_Q`` tokens x the ``H / H_kv`` heads of one KV head.

    Args:
        query: ``[num_tokens, H, head_dim]`` fp16/bf16/fp32 (last dim contiguous).
        kv_cache: ``[2, num_blocks, block_size, H_kv, head_dim]``, the query's dtype or
            FP8 (widened as read), already holding this step's keys/values (call
            :func:`store_kv` first).
        meta: ``query_start_loc [num_seqs+1] int32``, ``seq_lens [num_seqs] int32``,
            ``block_tables [num_seqs, max_blocks] int32``, ``max_query_len``. The
            decodes-first ordering is not required. Padding tokens past
            ``query_start_loc[-1]`` get unspecified output.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        out: optional ``[num_tokens, H, head_dim]`` output buffer.
        block_m: tile rows (query tokens x GQA group); default 16 for decode-only steps
            and fp32, 64 otherwise. Power of two >= 16.
        block_n: keys per tile, power of two >= 16; default 32 (16 for an FP8 cache with
            head_dim above 128, whose widening spilled registers at 32 on sm_80/sm_90).
            Tiles the caller sets are taken as given.
        num_splits: decode-only steps (``max_query_len == 1``) may split each context
            into this many parts processed by separate programs and merged by a second
            kernel (flash-decoding), so that few long sequences still fill the GPU.
            ``None``: chosen from the SM count (always 1 on CPU tensors).
    Returns:
        ``[num_tokens, H, head_dim]`` in the query's dtype.
    Limits:
        ``16 <= head_dim <= 256``; ``H`` divisible by ``H_kv``; ``H / H_kv <= block_m``.
    """
    _check_dtype(query)
    kv_cache, kv_fp8 = _cache_view(kv_cache, query.dtype)
    num_tokens, h, d = query.shape
    kc, vc = kv_cache[0], kv_cache[1]
    kvh = kc.shape[2]
    if h % kvh:
        raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    if not 16 <= d <= 256:
        raise ValueError(f"head_dim {d} outside [16, 256]")
    g = h // kvh
    if block_n is None:
        block_n = 16 if kv_fp8 and d > 128 else 32
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or meta.num_seqs == 0:
        return out
    if block_m is None:
        # 64-row tiles for prefill in 16-bit; fp32 tiles need twice the registers and
        # spill at 64 and 32 rows on sm_90 (python -m argosy.runtime.attention.compile_check
        # --dtypes fp32), so fp32 and decode-only steps use 16.
        # An FP8 cache's widening takes registers too: 64-row tiles spill 32 bytes on sm_80
        # (compile_check), 32-row ones do not; at head_dim 256 only 16 x 16 tiles are free
        # of spills on both architectures.
        block_m = 16 if meta.max_query_len == 1 or query.dtype == torch.float32 else (
            (16 if d > 128 else 32) if kv_fp8 else 64)
    block_m = max(block_m, triton.next_power_of_2(g), 16)
    if meta.max_query_len == 1:
        if num_splits is None:
            num_splits = _auto_num_splits(query, meta, kvh, block_n)
        if num_splits > 1:
            return _split_decode(query, kc, vc, meta, scale, out, g, block_n, num_splits, kv_fp8)
    block_q = block_m // g
    grid = (triton.cdiv(meta.max_query_len, block_q), meta.num_seqs, kvh)
    _paged_attention_kernel[grid](
        query, kc, vc, out,
        meta.block_tables, meta.seq_lens, meta.query_start_loc,
        float(scale),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), meta.block_tables.stride(0),
        QUERIES_PER_KV=g, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=kc.shape[1], BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_FP32=_dot_fp32(query), KV_FP8=kv_fp8,
        # head_dim 256 tiles spill registers at 4 warps on sm_80 (compile_check); 8 do not
        num_warps=8 if d > 128 else 4,
    )
    return out


def _split_decode(query, kc, vc, meta, scale, out, g, block_n, num_splits, kv_fp8=0):
    """Decode-only step through the split-KV kernel pair (see :func:`paged_attention`)."""
    num_seqs, h, d = meta.num_seqs, query.shape[1], query.shape[2]
    kvh = kc.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    part_len = triton.cdiv(triton.cdiv(meta.max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(meta.max_seq_len, part_len)
    part_acc = torch.empty(num_seqs, h, num_splits, block_d, dtype=torch.float32, device=query.device)
    part_ml = torch.empty(num_seqs, h, num_splits, 2, dtype=torch.float32, device=query.device)
    _paged_decode_split_kernel[(num_splits, num_seqs, kvh)](
        query, kc, vc, part_acc, part_ml,
        meta.block_tables, meta.seq_lens, meta.query_start_loc,
        float(scale), part_len,
        query.stride(0), query.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), meta.block_tables.stride(0),
        NUM_HEADS=h, NUM_SPLITS=num_splits, QUERIES_PER_KV=g, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_SIZE=kc.shape[1], BLOCK_M=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
        DOT_FP32=_dot_fp32(query), KV_FP8=kv_fp8,
    )
    _combine_splits_kernel[(num_seqs, h)](
        part_acc, part_ml, out, meta.query_start_loc,
        out.stride(0), out.stride(1),
        NUM_HEADS=h, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=d, BLOCK_D=block_d,
    )
    return out


# -------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < hidden
    # 16-bit arithmetic is done in fp32 and rounded once, as torch does for each op.
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + c, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * stride_ro + c, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / hidden
    y = (xf * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + c, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + c, (w.to(tl.float32) * y.to(tl.float32)).to(dtype), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm (Zhang & Sennrich 2019), one program per row.

    Matches HF ``LlamaRMSNorm`` rounding: ``h = x (+ residual)`` in the input dtype,
    ``weight * (h.float() * rsqrt(mean(h.float()**2) + eps)).to(dtype)``.

    Args:
        x: ``[T, hidden]`` fp16/bf16/fp32, rows contiguous.
        weight: ``[hidden]``, same dtype.
        eps: variance epsilon.
        residual: optional ``[T, hidden]``; when given, ``h = x + residual`` is normalised
            and also returned as the new residual.
    Returns:
        ``out [T, hidden]``, or ``(out, x + residual)`` when ``residual`` is given.
    Limits:
        one row must fit one program: ``hidden <= 65536``.
    """
    _check_dtype(x, weight)
    t, hidden = x.shape
    if hidden > 65536:
        raise ValueError("hidden size above 65536")
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if t:
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), res_out.stride(0),
            hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
        )
    return (out, res_out) if residual is not None else out


# ------------------------------------------------------------------------- rotary embedding
@triton.jit
def _rotary_kernel(
    x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok_i = i < HALF
    mask = (h[:, None] < NUM_HEADS) & ok_i[None, :]
    cos1 = tl.load(cos_ptr + pos * stride_c + i, mask=ok_i, other=0.0)
    cos2 = tl.load(cos_ptr + pos * stride_c + HALF + i, mask=ok_i, other=0.0)
    sin1 = tl.load(sin_ptr + pos * stride_c + i, mask=ok_i, other=0.0)
    sin2 = tl.load(sin_ptr + pos * stride_c + HALF + i, mask=ok_i, other=0.0)
    src = x_ptr + tok * stride_xt + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # fp32 arithmetic, one rounding at the store (the torch path rounds each product).
    o1 = x1 * cos1[None, :].to(tl.float32) - x2 * sin1[None, :].to(tl.float32)
    o2 = x2 * cos2[None, :].to(tl.float32) + x1 * sin2[None, :].to(tl.float32)
    dst = out_ptr + tok * stride_ot + h[:, None] * stride_oh + i[None, :]
    tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Rotate-half rotary embedding (Su et al., RoFormer 2021; HF layout), one program per token.

    ``out = x * cos[pos] + rotate_half(x) * sin[pos]`` with
    ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``.

    Args:
        x: ``[T, heads, head_dim]`` (q and k heads may be stacked), fp16/bf16/fp32, last
            dim contiguous.
        positions: ``[T]`` int32/int64 positions.
        cos, sin: ``[max_positions, head_dim]`` tables in ``x``'s dtype, rows contiguous.
        out: optional output (``x`` itself for in-place rotation).
    Returns:
        ``[T, heads, head_dim]`` in ``x``'s dtype.
    Limits:
        ``head_dim`` even; ``heads * head_dim / 2`` elements per program (fine up to
        several thousand).
    """
    _check_dtype(x, cos, sin)
    t, heads, d = x.shape
    if d % 2:
        raise ValueError("head_dim must be even")
    if out is None:
        out = torch.empty_like(x)
    if t:
        _rotary_kernel[(t,)](
            x, positions, cos, sin, out,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            NUM_HEADS=heads, HALF=d // 2,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(d // 2),
        )
    return out
