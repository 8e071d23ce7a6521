"""``parallelize()``: the one place where the strands are composed, in a fixed order.

tensor parallel -> pipeline parallel -> data parallel / ZeRO. Each strand is applied to the
plain model from the outside; the model file never imports torch.distributed. Training, verify
and bench all build their parallel model here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import RunConfig
from ..topology import Groups
from .data import DataParallel


@dataclass
class ParallelModel:
    """The local part of the model and the gradient synchroniser that goes with it."""

    module: nn.Module
    grad_sync: DataParallel


def parallelize(model: nn.Module, groups: Groups, cfg: RunConfig) -> ParallelModel:
    """Apply the layout of ``cfg.parallel`` to ``model`` (already on its device and dtype).

    Tensor and pipeline parallel come in later issues; config validation rejects them until then.
    """
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1 or p.zero > 0:
        raise NotImplementedError("tp, pp and zero are validated away until they are built")
    return ParallelModel(module=model, grad_sync=DataParallel(model, groups.dp))
