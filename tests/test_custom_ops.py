"""The autograd glue the fast backends share (sparrow/ops/custom_ops.py), wired to custom ops whose kernels are
the references, so it is checked on any machine: the gradients must be the reference's."""

import pytest
import torch
from torch import Tensor

from sparrow.ops import reference
from sparrow.ops.custom_ops import default_scale, register_attention_autograd, register_rope_autograd, unit_stride
from sparrow.testing import assert_close

calls = []


@torch.library.custom_op("sparrow_test::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out = reference.attention(q, k, v, causal, scale)
    return out, q.new_zeros((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _attention_bwd(grad_out, q, k, v, out, lse, causal, scale):
    calls.append(("attention", grad_out.stride(-1), causal, scale))
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(reference.attention(*leaves, causal, scale), leaves, grad_out)


register_attention_autograd("sparrow_test::attention_fwd", _attention_bwd)


@torch.library.custom_op("sparrow_test::rope", mutates_args=())
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    return reference.apply_rope(q, k, cos, -sin if backward else sin)


@_rope.register_fake
def _(q, k, cos, sin, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


register_rope_autograd("sparrow_test::rope", _rope)


def test_attention_glue_gives_the_reference_gradients_and_unit_stride_grads():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 8, 4, 5, dtype=torch.float32).transpose(1, 3)  # an incoming gradient without unit stride
    scale = default_scale(q, None)
    out = _attention_fwd(q, k, v, True, scale)[0]
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(reference.attention(q, k, v, True, None), (q, k, v), grad)
    for a, b in zip(got, ref):
        assert_close(a, b, grad=True)
    assert calls[-1] == ("attention", 1, True, scale) and scale == pytest.approx(8 ** -0.5)


def test_rope_glue_gives_the_reference_gradients():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 4, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(2, 6, 2, 8, dtype=torch.float32, requires_grad=True)
    angles = torch.randn(6, 4, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = torch.autograd.grad(_rope(q, k, cos, sin, False), (q, k), (gq, gk))
    ref = torch.autograd.grad(reference.apply_rope(q, k, cos, sin), (q, k), (gq, gk))
    for a, b in zip(got, ref):
        assert_close(a, b, grad=True)


def test_unit_stride_copies_only_what_it_must():
    t = torch.randn(3, 4)
    assert unit_stride(t) is t and unit_stride(None) is None
    assert unit_stride(t.t()).stride(-1) == 1
