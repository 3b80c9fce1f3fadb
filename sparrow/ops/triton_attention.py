"""Triton attention kernels (kernels/attention.py, kernels/decode.py) as torch.library custom ops with fakes
and autograd, registered as the "triton" backend of ``attention``, ``attention_varlen`` and
``attention_with_kv_cache``.

The forward ops return the base-2 log-sum-exp beside the output so the backward can recompute the softmax
without storing it; the backward ops are custom ops too, so ``torch.compile`` sees each launch as one node.
Eager calls skip the dispatcher (:func:`.custom_ops.fast_path`): each op ``_x`` has its wrapper ``_x_fast``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparrow.kernels import attention as _attn
from sparrow.kernels import decode as _decode

from .custom_ops import check_triton_device as check_device
from .custom_ops import default_scale as _scale
from .custom_ops import fast_path
from .custom_ops import register_attention_autograd
from .custom_ops import unit_stride as _unit_stride
from .registry import register

_DTYPES = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------- dense
def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return _attn.attention_fwd(q, k, v, causal, scale)


_fwd = torch.library.custom_op("sparrow::triton_attention_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(_attn.lse_shape(q, False), dtype=torch.float32)


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _attn.attention_bwd(do, q, k, v, out, lse, causal, scale)


_bwd = torch.library.custom_op("sparrow::triton_attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_bwd_fast = fast_path(_bwd, _bwd_impl)
_fwd_fast = fast_path(_fwd, _fwd_impl, *register_attention_autograd("sparrow::triton_attention_fwd", _bwd_fast))


# ------------------------------------------------------------------------------------------------ varlen
def _varlen_fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                     scale: float) -> tuple[Tensor, Tensor]:
    return _attn.attention_fwd(q, k, v, causal, scale, cu_seqlens, max_seqlen)


_varlen_fwd = torch.library.custom_op("sparrow::triton_attention_varlen_fwd", _varlen_fwd_impl, mutates_args=())


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape), q.new_empty(_attn.lse_shape(q, True), dtype=torch.float32)


def _varlen_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                     max_seqlen: int, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _attn.attention_bwd(do, q, k, v, out, lse, causal, scale, cu_seqlens, max_seqlen)
    # Tokens past cu_seqlens[-1] belong to no document: their outputs are zero and so are their gradients.
    end = None if torch.compiler.is_compiling() else int(cu_seqlens[-1])
    if end is not None and end < q.shape[0]:
        dq[end:].zero_()
        dk[end:].zero_()
        dv[end:].zero_()
    return dq, dk, dv


_varlen_bwd = torch.library.custom_op("sparrow::triton_attention_varlen_bwd", _varlen_bwd_impl, mutates_args=())


@_varlen_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_varlen_bwd_fast = fast_path(_varlen_bwd, _varlen_bwd_impl)


def _varlen_setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale


def _varlen_backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_fast(_unit_stride(grad_out), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal,
                             ctx.scale)
    return dq, dk, dv, None, None, None, None


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)
_varlen_fwd_fast = fast_path(_varlen_fwd, _varlen_fwd_impl, _varlen_setup, _varlen_backward)


# ------------------------------------------------------------------------------------------------ decode
def _kvcache_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    return _decode.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)


_kvcache = torch.library.custom_op("sparrow::triton_attention_with_kv_cache", _kvcache_impl, mutates_args=())


@_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


_kvcache_fast = fast_path(_kvcache, _kvcache_impl)


# ------------------------------------------------------------------------------------------------ checks
def _check_common(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_device(name, t)
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: the triton attention kernels take bfloat16 or float16, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the triton backend needs unit stride along head_dim, got strides {t.stride()}")
    if q.shape[-1] not in _attn.HEAD_DIMS:
        raise ValueError(f"q: head_dim {q.shape[-1]} not supported by the triton attention kernels {_attn.HEAD_DIMS}")


def _check_attention(q, k, v, causal, scale) -> None:
    _check_common(q, k, v)


def _check_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale) -> None:
    _check_common(q, k, v)
    check_device("cu_seqlens", cu_seqlens)
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens: the triton backend needs a contiguous cu_seqlens")


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, scale) -> None:
    _check_common(q, k_cache, v_cache)
    check_device("cache_seqlens", cache_seqlens)
    if not cache_seqlens.is_contiguous():
        raise ValueError("cache_seqlens: the triton backend needs a contiguous cache_seqlens")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("q: the triton KV-cache kernel is inference-only (no backward); inputs require grad")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    return _fwd_fast(q, k, v, bool(causal), _scale(q, scale))[0]


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                     scale: float | None) -> Tensor:
    return _varlen_fwd_fast(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), _scale(q, scale))[0]


def attention_with_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            scale: float | None) -> Tensor:
    return _kvcache_fast(q, k_cache, v_cache, cache_seqlens, _scale(q, scale))


register("attention", "triton", attention, _check_attention)
register("attention_varlen", "triton", attention_varlen, _check_varlen)
register("attention_with_kv_cache", "triton", attention_with_kv_cache, _check_kvcache)
