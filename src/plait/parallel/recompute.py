"""Activation recomputation (Chen et al. 2016; Korthikanti et al. 2022, §5): keep fewer of the
tensors that autograd saves for backward and compute them again when backward needs them.

- ``full``: every block keeps only its input; its whole forward runs again in backward.
- ``selective``: each attention core (QK^T, softmax, dropout, the sum over V: the modules the
  description names in ``attention_core``) keeps only its q, k and v; the rest of the block keeps
  what it always kept. The core saves the least memory per FLOP recomputed.

Built on ``torch.utils.checkpoint`` (non-reentrant): the region's inputs are saved as ordinary saved
tensors (so the activation meter counts them), the tensors saved inside it are dropped and made
again from those inputs the first time a backward needs one. A backward that runs in two passes
(zero bubble's I and W) recomputes in each.

Random numbers: checkpoint replays the default stream of the region's start. Tensor parallel's
second stream (``RNGTracker``, dropout on this rank's heads or sequence shard) lives outside it, so
the recomputation also replays that stream from where the forward found it: the same masks.

What travels: nothing of its own. The collectives inside a region (tensor parallel's f/g,
sequence parallel's all-gather and reduce-scatter) run again when it is recomputed, over tp, in
backward; ZeRO-3 has gathered the block's parameters by then (its hook on the block's output).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import DescriptionError
from ..models.description import ModelDescription


def recomputed_modules(model: nn.Module, desc: ModelDescription, mode: str) -> list[nn.Module]:
    """The modules whose forward ``mode`` recomputes: none, the attention cores, or the blocks."""
    if mode == "none":
        return []
    if mode == "full":
        return desc.block_list(model)
    if not desc.attention_core:
        raise DescriptionError("attention_core", "", "selective recomputation needs the model's description to "
                               "name its attention cores (e.g. 'blocks.*.attn.core'); use train.recompute=full")
    found = [m for name, m in model.named_modules() if fnmatch.fnmatchcase(name, desc.attention_core)]
    if not found:
        raise DescriptionError("attention_core", desc.attention_core, "matches no module of the model")
    return found


def apply_recompute(model: nn.Module, desc: ModelDescription, mode: str, streams: Sequence = ()) -> int:
    """Make the modules of ``mode`` recompute in backward (in place); ``streams``: objects with a
    ``state`` attribute (tensor parallel's ``RNGTracker``) replayed on recomputation. Returns how
    many modules recompute."""
    modules = recomputed_modules(model, desc, mode)
    for module in modules:
        _recompute(module, tuple(streams))
    return len(modules)


def _recompute(module: nn.Module, streams: tuple) -> None:
    """Wrap ``module.forward`` (its name and parameters stay as they are)."""
    inner = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        found = [s.state for s in streams]  # the streams as this forward finds them
        ran = []

        def run(*a, **k):
            if not ran:  # the forward itself
                ran.append(True)
                return inner(*a, **k)
            now = [s.state for s in streams]
            for s, state in zip(streams, found):
                s.state = state
            try:
                return inner(*a, **k)
            finally:
                for s, state in zip(streams, now):
                    s.state = state

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    module.forward = forward
