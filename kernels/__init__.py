"""Sparrow's Triton kernels, installed as ``sparrow.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and the launch wrappers that size their grids; the
``torch.library`` registration, autograd and argument checks live in ``sparrow/ops/triton_backend.py``.
"""

import sys as _sys

if __name__ == "kernels":
    # Found as a top-level package: the repository root is on sys.path (`python -m pytest` or `python -m
    # sparrow` run from a checkout put the working directory there). This directory is sparrow.kernels; the
    # top-level name belongs to Hugging Face's `kernels` package, which transformers imports whenever it
    # builds a model and which would otherwise find this one. Load that package in our place when it is
    # installed.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        # Not installed. transformers probes the name with find_spec (which finds this directory) and, with no
        # distribution metadata, imports it and reads __version__; an exception here escapes that probe and
        # breaks every model class (seen with transformers 5.17 on a GPU machine without Hugging Face's
        # package). So stay importable, but empty: no __version__ reads as "not installed", and any name taken
        # from this module fails with the reason.
        def __getattr__(name):
            raise AttributeError(f"module 'kernels' has no attribute {name!r}: Hugging Face's kernels package is "
                                 "not installed, and the repository's kernels/ is sparrow.kernels")
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement hands out what sys.modules holds after this
        _spec.loader.exec_module(_module)
