"""The math of onspec: pure functions over tensors, each citing the equation it implements (verification and
rejection sampling, sampling transforms, draft-length control, distillation losses, vocabulary trimming).
The bottom of kernels <- actors <- cluster: nothing here imports another part of onspec."""
if __name__ == "kernels":
    # Installed, this folder is `onspec.kernels`. Only a checkout's root on sys.path (pytest, `python -c` there,
    # Ray workers that inherit the driver's path) imports it as a top-level `kernels`, the name of a package
    # transformers imports: hand that name over to the installed package, if there is one.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
