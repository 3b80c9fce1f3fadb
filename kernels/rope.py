"""Rotary position embeddings (rotate-half convention, as HF Llama) in Triton.

Each program rotates every q head and every k head of a run of tokens: cos/sin for a position are loaded
once and reused across all heads, and q and k go through a single launch whatever their head counts
(GQA). cos/sin are indexed per (batch, position) when they carry a batch dim, so packed documents can restart
their positions. Only the first ``2 * cos.shape[-1]`` channels rotate; out of place the rest are copied,
in place they are left alone.

The backward of a rotation is the rotation by the negated angle, so the same kernel serves both directions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv, next_power_of_2


@triton.jit
def _rotate_heads(
    X, O, COS, SIN, b, t, token_mask, cols, col_mask,
    sx_b, sx_t, sx_h, so_b, so_t, so_h, H, HALF, D,
    BLOCK_H: tl.constexpr, BLOCK_REST: tl.constexpr, COPY_REST: tl.constexpr,
):
    # Tiles are (tokens, heads, pairs); cos/sin arrive as (tokens, pairs) and broadcast over heads.
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    row_mask = token_mask[:, None, None] & (heads < H)
    mask = row_mask & col_mask[None, None, :]
    x_base = X + b[:, None, None] * sx_b + t[:, None, None] * sx_t + heads * sx_h
    o_base = O + b[:, None, None] * so_b + t[:, None, None] * so_t + heads * so_h
    c = cols[None, None, :]
    x1 = tl.load(x_base + c, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF + c, mask=mask, other=0.0).to(tl.float32)
    cos = COS[:, None, :]
    sin = SIN[:, None, :]
    tl.store(o_base + c, (x1 * cos - x2 * sin).to(O.dtype.element_ty), mask=mask)
    tl.store(o_base + HALF + c, (x2 * cos + x1 * sin).to(O.dtype.element_ty), mask=mask)
    if COPY_REST:
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)[None, None, :]
        rest_mask = row_mask & (rest < D)
        tl.store(o_base + rest, tl.load(x_base + rest, mask=rest_mask), mask=rest_mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    T, TOKENS,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
    sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
    sc_b, sc_t, sc_d,
    HQ, HK, HALF, D,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr, COPY_REST: tl.constexpr, BACKWARD: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < TOKENS
    b = tokens // T
    t = tokens % T
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    c_off = b[:, None] * sc_b + t[:, None] * sc_t + cols[None, :] * sc_d
    c_mask = token_mask[:, None] & col_mask[None, :]
    cos = tl.load(COS + c_off, mask=c_mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + c_off, mask=c_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        sin = -sin
    _rotate_heads(Q, QO, cos, sin, b, t, token_mask, cols, col_mask, sq_b, sq_t, sq_h, sqo_b, sqo_t, sqo_h,
                  HQ, HALF, D, BLOCK_HQ, BLOCK_REST, COPY_REST)
    _rotate_heads(K, KO, cos, sin, b, t, token_mask, cols, col_mask, sk_b, sk_t, sk_h, sko_b, sko_t, sko_h,
                  HK, HALF, D, BLOCK_HK, BLOCK_REST, COPY_REST)


def _cos_strides(cos: torch.Tensor) -> tuple[int, int, int]:
    if cos.dim() == 2:  # shared by the whole batch
        return 0, cos.stride(0), cos.stride(1)
    return cos.stride(0), cos.stride(1), cos.stride(2)


def rope_launch(hq: int, hk: int, half: int, d: int, tokens: int, in_place: bool) -> dict:
    """Tile sizes and warps for a launch (also what the static check compiles)."""
    block_half = next_power_of_2(half)
    block_hq, block_hk = next_power_of_2(hq), next_power_of_2(hk)
    # Enough tokens per program for ~4K elements per tile: small-head models would otherwise leave most lanes
    # idle (and the interpreter pays per program).
    per_token = (block_hq + block_hk) * block_half
    cap = max(1, 4096 // per_token)
    block_t = min(next_power_of_2(tokens), 1 << (cap.bit_length() - 1))  # a power of two
    return dict(BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
                BLOCK_REST=next_power_of_2(max(d - 2 * half, 1)), COPY_REST=2 * half < d and not in_place,
                num_warps=8 if block_t * per_token >= 4096 else 4)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backward: bool = False,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, Hkv, D), unit stride along D. Writes into ``q_out``/``k_out`` when
    given (pass q and k themselves for in place), else into new contiguous tensors. ``backward`` rotates by
    the negated angle, which is the gradient of the forward rotation."""
    if cos.stride() != sin.stride():  # the kernel indexes both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, hq, d = q.shape
    hk = k.shape[2]
    half = cos.shape[-1]
    in_place = q_out is q and k_out is k
    q_out = torch.empty((batch, seq, hq, d), device=q.device, dtype=q.dtype) if q_out is None else q_out
    k_out = torch.empty((batch, seq, hk, d), device=k.device, dtype=k.dtype) if k_out is None else k_out
    tokens = batch * seq
    if tokens == 0:
        return q_out, k_out
    lp = rope_launch(hq, hk, half, d, tokens, in_place)
    _rope_kernel[(cdiv(tokens, lp["BLOCK_T"]),)](
        q, k, cos, sin, q_out, k_out,
        seq, tokens,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        *_cos_strides(cos),
        hq, hk, half, d, BACKWARD=backward, **lp,
    )
    return q_out, k_out
