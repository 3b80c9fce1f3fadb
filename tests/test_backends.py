"""The conformance suite every fast backend must pass: outputs and every gradient against the reference.

A backend is tested for each op it registers; an op it lacks is skipped with the reason. Without a GPU,
the triton backend runs under TRITON_INTERPRET=1 and the cuda backend runs the CPU kernels that sparrow._C
has for some ops, so CI exercises both paths; the CUDA kernels themselves run where a GPU is.
"""

import math

import pytest
import torch

from sparrow import ops
from sparrow.ops import reference, registry
from sparrow.testing import assert_close, max_error

from conftest import HAS_CUDA, REQUIRE_EXTENSIONS

FAST_BACKENDS = ["triton", "cuda"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def require_kernel(op: str, backend: str, *sample_args) -> None:
    """Skip (with the reason) unless ``backend`` is built and has a kernel for ``op`` on these inputs."""
    error = ops.backend_error(backend)
    if error is not None:
        if REQUIRE_EXTENSIONS and backend == "cuda":
            pytest.fail(f"sparrow._C is required here but failed to load: {error}")
        pytest.skip(f"backend {backend} unavailable: {error}")
    kernel = registry._kernels.get(op, {}).get(backend)
    if kernel is None:
        pytest.skip(f"backend {backend} has no {op} kernel yet")
    if not HAS_CUDA:
        try:
            kernel.check(*sample_args)
        except ValueError as exc:
            if "device" in str(exc) or "kernels for" in str(exc) or "CUDA tensor" in str(exc):
                pytest.skip(f"{backend}/{op} has no CPU path: {exc}")
            raise


def run_with_grads(fn, inputs, grad_inputs):
    """Outputs of fn(*inputs) and the gradients of a fixed random projection of them w.r.t. grad_inputs."""
    leaves = [t.detach().clone().requires_grad_(i in grad_inputs) if torch.is_tensor(t) else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_inputs], cotangents)
    return [o.detach() for o in outs], list(grads)


# ------------------------------------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 123), (2, 3, 1000), (3, 5120)], ids=str)
def test_rms_norm(backend, dtype, shape):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    require_kernel("rms_norm", backend, x, w, 1e-6)
    fast = run_with_grads(lambda x, w: ops.rms_norm(x, w, 1e-6, backend=backend), [x, w], [0, 1])
    ref = run_with_grads(lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], [0, 1])
    assert_close(fast[0][0], ref[0][0], name="y")
    assert_close(fast[1][0], ref[1][0], grad=True, name="dx")
    # dW sums over every row, so compare it relative to its scale.
    assert_close(fast[1][1] / ref[1][1].abs().max(), ref[1][1] / ref[1][1].abs().max(), grad=True, name="dw")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm(backend, dtype):
    x, r = (torch.randn(2, 5, 320, device=DEVICE).to(dtype) for _ in range(2))
    w = torch.randn(320, device=DEVICE).to(dtype)
    require_kernel("fused_add_rms_norm", backend, x, r, w, 1e-6)
    fast = run_with_grads(lambda x, r, w: ops.fused_add_rms_norm(x, r, w, 1e-6, backend=backend), [x, r, w], [0, 1, 2])
    ref = run_with_grads(lambda x, r, w: reference.fused_add_rms_norm(x, r, w, 1e-6), [x, r, w], [0, 1, 2])
    for name, a, b in zip(("normed", "sum"), fast[0], ref[0]):
        assert_close(a, b, name=name)
    for name, a, b in zip(("dx", "dresidual", "dw"), fast[1], ref[1]):
        assert_close(a / b.abs().max(), b / b.abs().max(), grad=True, name=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [8192, 12288, 16384, 65536])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_rms_norm_wide_rows(backend, dtype, hidden, fused):
    """The widths where a whole row per block meets the kernel's register limit (the cuda backward failed to
    launch at bf16 x 8192 on an H200) and where it hands over to the looped kernel."""
    x, r = (torch.randn(3, hidden, device=DEVICE).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    op, ref_op = (ops.fused_add_rms_norm, reference.fused_add_rms_norm) if fused else (ops.rms_norm, reference.rms_norm)
    inputs = [x, r, w] if fused else [x, w]
    require_kernel(op.__name__, backend, *inputs, 1e-6)
    fast = run_with_grads(lambda *t: op(*t, 1e-6, backend=backend), inputs, list(range(len(inputs))))
    ref = run_with_grads(lambda *t: ref_op(*t, 1e-6), inputs, list(range(len(inputs))))
    for a, b in zip(fast[0], ref[0]):
        assert_close(a, b, name="y")
    for a, b in zip(fast[1], ref[1]):
        assert_close(a / b.abs().max(), b / b.abs().max(), grad=True, name="grad")


# ---------------------------------------------------------------------------------------------------- rope
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_half,per_batch",
                         [(4, 4, 64, 32, False), (8, 2, 128, 64, True), (6, 1, 96, 16, False), (2, 2, 32, 16, True)])
