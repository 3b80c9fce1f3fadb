"""Sparrow's Triton kernels, installed as ``sparrow.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and the launch wrappers that size their grids; the
``torch.library`` registration, autograd and argument checks live in ``sparrow/ops/triton_backend.py``.
"""
