"""What model libraries need before torch.export can capture their models.

Hugging Face models return their key/value cache (``DynamicCache``) in the output whenever
``use_cache`` is on, which is the default of most causal-LM configs, in training too. torch.export
can only return classes registered as pytree nodes; transformers ships the registration, but
leaves it to the exporter to call. ``prepare_for_export(model)`` calls it for the libraries it
knows; anything it cannot do is logged and left to torch.export's own error.

    >>> prepare_for_export(model)     # before torch.export.export(model, ...)
"""

from __future__ import annotations

import importlib
import logging

from torch import nn

log = logging.getLogger("amp_compiler")


def _libraries(model: nn.Module) -> set[str]:
    return {type(m).__module__.split(".", 1)[0] for m in model.modules()}


def _register_transformers_caches(model: nn.Module) -> None:
    # transformers >= 5.x: every Cache subclass and the model's own cache classes; earlier
    # releases: DynamicCache only
    try:
        dynamo = importlib.import_module("transformers.exporters.exporter_dynamo")
        for m in model.modules():
            if type(m).__module__.startswith("transformers."):
                dynamo.register_cache_pytrees_for_model(m)
                break
        return
    except (ImportError, AttributeError):
        pass
    executorch = importlib.import_module("transformers.integrations.executorch")
    executorch.register_dynamic_cache_export_support()


# library (top-level module name) -> what it needs before a capture
PREPARE = {"transformers": _register_transformers_caches}


def prepare_for_export(model: nn.Module) -> None:
    """Run every preparation ``PREPARE`` lists for the libraries ``model``'s modules come from."""
    for lib in sorted(_libraries(model) & PREPARE.keys()):
        try:
            PREPARE[lib](model)
        except Exception as exc:  # noqa: BLE001 -- torch.export's own error says the rest
            log.info("could not prepare %s models for torch.export (%s: %s)", lib,
                     type(exc).__name__, exc)
