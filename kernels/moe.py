"""Grouped GEMM for mixture-of-experts layers in Triton: every expert's matmul in one launch, over groups of rows
of variable size, with no padding to a capacity.

The rows (token copies, one per (token, chosen expert)) are sorted by expert, so expert e owns the contiguous rows
``offsets[e]:offsets[e + 1]`` (``offsets`` int32, E + 1 entries, from a cumulative sum of the per-expert counts).

``grouped_mm``: ``out[rows of e] = a[rows of e] @ B_e`` with ``B_e = w[e].T`` (``transpose_w``, the forward of
``x @ W.T`` weights stored (E, N, K) as nn.Linear does) or ``B_e = w[e]`` (the input gradient). The grid has one
program per (row tile, column tile); row tiles are numbered expert by expert, each expert owning
``cdiv(count_e, BLOCK_M)`` of them, so a tile never straddles two experts and an empty expert costs nothing. The
launch size must not depend on the counts (reading them would sync the host): it is the bound
``cdiv(M, BLOCK_M) + E`` (each expert wastes at most one partial tile) and programs past the last tile do no work.
Each program finds its expert by walking the E offsets, O(E) scalar loads, negligible beside its K loop;
the programs past the last tile skip the K loop (row_end stays 0, so they store nothing).

``grouped_mm_wgrad``: ``dw[e] = g[rows of e].T @ a[rows of e]``, the weight gradient, one program per (expert,
N tile, K tile) looping over that expert's rows; an expert with no rows gets zeros.

Accumulation is fp32; fp32 inputs use IEEE products (not TF32) so the result matches the reference loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _interpreting, _tuned
from .grid import cdiv, next_power_of_2


# Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits; upcasting the (exactly representable)
# values reproduces the GPU's fp32-accumulated product.
_INTERPRET: tl.constexpr = tl.constexpr(_interpreting())


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ------------------------------------------------------------------------------------------------ configs
def _tile_grid(*, bms, bns, bks, stages, warps=(4, 8)):
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) combination, in that nesting order; the prune functions
    then drop what does not fit."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm in bms for bn in bns for bk in bks for w in warps for st in stages]


def _mm_configs():
    if _interpreting():
        # 16 is tl.dot's minimum; tiny test shapes then still cross tile and expert boundaries.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return _tile_grid(bms=(64, 128), bns=(64, 128), bks=(32, 64), stages=(2, 3, 4))


def _prune_mm(configs, named_args, **kwargs):
    """Drop tiles that overflow shared memory (A and B tiles per stage, 2 bytes per 16-bit element, 4 for fp32)
    or that are wider than the problem."""
    a = named_args.get("A")
    elt = a.element_size() if a is not None else 2
    n = named_args.get("N", kwargs.get("N", 4096))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm + bn) * bk * elt * c.num_stages > 160 * 1024:
            continue
        if bn > 64 and n <= 64:
            continue
        if bm * bn >= 128 * 128 and c.num_warps == 4:
            continue
        kept.append(c)
    return _tuned(kept or configs[:1])


# Narrower M and deeper K than _mm_configs: the wgrad GEMM reduces over tokens.
def _wgrad_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return _tile_grid(bms=(32, 64), bns=(64, 128), bks=(64, 128), stages=(2, 3))


def _prune_wgrad(configs, named_args, **kwargs):
    a = named_args.get("A")
    elt = a.element_size() if a is not None else 2
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bn + bk) * bm * elt * c.num_stages > 160 * 1024:
            continue
        if bn * bk >= 128 * 128 and c.num_warps == 4:
            continue
        kept.append(c)
    return _tuned(kept or configs[:1])


def _bucket(n: int) -> int:
    """Autotuning key: a power-of-two bucket of the row count, so every batch does not retune."""
    return min(next_power_of_2(max(n, 1)), 65536)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _grouped_mm_kernel(
    A, W, C, OFFSETS,
    N, K, E,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_cm, stride_cn,
    M_BUCKET,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert owns row tile pid_m, and where its rows start and end.
    remaining = pid_m
    expert = pid_m * 0 - 1
    row_start = pid_m * 0
    row_end = pid_m * 0
    for e in range(0, E):
        start = tl.load(OFFSETS + e)
        end = tl.load(OFFSETS + e + 1)
        tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (remaining >= 0) & (remaining < tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, start + remaining * BLOCK_M, row_start)
        row_end = tl.where(hit, end, row_end)
        remaining -= tiles
    # A program past the last tile (the grid is an upper bound) loops zero times and stores nothing.
    k_end = tl.where(expert >= 0, K, 0)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < row_end
    n_ok = offs_n < N
    w_base = W + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, IEEE)
    tl.store(C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_mm_wgrad_kernel(
    G, A, DW, OFFSETS,
    N, K,
    stride_gm, stride_gn, stride_am, stride_ak, stride_de, stride_dn, stride_dk,
    M_BUCKET,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        g = tl.load(G + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot_acc(tl.trans(g), a, acc, IEEE)
    tl.store(DW + expert.to(tl.int64) * stride_de + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk,
             acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


_grouped_mm_tuned = triton.autotune(
    configs=_mm_configs(), key=["N", "K", "M_BUCKET", "IEEE"], prune_configs_by={"early_config_prune": _prune_mm},
)(_grouped_mm_kernel)

_grouped_mm_wgrad_tuned = triton.autotune(
    configs=_wgrad_configs(), key=["N", "K", "M_BUCKET", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_wgrad},
)(_grouped_mm_wgrad_kernel)


# ------------------------------------------------------------------------------------------------ launchers
def grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """a (M, K) sorted by expert, w (E, N, K) if ``transpose_w`` else (E, K, N), offsets int32 (E + 1,) ->
    (M, N), rows of expert e multiplied by ``w[e].T`` (or ``w[e]``)."""
    m, k = a.shape
    experts = w.shape[0]
    if transpose_w:
        n, stride_wk, stride_wn = w.shape[1], w.stride(2), w.stride(1)
    else:
        n, stride_wk, stride_wn = w.shape[2], w.stride(1), w.stride(2)
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) + experts, cdiv(n, meta["BLOCK_N"]))

    _grouped_mm_tuned[grid](
        a, w, out, offsets, n, k, experts,
        a.stride(0), a.stride(1), w.stride(0), stride_wk, stride_wn, out.stride(0), out.stride(1),
        _bucket(m), IEEE=a.dtype == torch.float32,
    )
    return out


def grouped_mm_wgrad(g: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:
    """g (M, N), a (M, K), both sorted by expert -> (E, N, K) with ``dw[e] = g[rows e].T @ a[rows e]``."""
    m, n = g.shape
    k = a.shape[1]
    dw = torch.empty((experts, n, k), device=a.device, dtype=a.dtype)
    if experts == 0 or n == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()

    def grid(meta):
        return (experts, cdiv(n, meta["BLOCK_N"]), cdiv(k, meta["BLOCK_K"]))

    _grouped_mm_wgrad_tuned[grid](
        g, a, dw, offsets, n, k,
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        _bucket(m), IEEE=a.dtype == torch.float32,
    )
    return dw
