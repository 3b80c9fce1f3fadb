"""The Triton grouped GEMM (kernels/moe.py) as torch.library custom ops with fakes and autograd, and the "triton"
backend of ``moe_experts`` built on it.

``moe_experts`` here: sort the (token, expert) pairs by expert (a stable argsort, no host sync), gather the token
rows, one grouped GEMM for every expert's gate/up projection, SwiGLU, one grouped GEMM for the down projection,
scale by the routing weights and scatter-add back to the tokens. The sort, gathers and scatter are plain torch
ops, so autograd carries the gradient to x and, through the routing weights, to the router; the GEMMs' own
gradients are the same two kernels (input gradient: ``grouped_mm`` with the weight untransposed; weight
gradient: ``grouped_mm_wgrad``). Every shape is static, so ``torch.compile`` traces the whole layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparrow.kernels import moe as _moe

from .custom_ops import check_triton_device as check_device
from .custom_ops import unit_stride as _unit_stride
from .registry import register


@torch.library.custom_op("sparrow::triton_grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, w: Tensor, offsets: Tensor, transpose_w: bool) -> Tensor:
    """Rows of ``a`` (sorted by expert; expert e owns ``offsets[e]:offsets[e+1]``) times ``w[e].T`` (or ``w[e]``)."""
    return _moe.grouped_mm(a, w, offsets, transpose_w)


@grouped_mm.register_fake
def _(a: Tensor, w: Tensor, offsets: Tensor, transpose_w: bool) -> Tensor:
    return a.new_empty((a.shape[0], w.shape[1] if transpose_w else w.shape[2]))


@torch.library.custom_op("sparrow::triton_grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(g: Tensor, a: Tensor, offsets: Tensor, experts: int) -> Tensor:
    """``dw[e] = g[rows of e].T @ a[rows of e]``, shape (experts, g columns, a columns)."""
    return _moe.grouped_mm_wgrad(g, a, offsets, experts)


@grouped_mm_wgrad.register_fake
def _(g: Tensor, a: Tensor, offsets: Tensor, experts: int) -> Tensor:
    return a.new_empty((experts, g.shape[1], a.shape[1]))


def _setup(ctx, inputs, output) -> None:
    a, w, offsets, transpose_w = inputs
    ctx.save_for_backward(a, w, offsets)
    ctx.transpose_w = transpose_w


def _backward(ctx, grad: Tensor):
    a, w, offsets = ctx.saved_tensors
    grad = _unit_stride(grad)
    grad_a = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_mm(grad, w, offsets, not ctx.transpose_w)
    if ctx.needs_input_grad[1]:
        # C = A W_e^T: dW_e = dC_e^T A_e (E, N, K); C = A W_e: dW_e = A_e^T dC_e (E, K, N).
        grad_w = (grouped_mm_wgrad(grad, a, offsets, w.shape[0]) if ctx.transpose_w
                  else grouped_mm_wgrad(a, grad, offsets, w.shape[0]))
    return grad_a, grad_w, None, None


grouped_mm.register_autograd(_backward, setup_context=_setup)


def sort_by_expert(topk_ids: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): ``order`` lists the flattened (token, slot) pairs grouped by expert (stable, so tokens
    keep their order within an expert); ``offsets`` int32 (experts + 1,) the cumulative group sizes."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.int32, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0, dtype=torch.int32)])
    return order, offsets


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    k = topk_ids.shape[1]
    experts, inter = w_gate_up.shape[0], w_down.shape[2]
    order, offsets = sort_by_expert(topk_ids, experts)
    token = order // k
    hidden = grouped_mm(x[token], w_gate_up, offsets, True)  # (T * k, 2I), expert by expert
    act = (F.silu(hidden[:, :inter].float()) * hidden[:, inter:].float()).to(x.dtype)
    y = grouped_mm(act, w_down, offsets, True)  # (T * k, H)
    # Combine in float32, as the reference: each token sums its k weighted expert outputs.
    y = y.float() * topk_weights.reshape(-1)[order].float().unsqueeze(1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, y)
    return out.to(x.dtype)


def _check_moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor) -> None:
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w_gate_up", w_gate_up),
                    ("w_down", w_down)):
        check_device(name, t)


register("moe_experts", "triton", moe_experts, _check_moe_experts)