def test_apply_rope(backend, dtype, heads, kv_heads, head_dim, rotary_half, per_batch):
    b, t = 2, 7
    q = torch.randn(b, t, heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(b, t, kv_heads, head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, 100, (b, t) if per_batch else (t,), device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(rotary_half, device=DEVICE) / rotary_half))
    angles = positions[..., None].float() * inv_freq
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    require_kernel("apply_rope", backend, q, k, cos, sin)
    fast = run_with_grads(lambda q, k: ops.apply_rope(q, k, cos, sin, backend=backend), [q, k], [0, 1])
    ref = run_with_grads(lambda q, k: reference.apply_rope(q, k, cos, sin), [q, k], [0, 1])
    for name, a, b in zip(("q", "k"), fast[0], ref[0]):
        assert_close(a, b, name=name)
    for name, a, b in zip(("dq", "dk"), fast[1], ref[1]):
        assert_close(a, b, grad=True, name=name)


# ----------------------------------------------------------------------------------------------- attention
def check_attention_error(fast, lowp, exact, name):
    """flash-attention's rule: the kernel's error against the float32 reference is at most twice the error of
    the reference computed in the kernel's own precision (plus a float32-sized floor)."""
    fast_err, ref_err = max_error(fast, exact), max_error(lowp, exact)
    assert fast_err <= 2 * ref_err + 1e-5, f"{name}: kernel error {fast_err:.3e} > 2 x reference error {ref_err:.3e}"


def attention_cases():
    # Under the CPU interpreter, 33 crosses a block boundary (blocks of 32) and 1 is a lone partial block.
    lengths = [1, 17, 127, 128, 129, 1000] if HAS_CUDA else [1, 33]
    for causal in (True, False):
        for heads, kv_heads in ((4, 4), (4, 2), (4, 1), (8, 1)):
            for t in lengths:
                yield causal, heads, kv_heads, t


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal,heads,kv_heads,seqlen", list(attention_cases()))
@pytest.mark.parametrize("head_dim", [64, 128] if HAS_CUDA else [64])
def test_attention(backend, dtype, causal, heads, kv_heads, seqlen, head_dim):
    q = torch.randn(2, seqlen, heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(2, seqlen, kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(2, seqlen, kv_heads, head_dim, device=DEVICE).to(dtype)
    require_kernel("attention", backend, q, k, v, causal, None)
    args = [q, k, v]
    fast = run_with_grads(lambda q, k, v: ops.attention(q, k, v, causal, backend=backend), args, [0, 1, 2])
    lowp = run_with_grads(lambda q, k, v: reference.attention(q, k, v, causal, upcast=False), args, [0, 1, 2])
    exact = run_with_grads(lambda q, k, v: reference.attention(q.float(), k.float(), v.float(), causal), args, [0, 1, 2])
    check_attention_error(fast[0][0], lowp[0][0], exact[0][0], "out")
    for name, f, l, e in zip(("dq", "dk", "dv"), fast[1], lowp[1], exact[1]):
        check_attention_error(f, l, e, name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("q_len,kv_len", [(1, 40), (3, 40), (16, 16)])
def test_attention_queries_shorter_than_keys(backend, q_len, kv_len):
    dtype = torch.bfloat16
    q = torch.randn(2, q_len, 4, 64, device=DEVICE).to(dtype)
    k = torch.randn(2, kv_len, 2, 64, device=DEVICE).to(dtype)
    v = torch.randn(2, kv_len, 2, 64, device=DEVICE).to(dtype)
    require_kernel("attention", backend, q, k, v, True, None)
    fast = ops.attention(q, k, v, True, backend=backend)
    lowp = reference.attention(q, k, v, True, upcast=False)
    exact = reference.attention(q.float(), k.float(), v.float(), True)
    check_attention_error(fast, lowp, exact, "out")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[1, 5, 1, 30], [17], [64, 1, 3]], ids=str)
def test_attention_varlen(backend, causal, lengths):
    dtype = torch.bfloat16
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(total, 4, 64, device=DEVICE).to(dtype)
    k = torch.randn(total, 2, 64, device=DEVICE).to(dtype)
    v = torch.randn(total, 2, 64, device=DEVICE).to(dtype)
    max_len = max(lengths)
    require_kernel("attention_varlen", backend, q, k, v, cu, max_len, causal, None)
    args = [q, k, v]
    fast = run_with_grads(lambda q, k, v: ops.attention_varlen(q, k, v, cu, max_len, causal, backend=backend), args, [0, 1, 2])
    lowp = run_with_grads(lambda q, k, v: reference.attention_varlen(q, k, v, cu, max_len, causal, upcast=False), args, [0, 1, 2])
    exact = run_with_grads(lambda q, k, v: reference.attention_varlen(q.float(), k.float(), v.float(), cu, max_len, causal), args, [0, 1, 2])
    check_attention_error(fast[0][0], lowp[0][0], exact[0][0], "out")
    for name, f, l, e in zip(("dq", "dk", "dv"), fast[1], lowp[1], exact[1]):
        check_attention_error(f, l, e, name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_attention_custom_scale(backend):
    q, k, v = (torch.randn(1, 20, 2, 64, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    require_kernel("attention", backend, q, k, v, True, 0.05)
    fast = ops.attention(q, k, v, True, 0.05, backend=backend)
    exact = reference.attention(q.float(), k.float(), v.float(), True, 0.05)
    check_attention_error(fast, reference.attention(q, k, v, True, 0.05, upcast=False), exact, "out")
    assert max_error(fast, reference.attention(q.float(), k.float(), v.float(), True, 1 / math.sqrt(64))) > 1e-2
