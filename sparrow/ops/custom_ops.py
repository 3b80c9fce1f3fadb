"""What the fast backends share when they wrap kernels as torch custom ops (``triton_*.py``, ``cuda_*.py``):
device and layout checks, the default softmax scale, and the autograd of a dense attention forward that
returns ``(out, lse)``. Written once here so the backends differ only in the kernels they call.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from .reference import default_scale  # noqa: F401  (one definition; the backends import it from here)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(name: str, t: Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), got {t.device}")


def unit_stride(t: Tensor | None) -> Tensor | None:
    """Incoming gradients can have any layout (expanded zeros, transposes); the kernels need unit stride."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _direct_call_ok(args: tuple) -> bool:
    """Whether a kernel may be called as a plain function: nothing is being traced or transformed
    (torch.compile, export, make_fx under AOTAutograd, a fake or functional tensor, any dispatch mode such as
    FakeTensorMode, a torch.func transform)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return all(type(a) is Tensor or type(a) is torch.nn.Parameter for a in args if isinstance(a, Tensor))


def fast_path(op: Callable, impl: Callable, setup: Callable | None = None,
              backward: Callable | None = None) -> Callable:
    """``op(*args)`` for the custom op ``op`` made from ``impl``, without torch's dispatcher in eager code.

    The dispatcher costs a custom op ~15 us of host time a call, ~30 us with its Python autograd (the 2-core CPU
    machine; a torch.autograd.Function: 4-5 us), and at small shapes and in decoding the GPU waits on exactly that
    host time. So outside tracing, ``impl`` runs directly when no gradient is wanted, and through an
    autograd.Function wired with the op's own ``setup``/``backward`` when one is. Under torch.compile, export,
    any tracing or a torch.func transform the op itself is called (:func:`_direct_call_ok`), so graphs keep one
    opaque node; ``opcheck`` tests the op itself."""
    function = None
    if setup is not None:
        # The ctx-taking forward, not forward + setup_context: the latter routes every apply through functorch's
        # machinery, 33 us a call here against 5.5 us. (Under a torch.func transform the op itself runs, as before.)
        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        def function_backward(ctx, *grads):
            return backward(ctx, *grads)

        function = type(f"{getattr(impl, '__name__', 'op').strip('_')}_eager", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(function_backward)}).apply

    def call(*args):
        if not _direct_call_ok(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return function(*args) if function is not None else op(*args)
        return impl(*args)

    return call


def below_autograd(op: Callable) -> Callable:
    """A native op called past its autograd kernel: for ``sparrow_C`` ops, whose autograd is registered from
    Python, the plain kernel (``fast_path``'s ``impl`` for them)."""

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    call.__name__ = getattr(op, "__name__", "native_op").replace(".", "_")
    return call


def register_attention_autograd(fwd_op: str, bwd: Callable,
                                prepare_grad: Callable[[Tensor], Tensor] = unit_stride) -> tuple[Callable, Callable]:
    """Autograd for a dense attention op ``fwd_op(q, k, v, causal, scale) -> (out, lse)`` whose backward is
    ``bwd(grad_out, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``; ``prepare_grad`` puts the incoming
    gradient in a layout the backward kernel reads. Returns (setup, backward), for :func:`fast_path`."""

    def setup(ctx, inputs, output) -> None:
        q, k, v, causal, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1])
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(prepare_grad(grad_out), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd(fwd_op, backward, setup_context=setup)
    return setup, backward


def register_rope_autograd(rope_op: str, rope: Callable) -> tuple[Callable, Callable]:
    """Autograd for a rotary op ``rope_op(q, k, cos, sin, backward) -> (q, k)``: the gradient of a rotation
    is the rotation by the negated angle, i.e. the same kernel with ``backward`` flipped. Returns (setup,
    backward), for :func:`fast_path`."""

    def setup(ctx, inputs, output) -> None:
        _, _, cos, sin, backward = inputs
        ctx.save_for_backward(cos, sin)
        ctx.backward = backward

    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = rope(unit_stride(grad_q), unit_stride(grad_k), cos, sin, not ctx.backward)
        return grad_q, grad_k, None, None, None

    torch.library.register_autograd(rope_op, backward, setup_context=setup)
    return setup, backward
