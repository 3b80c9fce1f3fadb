"""RMSNorm (and the fused residual add + RMSNorm) in Triton: forward, backward, and the launch wrappers.

Forward: one program per row (several when rows are short). Rows up to ``MAX_FUSED_FWD`` elements are held
whole in registers, so x is read from HBM once; longer rows take a two-pass loop (sum of squares, then
scale) whose second read mostly hits L2. rstd is written per row (fp32) for the backward pass.

Backward: a persistent grid of at most ``2 x SM count`` programs, each walking a contiguous run of rows and
keeping its own fp32 dW partial, written once at the end. The second pass sums ``programs x hidden`` floats,
which does not grow with the number of rows (the apex / Liger scheme, without atomics).

All arithmetic is fp32; x, dy and the outputs stay in their own dtype in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grid import cdiv, next_power_of_2

MAX_HIDDEN = 65536
# Above these a row no longer fits comfortably in registers (the backward holds x, dy, w and the dW partial).
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
# Chunk width of the looped variants.
LOOP_BLOCK = 4096


def _num_warps(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _num_programs(device: torch.device, rows: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    # The interpreter runs programs one after another; a few are enough to exercise the partial reduction.
    return max(1, min(rows, 4))


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, HAS_RES: tl.constexpr,
):
    if ONE_PASS:
        # BLOCK_M rows per program (more than one only for short rows, which would leave lanes idle).
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.arange(0, BLOCK)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # The norm sees the sum rounded to the storage dtype, exactly as the returned residual stream.
            summed = (x + r).to(S.dtype.element_ty)
            tl.store(S + rows[:, None] * stride_s + cols[None, :], summed, mask=mask)
            x = summed.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        r_row = R + row * stride_r
        y_row = Y + row * stride_y
        s_row = S + row * stride_s
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                summed = (x + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
                tl.store(s_row + cols, summed, mask=mask)
                x = summed.to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N
            if HAS_RES:
                x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DS, DWP,
    stride_dy, stride_x, stride_dx, stride_ds,
    M, N, rows_per_program,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, HAS_DS: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row indices: row * stride overflows int32 beyond 2**31 elements.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dwp_row = DWP + pid.to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        # Pipelined on the GPU: the next row's x and dy are in flight while this one is reduced, which is what
        # keeps a grid of only 2 programs per SM near the bandwidth limit.
        for row in tl.range(row_start, row_end, num_stages=2):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / N))
            if HAS_DS:
                dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
        tl.store(dwp_row + cols, dw, mask=mask)
    else:
        # The partial row lives in global memory (zeroed by the wrapper); this program alone touches it.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc += w * dy * x
            # Second pass over the same columns: it needs c (the whole row's sum); the row is too long for registers.
            c = tl.sum(acc, axis=0) * rstd * rstd / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N
                x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = rstd * (w * dy - x * c)
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                part = tl.load(dwp_row + cols, mask=mask, other=0.0)
                tl.store(dwp_row + cols, part + dy * x * rstd, mask=mask)


def fwd_launch(n: int, rows: int, *, max_fused: int = MAX_FUSED_FWD) -> dict:
    """Tile and warps of the forward for rows of ``n`` elements (also what the static check compiles)."""
    block = next_power_of_2(n)
    one_pass = block <= max_fused
    if not one_pass:
        block = min(LOOP_BLOCK, max_fused)
    # Short rows share a program, up to ~4K elements per tile; long rows get one each.
    block_m = 1
    if one_pass:
        cap = max(1, 4096 // block)
        block_m = min(next_power_of_2(rows), 1 << (cap.bit_length() - 1))
    return dict(BLOCK_M=block_m, BLOCK=block, ONE_PASS=one_pass, num_warps=_num_warps(block_m * block))


def bwd_launch(n: int, *, max_fused: int = MAX_FUSED_BWD) -> dict:
    """Tile and warps of the backward for rows of ``n`` elements (also what the static check compiles)."""
    block = next_power_of_2(n)
    one_pass = block <= max_fused
    if not one_pass:
        block = min(LOOP_BLOCK, max_fused)
    return dict(BLOCK=block, ONE_PASS=one_pass, num_warps=_num_warps(block))


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    max_fused: int = MAX_FUSED_FWD,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x, residual: (rows, hidden) with unit stride along hidden. Returns (y, x + residual or None, rstd)."""
    rows, n = x.shape
    y = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    summed = torch.empty((rows, n), device=x.device, dtype=x.dtype) if residual is not None else None
    rstd = torch.empty((rows,), device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, summed, rstd
    lp = fwd_launch(n, rows, max_fused=max_fused)
    r = residual if residual is not None else x
    s = summed if summed is not None else y
    _rms_norm_fwd_kernel[(cdiv(rows, lp["BLOCK_M"]),)](
        x, r, weight, y, s, rstd,
        x.stride(0), r.stride(0), y.stride(0), s.stride(0),
        rows, n, eps, HAS_RES=residual is not None, **lp,
    )
    return y, summed, rstd


def rms_norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_sum: torch.Tensor | None = None,
    *,
    max_fused: int = MAX_FUSED_BWD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dw); ``grad_sum`` (the gradient reaching the residual stream of the fused variant) is
    added to dx."""
    rows, n = x.shape
    dx = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    lp = bwd_launch(n, max_fused=max_fused)
    one_pass = lp["ONE_PASS"]
    programs = _num_programs(x.device, rows)
    rows_per_program = cdiv(rows, programs)
    programs = cdiv(rows, rows_per_program)
    alloc = torch.empty if one_pass else torch.zeros
    partial = alloc((programs, n), device=x.device, dtype=torch.float32)
    ds = grad_sum if grad_sum is not None else grad_y
    _rms_norm_bwd_kernel[(programs,)](
        grad_y, x, weight, rstd, dx, ds, partial,
        grad_y.stride(0), x.stride(0), dx.stride(0), ds.stride(0),
        rows, n, rows_per_program, HAS_DS=grad_sum is not None, **lp,
    )
    return dx, partial.sum(0).to(weight.dtype)
