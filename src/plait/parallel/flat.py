"""Flat sharded storage, shared by every ZeRO stage (Rajbhandari et al. 2020, §5).

Tensors are laid out one after another in a flat buffer padded to a multiple of dp; dp rank r
owns the r-th of dp equal slices. A ``FlatLayout`` is that arithmetic (no storage of its own):
the slice of a buffer a rank owns, and the *segments* through which an optimizer steps it, one per
parameter that overlaps the slice, so weight decay and clipping still see parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..comm import views_of


@dataclass(frozen=True)
class FlatLayout:
    """``params`` laid out flat over ``dp`` ranks; this is rank ``rank``'s view of it."""

    params: tuple[nn.Parameter, ...]
    dp: int
    rank: int

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def padded(self) -> int:
        """The flat length: ``numel`` rounded up to a multiple of dp."""
        return -(-self.numel // self.dp) * self.dp

    @property
    def size(self) -> int:
        """Elements in each rank's slice."""
        return self.padded // self.dp

    def zeros(self, shard: bool = False) -> torch.Tensor:
        """A zeroed flat buffer (or one rank's slice of it) in the parameters' dtype and device."""
        p = self.params[0]
        return torch.zeros(self.size if shard else self.padded, dtype=p.dtype, device=p.device)

    def mine(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a flat buffer (a view)."""
        return flat[self.rank * self.size:(self.rank + 1) * self.size]

    def _overlaps(self):
        """(parameter, first, end, its offset) for each parameter overlapping this rank's slice:
        the overlap is ``[first, end)`` of the flat buffer."""
        lo, hi, offset = self.rank * self.size, (self.rank + 1) * self.size, 0
        for p in self.params:
            a, z = max(lo, offset), min(hi, offset + p.numel())
            if a < z:
                yield p, a, z, offset
            offset += p.numel()

    def segments(self, values: torch.Tensor, grads: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(segment, source) for each parameter overlapping this rank's slice; ``values`` and
        ``grads`` are that slice, and each segment (and its ``.grad``) is a view into them."""
        lo, out = self.rank * self.size, []
        for p, a, z, _ in self._overlaps():
            seg = nn.Parameter(values[a - lo:z - lo])
            seg.grad = grads[a - lo:z - lo]
            out.append((seg, p))
        return out

    def starts(self) -> list[int]:
        """For each of ``segments``, the index of its first element in its parameter's flat order."""
        return [a - offset for _, a, _, offset in self._overlaps()]


def release(t: torch.Tensor) -> None:
    """Free ``t``'s storage, keeping the tensor (and every view of it) to be restored later."""
    t.untyped_storage().resize_(0)


def restore(t: torch.Tensor) -> bool:
    """Give ``t`` its storage back (uninitialised) if it was released; whether it was."""
    storage = t.untyped_storage()
    if storage.size():
        return False
    storage.resize_(t.numel() * t.element_size())
    return True


def flatten_into(params, flat: torch.Tensor) -> None:
    """Copy each parameter into its place in ``flat`` and make its ``.data`` that view."""
    for p, view in zip(params, views_of(list(params), flat)):
        view.copy_(p.detach())
        p.data = view
