"""amp_compiler: compiler-pass automatic mixed precision for PyTorch.

    >>> import amp_compiler as ac
    >>> amp = ac.convert(model, dtype="bfloat16")   # analyse the graph, insert explicit casts
    >>> amp.report()                                 # why each node got its precision
"""

from amp_compiler.convert import convert
from amp_compiler.errors import (AmpCompilerError, ConfigError, LossScalerError, OnnxError,
                                 ToleranceError, TraceError, UnsupportedModelError)
from amp_compiler.module import AmpModule
from amp_compiler.passes.plan import Decision, PrecisionPlan

__all__ = ["convert", "AmpModule", "PrecisionPlan", "Decision", "AmpCompilerError",
           "ConfigError", "TraceError", "UnsupportedModelError", "ToleranceError",
           "LossScalerError", "OnnxError"]
__version__ = "0.1.0"


def __getattr__(name):
    # optional parts load lazily so `import amp_compiler` stays light
    if name == "LossScaler":
        from amp_compiler.scaler import LossScaler
        return LossScaler
    raise AttributeError(f"module 'amp_compiler' has no attribute {name!r}")
