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

from amp_compiler.convert import convert  # noqa: E402
from amp_compiler.errors import (AmpCompilerError, ConfigError, LossScalerError, OnnxError,
                                 ToleranceError, TraceError, UnsupportedModelError)
from amp_compiler.module import AmpModule
from amp_compiler.passes.plan import Decision, PrecisionPlan

__all__ = ["convert", "AmpModule", "PrecisionPlan", "Decision", "AmpCompilerError",
           "ConfigError", "TraceError", "UnsupportedModelError", "ToleranceError",
           "LossScalerError", "OnnxError"]
__version__ = "0.1.0"


_LAZY = {
    "LossScaler": "amp_compiler.scaler",
    "export_onnx": "amp_compiler.onnx_export",
    "onnx_session": "amp_compiler.onnx_export",
    "verify_onnx": "amp_compiler.onnx_export",
    "convert_onnx": "amp_compiler.onnx_frontend",
    "compare": "amp_compiler.compare",
}


__all__ += list(_LAZY)


def __getattr__(name):
    # optional parts (ONNX, the scaler, the debugger) load lazily: `import amp_compiler` stays light
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amp_compiler' has no attribute {name!r}")
