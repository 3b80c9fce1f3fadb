"""sparrow._C: the build, the TORCH_LIBRARY registration, fake implementations and autograd of native ops.

These run on the CPU kernels that some native ops carry, so CI checks the whole native path without a GPU;
the `cuda`-marked tests run the same checks on the GPU kernels.
"""

import importlib

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
