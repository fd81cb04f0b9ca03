"""amp_compiler: compiler-pass automatic mixed precision for PyTorch.

    >>> import amp_compiler as ac
    >>> amp = ac.convert(model, dtype="bfloat16")   # analyse the graph, insert explicit casts
    >>> amp.report()                                 # why each node got its precision
"""

import os as _os

# `passes/` and `models/` live beside this folder in a source checkout and are installed as
# amp_compiler.passes / amp_compiler.models. When Python imports this package straight from a
# checkout (running from its root, or an editable install in setuptools' compat mode), those
# sub-packages are not inside this folder: look for them beside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "passes")) and _os.path.isfile(
        _os.path.join(_root, "passes", "__init__.py")):
    __path__.append(_root)

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _Package(_types.ModuleType):
    """This package, with one rule for public functions named like the submodule defining them
    (``compare`` in ``amp_compiler/compare.py``, ``convert`` in ``convert.py``).

    Whenever a submodule finishes importing, the import system runs
    ``setattr(amp_compiler, "compare", <module amp_compiler.compare>)``: the first import, by
    anyone, at any time (our lazy ``__getattr__`` included), would replace the function
    ``ac.compare`` with the module. Here that binding stores the module's function instead, so
    ``ac.compare(...)`` works however often and in whatever order things are imported. (The
    module's other names: ``from amp_compiler.compare import CompareReport``.)
    """

    def __setattr__(self, name: str, value) -> None:
        if (name in _SAME_NAME and isinstance(value, _types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


_SAME_NAME = ("convert", "compare", "cuda_graphs")
_sys.modules[__name__].__class__ = _Package

from amp_compiler.convert import convert  # noqa: E402
from amp_compiler.errors import (AmpCompilerError, ConfigError, LossScalerError, OnnxError,
                                 PlanError, SavedFileError, ToleranceError, TraceError,
                                 UnsupportedModelError, UnsupportedOperationError,
                                 UnusedOverrideWarning)
from amp_compiler.module import AmpModule
from amp_compiler.passes.plan import Decision, PrecisionPlan

__all__ = ["convert", "AmpModule", "PrecisionPlan", "Decision", "AmpCompilerError",
           "ConfigError", "TraceError", "UnsupportedModelError", "ToleranceError",
           "LossScalerError", "OnnxError", "PlanError", "SavedFileError",
           "UnsupportedOperationError", "UnusedOverrideWarning"]
__version__ = "0.1.0"


_LAZY = {
    "LossScaler": "amp_compiler.scaler",
    "export_onnx": "amp_compiler.onnx.export",
    "onnx_session": "amp_compiler.onnx.session",
    "verify_onnx": "amp_compiler.onnx.session",
    "convert_onnx": "amp_compiler.onnx.convert",
    "compare": "amp_compiler.compare",
    "backend": "amp_compiler.dynamo",
    "save": "amp_compiler.saving",
    "load": "amp_compiler.loading",
    "cuda_graphs": "amp_compiler.cuda_graphs",
}


__all__ += list(_LAZY)


def __getattr__(name):
    # optional parts (ONNX, the scaler, the debugger) load lazily: `import amp_compiler` stays light
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amp_compiler' has no attribute {name!r}")
