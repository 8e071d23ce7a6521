"""Global-norm gradient clipping over every strand's pieces of the model.

The norm is that of the whole model's gradient, whatever the layout: each rank holds some of it,
so squared norms are summed over the groups that split it, one all-reduce of one number each.

- tensor parallel: a tp-sharded parameter's squares are summed over tp; a replicated one (a norm
  weight, a row-parallel bias) holds the same gradient on every tp rank and is counted once;
- pipeline parallel: each stage holds other parameters, so squares are summed over pp; a tied
  weight's second copy (the output layer of a tied embedding) is scaled but not counted;
- ZeRO: each dp rank holds a slice of every gradient, so squares are summed over dp. Plain data
  parallel's gradients are already averaged over dp: no dp traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import comm


@dataclass(frozen=True)
class ClipSets:
    """What the optimizer steps on this rank, by how its squared norm is counted."""

    sharded: tuple[torch.Tensor, ...] = ()  # split over tp: squares summed over tp
    replicated: tuple[torch.Tensor, ...] = ()  # alike on every tp rank: counted once
    copies: tuple[torch.Tensor, ...] = ()  # a tied weight's second copy: scaled, not counted


@dataclass(frozen=True)
class NormGroups:
    """The groups squares are summed over (None: not split along that dimension)."""

    tp: object = None
    pp: object = None
    dp: object = None  # only where each dp rank holds a slice of the gradients (ZeRO)


@torch.no_grad()
def clip_grad_norm(sets: ClipSets, max_norm: float, groups: NormGroups = NormGroups()) -> float:
    """Scale gradients so that their global L2 norm is at most ``max_norm`` (0: measure only);
    return the norm. forward: -; after backward: up to three all-reduces of one number (tp, dp, pp)."""
    grads_s = [p.grad for p in sets.sharded if p.grad is not None]
    grads_r = [p.grad for p in sets.replicated if p.grad is not None]
    device = (grads_s + grads_r)[0].device if grads_s or grads_r else torch.device("cpu")
    sq = _sum_over(_squared_norm(grads_s, device), groups.tp) + _squared_norm(grads_r, device)
    total = _sum_over(_sum_over(sq, groups.dp), groups.pp).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([*sets.sharded, *sets.replicated, *sets.copies], max_norm, total)
    return float(total)


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and comm.group_size(group) > 1:
        comm.all_reduce_(t, group)
    return t


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.nn.utils.get_total_norm(grads).double().square()
