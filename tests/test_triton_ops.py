"""The triton backend's torch.library custom ops: opcheck (schema, fake, autograd registration), the looped
variants for rows too long for registers, in-place RoPE and the argument errors.

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest), so shapes are kept small.
"""

import warnings

import pytest
import torch

from sparrow import ops
from sparrow.ops import reference
from sparrow.testing import assert_close

from conftest import HAS_CUDA, assert_compiled_matches_eager, triton_module

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def tb():
    return triton_module("triton_backend")


def rope_inputs(dtype=torch.float32, batch=2, seq=5, heads=4, kv_heads=2, head_dim=32, half=12, per_batch=True):
    q = torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 50, (batch, seq) if per_batch else (seq,), device=DEVICE)
    angles = positions[..., None].float() * (1.0 / 10000 ** (torch.arange(half, device=DEVICE) / half))
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_rms_norm_opcheck(tb, dtype):
    x = torch.randn(5, 72, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(72, device=DEVICE, dtype=dtype, requires_grad=True)
    r = torch.randn(5, 72, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(tb._rms_norm_fwd, (x, w, 1e-6))
    torch.library.opcheck(tb._fused_add_rms_norm_fwd, (x, r, w, 1e-6))
    _, rstd = tb._rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    dy = torch.randn_like(x.detach())
    torch.library.opcheck(tb._rms_norm_bwd, (dy, x.detach(), w.detach(), rstd, None))
    torch.library.opcheck(tb._rms_norm_bwd, (dy, x.detach(), w.detach(), rstd, torch.randn_like(dy)))


def _fwd_bwd(fn, inputs, grad_seed=0):
    """Outputs and input gradients of fn(*inputs) (tensors among them get fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = fn(*leaves)
    g = torch.Generator(device=DEVICE).manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=g, device=DEVICE, dtype=o.dtype) for o in outs]
    torch.autograd.backward(list(outs), grads)
    return outs, [t.grad for t in leaves if isinstance(t, torch.Tensor)]


def test_eager_fast_path_matches_the_custom_op(tb):
    # Eager calls skip torch's dispatcher (custom_ops.fast_path): the kernel directly, or an autograd.Function
    # with the op's own setup and backward. Outputs and every gradient must be the custom op's exactly.
    x, r = torch.randn(5, 72, device=DEVICE), torch.randn(5, 72, device=DEVICE)
    w = torch.randn(72, device=DEVICE)
    q, k, cos, sin = rope_inputs()
    for fast, op, inputs in ((tb._rms_norm_fwd_fast, tb._rms_norm_fwd, (x, w, 1e-6)),
                             (tb._fused_add_rms_norm_fwd_fast, tb._fused_add_rms_norm_fwd, (x, r, w, 1e-6)),
                             (lambda *a: tb._rope_fast(*a, False), lambda *a: tb._rope_op(*a, False), (q, k, cos, sin))):
        got, got_grads = _fwd_bwd(fast, inputs)
        want, want_grads = _fwd_bwd(op, inputs)
        assert "_eager" in type(got[0].grad_fn).__name__  # the Function, not the op's autograd node
        for a, b in zip([*got, *got_grads], [*want, *want_grads]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():
            for a, b in zip(fast(*inputs), op(*inputs)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fast_path_hands_traced_calls_to_the_custom_op(tb):
    # Under a dispatch mode (what FakeTensorMode and make_fx are) the op itself runs, so a trace records it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(3, 40, device=DEVICE), torch.randn(40, device=DEVICE)
    with Record() as seen:
        tb._rms_norm_fwd_fast(x, w, 1e-6)
    assert any("triton_rms_norm_fwd" in name for name in seen.ops), seen.ops
    # Under a torch.func transform the op runs as well (vmap falls back to a loop over it): the kernel never
    # sees functorch's wrapped tensors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no batching rule", the fallback's notice
        mapped = torch.func.vmap(lambda row: tb._rms_norm_fwd_fast(row[None], w, 1e-6)[0][0])(x)
    torch.testing.assert_close(mapped, tb._rms_norm_fwd_fast(x, w, 1e-6)[0])


def test_rope_opcheck(tb):
    q, k, cos, sin = rope_inputs()
    torch.library.opcheck(tb._rope_op, (q.requires_grad_(), k.requires_grad_(), cos, sin, False))
    torch.library.opcheck(tb._rope_inplace_op, (q.detach().clone(), k.detach().clone(), cos, sin))


@pytest.mark.parametrize("hidden", [1000])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_looped_variant(tb, hidden, fused):
    """Rows longer than the register-resident block: force the two-pass kernels with a small block."""
    from sparrow.kernels import rms_norm as kr

    x = torch.randn(6, hidden, device=DEVICE)
    w = torch.randn(hidden, device=DEVICE)
    res = torch.randn(6, hidden, device=DEVICE) if fused else None
    y, summed, rstd = kr.rms_norm_fwd(x, w, 1e-6, res, max_fused=256)
    base = x + res if fused else x
    assert_close(y, reference.rms_norm(base, w), name="y")
    if fused:
        assert_close(summed, base, name="sum")
    dy = torch.randn_like(x)
    ds = torch.randn_like(x) if fused else None
    dx, dw = kr.rms_norm_bwd(dy, base, w, rstd, ds, max_fused=256)
    dx1, dw1 = kr.rms_norm_bwd(dy, base, w, rstd, ds)  # register-resident path
    xr, wr = base.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(reference.rms_norm(xr, wr), [xr, wr], dy)
    if fused:
        gx = gx + ds
    for name, got in (("looped", (dx, dw)), ("one-pass", (dx1, dw1))):
        assert_close(got[0], gx, grad=True, name=f"{name} dx")
        assert_close(got[1] / gw.abs().max(), gw / gw.abs().max(), grad=True, name=f"{name} dw")


def test_rms_norm_row_strided_input(tb):
    """A (rows, hidden) view with padding between rows runs without a copy; the kernel takes the row stride."""
    base = torch.randn(7, 96, device=DEVICE)
    x = base[:, :80]
    w = torch.randn(80, device=DEVICE)
    y, rstd = tb._rms_norm_fwd(x, w, 1e-6)
    assert_close(y, reference.rms_norm(x, w), name="y")
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))


def test_rope_in_place(tb):
    q, k, cos, sin = rope_inputs(head_dim=32, half=12)
    expected = reference.apply_rope(q, k, cos, sin)
    q2, k2 = q.clone(), k.clone()
    out = tb.apply_rope_(q2, k2, cos, sin)
    assert out[0] is q2 and out[1] is k2
    assert_close(q2, expected[0], name="q")
    assert_close(k2, expected[1], name="k")
    with pytest.raises(ValueError, match="q: in-place"):
        tb.apply_rope_(q.clone().requires_grad_(), k.clone(), cos, sin)
    with torch.no_grad():  # allowed where autograd is off
        tb.apply_rope_(q.clone().requires_grad_(), k.clone(), cos, sin)


def test_rope_strided_heads(tb):
    """q and k as views of a fused qkv projection (head stride > head_dim) are read in place."""
    qkv = torch.randn(2, 5, 8, 32, device=DEVICE)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    _, _, cos, sin = rope_inputs(head_dim=32, half=16, per_batch=False)
    got = ops.apply_rope(q, k, cos, sin, backend="triton")
    expected = reference.apply_rope(q, k, cos, sin)
    assert_close(got[0], expected[0], name="q")
    assert_close(got[1], expected[1], name="k")


def test_triton_argument_errors(tb):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="x: hidden size"):
        ops.rms_norm(torch.randn(1, 65537, device=DEVICE), torch.ones(65537, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="weight: the triton backend needs unit stride"):
        ops.rms_norm(x, torch.ones(8, 2, device=DEVICE)[:, 0], backend="triton")
    q, k, cos, sin = rope_inputs()
    with pytest.raises(ValueError, match="q: the triton backend needs unit stride"):
        ops.apply_rope(q.transpose(2, 3).contiguous().transpose(2, 3), k, cos, sin, backend="triton")
    with pytest.raises(ValueError, match="cos: the triton backend does not differentiate"):
        ops.apply_rope(q, k, cos.requires_grad_(), sin, backend="triton")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="x: the triton backend needs a CUDA tensor"):
            tb.check_device("x", torch.randn(2, device="meta"))


def test_triton_ops_under_torch_compile(tb):
    """The custom ops are single opaque nodes for dynamo/AOTAutograd: fullgraph capture with their fakes and
    backward (aot_eager keeps the test independent of inductor's CPU codegen)."""
    x = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    q, k, cos, sin = rope_inputs()

    def f(x, r, w, q, k):
        y, s = ops.fused_add_rms_norm(x, r, w, backend="triton")
        q2, k2 = ops.apply_rope(q, k, cos, sin, backend="triton")
        return ops.rms_norm(y, w, backend="triton").sum() + s.sum() + q2.sum() + k2.square().sum()

    assert_compiled_matches_eager(f, (x, r, w, q, k), atol=1e-4, rtol=1e-4)


def test_autotune_off_keeps_the_first_fitting_tile(monkeypatch):
    """SPARROW_AUTOTUNE=0 (gpu_check.sh --brief's tests): each pruner keeps the first tile that fits, the same
    one the full list starts with."""
    import triton

    from sparrow.kernels import attention as ka
    from sparrow.kernels import moe as km

    attn = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=ka._FWD_STAGES)
            for bm, bn, w in ka._FWD_TILES]
    mm = km._tile_grid(bms=(64, 128), bns=(64, 128), bks=(32, 64), stages=(2, 3, 4))
    a = torch.empty(4, 8, dtype=torch.bfloat16)

    def prune():
        return (ka._prune_fwd(attn, {}, HEAD_DIM=64, arch=90),
                km._prune_mm(mm, {"A": a, "N": 4096}))

    monkeypatch.delenv("SPARROW_AUTOTUNE", raising=False)
    tuned = prune()
    assert all(len(kept) > 1 for kept in tuned)
    monkeypatch.setenv("SPARROW_AUTOTUNE", "0")
    assert list(prune()) == [kept[:1] for kept in tuned]
