"""plait: train transformer language models across many processes.

For a training loop of your own (``api.py``, docs/own-model.md)::

    import plait
    pm = plait.parallelize(model, description, plait.ParallelConfig(tp=2))   # inside plait.launch(fn, n)

Names are imported when first used, so ``import plait`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "parallelize": "plait.api", "launch": "plait.api", "device": "plait.api",
    "ParallelModel": "plait.parallel.hybrid", "ParallelConfig": "plait.config",
    "ModelDescription": "plait.models.description", "TensorParallelPlan": "plait.models.description",
    "seed_for": "plait.seeds", "load_hf": "plait.models.hf", "save_hf": "plait.models.hf",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plait' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
