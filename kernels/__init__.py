"""Triton kernels and their torch references."""
import sys as _sys

if __name__ == "kernels":
    # This folder is ``splitserve.kernels``. With the repository root on
    # sys.path (``python -m pytest`` or a bench script run from a checkout) it
    # is also found as a top-level ``kernels`` and hides PyPI's package of that
    # name (Hugging Face's hub kernels), which transformers imports whenever
    # that package is installed (a dependency of transformers >= 5.25). Then
    # the real one takes this name; without it, this module stays (it has no
    # version, so transformers treats hub kernels as unavailable).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
