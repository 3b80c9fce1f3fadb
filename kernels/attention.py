"""Flash attention (the FlashAttention-2 algorithm) in Triton: forward, backward, GQA, packed documents.

Layouts follow the ops layer: q (B, Tq, H, D), k/v (B, Tk, Hkv, D), or (tokens, heads, D) for the varlen form,
where ``cu_seqlens`` gives each document's token range. One set of kernels serves all three forms: a
"batch" index picks either a batch row (dense, batch stride) or a document (varlen, batch stride 0 and a
start offset from ``cu_seqlens``); a per-row key length (``k_lens``) serves decoding against a KV cache.

Forward: one program per (query block, batch x head). Keys are streamed in blocks with the online softmax
in base 2 (the scale is pre-multiplied by log2(e), so each score costs one FMA and one exp2). Blocks that
need no mask (inside the causal triangle and the key range) run a loop without any ``where``; only the
diagonal/boundary blocks pay for masking, and causal programs skip blocks above the diagonal entirely. The
log-sum-exp (base 2, scaled units) is saved per query row for the backward.

Backward: ``delta = rowsum(dO * O)``, then two kernels as in FA2 / the Triton tutorial, so neither needs
atomics: one program per key block accumulates dK and dV over every query block *and every query head of
its GQA group* (so repeated k/v are never materialised and no reduction pass is needed), and one program
per query block accumulates dQ. Both recompute P from Q, K and the saved log-sum-exp.

The causal mask is aligned bottom-right: query i of Tq sees key j of Tk when ``j <= i + Tk - Tq``.
Sequence lengths are arbitrary: every block load is masked against the row's true length.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .grid import cdiv, next_power_of_2

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 96, 128, 256)
# Query rows per program of the backward's delta = rowsum(dO * O) pass.
PREPROCESS_BLOCK = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(kept: list) -> list:
    """The configs an autotuner times. ``SPARROW_AUTOTUNE=0`` keeps only the first that fits: each new shape then
    compiles one kernel instead of timing every tile, which is what correctness tests on a GPU lent for minutes
    can afford (the attention tests took 16-22 s each with tuning on an H200). Speed needs the tuning."""
    return kept[:1] if os.environ.get("SPARROW_AUTOTUNE", "1") == "0" else kept


# Triton's CPU interpreter computes bf16 tl.dot on the raw bit patterns (garbage); upcasting the operands,
# which already hold exactly-representable bf16/fp16 values, reproduces the GPU's fp32-accumulated product.
_INTERPRET: tl.constexpr = tl.constexpr(_interpreting())


@triton.jit
def _to16(x, dtype: tl.constexpr):
    """fp32 -> 16-bit, round to nearest even. That is what the GPU does; Triton's CPU interpreter truncates to
    bf16, which would add up to an ulp to every bf16 result under test, so there it rounds the bits first."""
    if _INTERPRET and dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


def _seqlen_bucket(n: int) -> int:
    """Autotuning key: a power-of-two bucket, so every new length does not trigger a new tuning run."""
    return min(next_power_of_2(max(n, 1)), 16384)


# ------------------------------------------------------------------------------------------------ configs
# The autotuners try only tiles that compile clean for the GPU they run on: no register spills, shared memory within
# the per-block limit, and on Hopper dots wgmma can take. ``benchmarks/static_check.py`` compiles every kept config
# for sm_80 and sm_90 and fails CI if one breaks these rules; the rules themselves live here, in ``_tile_cost`` and
# the budgets below.
#
# Register rule: each thread holds its share of the tiles live in the main loop, counted in fp32 values, which must
# stay within a per-(kernel, arch) budget (the rest of the 255 registers hold addresses, masks and statistics):
#   forward  acc (M x D) + scores (M x N)                                     -> M * (D + N) / threads
#   dK/dV    dK, dV (N x D each; one of them per pass when split) + P^T, dP^T, dS^T and their 16-bit copies
#                                                                             -> N * (2 * D + 4 * M) / threads
#   dQ       dQ and the q/dO operands (M x D) + P, dP, dS and copies (M x N)  -> 2 * M * (D + 2 * N) / threads
# The budgets come from ptxas reports over the full tile grid, head dims 64-256 (README "Static GPU check"): the
# configs above them spilled. Hopper's wgmma keeps its accumulators denser than Ampere's mma.sync, hence dQ's.
_FP32_PER_THREAD = {
    ("fwd", 80): 56, ("fwd", 90): 96,
    ("dkdv", 80): 80, ("dkdv", 90): 96,
    ("dq", 80): 64, ("dq", 90): 160,
}
# Every config lets ptxas use the whole 255 registers a thread may have. Left alone, ptxas squeezes an 8-warp block
# needing a little over 128 registers down to 128 (two blocks per SM) and spills instead; the autotuner, not that
# heuristic, should decide between fewer resident warps and a smaller tile.
_MAX_REGISTERS = 255
# Largest dynamic shared memory one block may use (bytes), by compute capability.
_SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Forward tiles (BLOCK_M, BLOCK_N, warps); the narrow 8-warp ones are what the widest heads (and Ampere's smaller
# register budget) fit. Three stages keep two K/V tiles in flight on both Ampere and Hopper.
_FWD_TILES = ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8), (128, 32, 8), (64, 32, 8))
_FWD_STAGES = 3
# Backward tiles, shared by the dK/dV and dQ kernels (pruned apart): two stages, as each loop step already streams
# two tiles (q and dO, or k and v) and the registers, not the latency, are the limit.
_BWD_TILES = ((32, 64, 4), (32, 64, 8), (64, 64, 4), (64, 64, 8), (32, 128, 8), (64, 128, 8), (16, 64, 8),
              (64, 32, 8))
_BWD_STAGES = 2


# From this head dim on, dK and dV are computed by two programs per key block instead of one: both fp32
# accumulators (2 x 64 x 256 values) and the K/V tiles do not fit one thread block's registers without spilling.
# Each pass recomputes P^T; the dV pass skips dP^T.
SPLIT_DKDV_HEAD_DIM = 256


def dkdv_passes(head_pow2: int) -> tuple[tuple[bool, bool], ...]:
    """(DO_DK, DO_DV) of each launch of the dK/dV kernel."""
    if head_pow2 >= SPLIT_DKDV_HEAD_DIM:
        return ((True, False), (False, True))
    return ((True, True),)


def _target_arch(named_args: dict, kwargs: dict) -> int:
    """The compute capability the kernel is compiled for (80, 90, ...): passed explicitly by the static check,
    read from the current CUDA device at launch."""
    if "arch" in kwargs:
        return int(kwargs["arch"])
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _tile_cost(kernel: str, arch: int, head_dim: int, bm: int, bn: int, warps: int, stages: int,
               accumulators: int = 2) -> tuple[bool, float]:
    """(whether the tile is possible at all on ``arch``, fp32 values live per thread): the one place the rules live."""
    threads = 32 * warps
    # Hopper's wgmma runs 64-row tiles per warpgroup; a smaller M falls back to the slower mma.sync path.
    # The M dimension is the query block for the forward and dQ, the key block for dK/dV.
    m_rows = bn if kernel == "dkdv" else bm
    if kernel == "fwd":
        live = bm * (head_dim + bn) / threads
        smem = 2 * head_dim * (bm + 2 * stages * bn)  # Q once, K and V per stage, 2 bytes each
    elif kernel == "dkdv":
        live = bn * (accumulators * head_dim + 4 * bm) / threads
        smem = 2 * head_dim * (2 * bn + 2 * stages * bm)  # K, V once, q and dO per stage
    else:
        live = 2 * bm * (head_dim + 2 * bn) / threads
        smem = 2 * head_dim * (2 * bm + 2 * stages * bn)  # q, dO once, K and V per stage
    possible = smem <= _SMEM_LIMIT[arch] and not (arch >= 90 and m_rows < 64)
    return possible, live


def _fwd_configs():
    if _interpreting():
        # Small blocks, so the CPU tests at tiny lengths (e.g. 33) still cross block boundaries and the diagonal;
        # not smaller, as the interpreter's cost is per block iteration.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=_FWD_STAGES,
                          maxnreg=_MAX_REGISTERS) for bm, bn, w in _FWD_TILES]


def _bwd_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=_BWD_STAGES,
                          maxnreg=_MAX_REGISTERS) for bm, bn, w in _BWD_TILES]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        arch = 90 if _target_arch(named_args, kwargs) >= 90 else 80
        accumulators = int(kwargs.get("DO_DK", True)) + int(kwargs.get("DO_DV", True))
        costs = [(c, *_tile_cost(kernel, arch, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                 c.num_stages, accumulators)) for c in configs]
        kept = [c for c, possible, live in costs if possible and live <= _FP32_PER_THREAD[(kernel, arch)]]
        if not kept:
            # The widest heads: the possible tile with the smallest live set (the static check says if it spills).
            possible = [(live, i) for i, (c, ok, live) in enumerate(costs) if ok]
            if not possible:
                raise ValueError(f"no {kernel} attention tile fits head_dim={head_dim} on sm_{arch}")
            kept = [costs[min(possible)[1]][0]]
        return _tuned(kept)

    prune.__name__ = f"_prune_{kernel}"
    return prune


_prune_fwd = _pruner("fwd")
_prune_dkdv = _pruner("dkdv")
_prune_dq = _pruner("dq")


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _seq_bounds(CU_Q, K_LENS, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr):
    """Where this batch row / document starts in the token axis, and its query and key lengths."""
    if VARLEN:
        start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - start
        len_k = len_q
    else:
        start = b * 0
        len_q = seqlen_q
        if HAS_K_LENS:
            len_k = tl.load(K_LENS + b)
        else:
            len_k = seqlen_k
    return start, len_q, len_k


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, len_k, diag, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASK:
            kv_mask = (offs_n < len_k)[:, None] & d_ok[None, :]
        else:
            kv_mask = (offs_n >= 0)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k)) * qk_scale
        if MASK:
            valid = (offs_n < len_k)[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot_acc(_to16(p, v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, K_LENS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    H, GROUP, seqlen_q, seqlen_k, qk_scale, TUNE_KEY,
    VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr, CAUSAL: tl.constexpr,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start, len_q, len_k = _seq_bounds(CU_Q, K_LENS, b, seqlen_q, seqlen_k, VARLEN, HAS_K_LENS)
    if start_m * BLOCK_M >= len_q:
        return
    diag = len_k - len_q

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    row_ok = offs_m < len_q
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + (start + offs_m).to(tl.int64)[:, None] * stride_qt
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh + start.to(tl.int64) * stride_kt
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + start.to(tl.int64) * stride_vt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + diag)
        # Keys below every row's diagonal of this block need no causal mask.
        full_end = tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_end = len_k
    full_end = tl.minimum(full_end, len_k // BLOCK_N * BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full_end,
                               len_k, diag, qk_scale, False, CAUSAL, BLOCK_N, D, HEAD_DIM)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full_end, hi,
                               len_k, diag, qk_scale, True, CAUSAL, BLOCK_N, D, HEAD_DIM)

    # No keys at all (an empty key range) yields zeros rather than 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + (start + offs_m).to(tl.int64)[:, None] * stride_ot
    tl.store(o_ptrs + offs_d[None, :], _to16(out, O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = m_i + tl.math.log2(l_safe)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + start + offs_m, lse, mask=row_ok)


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(), key=["HEAD_DIM", "CAUSAL", "VARLEN", "HAS_K_LENS", "TUNE_KEY", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_fwd_kernel)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    H, seqlen_q,
    VARLEN: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start, len_q, _ = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, VARLEN, False)
    if start_m * BLOCK_M >= len_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < len_q)[:, None] & (offs_d < D)[None, :]
    rows = (start + offs_m).to(tl.int64)[:, None]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + start + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh,
    HKV, GROUP, seqlen_q, seqlen_k, sm_scale, qk_scale, TUNE_KEY,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DO_DK: tl.constexpr = True, DO_DV: tl.constexpr = True,
):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    start, len_q, len_k = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_k, VARLEN, False)
    if start_n * BLOCK_N >= len_k:
        return
    diag = len_k - len_q
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    kv_mask = (offs_n < len_k)[:, None] & d_ok[None, :]
    rows_n = (start + offs_n).to(tl.int64)[:, None]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + rows_n * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh + rows_n * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    lo = 0
    if CAUSAL:
        # Query row i sees key j iff i >= j - diag: earlier query blocks contribute nothing.
        lo = tl.maximum(start_n * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
    offs_m0 = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + start.to(tl.int64) * stride_qt
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh + start.to(tl.int64) * stride_dot
        l_base = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + start
        d_base = DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + start
        for start_m in range(lo, len_q, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < len_q
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            # Rows past the end get lse = +inf, hence p = 0: no separate row mask on P is needed.
            lse = tl.load(l_base + offs_m, mask=m_ok, other=float("inf"))
            qkT = _dot(k, tl.trans(q)) * qk_scale
            pT = tl.math.exp2(qkT - lse[None, :])
            if CAUSAL:
                pT = tl.where(offs_m[None, :] + diag >= offs_n[:, None], pT, 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
            if DO_DV:
                dv = _dot_acc(_to16(pT, do.dtype), do, dv)
            if DO_DK:
                delta = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
                dpT = _dot(v, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk = _dot_acc(_to16(dsT, q.dtype), q, dk)
    if DO_DK:
        dk = dk * sm_scale
        tl.store(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + rows_n * stride_dkt + offs_d[None, :],
                 _to16(dk, DK.dtype.element_ty), mask=kv_mask)
    if DO_DV:
        tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + rows_n * stride_dvt + offs_d[None, :],
                 _to16(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    H, GROUP, seqlen_q, seqlen_k, sm_scale, qk_scale, TUNE_KEY,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Same grid prologue as _attn_fwd_kernel: inline in each, as Triton kernels take flat pointer/stride arguments.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start, len_q, len_k = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_k, VARLEN, False)
    if start_m * BLOCK_M >= len_q:
        return
    diag = len_k - len_q
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    m_ok = offs_m < len_q
    q_mask = m_ok[:, None] & d_ok[None, :]
    rows_m = (start + offs_m).to(tl.int64)[:, None]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows_m * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows_m * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + start + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + start + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh + start.to(tl.int64) * stride_kt
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + start.to(tl.int64) * stride_vt
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (start_m + 1) * BLOCK_M + diag)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < len_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(_to16(ds, k.dtype), k, dq)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows_m * stride_dqt + offs_d[None, :],
             _to16(dq, DQ.dtype.element_ty), mask=q_mask)


_bwd_dkdv_tuned = triton.autotune(
    configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "VARLEN", "TUNE_KEY", "GROUP", "DO_DK", "DO_DV"],
    prune_configs_by={"early_config_prune": _prune_dkdv},
)(_attn_bwd_dkdv_kernel)
_bwd_dq_tuned = triton.autotune(
    configs=_bwd_configs(), key=["HEAD_DIM", "CAUSAL", "VARLEN", "TUNE_KEY", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_dq},
)(_attn_bwd_dq_kernel)


# -------------------------------------------------------------------------------------------- launchers
def _as_batched(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed (tokens, heads, D) tensor is one "batch" of stride 0 whose
    documents are located through cu_seqlens."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _dims(q, k, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    if varlen:
        batch = cu_seqlens.shape[0] - 1
        seqlen_q = seqlen_k = max_seqlen
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    return varlen, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """The saved log-sum-exp: (B, H, Tq) dense, (H, tokens) varlen; fp32, base 2, in scaled-score units."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def attention_fwd(q, k, v, causal: bool, scale: float, cu_seqlens=None, max_seqlen=None, k_lens=None):
    """Returns (out, lse). ``k_lens`` (int32, per batch row) limits each row's keys (KV-cache decoding)."""
    varlen, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = _dims(q, k, cu_seqlens, max_seqlen)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    dummy = cu_seqlens if varlen else (k_lens if k_lens is not None else lse)
    grid = lambda meta: (cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd_tuned[grid](
        q, k, v, out, lse, dummy, k_lens if k_lens is not None else dummy,
        *_as_batched(q, varlen), *_as_batched(k, varlen), *_as_batched(v, varlen), *_as_batched(out, varlen),
        *_lse_strides(lse, varlen),
        heads, heads // kv_heads, seqlen_q, seqlen_k, scale * LOG2E, _seqlen_bucket(seqlen_k),
        VARLEN=varlen, HAS_K_LENS=k_lens is not None, CAUSAL=causal,
        D=head_dim, HEAD_DIM=max(next_power_of_2(head_dim), 16),
    )
    return out, lse


def attention_bwd(do, q, k, v, out, lse, causal: bool, scale: float, cu_seqlens=None, max_seqlen=None):
    """Returns (dq, dk, dv); dk and dv are already summed over the query heads of each GQA group."""
    varlen, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = _dims(q, k, cu_seqlens, max_seqlen)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_pow2 = max(next_power_of_2(head_dim), 16)
    delta = torch.empty_like(lse)
    cu = cu_seqlens if varlen else lse
    lse_strides = _lse_strides(lse, varlen)
    pre_block = PREPROCESS_BLOCK
    _bwd_preprocess_kernel[(cdiv(seqlen_q, pre_block), batch * heads)](
        out, do, delta, cu, *_as_batched(out, varlen), *_as_batched(do, varlen), *lse_strides,
        heads, seqlen_q, VARLEN=varlen, D=head_dim, HEAD_DIM=head_pow2, BLOCK_M=pre_block,
    )
    group = heads // kv_heads
    common = dict(VARLEN=varlen, CAUSAL=causal, D=head_dim, HEAD_DIM=head_pow2)
    strides_in = (*_as_batched(q, varlen), *_as_batched(k, varlen), *_as_batched(v, varlen), *_as_batched(do, varlen))
    bucket = _seqlen_bucket(max(seqlen_q, seqlen_k))
    for do_dk, do_dv in dkdv_passes(head_pow2):
        _bwd_dkdv_tuned[lambda meta: (cdiv(seqlen_k, meta["BLOCK_N"]), batch * kv_heads)](
            q, k, v, do, lse, delta, dk, dv, cu,
            *strides_in, *_as_batched(dk, varlen), *_as_batched(dv, varlen), *lse_strides,
            kv_heads, group, seqlen_q, seqlen_k, scale, scale * LOG2E, bucket, DO_DK=do_dk, DO_DV=do_dv, **common,
        )
    _bwd_dq_tuned[lambda meta: (cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, do, lse, delta, dq, cu,
        *strides_in, *_as_batched(dq, varlen), *lse_strides,
        heads, group, seqlen_q, seqlen_k, scale, scale * LOG2E, bucket, **common,
    )
    return dq, dk, dv
