"""Sparrow's ops layer: the only way the model touches normalisation, rotary embeddings, attention and the
experts of a mixture-of-experts MLP.

Every op has a pure-PyTorch reference (:mod:`sparrow.ops.reference`, the ground truth) and fast backends
with the same signature. Choose one per call (``backend="triton"``), per region
(``with sparrow.ops.use_backend("cuda"):``), per process (``SPARROW_BACKEND=cuda``), or leave "auto", which
takes the fastest backend that can handle the inputs on their device.

Arguments are checked here, once, for every backend: a wrong shape, dtype or device is a ``ValueError``
naming the argument. Backend-specific limits (a head dim a kernel lacks, a non-contiguous input) are checked
by the backend and reported the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import (
    BACKENDS,
    available_backends,
    backend_error,
    get_backend,
    load_backends,
    register,
    resolve,
    set_auto_order,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "apply_rope",
    "attention",
    "attention_varlen",
    "attention_with_kv_cache",
    "available_backends",
    "check_cu_seqlens",
    "backend_error",
    "fused_add_rms_norm",
    "get_backend",
    "moe_experts",
    "register",
    "rms_norm",
    "set_auto_order",
    "use_backend",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        _fail(f"{name}: dtype must be float32, bfloat16 or float16, got {t.dtype}")


def _check_same_device(reference_name: str, reference: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            _fail(f"{name}: on {t.device} but {reference_name} is on {reference.device}")


def _check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    _check_float("x", x)
    _check_float("weight", weight)
    _check_same_device("x", x, weight=weight)
    if x.dim() < 1:
        _fail("x: expected at least 1 dimension")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        _fail(f"weight: expected shape ({x.shape[-1]},) to match the last dim of x, got {tuple(weight.shape)}")
    if not eps > 0:
        _fail(f"eps: must be positive, got {eps}")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last dim, accumulated in float32."""
    _check_rms_norm(x, weight, eps)
    return resolve("rms_norm", backend, x.device, (x, weight, eps))(x, weight, eps)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``: the residual add of a pre-norm block fused with
    the next norm, so the sum is read once."""
    _check_rms_norm(x, weight, eps)
    _check_float("residual", residual)
    _check_same_device("x", x, residual=residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        _fail(f"residual: expected shape {tuple(x.shape)} and dtype {x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    return resolve("fused_add_rms_norm", backend, x.device, (x, residual, weight, eps))(x, residual, weight, eps)


def _check_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    _check_same_device("q", q, k=k, cos=cos, sin=sin)
    if q.dim() != 4:
        _fail(f"q: expected (batch, seq, heads, head_dim), got {q.dim()} dims")
    if k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        _fail(f"k: expected (batch, seq, kv_heads, head_dim) = ({q.shape[0]}, {q.shape[1]}, *, {q.shape[3]}), got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        _fail(f"k: dtype {k.dtype} does not match q dtype {q.dtype}")
    if cos.shape != sin.shape:
        _fail(f"sin: shape {tuple(sin.shape)} does not match cos shape {tuple(cos.shape)}")
    batch, seq, _, head_dim = q.shape
    if cos.dim() == 2:
        leading_ok = cos.shape[0] == seq
    elif cos.dim() == 3:
        leading_ok = cos.shape[0] == batch and cos.shape[1] == seq
    else:
        leading_ok = False
    if not leading_ok:
        _fail(f"cos: expected (seq, rotary_dim // 2) or (batch, seq, rotary_dim // 2) with seq={seq}, batch={batch}, got {tuple(cos.shape)}")
    if cos.shape[-1] < 1 or 2 * cos.shape[-1] > head_dim:
        _fail(f"cos: last dim is rotary_dim // 2 and must be in [1, head_dim // 2 = {head_dim // 2}], got {cos.shape[-1]}")


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotary embeddings, rotate-half convention (as HF Llama), applied to q and k.

    q: (batch, seq, heads, head_dim); k: (batch, seq, kv_heads, head_dim); cos, sin: (seq, rotary_dim // 2)
    or (batch, seq, rotary_dim // 2), the latter for per-token positions of packed documents. Channels past
    ``rotary_dim`` pass through unchanged.
    """
    _check_rope(q, k, cos, sin)
    return resolve("apply_rope", backend, q.device, (q, k, cos, sin))(q, k, cos, sin)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != rank:
            _fail(f"{name}: expected {layout}, got {t.dim()} dims")
    _check_same_device("q", q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"k, v: dtypes {k.dtype}, {v.dtype} must match q dtype {q.dtype}")
    if k.shape != v.shape:
        _fail(f"v: shape {tuple(v.shape)} must match k shape {tuple(k.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if q.shape[-1] != k.shape[-1]:
        _fail(f"k: head_dim {k.shape[-1]} does not match q head_dim {q.shape[-1]}")
    if kv_heads < 1 or heads % kv_heads != 0:
        _fail(f"k: kv_heads ({kv_heads}) must divide q heads ({heads})")


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None, *, backend: str | None = None
) -> Tensor:
    """Scaled dot-product attention with GQA.

    q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim), kv_heads dividing heads.
    ``q_len`` may be shorter than ``kv_len``: the queries are then the last positions, and the causal mask is
    aligned bottom-right, as decoding against a KV cache needs. ``scale`` defaults to ``head_dim ** -0.5``.
    """
    _check_qkv(q, k, v, 4, "(batch, seq, heads, head_dim)")
    if k.shape[0] != q.shape[0]:
        _fail(f"k: batch {k.shape[0]} does not match q batch {q.shape[0]}")
    if causal and q.shape[1] > k.shape[1]:
        _fail(f"q: causal attention needs q_len <= kv_len, got {q.shape[1]} > {k.shape[1]}")
    return resolve("attention", backend, q.device, (q, k, v, causal, scale))(q, k, v, causal, scale)


