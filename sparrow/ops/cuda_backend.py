"""The "cuda" backend: native kernels from ``sparrow._C`` (registered in csrc/torch_bindings.cpp as
``torch.ops.sparrow_C.*``), given fake implementations and autograd here so that ``torch.compile`` and
``torch.library.opcheck`` work with them.

Some native ops also have CPU kernels; they let CI exercise the whole native path without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparrow import _C  # noqa: F401  (importing it registers torch.ops.sparrow_C)

from .registry import register

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_devices(op_name: str) -> set[str]:
    """Device types with a kernel for ``sparrow_C::op_name`` in this build."""
    devices = set()
    for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow_C::{op_name}", key):
            devices.add(device)
    return devices


# ---------------------------------------------------------------------------------------------- rms_norm
@torch.library.register_fake("sparrow_C::rms_norm_fwd")
def _rms_norm_fwd_fake(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("sparrow_C::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_y: Tensor, _grad_rstd: Tensor):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.sparrow_C.rms_norm_bwd(grad_y.contiguous(), x, weight, rstd)
    return grad_x, grad_weight, None


torch.library.register_autograd("sparrow_C::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup_context)

_RMS_NORM_DEVICES = _native_devices("rms_norm_fwd")


def _check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    if x.device.type not in _RMS_NORM_DEVICES:
        raise ValueError(f"x: the cuda backend's rms_norm has kernels for {sorted(_RMS_NORM_DEVICES)}, got {x.device}")
    if x.dtype not in _NATIVE_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported by the cuda backend")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} must match x dtype {x.dtype} for the cuda backend")
    if not weight.is_contiguous():
        raise ValueError("weight: the cuda backend needs a contiguous weight")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    y, _ = torch.ops.sparrow_C.rms_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight, float(eps))
    return y.view(x.shape)


register("rms_norm", "cuda", rms_norm, _check_rms_norm)
