"""Sparrow's Triton kernels, installed as ``sparrow.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and the launch wrappers that size their grids; the
``torch.library`` registration, autograd and argument checks live in ``sparrow/ops/triton_backend.py``.
"""

import sys as _sys

if __name__ == "kernels":
    # Found as a top-level package: the repository root is on sys.path (`python -m pytest` or `python -m
    # sparrow` run from a checkout put the working directory there). This directory is sparrow.kernels; the
    # top-level name belongs to Hugging Face's `kernels` package, which transformers (>= 5.25) imports
    # whenever it builds a model and which would otherwise find this one. Load that package in our place,
    # or fail as a missing package does.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ is sparrow.kernels)",
                                  name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement hands out what sys.modules holds after this
    _spec.loader.exec_module(_module)
