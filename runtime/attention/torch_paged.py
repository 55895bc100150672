"""Pure-torch paged attention: the CPU backend and the oracle for the Triton kernels.

Algorithm: PagedAttention (Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention", SOSP 2023): keys and values live in
fixed-size blocks; a sequence's context is the concatenation of the blocks listed in
its block table. Each step gathers the blocks it needs transiently and runs
``scaled_dot_product_attention``; no per-request KV tensor outlives the step.

Decode rows in bfloat16 take the C++ kernel of :mod:`.cpu_decode` instead (it reads the
blocks in place; :func:`use_decode_kernel`); float32, the exact path and the oracle the
Triton and C++ kernels are tested against, stays pure torch. An FP8 cache
(``--kv-cache-dtype fp8``: one byte a value) is widened to the query's dtype as blocks are
gathered here, and as rows are read in the C++ kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_decode
from .metadata import AttentionMetadata, DecodeMetadata


def use_decode_kernel(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when decode rows take the C++ kernel (:mod:`.cpu_decode`): CPU tensors in a
    reduced precision it supports, and the kernel built. float32 keeps the torch path
    (the exact path, and the kernel's oracle)."""
    return query.dtype != torch.float32 and cpu_decode.supports(query, kv_cache) and cpu_decode.kernel() is not None


#: FP8 cache element types (``--kv-cache-dtype``): values are stored unscaled (scale 1.0),
#: saturated to the type's finite range, and widened to the query's dtype where read.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the cache's element type: unchanged for the model dtype; for FP8, clamped
    to the type's largest finite value (E4M3 448, E5M2 57,344) and rounded to nearest, as
    vLLM's unscaled FP8 KV cache stores them."""
    if x.dtype == dtype:
        return x
    if dtype in FP8_DTYPES:
        m = torch.finfo(dtype).max
        return x.clamp(-m, m).to(dtype)
    return x.to(dtype)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write the step's new keys/values into the paged cache.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the model dtype (converted
            to the cache's, :func:`to_cache_dtype`).
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (modified in place).
        meta: ``slot_mapping`` gives the flat slot of each token; -1 entries are skipped.
    """
    kc = kv_cache[0].view(-1, kv_cache.shape[-2], kv_cache.shape[-1])
    vc = kv_cache[1].view(-1, kv_cache.shape[-2], kv_cache.shape[-1])
    slots = meta.slot_mapping
    if meta.has_padding:
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    key, value = to_cache_dtype(key, kv_cache.dtype), to_cache_dtype(value, kv_cache.dtype)
    if kv_cache.dtype in FP8_DTYPES:  # index_copy_ has no FP8 kernel: copy the bytes
        kc, vc, key, value = (t.view(torch.uint8) for t in (kc, vc, key, value))
    kc.index_copy_(0, slots, key)
    vc.index_copy_(0, slots, value)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, nblk]`` block ids -> ``[B, num_kv_heads, length, head_dim]`` context in
    ``dtype`` (a view, unless an FP8 cache is widened).

    ``index_select`` copies whole blocks (contiguous rows), several times faster on CPU
    than advanced indexing.
    """
    b = block_table.shape[0]
    x = torch.index_select(cache, 0, block_table.reshape(-1))  # [B*nblk, block_size, kvh, d]
    x = x.view(b, -1, cache.shape[-2], cache.shape[-1])[:, :length]
    return x.transpose(1, 2).to(dtype)


