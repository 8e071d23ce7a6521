"""Reference models: plain PyTorch, no distributed code."""

from ..config import ModelConfig
from .gpt import GPT, generate, num_params


def build_model(cfg: ModelConfig) -> GPT:
    """The decoder-only transformer of ``cfg.flavour`` (resolved config: kv_heads, ffn_hidden set)."""
    return GPT(cfg)


__all__ = ["GPT", "build_model", "generate", "num_params"]
