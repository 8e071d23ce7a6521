"""Every tensor of a rank's training state as pieces of the unsplit model's tensors.

A rank holds parts of the whole model: tensor parallel splits a matrix along one dimension (the
vocabulary padded to a multiple of tp), ZeRO gives each dp rank a flat slice of a bucket that may
start and end inside a parameter, and pipeline parallel keeps some blocks. Here each such part is
turned into rectangular *pieces* of the whole tensor, named by its place in the unsplit model
(``model.layers.3.proj.weight``, ``optim.layers.3.proj.weight.exp_avg``), with its offsets and
sizes there. Saving writes the pieces; loading fills the pieces of whatever layout is running now
from whatever pieces were written, so a checkpoint loads at any layout.

A flat range of a row-major tensor is at most ``2 * (ndim - 1) + 1`` rectangles: a ragged start, whole
rows, a ragged end (``flat_boxes``). Replicated copies are written once: by dp rank 0 unless the
strand's segment is a slice of its own (ZeRO), by tp rank 0 unless tensor parallel splits the
tensor, and a tied weight under its input stage's name only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..models.description import ModelDescription


@dataclass(frozen=True)
class Box:
    """A rectangle of a whole tensor (``offsets``, ``sizes``) and where its elements lie in the local
    tensor: the flat range ``[lo, hi)`` of the local part, then ``keep`` elements along ``dim``
    (the vocabulary padding of tensor parallel cut off), or all of them when ``keep`` is None."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    lo: int
    hi: int
    local_sizes: tuple[int, ...]
    dim: int = 0
    keep: int | None = None

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This box's elements of ``flat`` (the local part, flattened), as a view of the box's shape."""
        v = flat[self.lo:self.hi].view(self.local_sizes)
        return v if self.keep is None else v.narrow(self.dim, 0, self.keep)


def flat_boxes(shape: tuple[int, ...], a: int, b: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    """Rectangles ``(offsets, sizes, lo, hi)`` covering the flat range ``[a, b)`` of a row-major
    tensor of ``shape``, in order; each is the flat range ``[lo, hi)``."""
    if a >= b:
        return
    if len(shape) <= 1:
        yield ((a,), (b - a,), a, b) if shape else ((), (), a, b)
        return
    inner = math.prod(shape[1:])
    zeros = (0,) * (len(shape) - 1)
    if a % inner:  # a ragged start, inside row a // inner
        row, end = a // inner, min(b, (a // inner + 1) * inner)
        for off, size, lo, hi in flat_boxes(shape[1:], a - row * inner, end - row * inner):
            yield (row, *off), (1, *size), lo + row * inner, hi + row * inner
        a = end
    rows = (b - a) // inner
    if rows > 0:
        yield (a // inner, *zeros), (rows, *shape[1:]), a, a + rows * inner
        a += rows * inner
    if a < b:  # a ragged end
        row = a // inner
        for off, size, lo, hi in flat_boxes(shape[1:], 0, b - row * inner):
            yield (row, *off), (1, *size), lo + row * inner, hi + row * inner


@dataclass(frozen=True)
class Place:
    """One tensor this rank holds, located in the unsplit model.

    ``tensor``: what is stored (a parameter, a buffer, or a ZeRO segment that the optimizer steps),
    holding the local part's flat elements ``[start, start + tensor.numel())``; ``local_shape``: the
    local part (a tp shard, or the whole tensor); ``split``: ``(dim, whole size, tp rank)`` when
    tensor parallel splits it; ``writer``: whether this rank writes it (one copy of each element)."""

    name: str
    tensor: torch.Tensor
    start: int
    local_shape: tuple[int, ...]
    split: tuple[int, int, int] | None
    writer: bool
    boxes: tuple[Box, ...] = field(default=(), compare=False)

    @property
    def global_shape(self) -> tuple[int, ...]:
        if self.split is None:
            return self.local_shape
        dim, size, _ = self.split
        return tuple(size if d == dim else n for d, n in enumerate(self.local_shape))


def boxes_of(place: Place) -> tuple[Box, ...]:
    """The rectangles of the whole tensor that ``place`` holds, with where they lie locally."""
    out = []
    n = place.tensor.numel()
    for off, size, lo, hi in flat_boxes(place.local_shape, place.start, place.start + n):
        lo, hi = lo - place.start, hi - place.start
        if place.split is None:
            out.append(Box(off, size, lo, hi, size))
            continue
        dim, whole, rank = place.split
        first = off[dim] + rank * place.local_shape[dim]
        keep = min(size[dim], whole - first)
        if keep <= 0:  # vocabulary padding only
            continue
        goff = tuple(first if d == dim else o for d, o in enumerate(off))
        gsize = tuple(keep if d == dim else s for d, s in enumerate(size))
        out.append(Box(goff, gsize, lo, hi, size, dim, keep if keep < size[dim] else None))
    return tuple(out)


def canonical_names(desc: ModelDescription) -> dict[str, str]:
    """A tied output name -> the input name it is saved under (the unsplit model holds one tensor)."""
    return {out: inp for out, inp in desc.tied}


def places(pm) -> list[Place]:
    """Every model tensor of the parallel model ``pm`` (a ``ParallelModel``) on this rank: the
    optimizer's segments (parameters, or their ZeRO slices), frozen parameters, and buffers."""
    module, data, coord = pm.module, pm.data, pm.coord
    sharded = pm.tp.sharded if pm.tp is not None else {}
    tied = canonical_names(pm.desc)
    copy = id(pm.tied_param) if pm.tied_split else None
    copy_name = next((out for out, _ in pm.desc.tied), None)
    names = {id(p): n for n, p in module.named_parameters()}

    def place(local_name: str, tensor: torch.Tensor, start: int, src: torch.Tensor) -> Place:
        split = None
        if local_name in sharded:
            dim, size = sharded[local_name]
            split = (dim, size, coord.tp_rank)
        dup = id(src) == copy and local_name == copy_name  # the output stage's copy of a tied weight
        writer = (tensor is not src or coord.dp_rank == 0) and \
            (split is not None or coord.tp_rank == 0) and not dup and not data.copy
        p = Place(tied.get(local_name, local_name), tensor, start, tuple(src.shape), split, writer)
        return Place(p.name, p.tensor, p.start, p.local_shape, p.split, p.writer, boxes_of(p))

    out, covered = [], set()
    for seg, start, src in data.places():
        out.append(place(names[id(src)], seg, start, src))
        covered.add(id(src))
    for name, p in module.named_parameters():  # trained ones outside this rank's segments: other dp ranks'
        if id(p) not in covered and not p.requires_grad:  # frozen: whole on every dp rank
            out.append(place(name, p, 0, p))
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    for name, b in module.state_dict(keep_vars=True).items():
        if name not in params and torch.is_tensor(b):
            out.append(place(name, b, 0, b))
    return out
