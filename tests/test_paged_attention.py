"""The pure-torch paged attention against dense causal attention (it is the oracle for
the GPU kernels, so it gets its own oracle: a straightforward float64 computation)."""

from __future__ import annotations

import pytest
import torch

from argosy.runtime.attention import AttentionMetadata, paged_attention, store_kv


def _dense_reference(q_new, k_all, v_all, ctx_len, scale):
    """q_new [qlen, H, d]; k_all/v_all [L, Hkv, d] (context incl. new tokens)."""
    qlen, h, d = q_new.shape
    hkv = k_all.shape[1]
    k = k_all.double().repeat_interleave(h // hkv, dim=1)
    v = v_all.double().repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q_new.double(), k) * scale
    pos_q = torch.arange(ctx_len, ctx_len + qlen)[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_mixed_step_matches_dense(gqa, dtype, atol):
    torch.manual_seed(gqa)
    hkv, d, bs, num_blocks = 2, 32, 16, 64
    h = hkv * gqa
    # (context already cached, new tokens): decodes first, then prefill chunks.
    seqs = [(37, 1), (5, 1), (16, 1), (0, 23), (40, 9), (0, 1)]
    seqs = [s for s in seqs if s[1] == 1 and s[0] > 0] + [s for s in seqs if not (s[1] == 1 and s[0] > 0)]
    cache = torch.zeros(2, num_blocks, bs, hkv, d, dtype=dtype)
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous blocks
    tables, slot_mapping, q_parts, ref_parts = [], [], [], []
    seq_lens, query_lens = [], []
    for ctx, qlen in seqs:
        total = ctx + qlen
        nblk = -(-total // bs)
        table = [perm.pop() for _ in range(nblk)]
        tables.append(table)
        k_all = torch.randn(total, hkv, d).to(dtype)
        v_all = torch.randn(total, hkv, d).to(dtype)
        for p in range(ctx):  # the cached context
            cache[0, table[p // bs], p % bs] = k_all[p]
            cache[1, table[p // bs], p % bs] = v_all[p]
        slot_mapping += [table[p // bs] * bs + p % bs for p in range(ctx, total)]
        q = torch.randn(qlen, h, d).to(dtype)
        q_parts.append(q)
        ref_parts.append(_dense_reference(q, k_all, v_all, ctx, d**-0.5))
        q_parts[-1] = (q, k_all[ctx:], v_all[ctx:])
        seq_lens.append(total)
        query_lens.append(qlen)
    num_decodes = sum(1 for c, ql in seqs if ql == 1 and c > 0)
    max_blocks = max(map(len, tables))
    bt = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    # one padding token (slot -1) at the end, as CUDA graphs would add
    slot = torch.tensor(slot_mapping + [-1], dtype=torch.int64)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(slot, bt, torch.tensor(seq_lens, dtype=torch.int32), qsl, max(query_lens),
                             max(seq_lens), num_decodes, seq_lens, query_lens, has_padding=True)
    q = torch.cat([p[0] for p in q_parts])
    k_new = torch.cat([p[1] for p in q_parts] + [torch.full((1, hkv, d), 99.0, dtype=dtype)])
    v_new = torch.cat([p[2] for p in q_parts] + [torch.full((1, hkv, d), 99.0, dtype=dtype)])
    before = cache.clone()
    store_kv(k_new, v_new, cache, meta)
    # padding wrote nothing; every real slot holds its token
    changed = (cache != before).any(-1).any(-1).view(2, -1).any(0).nonzero().flatten().tolist()
    assert set(changed) <= set(slot_mapping)
    out = paged_attention(q, cache, meta, d**-0.5)
    ref = torch.cat(ref_parts)
    assert out.shape == q.shape and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    assert err < atol, f"max error {err} (gqa={gqa}, {dtype})"


@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_shared_prefix_step_takes_cascade_attention_and_matches_dense(gqa, dtype, atol):
    """Prefill sequences whose block tables start with the same blocks (a prompt prefix
    hit in the prefix cache) are one cascade group: shared prefix once, own rest per
    sequence, merged by log-sum-exp. Same answer as dense attention, including members
    with their own cached context after the prefix, a member too short to join, and a
    decode and an unrelated prefill in the same step."""
    from argosy.runtime.attention import torch_paged

    torch.manual_seed(10 + gqa)
    hkv, d, bs, num_blocks = 2, 32, 16, 160
    h = hkv * gqa
    shared_blocks = 20  # 320 tokens >= CASCADE_MIN_PREFIX_TOKENS
    assert shared_blocks * bs >= torch_paged.CASCADE_MIN_PREFIX_TOKENS
    perm = torch.randperm(num_blocks).tolist()
    shared_table = [perm.pop() for _ in range(shared_blocks)]
    k_shared = torch.randn(shared_blocks * bs, hkv, d).to(dtype)
    v_shared = torch.randn(shared_blocks * bs, hkv, d).to(dtype)
    cache = torch.zeros(2, num_blocks, bs, hkv, d, dtype=dtype)
    # (shares the prefix, context cached before this step, new tokens); decode first
    seqs = [(False, 70, 1), (True, 320, 23), (True, 320 + 37, 9), (True, 320 + 16, 1 + 16), (False, 0, 30),
            (True, 100, 12), (True, 320, 5)]
    tables, slots, qs, ks, vs, refs, seq_lens, query_lens = [], [], [], [], [], [], [], []
    for shares, ctx, qlen in seqs:
        total = ctx + qlen
        k_all = torch.randn(total, hkv, d).to(dtype)
        v_all = torch.randn(total, hkv, d).to(dtype)
        n_sh = min(shared_blocks, ctx // bs) if shares else 0
        k_all[: n_sh * bs], v_all[: n_sh * bs] = k_shared[: n_sh * bs], v_shared[: n_sh * bs]
        table = shared_table[:n_sh] + [perm.pop() for _ in range(-(-total // bs) - n_sh)]
        for p in range(n_sh * bs, ctx):
            cache[0, table[p // bs], p % bs], cache[1, table[p // bs], p % bs] = k_all[p], v_all[p]
        slots += [table[p // bs] * bs + p % bs for p in range(ctx, total)]
        q = torch.randn(qlen, h, d).to(dtype)
        qs.append(q), ks.append(k_all[ctx:]), vs.append(v_all[ctx:])
        refs.append(_dense_reference(q, k_all, v_all, ctx, d**-0.5))
        tables.append(table), seq_lens.append(total), query_lens.append(qlen)
    for p in range(shared_blocks * bs):
        cache[0, shared_table[p // bs], p % bs], cache[1, shared_table[p // bs], p % bs] = k_shared[p], v_shared[p]
    bt = torch.zeros(len(seqs), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), bt, torch.tensor(seq_lens, dtype=torch.int32), qsl,
                             max(query_lens), max(seq_lens), 1, seq_lens, query_lens)
    store_kv(torch.cat(ks), torch.cat(vs), cache, meta)
    groups = meta.shared_prefix_groups(bs, torch_paged.CASCADE_MIN_PREFIX_TOKENS)
    assert groups == [([1, 2, 3, 6], shared_blocks)], groups  # seq 5 holds only 6 of the blocks
    out = paged_attention(torch.cat(qs), cache, meta, d**-0.5)
    err = (out.double() - torch.cat(refs)).abs().max().item()
    assert err < atol, f"max error {err} (gqa={gqa}, {dtype})"
