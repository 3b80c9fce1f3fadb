"""Attention of new queries against a KV cache, in Triton.

Two paths:

* Prefill / several new tokens: the flash forward of :mod:`attention` with a per-row key length
  (``k_lens``), so each row attends only its own valid prefix, causal bottom-right within it.
* One new token (the decode step): split-KV ("flash-decoding"). A single query row per head leaves a
  (query block, head) grid far too small to fill the GPU and wastes most of a 16-row MMA tile, so instead
  the cache is cut into chunks, each program reduces one (row, kv head, chunk) for *all* query heads of the
  GQA group at once (the group is the M dimension of the tile, so K/V are read once per group), and writes a
  partial output with its log-sum-exp; a second small kernel merges the chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import LOG2E, _dot, _interpreting, _to16, attention_fwd
from .grid import cdiv, next_power_of_2


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, O_PART, LSE_PART,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_opb, stride_oph, stride_ops,
    stride_lpb, stride_lph,
    HKV, GROUP, chunk_len, qk_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    len_k = tl.load(LENS + b)
    lo = split * chunk_len
    hi = tl.minimum(lo + chunk_len, len_k)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    g_ok = offs_g < GROUP
    heads = hk * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Decoding is bound by reading the cache, so P stays fp32 (exact fp32 FMAs, not tf32) instead of being
        # rounded to 16 bits as in the compute-bound forward: a free ulp of accuracy.
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    # An empty chunk (past the row's length) records lse = -inf, which the merge weights by zero.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    op = O_PART + b.to(tl.int64) * stride_opb + heads[:, None] * stride_oph + split * stride_ops + offs_d[None, :]
    tl.store(op, acc / l_safe[:, None], mask=g_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + b.to(tl.int64) * stride_lpb + heads * stride_lph + split, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, OUT,
    stride_opb, stride_oph, stride_ops,
    stride_lpb, stride_lph,
    stride_ob, stride_oh,
    H, NUM_SPLITS,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + b.to(tl.int64) * stride_lpb + h * stride_lph + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    part = tl.load(O_PART + b.to(tl.int64) * stride_opb + h * stride_oph + offs_s[:, None] * stride_ops + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, _to16(out, OUT.dtype.element_ty), mask=offs_d < D)


def split_launch(head_dim: int, group: int, *, interpreting: bool) -> dict:
    """Tile and launch options of the split kernel: the GQA group padded to the 16-row MMA minimum, and a key block
    of 4096 / head_dim keys per step (64 at head dim 64, 16 at 256; 16 under the interpreter, which pays per
    step): the fp32 copy of V for the exact P @ V must fit the registers (the static check found 64 keys spilling
    at head dims 96-256). Also what the static check compiles."""
    block_n = 16 if interpreting else max(16, min(64, 4096 // max(next_power_of_2(head_dim), 16)))
    return dict(BLOCK_G=max(next_power_of_2(group), 16), BLOCK_N=block_n, num_warps=4, num_stages=3)


def _num_splits(batch_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough chunks to give every SM a couple of programs, but chunks of at least 256 keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = cdiv(2 * sms, max(batch_kv_heads, 1))
    return max(1, min(wanted, cdiv(max_len, 256 if device.type == "cuda" else 16), 128))


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale: float):
    """q (B, Tq, H, D); caches (B, max_len, Hkv, D); cache_seqlens int32 (B,), counting the new tokens."""
    if q.shape[1] != 1:
        out, _ = attention_fwd(q, k_cache, v_cache, True, scale, k_lens=cache_seqlens)
        return out
    batch, _, heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    splits = _num_splits(batch * kv_heads, max_len, q.device)
    chunk = cdiv(cdiv(max_len, splits), 64) * 64
    splits = cdiv(max_len, chunk)
    head_pow2 = max(next_power_of_2(head_dim), 16)
    o_part = torch.empty((batch, heads, splits, head_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    q2 = q[:, 0]
    launch = split_launch(head_dim, group, interpreting=_interpreting())
    _decode_split_kernel[(batch * kv_heads, splits)](
        q2, k_cache, v_cache, cache_seqlens, o_part, lse_part,
        q2.stride(0), q2.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        kv_heads, group, chunk, scale * LOG2E,
        D=head_dim, HEAD_DIM=head_pow2, **launch,
    )
    out = torch.empty_like(q)
    o2 = out[:, 0]
    _decode_merge_kernel[(batch * heads,)](
        o_part, lse_part, o2,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        o2.stride(0), o2.stride(1),
        heads, splits, D=head_dim, HEAD_DIM=head_pow2, BLOCK_S=max(next_power_of_2(splits), 2),
    )
    return out
