"""AdamW with decoupled weight decay on matrices only, warm-up then cosine decay, global-norm clip."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .. import comm
from ..config import TrainConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, decays: set[int] | None = None
                    ) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters of two or more dims (not on norms, biases), or on those
    whose ids are in ``decays`` (ZeRO's flat slices have lost their shapes)."""
    params = [p for p in params if p.requires_grad]
    takes_decay = (lambda p: id(p) in decays) if decays is not None else (lambda p: p.dim() >= 2)
    decay = [p for p in params if takes_decay(p)]
    other = [p for p in params if not takes_decay(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(sharded: list[torch.Tensor], replicated: list[torch.Tensor], max_norm: float,
                   group=None, pp_group=None, copies: tuple[torch.Tensor, ...] = (), dp_group=None) -> float:
    """Scale gradients so that their global L2 norm is at most ``max_norm``; return the norm.

    ``sharded`` parameters are split over ``group`` (tensor parallel): their squared norms are
    summed over it (one all-reduce of one number). ``replicated`` ones hold the same gradient on
    every rank of the group and are counted once. Each pipeline stage holds other parameters: the
    squared norms are summed over ``pp_group``; a tied weight's second copy goes in ``copies``
    (scaled, not counted). Under ZeRO each dp rank holds a slice of every gradient: ``dp_group``
    sums the squares over the slices.
    Under data parallel gradients are already averaged, so no dp traffic is needed.
    """
    grads_s = [p.grad for p in sharded if p.grad is not None]
    grads_r = [p.grad for p in replicated if p.grad is not None]
    device = (grads_s + grads_r)[0].device if grads_s or grads_r else torch.device("cpu")
    sq = _sum_over(_squared_norm(grads_s, device), group) + _squared_norm(grads_r, device)
    total = _sum_over(_sum_over(sq, dp_group), pp_group).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([*sharded, *replicated, *copies], max_norm, total)
    return float(total)


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and comm.group_size(group) > 1:
        comm.all_reduce_(t, group)
    return t


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.nn.utils.get_total_norm(grads).double().square()