def _decode_attention(query, kc, vc, block_tables, seq_lens, lens: list[int], scale: float) -> torch.Tensor:
    """One query token per sequence: ``query [B, H, d]`` -> ``[B, H, d]``."""
    b, h, d = query.shape
    max_len = max(lens)
    nblk = -(-max_len // kc.shape[1])
    k = _gather(kc, block_tables[:, :nblk], max_len, query.dtype)
    v = _gather(vc, block_tables[:, :nblk], max_len, query.dtype)
    # GQA for one query token: the g query heads sharing a KV head become g query rows
    # of that head ([B, kvh, g, d]); K/V are never expanded.
    kvh = k.shape[1]
    q = query.view(b, kvh, h // kvh, d)
    mask = None
    if min(lens) != max_len:
        mask = (torch.arange(max_len, device=query.device)[None, :] < seq_lens[:, None]).view(b, 1, 1, max_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).view(b, h, d)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    use_kernel: Optional[bool] = None) -> torch.Tensor:
    """Attention of the step's queries over each sequence's paged context.

    Queries of a sequence are its newest ``query_len`` tokens; query ``i`` attends to
    context positions ``<= seq_len - query_len + i`` (causal within the new tokens, full
    over cached ones). GQA maps query head ``h`` to KV head ``h // (H / H_kv)``.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``.
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, already holding
            this step's keys/values (call :func:`store_kv` first).
        meta: step metadata (decodes first).
        scale: softmax scale, usually ``head_dim ** -0.5``.
        use_kernel: decode rows take the C++ kernel; None: decided here by
            :func:`use_decode_kernel` (~3 us; the model runner decides once at startup).
    Returns:
        ``[num_tokens, num_heads, head_dim]`` in the query's dtype.
    """
    kc, vc = kv_cache[0], kv_cache[1]
    block_size = kc.shape[1]
    out = torch.empty_like(query)
    nd = meta.num_decodes
    if nd and (use_decode_kernel(query, kv_cache) if use_kernel is None else use_kernel):
        out[:nd] = torch.ops.argosy.paged_decode_attention(query[:nd], kv_cache, meta.block_tables[:nd],
                                                           meta.seq_lens[:nd], scale)
    elif nd:
        # Decodes of similar length are batched together (padding kept small).
        for idx, members in meta.decode_groups():
            lens = [meta.seq_lens_cpu[i] for i in members]
            rows = query[:nd] if idx is None else query.index_select(0, idx)
            bt = meta.block_tables[:nd] if idx is None else meta.block_tables.index_select(0, idx)
            seq_lens = meta.seq_lens[:nd] if idx is None else meta.seq_lens.index_select(0, idx)
            res = _decode_attention(rows, kc, vc, bt, seq_lens, lens, scale)
            if idx is None:
                out[:nd] = res
            else:
                out.index_copy_(0, idx, res)
    row_start = meta.row_starts
    cascaded: set[int] = set()
    groups = meta.shared_prefix_groups(block_size, CASCADE_MIN_PREFIX_TOKENS) if query.device.type == "cpu" else []
    for members, nblk in groups:  # (PyTorch's flash attention with log-sum-exp is CPU-only)
        _cascade_attention(query, kc, vc, meta, members, row_start, nblk, scale, out)
        cascaded.update(members)
    for s in range(nd, meta.num_seqs):
        if s in cascaded:
            continue
        qlen, slen = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
        start = row_start[s]
        end = start + qlen
        nblk = -(-slen // block_size)
        bt = meta.block_tables[s : s + 1, :nblk]
        k = _gather(kc, bt, slen, query.dtype)
        v = _gather(vc, bt, slen, query.dtype)
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, qlen, d]
        ctx = slen - qlen
        if ctx == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            pos_q = torch.arange(ctx, slen, device=query.device)
            mask = torch.arange(slen, device=query.device)[None, :] <= pos_q[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


#: Prefill sequences of one step that share at least this many tokens of cached prompt
#: prefix (the same physical blocks) take cascade attention (:func:`_cascade_attention`).
CASCADE_MIN_PREFIX_TOKENS = 256


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None):
    """PyTorch's CPU flash attention with its log-sum-exp: ``q [1, kvh, L, d]``,
    ``k``/``v [1, kvh, S, d]``, ``mask [L, S]`` additive in q's dtype ->
    ``(out [1, kvh, L, d], lse [1, kvh, L] float32)`` (natural log)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)[:2]
    return out, lse


def _cascade_inputs(meta: AttentionMetadata, members: list[int], row_start: list[int], p: int, g: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A cascade group's query-row indices ``[T] int64`` and, per member, its additive
    causal mask over its own keys (positions ``p`` .. ``seq_len - 1``), ``[g * qlen,
    seq_len - p]`` in ``dtype``: built once per step (``meta.step_cache``), used by every
    layer."""
    key = ("cascade", tuple(members), p, g, dtype)
    got = meta.step_cache.get(key)
    if got is None:
        dev = meta.block_tables.device
        idx = torch.cat([torch.arange(row_start[s], row_start[s + 1], device=dev) for s in members])
        masks = []
        for s in members:
            qlen, slen = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
            allowed = torch.arange(p, slen, device=dev)[None, :] <= torch.arange(slen - qlen, slen, device=dev)[:, None]
            mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
            masks.append(mask.repeat(g, 1))
        got = meta.step_cache[key] = (idx, masks)
    return got


def _cascade_attention(query, kc, vc, meta: AttentionMetadata, members: list[int], row_start: list[int],
                       nblk: int, scale: float, out: torch.Tensor) -> None:
    """Attention of prefill sequences whose block tables share their first ``nblk`` blocks,
    written into their rows of ``out``: the shared prefix is gathered once and every
    member's query rows attend to it in one call (no mask: it precedes all of them), then
    each member's own rest of the context (causal mask), and the two partial results are
    merged by their log-sum-exp: ``o = (o1 e^{l1} + o2 e^{l2}) / (e^{l1} + e^{l2})``.
    Cascade (shared-prefix) attention as in FlashInfer (Ye et al., "Cascade Inference",
    2024) and vLLM's ``use_cascade_attention``; exact up to rounding. On a CPU the gain is
    that the prefix's K/V are read and packed once instead of once per sequence (a burst
    of 31 requests over a 1,000-token cached prompt: 13 -> ~5 ms a layer).

    Query heads sharing a KV head are folded into query rows (``[1, kvh, g * T, d]``), so
    K/V are never repeated. Shapes: ``query [num_tokens, H, d]``, ``kc``/``vc
    [num_blocks, block_size, kvh, d]``.
    """
    bs, kvh, d = kc.shape[1], kc.shape[-2], kc.shape[-1]
    h = query.shape[1]
    g = h // kvh
    p = nblk * bs
    dev = query.device
    idx, masks = _cascade_inputs(meta, members, row_start, p, g, query.dtype)
    q = query.index_select(0, idx)
    t = q.shape[0]

    def fold(x: torch.Tensor) -> torch.Tensor:  # [n, H, d] -> [1, kvh, g * n, d], rows (head in group, token)
        return x.view(x.shape[0], kvh, g, d).permute(1, 2, 0, 3).reshape(1, kvh, g * x.shape[0], d)

    def unfold(o: torch.Tensor, lse: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (o.view(kvh, g, n, d).permute(2, 0, 1, 3).reshape(n, h, d),
                lse.view(kvh, g, n).permute(2, 0, 1).reshape(n, h))

    head = meta.block_tables[members[0] : members[0] + 1, :nblk]
    o_p, lse_p = unfold(*_flash(fold(q), _gather(kc, head, p, q.dtype), _gather(vc, head, p, q.dtype), scale), t)
    o_s = torch.empty_like(q)
    lse_s = torch.empty(t, h, dtype=torch.float32, device=dev)
    r = 0
    for s, mask in zip(members, masks):
        qlen, slen = meta.query_lens_cpu[s], meta.seq_lens_cpu[s]
        bt = meta.block_tables[s : s + 1, nblk : -(-slen // bs)]
        o, lse = _flash(fold(q[r : r + qlen]), _gather(kc, bt, slen - p, q.dtype), _gather(vc, bt, slen - p, q.dtype),
                        scale, mask)
        o_s[r : r + qlen], lse_s[r : r + qlen] = unfold(o, lse, qlen)
        r += qlen
    lse = torch.logaddexp(lse_p, lse_s)
    merged = o_p.float() * torch.exp(lse_p - lse).unsqueeze(-1) + o_s.float() * torch.exp(lse_s - lse).unsqueeze(-1)
    out.index_copy_(0, idx, merged.to(out.dtype))


def store_kv_decode(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: DecodeMetadata) -> None:
    """:func:`store_kv` for a decode-only step, as one ``index_put_`` on the whole cache
    tensor (no views of it are mutated, so ``torch.compile`` writes the slots in place
    instead of copying the cache).

    Args:
        key, value: ``[B, num_kv_heads, head_dim]``, the model dtype (converted to the
            cache's, :func:`to_cache_dtype`).
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (modified in place).
        meta: ``slot_mapping [B]`` (every entry a real slot).
    """
    block_size = kv_cache.shape[2]
    slots = meta.slot_mapping
    blk = torch.div(slots, block_size, rounding_mode="floor")
    which = torch.arange(2, device=slots.device)[:, None]
    kv_cache.index_put_((which, blk[None, :], (slots - blk * block_size)[None, :]),
                        to_cache_dtype(torch.stack((key, value)), kv_cache.dtype))


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: DecodeMetadata, scale: float,
                     use_kernel: Optional[bool] = None) -> torch.Tensor:
    """:func:`paged_attention` for a decode-only step, in tensor ops only (traceable).

    In reduced precision on the CPU this is the C++ kernel (:func:`use_decode_kernel`, one
    opaque op in a compiled graph). Otherwise every sequence's ``W`` table blocks are
    gathered (``index_select`` of whole blocks) into
    ``[B, kv_heads, W * block_size, head_dim]`` and positions at or past its
    ``seq_len`` are masked, so a batch of very different lengths reads ``B x`` the longest
    context (the eager path groups similar lengths instead). GQA as in
    :func:`_decode_attention`: the ``g`` query heads of a KV head are ``g`` query rows.

    Args:
        query: ``[B, num_heads, head_dim]``.
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` holding this step's keys/values.
        meta: the step's :class:`DecodeMetadata`.
        scale: softmax scale.
        use_kernel: as in :func:`paged_attention`.
    Returns:
        ``[B, num_heads, head_dim]`` in the query's dtype.
    """
    if use_decode_kernel(query, kv_cache) if use_kernel is None else use_kernel:  # reads the blocks in place, no padding
        return torch.ops.argosy.paged_decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, scale)
    b, h, d = query.shape
    kvh = kv_cache.shape[-2]
    bt = meta.block_tables
    ctx = bt.shape[1] * kv_cache.shape[2]
    idx = bt.flatten()
    # explicit sizes (no -1): inferring one would make torch.compile specialize b == 1
    k = kv_cache[0].index_select(0, idx).view(b, ctx, kvh, d).transpose(1, 2).to(query.dtype)
    v = kv_cache[1].index_select(0, idx).view(b, ctx, kvh, d).transpose(1, 2).to(query.dtype)
    mask = (torch.arange(ctx, device=query.device)[None, :] < meta.seq_lens[:, None])[:, None, None, :]
    q = query.unflatten(1, (kvh, h // kvh))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).flatten(1, 2)
