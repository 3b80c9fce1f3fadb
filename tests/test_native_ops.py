"""sparrow._C: the build, the TORCH_LIBRARY registration, fake implementations and autograd of native ops.

These run on the CPU kernels that some native ops carry, so CI checks the whole native path without a GPU;
the `cuda`-marked tests run the same checks on the GPU kernels.
"""

import importlib
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, REQUIRE_EXTENSIONS


@pytest.fixture(scope="module")
def native():
    try:
        importlib.import_module("sparrow._C")
    except ImportError as exc:
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"sparrow._C must be built here: {exc}")
        pytest.skip(f"sparrow._C not built: {exc}")
    importlib.import_module("sparrow.ops.cuda_backend")  # fakes and autograd
    return torch.ops.sparrow_C


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_opcheck(native, device, dtype):
    x = torch.randn(6, 130, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(130, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(native.rms_norm_fwd, (x, w, 1e-6))
    y, rstd = native.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(native.rms_norm_bwd, (torch.randn_like(y), x.detach(), w.detach(), rstd))


@pytest.mark.parametrize("device", devices())
def test_rms_norm_saves_rstd(native, device):
    x = torch.randn(3, 50, device=device)
    _, rstd = native.rms_norm_fwd(x, torch.ones(50, device=device), 1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))


def test_native_argument_errors_are_value_errors(native):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        native.rms_norm_fwd(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        native.rms_norm_fwd(torch.randn(2, 4, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="x: dtype"):
        native.rms_norm_fwd(x.double(), torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="x: expected a contiguous"):
        native.rms_norm_fwd(torch.randn(8, 4).t(), torch.ones(8), 1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries")
def test_native_links_the_shared_cxx_runtime(native):
    # A libstdc++ linked statically into sparrow._C (what g++ 13.3 did on the H200 machine) throws c10 errors
    # with its own runtime, and libtorch, catching them with the shared one, crashed the process.
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not found")
    path = importlib.import_module("sparrow._C").__file__
    dynamic = subprocess.run([readelf, "-d", "-W", path], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    symbols = subprocess.run([readelf, "-s", "-W", "--dyn-syms", path], capture_output=True, text=True,
                             check=True).stdout
    defined = [line for line in symbols.splitlines()
               if line.split() and line.split()[-1].split("@")[0] == "__cxa_throw" and " UND " not in line]
    assert not defined, defined


def test_native_op_works_under_torch_compile(native):
    from sparrow import ops

    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    compiled = torch.compile(lambda x, w: ops.rms_norm(x, w, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(x, w), ops.reference.rms_norm(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's view of the build")
def test_cuda_kernels_are_compiled_in(native):
    # The CUDA kernels are in the library even where no GPU can run them: the dispatcher knows them.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparrow_C::rms_norm_fwd", "CUDA")


# ------------------------------------------------------------------------ fused_add_rms_norm and rope
def rope_tables(batch, seq, half, device, per_batch):
    positions = torch.randint(0, 64, (batch, seq) if per_batch else (seq,), device=device)
    angles = positions[..., None].float() * (1.0 / 10000 ** (torch.arange(half, device=device) / half))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_add_rms_norm_opcheck(native, device, dtype):
    x, r = (torch.randn(6, 136, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    w = torch.randn(136, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(native.fused_add_rms_norm_fwd, (x, r, w, 1e-6))
    _, summed, rstd = native.fused_add_rms_norm_fwd(x.detach(), r.detach(), w.detach(), 1e-6)
    dy = torch.randn_like(summed)
    torch.library.opcheck(native.rms_norm_bwd, (dy, summed, w.detach(), rstd, torch.randn_like(dy)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_opcheck(native, device, dtype, per_batch):
    q = torch.randn(2, 5, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 5, 2, 64, device=device, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(2, 5, 24, device, per_batch)
    torch.library.opcheck(native.rope, (q, k, cos, sin, False))
    torch.library.opcheck(native.rope_, (q.detach().clone(), k.detach().clone(), cos, sin, False))


@pytest.mark.parametrize("device", devices())
def test_rope_in_place_matches_out_of_place(native, device):
    from sparrow.ops import cuda_backend, reference

    q = torch.randn(2, 5, 4, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 5, 1, 64, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(2, 5, 32, device, True)
    expected = reference.apply_rope(q, k, cos, sin)
    q2, k2 = cuda_backend.apply_rope_(q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(q2, expected[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k2, expected[1], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="q: in-place"):
        cuda_backend.apply_rope_(q.clone().requires_grad_(), k.clone(), cos, sin)


@pytest.mark.parametrize("device", devices())
def test_rope_round_trip(native, device):
    """The backward flag rotates by the negated angle: applying both gives the input back."""
    q = torch.randn(3, 4, 2, 32, device=device)
    k = torch.randn(3, 4, 2, 32, device=device)
    cos, sin = rope_tables(3, 4, 10, device, True)
    q1, k1 = native.rope(q, k, cos, sin, False)
    q2, k2 = native.rope(q1, k1, cos, sin, True)
    torch.testing.assert_close(q2, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2, k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_eager_fast_path_matches_the_native_op(native, device):
    # Eager calls skip the Python autograd kernel (custom_ops.fast_path): the op below autograd without
    # gradients, an autograd.Function with them. Outputs and every gradient must be the op's own exactly.
    cb = importlib.import_module("sparrow.ops.cuda_backend")
    x, r = torch.randn(5, 72, device=device), torch.randn(5, 72, device=device)
    w = torch.randn(72, device=device)
    q, k = torch.randn(2, 5, 4, 32, device=device), torch.randn(2, 5, 2, 32, device=device)
    cos, sin = torch.randn(2, 5, 16, device=device), torch.randn(2, 5, 16, device=device)
    for fast, op, inputs in ((cb._rms_norm_fwd, native.rms_norm_fwd, (x, w, 1e-6)),
                             (cb._fused_add_rms_norm_fwd, native.fused_add_rms_norm_fwd, (x, r, w, 1e-6)),
                             (cb._rope, native.rope, (q, k, cos, sin, False))):
        results = []
        for fn in (fast, op):
            leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t is not cos
                      and t is not sin else t for t in inputs]
            outs = fn(*leaves)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
            results.append([*outs, *(t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad)])
            if fn is fast:
                assert "_eager" in type(outs[0].grad_fn).__name__
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():
            for a, b in zip(fast(*inputs), op(*inputs)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_native_rope_and_fused_argument_errors(native):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual"):
        native.fused_add_rms_norm_fwd(x, torch.randn(4, 7), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="grad_sum"):
        native.rms_norm_bwd(x, x, torch.ones(8), torch.ones(4), torch.randn(3, 8))
    q, k = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    cos, sin = rope_tables(1, 3, 8, "cpu", False)
    with pytest.raises(ValueError, match="q: expected"):
        native.rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k: dtype"):
        native.rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="cos: expected"):
        native.rope(q, k, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="cos: last dim"):
        native.rope(q, k, torch.ones(3, 9), torch.ones(3, 9))
    with pytest.raises(ValueError, match="q: expected unit stride"):
        native.rope(q.transpose(2, 3).contiguous().transpose(2, 3), k, cos, sin)
    with pytest.raises(ValueError, match="q: dtype"):
        native.rope(q.double(), k.double(), cos, sin)


def test_native_fused_and_rope_under_torch_compile(native):
    from sparrow import ops

    x, r = (torch.randn(2, 3, 64, requires_grad=True) for _ in range(2))
    w = torch.randn(64, requires_grad=True)
    q, k = torch.randn(2, 3, 4, 16, requires_grad=True), torch.randn(2, 3, 2, 16, requires_grad=True)
    cos, sin = rope_tables(2, 3, 8, "cpu", True)

    def f(x, r, w, q, k):
        y, s = ops.fused_add_rms_norm(x, r, w, backend="cuda")
        q2, k2 = ops.apply_rope(q, k, cos, sin, backend="cuda")
        return y.sum() + s.square().sum() + q2.square().sum() + k2.sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w, q, k)
    grads = torch.autograd.grad(out, [x, r, w, q, k])
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, q, k)]
    ops_ref = ops.reference
    y, s = ops_ref.fused_add_rms_norm(*leaves[:3])
    q2, k2 = ops_ref.apply_rope(leaves[3], leaves[4], cos, sin)
    expected = y.sum() + s.square().sum() + q2.square().sum() + k2.sum()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for got, ref in zip(grads, torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only machine's view of the build")
def test_fused_and_rope_cuda_kernels_are_compiled_in(native):
    for op in ("fused_add_rms_norm_fwd", "rope", "rope_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow_C::{op}", "CUDA"), op
