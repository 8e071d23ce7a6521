"""``parallelize()``: the one place where the strands are composed, in a fixed order.

tensor parallel -> pipeline parallel -> data parallel / ZeRO. Each strand is applied to the
plain model from the outside; the model file never imports torch.distributed. Training, verify
and bench all build their parallel model here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..topology import Groups
from ..train.optim import clip_grad_norm
from .data import DataParallel
from .tensor import TensorParallel, apply_tensor_parallel


@dataclass
class ParallelModel:
    """The local part of the model and the strand objects that act on it around each step."""

    module: nn.Module
    grad_sync: DataParallel
    tp: TensorParallel | None = None

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy per token (mean or sum); vocabulary-parallel under tp."""
        if self.tp is not None:
            return self.tp.loss(logits, target, reduction)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction)

    def finish_grads(self) -> None:
        """After the last backward of a step: gradients averaged over dp, sp partial sums over tp."""
        self.grad_sync.finish()
        if self.tp is not None:
            self.tp.finish_grads()

    def clip_grads(self, max_norm: float) -> float:
        """Global-norm clip; tp-sharded parameters summed over tp, replicated ones counted once."""
        sharded = self.tp.sharded if self.tp is not None else {}
        params = list(self.module.named_parameters())
        return clip_grad_norm([p for n, p in params if n in sharded], [p for n, p in params if n not in sharded],
                              max_norm, self.tp.group if self.tp is not None else None)

    def full_params(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by name, on CPU (collective over tp)."""
        if self.tp is not None:
            return self.tp.full_params(self.module)
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}

    def checkpoint_shards(self) -> tuple | None:
        """``(tp_mesh, {name: (dim, size)})`` of the tensor-parallel shards, for checkpoints."""
        return (self.tp.mesh, self.tp.sharded) if self.tp is not None else None

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (for sampling; collective over tp)."""
        logits = self.module(tokens)
        return self.tp.full_logits(logits) if self.tp is not None else logits


def parallelize(model: nn.Module, groups: Groups, cfg: RunConfig) -> ParallelModel:
    """Apply the layout of ``cfg.parallel`` to ``model`` (already on its device and dtype)."""
    p = cfg.parallel
    if p.pp > 1 or p.zero > 0:
        raise NotImplementedError("pp and zero are validated away until they are built")
    tp = None
    if p.tp > 1 or p.sequence_parallel:
        seed = cfg.train.seed + 100_003 * (1 + groups.coord.dp_rank)  # dropout streams differ over dp and tp
        tp = apply_tensor_parallel(model, groups.tp, p.sequence_parallel, seed)
        tp.mesh = groups.mesh["tp"]
    return ParallelModel(module=model, grad_sync=DataParallel(model, groups.dp), tp=tp)
