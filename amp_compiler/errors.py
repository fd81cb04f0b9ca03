"""Typed errors: every error amp_compiler raises on purpose derives from AmpCompilerError.

Each message names the node / module / op involved and says what the user can do about it.
"""

from __future__ import annotations


class AmpCompilerError(Exception):
    """Base class of every error amp_compiler raises on purpose."""


class TraceError(AmpCompilerError):
    """The model could not be captured as a graph (symbolic tracing or torch.export failed)."""


class ConfigError(AmpCompilerError, ValueError):
    """A convert() argument is invalid (unknown dtype, unknown override, bad tolerance...)."""


class UnsupportedModelError(AmpCompilerError):
    """The model is valid PyTorch but something in it cannot be converted; the message says why."""


class ToleranceError(AmpCompilerError):
    """Tolerance mode could not bring the error under epsilon; the message gives the best reached."""


class LossScalerError(AmpCompilerError):
    """Loss scaler misuse (fp16 master weights, step() before scale(), ...)."""


class OnnxError(AmpCompilerError):
    """ONNX export or conversion failed; the message names the node and what to do."""


class PlanError(AmpCompilerError, ValueError):
    """A saved plan (``PrecisionPlan.from_json``) is malformed; the message names the file, the
    place in it (``nodes['linear'].precision``) and what is wrong there."""


class SavedFileError(AmpCompilerError, ValueError):
    """A file ``amp_compiler.save`` writes or ``load`` reads is unusable: missing, not one of
    ours, from a newer format, or holding weights that do not fit the model given; the message
    names the file and what to do."""


class UnsupportedOperationError(AmpCompilerError, TypeError):
    """An ``nn.Module`` operation an ``AmpModule`` refuses, raised before anything changes: a
    whole-module dtype change (``.half()``, ``.to(torch.bfloat16)``: precision is the plan's,
    convert again with ``dtype=``) or pickling the module (``amp_compiler.save`` saves it)."""


class PassError(AmpCompilerError):
    """A compiler pass failed unexpectedly or left an invalid graph; the message names the pass
    and the passes run before it (a bug: please report it with the model)."""


class UnusedOverrideWarning(UserWarning):
    """A ``keep_fp32`` / ``force_low`` entry names an op kind or a module class this model does
    not contain: it does nothing here (a recipe shared across models may name such kinds)."""
