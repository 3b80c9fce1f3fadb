"""The references are the ground truth, so each is checked against an independent naive formula in float64:
forward and gradients."""

import math

import pytest
import torch

from sparrow.ops import reference


def naive_rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


def naive_rope(x, cos_half, sin_half):
    """HF Llama's formulation: full-width cos/sin (the half repeated) and rotate_half, on the rotary part."""
    r = 2 * cos_half.shape[-1]
    cos = torch.cat([cos_half, cos_half], -1).unsqueeze(-2)
    sin = torch.cat([sin_half, sin_half], -1).unsqueeze(-2)
    xr, rest = x[..., :r], x[..., r:]
    rotated = torch.cat([-xr[..., r // 2 :], xr[..., : r // 2]], -1)
    return torch.cat([xr * cos + rotated * sin, rest], -1)


def naive_attention(q, k, v, causal, scale):
    """softmax(Q K^T) V per head with an explicit mask, k/v heads repeated for GQA."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi].T * scale
            if causal:
                mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
                s = s.masked_fill(~mask, float("-inf"))
            out[bi, :, hi] = torch.softmax(s, -1) @ v[bi, :, hi]
    return out


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs)  # randn_like would copy strides
    loss.backward()
    return outs, [t.grad for t in inputs]


def check_same(fn_a, fn_b, *inputs, atol=1e-9):
    outs_a, grads_a = grads(fn_a, *inputs)
    outs_b, grads_b = grads(fn_b, *inputs)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-7)


@pytest.mark.parametrize("shape", [(7,), (3, 123), (2, 5, 64)])
def test_rms_norm_matches_formula(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    check_same(lambda x, w: reference.rms_norm(x, w, 1e-5), lambda x, w: naive_rms_norm(x, w, 1e-5), x, w)


def test_rms_norm_keeps_dtype_and_accumulates_in_fp32():
    x = torch.randn(4, 256, dtype=torch.bfloat16) * 100
    w = torch.ones(256, dtype=torch.bfloat16)
    y = reference.rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    expected = naive_rms_norm(x.double(), w.double(), 1e-6)
    torch.testing.assert_close(y.double(), expected, atol=2e-2, rtol=2e-2)


def test_fused_add_rms_norm_is_add_then_norm():
    x, r = torch.randn(2, 3, 32, dtype=torch.float64), torch.randn(2, 3, 32, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    check_same(lambda x, r, w: reference.fused_add_rms_norm(x, r, w, 1e-6),
               lambda x, r, w: (naive_rms_norm(x + r, w, 1e-6), x + r), x, r, w)


@pytest.mark.parametrize("rotary_half", [8, 5])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_matches_hf_rotate_half(rotary_half, per_batch):
    b, t, h, hkv, d = 2, 6, 4, 2, 16
    q = torch.randn(b, t, h, d, dtype=torch.float64)
    k = torch.randn(b, t, hkv, d, dtype=torch.float64)
    shape = (b, t, rotary_half) if per_batch else (t, rotary_half)
    angles = torch.rand(shape, dtype=torch.float64) * 10
    cos, sin = angles.cos(), angles.sin()
    check_same(lambda q, k: reference.apply_rope(q, k, cos, sin),
               lambda q, k: (naive_rope(q, cos, sin), naive_rope(k, cos, sin)), q, k)


def test_rope_is_a_rotation_preserving_pair_norms():
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    angles = torch.rand(5, 4, dtype=torch.float64)
    out, _ = reference.apply_rope(q, q[:, :, :1], angles.cos(), angles.sin())
    pair_norm = lambda x: x[..., :4] ** 2 + x[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(q))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 7), (3, 9)])
def test_attention_matches_naive_softmax(causal, heads, kv_heads, tq, tk):
    d = 8
    q = torch.randn(2, tq, heads, d, dtype=torch.float64)
    k = torch.randn(2, tk, kv_heads, d, dtype=torch.float64)
    v = torch.randn(2, tk, kv_heads, d, dtype=torch.float64)
    scale = 0.3
    check_same(lambda q, k, v: reference.attention(q, k, v, causal, scale),
               lambda q, k, v: naive_attention(q, k, v, causal, scale), q, k, v)


def test_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (torch.randn(1, 4, 2, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(reference.attention(q, k, v), naive_attention(q, k, v, True, 1 / math.sqrt(16)))


def test_gqa_equals_repeated_kv_heads():
    q = torch.randn(2, 6, 8, 16, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 16, dtype=torch.float64)
    v = torch.randn(2, 6, 2, 16, dtype=torch.float64)
    repeated = reference.attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2))
    torch.testing.assert_close(reference.attention(q, k, v), repeated)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_each_document_alone(causal):
    lengths = [3, 1, 7, 5]
    total = sum(lengths) + 2  # two trailing tokens belong to no document
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(total, 4, 8, dtype=torch.float64)
    k = torch.randn(total, 2, 8, dtype=torch.float64)
    v = torch.randn(total, 2, 8, dtype=torch.float64)

    def per_document(q, k, v):
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(naive_attention(q[None, s:e], k[None, s:e], v[None, s:e], causal, 0.5)[0])
        return torch.cat(outs + [torch.zeros_like(q[cu[-1]:])])

    check_same(lambda q, k, v: reference.attention_varlen(q, k, v, cu, max(lengths), causal, 0.5), per_document, q, k, v)


def test_low_precision_path_computes_in_input_dtype():
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    exact = reference.attention(q.double(), k.double(), v.double())
    upcast = reference.attention(q, k, v)
    lowp = reference.attention(q, k, v, upcast=False)
    assert (lowp.double() - exact).abs().max() >= (upcast.double() - exact).abs().max()
