"""Models: plain PyTorch, no distributed code, each with its description (what strands may know).

``build(cfg)`` gives ``(module, description)`` for plait's own flavours, or calls a user's builder
(``model.builder = "FILE.py:FUNCTION"``: a function of the ``ModelConfig`` returning the module and
its ``ModelDescription``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys

from torch import nn

from ..config import ModelConfig, builder_parts
from ..errors import ConfigError
from .description import ModelDescription, TensorParallelPlan, check, compose
from .gpt import GPT, num_params
from .sampling import generate


def build(cfg: ModelConfig) -> tuple[nn.Module, ModelDescription]:
    """The model of ``cfg`` (resolved config) and its description."""
    if cfg.builder:
        return _from_builder(cfg)
    if cfg.flavour == "bert":
        from .bert import Bert

        model = Bert(cfg)
        return model, model.describe()
    model = GPT(cfg)
    return model, model.describe()


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` alone (for a single process; strands need ``build``'s description too)."""
    return build(cfg)[0]


def load_builder(spec: str):
    """The function named by ``"FILE.py:FUNCTION"`` (FILE relative to the working directory)."""
    file, name = builder_parts(spec)
    module_name = "plait_builder_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        loader = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: report it in one line
            raise ConfigError("model.builder", spec, f"importing {file} failed: {type(e).__name__}: {e}") from None
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError("model.builder", spec, f"{file} defines no function {name!r}")
    return fn


def _from_builder(cfg: ModelConfig) -> tuple[nn.Module, ModelDescription]:
    out = load_builder(cfg.builder)(cfg)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)
            and isinstance(out[1], ModelDescription)):
        raise ConfigError("model.builder", cfg.builder, "the function must return (nn.Module, ModelDescription)")
    return out


__all__ = ["GPT", "ModelDescription", "TensorParallelPlan", "build", "build_model", "check", "compose",
           "generate", "load_builder", "num_params"]