def check_cu_seqlens(cu_seqlens: Tensor, tokens: int, max_seqlen: int) -> None:
    """ValueError unless ``cu_seqlens`` starts at 0, never decreases, ends within ``tokens`` and has no document
    longer than ``max_seqlen``. It reads the values back (one host sync; skipped under torch.compile, where it
    would break the graph)."""
    if torch.compiler.is_compiling() or cu_seqlens.numel() < 2:
        return
    lengths = cu_seqlens.diff()
    start, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if start != 0 or shortest < 0:
        _fail("cu_seqlens: must start at 0 and be non-decreasing")
    if last > tokens:
        _fail(f"cu_seqlens: last entry {last} exceeds the {tokens} tokens")
    if longest > max_seqlen:
        _fail(f"max_seqlen: {max_seqlen} is shorter than the longest document ({longest})")


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    causal: bool = True,
    scale: float | None = None,
    *,
    backend: str | None = None,
    check_seqlens: bool = True,
) -> Tensor:
    """Attention over packed documents, as flash-attention's varlen API.

    q, k, v: (tokens, heads | kv_heads, head_dim); ``cu_seqlens`` int32 (docs + 1,), starting at 0 and
    non-decreasing, document i spanning tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; ``max_seqlen`` the longest
    document. No token attends outside its document.

    ``check_seqlens`` runs :func:`check_cu_seqlens` (one host sync); a model that checked them once per forward
    passes False in its layers.
    """
    _check_qkv(q, k, v, 3, "(tokens, heads, head_dim)")
    if k.shape[0] != q.shape[0]:
        _fail(f"k: {k.shape[0]} tokens but q has {q.shape[0]}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        _fail("cu_seqlens: expected a 1-D torch.int32 tensor")
    if cu_seqlens.shape[0] < 2:
        _fail("cu_seqlens: needs at least 2 entries (0 and the total)")
    _check_same_device("q", q, cu_seqlens=cu_seqlens)
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        _fail(f"max_seqlen: expected a positive int, got {max_seqlen!r}")
    if check_seqlens:
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    return resolve("attention_varlen", backend, q.device, (q, k, v, cu_seqlens, max_seqlen, causal, scale))(
        q, k, v, cu_seqlens, max_seqlen, causal, scale
    )


def attention_with_kv_cache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float | None = None, *,
    backend: str | None = None, check_lengths: bool = True,
) -> Tensor:
    """Attention of new queries against a KV cache, for generation (prefill, then one token at a time).

    q: (batch, new_len, heads, head_dim); k_cache, v_cache: (batch, max_len, kv_heads, head_dim);
    ``cache_seqlens`` int32 (batch,): each row's valid cache length, the ``new_len`` new tokens (already
    written into the cache) included. Causal, bottom-right within each row's valid prefix; positions past a
    row's length are never read.

    ``check_lengths`` checks that every length lies in [new_len, max_len], which reads ``cache_seqlens`` back
    from the GPU: a host sync that, once per layer, drained the GPU queue at every decoded token. A caller that
    has bounded the lengths itself (SparrowForCausalLM does, once per forward) passes False.
    """
    _check_qkv(q, k_cache, v_cache, 4, "(batch, seq, heads, head_dim)")
    if k_cache.shape[0] != q.shape[0]:
        _fail(f"k_cache: batch {k_cache.shape[0]} does not match q batch {q.shape[0]}")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (q.shape[0],):
        _fail(f"cache_seqlens: expected a torch.int32 tensor of shape ({q.shape[0]},)")
    _check_same_device("q", q, cache_seqlens=cache_seqlens)
    if check_lengths and not torch.compiler.is_compiling():
        if bool(((cache_seqlens < q.shape[1]) | (cache_seqlens > k_cache.shape[1])).any()):  # one sync
            _fail(f"cache_seqlens: each entry must lie in [new_len={q.shape[1]}, max_len={k_cache.shape[1]}]")
    args = (q, k_cache, v_cache, cache_seqlens, scale)
    return resolve("attention_with_kv_cache", backend, q.device, args)(*args)


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                backend: str | None = None, check_ids: bool = True) -> Tensor:
    """The routed experts of a mixture-of-experts SwiGLU MLP (the router stays in the model).

    x: (tokens, hidden); ``topk_ids`` int (tokens, k): the experts each token is sent to, distinct per token;
    ``topk_weights`` float (tokens, k): their mixing weights (differentiable: the router's gradient flows through
    them); ``w_gate_up`` (experts, 2 * inter, hidden): each expert's gate projection stacked over its up projection
    (transformers' layout); ``w_down`` (experts, hidden, inter). Returns (tokens, hidden)
    ``sum_j topk_weights[:, j] * down_e(silu(gate_e(x)) * up_e(x))``, ``e = topk_ids[:, j]``.

    ``check_ids`` checks that every id lies in [0, experts), which reads them back from the GPU: a host sync in
    every MoE layer. Ids from a ``torch.topk`` over the router's experts (the model's own router) are in range by
    construction, so the model passes False.
    """
    for name, t in (("x", x), ("topk_weights", topk_weights), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check_float(name, t)
    _check_same_device("x", x, topk_ids=topk_ids, topk_weights=topk_weights, w_gate_up=w_gate_up, w_down=w_down)
    if x.dim() != 2:
        _fail(f"x: expected (tokens, hidden), got shape {tuple(x.shape)}")
    if not isinstance(topk_ids, Tensor) or topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.dim() != 2 \
            or topk_ids.shape[0] != x.shape[0]:
        _fail(f"topk_ids: expected an int32/int64 tensor (tokens={x.shape[0]}, k)")
    if topk_weights.shape != topk_ids.shape:
        _fail(f"topk_weights: shape {tuple(topk_weights.shape)} does not match topk_ids {tuple(topk_ids.shape)}")
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != x.shape[1] or w_gate_up.shape[1] % 2:
        _fail(f"w_gate_up: expected (experts, 2 * inter, hidden={x.shape[1]}), got {tuple(w_gate_up.shape)}")
    experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if w_down.shape != (experts, x.shape[1], inter):
        _fail(f"w_down: expected (experts={experts}, hidden={x.shape[1]}, inter={inter}), got {tuple(w_down.shape)}")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        _fail(f"w_gate_up, w_down: dtypes {w_gate_up.dtype}, {w_down.dtype} must match x dtype {x.dtype}")
    if topk_ids.shape[1] > experts:
        _fail(f"topk_ids: k={topk_ids.shape[1]} exceeds the {experts} experts")
    if check_ids and not torch.compiler.is_compiling() and topk_ids.numel() \
            and bool(((topk_ids < 0) | (topk_ids >= experts)).any()):  # one sync
        _fail(f"topk_ids: expert ids must lie in [0, {experts})")
    args = (x, topk_ids, topk_weights, w_gate_up, w_down)
    return resolve("moe_experts", backend, x.device, args)(*args)


load_backends()
