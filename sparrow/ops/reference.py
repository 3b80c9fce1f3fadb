"""Pure-PyTorch reference implementations: the ground truth every fast backend is tested against.

They favour clarity and exactness over speed, compute in (at least) float32 and return the input dtype, and use only
traceable tensor operations (no ``.item()``/``.tolist()``), so ``torch.compile`` can capture the model
with this backend in a single graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(q: Tensor, scale: float | None) -> float:
    """The attention softmax scale of every backend: ``head_dim ** -0.5`` unless given."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _acc(t: Tensor) -> Tensor:
    """At least float32: low-precision inputs are upcast, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * _acc(weight)).to(x.dtype)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``2 * cos.shape[-1]`` channels of ``x``; the rest pass through."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    # cos/sin arrive as (seq, half) or (batch, seq, half); insert the head axis.
    cos = _acc(cos.unsqueeze(-2))
    sin = _acc(sin.unsqueeze(-2))
    x1f, x2f = _acc(x1), _acc(x2)
    out1 = x1f * cos - x2f * sin
    out2 = x2f * cos + x1f * sin
    return torch.cat([out1.to(x.dtype), out2.to(x.dtype), rest], dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _grouped_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """QK^T for GQA without repeating k: q (B, Tq, H, D), k (B, Tk, Hkv, D) -> (B, Hkv, G, Tq, Tk)."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    return torch.matmul(qg, kg.transpose(-1, -2)) * scale


def causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """True where query i may attend key j; queries are the last ``tq`` of ``tk`` positions (bottom-right)."""
    q_pos = torch.arange(tk - tq, tk, device=device).unsqueeze(-1)
    k_pos = torch.arange(tk, device=device).unsqueeze(0)
    return k_pos <= q_pos


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None, *,
              key_padding_mask: Tensor | None = None, upcast: bool = True) -> Tensor:
    """softmax(QK^T * scale + mask) V with GQA.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Hkv dividing H and Tq <= Tk when causal.
    ``key_padding_mask`` (B, Tk) is True for keys that exist. ``upcast=False`` computes in the input dtype,
    which is how the low-precision error baseline of the kernel tests is made.
    """
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = default_scale(q, scale)
    dtype = q.dtype
    if upcast:
        q, k, v = _acc(q), _acc(k), _acc(v)
    scores = _grouped_scores(q, k, scale)  # (B, Hkv, G, Tq, Tk)
    allowed = None
    if causal:
        allowed = causal_mask(tq, tk, q.device)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, None, :]
        allowed = pad if allowed is None else (allowed & pad)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A query that may attend nothing (only possible with padding) gets zeros, not NaN.
    if allowed is not None:
        probs = torch.nan_to_num(probs, nan=0.0)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    out = torch.matmul(probs.to(vg.dtype), vg)  # (B, Hkv, G, Tq, D)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, tq, h, v.shape[-1])
    return out.to(dtype)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool = True,
                     scale: float | None = None, *, upcast: bool = True) -> Tensor:
    """Attention over packed documents: q, k, v are (tokens, heads, head_dim), document i spans
    ``cu_seqlens[i]:cu_seqlens[i+1]``, and no token attends outside its own document.

    The documents are gathered into a padded (docs, max_seqlen) batch with index arithmetic (no host sync),
    run through :func:`attention` with a key padding mask, and gathered back into packed order.
    """
    total = q.shape[0]
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    offsets = torch.arange(max_seqlen, device=q.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # (docs, max_seqlen)
    # Padding slots point at token 0; they are masked as keys and their outputs are dropped.
    index = torch.where(valid, starts.unsqueeze(1) + offsets.unsqueeze(0), torch.zeros_like(valid, dtype=torch.long))
    qd, kd, vd = q[index], k[index], v[index]  # (docs, max_seqlen, heads, head_dim)
    # Documents are left-aligned and square in the padded batch, so causal is the plain top-left mask.
    out = attention(qd, kd, vd, causal=causal, scale=scale, key_padding_mask=valid, upcast=upcast)
    # Back to packed order by gathering each token's (document, offset) slot: static shapes throughout, so
    # torch.compile traces it without a graph break. Tokens past cu_seqlens[-1] belong to no document.
    tokens = torch.arange(total, device=q.device)
    doc = torch.searchsorted(cu[1:], tokens, right=True).clamp_max(starts.shape[0] - 1)
    offset = (tokens - starts[doc]).clamp(0, max_seqlen - 1)
    inside = (tokens < cu[-1])[:, None, None]
    return torch.where(inside, out[doc, offset], torch.zeros((), dtype=out.dtype, device=out.device))


def attention_with_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            scale: float | None = None, *, upcast: bool = True) -> Tensor:
    """Attention of the new queries q (B, Tq, H, D) against each row's valid cache prefix.

    ``cache_seqlens[b]`` counts row b's valid positions, the Tq new ones (already written) included, so query
    i of row b sits at position ``cache_seqlens[b] - Tq + i`` and sees keys at positions up to and including it.
    """
    b, tq, h, d = q.shape
    tk = k_cache.shape[1]
    scale = default_scale(q, scale)
    dtype = q.dtype
    if upcast:
        q, k_cache, v_cache = _acc(q), _acc(k_cache), _acc(v_cache)
    scores = _grouped_scores(q, k_cache, scale)  # (B, Hkv, G, Tq, Tk)
    q_pos = cache_seqlens.long().unsqueeze(1) - tq + torch.arange(tq, device=q.device)  # (B, Tq)
    allowed = torch.arange(tk, device=q.device) <= q_pos.unsqueeze(-1)  # (B, Tq, Tk)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    # Zero probabilities do not cancel whatever sits past a row's length (inf/NaN in unwritten slots).
    written = (torch.arange(tk, device=q.device) < cache_seqlens.long().unsqueeze(1))[:, :, None, None]  # (B, Tk, 1, 1)
    v_cache = torch.where(written, v_cache, torch.zeros((), dtype=v_cache.dtype, device=v_cache.device))
    vg = v_cache.permute(0, 2, 1, 3).unsqueeze(2)
    out = torch.matmul(probs.to(vg.dtype), vg)
    return out.permute(0, 3, 1, 2, 4).reshape(b, tq, h, v_cache.shape[-1]).to(dtype)


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """The routed SwiGLU experts of a mixture-of-experts MLP, as a loop over experts.

    x (T, H); ``topk_ids`` (T, k) the experts each token goes to, ``topk_weights`` (T, k) their mixing weights;
    ``w_gate_up`` (E, 2I, H) each expert's gate then up projection, ``w_down`` (E, H, I). Token t's output is
    ``sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t, j]``.

    Eagerly each expert runs on the tokens that chose it (as transformers' Mixtral loop). How many that is depends
    on the data, which ``torch.compile`` cannot give a static shape; while compiling, each expert runs on every
    token instead, masked by its weight (zero where the token did not pick it; a zero weight adds an exact zero):
    E / k times the work, but one graph.
    """
    xf = _acc(x)
    weights = _acc(topk_weights)
    out = torch.zeros_like(xf)
    inter = w_down.shape[-1]

    def expert(e: int, rows: Tensor) -> Tensor:
        gate_up = rows @ _acc(w_gate_up[e]).t()
        return (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ _acc(w_down[e]).t()

    for e in range(w_gate_up.shape[0]):
        if torch.compiler.is_compiling():
            weight_e = (weights * (topk_ids == e)).sum(-1, keepdim=True)  # (T, 1): 0 for tokens that skip e
            out = out + weight_e * expert(e, xf)
        else:
            token, slot = torch.where(topk_ids == e)
            out = out.index_add(0, token, weights[token, slot].unsqueeze(1) * expert(e, xf[token]))
    return out.to(x.dtype)
