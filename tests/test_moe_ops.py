"""The Triton MoE path (kernels/moe.py grouped GEMM + sparrow/ops/triton_moe.py) against the reference loop: the
output and every gradient, the router's included; the custom ops' registrations (opcheck); torch.compile."""

from __future__ import annotations

import pytest
import torch

from sparrow import ops
from sparrow.testing import max_error, tolerance

from conftest import HAS_CUDA, assert_compiled_matches_eager, triton_module
from test_backends import DEVICE


@pytest.fixture(scope="module")
def tm():
    return triton_module("triton_moe")


def routed_inputs(dtype, tokens=21, hidden=24, inter=20, experts=5, k=2, seed=0):
    """A router (weight, x) and expert weights; expert 3 gets no token, so an empty group is exercised, and one
    expert gets more than a 16-row tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) / hidden**0.5
    x[:, 0] = 3.0  # a constant feature, through which the router favours expert 0 and shuns expert 3
    router[0, 0], router[3] = 1.0, 0.0
    router[3, 0] = -10.0
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, router, w_gate_up, w_down)], k


def moe_forward(x, router, w_gate_up, w_down, k, backend):
    probs = torch.softmax((x @ router.t()).float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return ops.moe_experts(x, ids, weights.to(x.dtype), w_gate_up, w_down, backend=backend), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_moe_matches_reference_in_output_and_every_gradient(tm, dtype):
    leaves, k = routed_inputs(dtype)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, ids = moe_forward(*leaves, k, "triton")
    expected, _ = moe_forward(*ref_leaves, k, "reference")
    assert not (ids == 3).any() and torch.bincount(ids.flatten()).max() > 16
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    names = ("x", "router", "w_gate_up", "w_down")
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, **tolerance(dtype))
        for name, got, ref in zip(names, leaves, ref_leaves):
            torch.testing.assert_close(got.grad, ref.grad, **tolerance(dtype, grad=True), msg=lambda m: f"{name}: {m}")
    else:
        # The reference keeps every intermediate in float32; the kernels round the expert activations to bf16
        # between the GEMMs (as any bf16 implementation does): relative to the largest value, a bf16 ulp or two.
        assert max_error(out, expected) <= 2e-2 * expected.abs().max().item()
        for name, got, ref in zip(names, leaves, ref_leaves):
            assert max_error(got.grad, ref.grad) <= 3e-2 * ref.grad.abs().max().item(), name
    assert leaves[2].grad[3].abs().max() == 0  # the idle expert gets an exact zero gradient


def test_grouped_mm_handles_empty_and_multi_tile_groups(tm):
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 0, 37, 40, 40], dtype=torch.int32, device=DEVICE)  # experts 0 and 3 empty
    a = torch.randn(40, 18, generator=g).to(DEVICE)
    w = torch.randn(4, 22, 18, generator=g).to(DEVICE)
    out = tm.grouped_mm(a, w, offsets, True)
    expected = torch.cat([a[:37] @ w[1].t(), a[37:] @ w[2].t()])
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    dw = tm.grouped_mm_wgrad(out, a, offsets, 4)
    torch.testing.assert_close(dw[1], out[:37].t() @ a[:37], **tolerance(torch.float32, grad=True))
    assert dw[0].abs().max() == 0 and dw[3].abs().max() == 0


def _opcheck(op, args):
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if HAS_CUDA:
        tests = (*tests, "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=tests)


def test_opcheck_grouped_mm(tm):
    offsets = torch.tensor([0, 5, 5, 9], dtype=torch.int32, device=DEVICE)
    a = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    _opcheck(tm.grouped_mm, (a, torch.randn(3, 16, 16, device=DEVICE, requires_grad=True), offsets, True))
    _opcheck(tm.grouped_mm, (a, torch.randn(3, 16, 24, device=DEVICE, requires_grad=True), offsets, False))
    _opcheck(tm.grouped_mm_wgrad, (torch.randn(9, 24, device=DEVICE), a.detach(), offsets, 3))


def test_triton_moe_layer_under_torch_compile(tm):
    """The whole routed layer (router, sort, grouped GEMMs, scatter) captures in one graph with its backward."""
    leaves, k = routed_inputs(torch.float32, tokens=9, hidden=16, inter=16, experts=4)

    def f(x, router, w_gate_up, w_down):
        return moe_forward(x, router, w_gate_up, w_down, k, "triton")[0].square().sum()

    assert_compiled_matches_eager(f, leaves, atol=1e-4, rtol=1e-4)
