"""A rank's training state as DCP items named by the unsplit model, and DCP's planners for them.

What one checkpoint holds (every name is the unsplit model's, ``pieces.py``):

- ``model.NAME``: every parameter and persistent buffer;
- ``optim.NAME.KEY``: the optimizer's state of that parameter (AdamW: ``exp_avg``, ``exp_avg_sq``
  as pieces of the parameter's shape, ``step`` as a scalar);
- ``rng.ppP.dpD.tpT.KIND``: each rank's random streams (``cpu``, ``cuda``, tensor parallel's ``tp``),
  restored only when resuming at the same layout.

The step (which is also the data position), the layout and the config are plain data in ``plait.json`` beside
them (``store.py``). The folder is a plain DCP checkpoint: PyTorch's own tools read it
(``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``), every tensor whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import (
    _create_read_items,
    _create_write_items,
    create_read_items_for_chunk_list,
)

from ..errors import ConfigError
from .pieces import Box, Place, places


@dataclass
class Pieces:
    """The rectangles of one whole tensor (``shape``) that this rank holds, and a view of each."""

    shape: tuple[int, ...]
    boxes: list[Box]
    views: list[torch.Tensor]

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(b.offsets), torch.Size(b.sizes)) for b in self.boxes]

    def staged(self) -> Pieces:
        """A copy on the CPU (for a save that runs while training goes on)."""
        return Pieces(self.shape, self.boxes, [v.detach().to("cpu", copy=True).contiguous() for v in self.views])


def _add(state: dict, name: str, place: Place, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    views = [b.view(flat) for b in place.boxes]
    if name in state:
        state[name].boxes.extend(place.boxes)
        state[name].views.extend(views)
    else:
        state[name] = Pieces(place.global_shape, list(place.boxes), views)


def training_state(pm, optimizer: torch.optim.Optimizer | None, *, saving: bool) -> dict:
    """``{name: Pieces | tensor}`` of the parallel model ``pm`` and ``optimizer`` on this rank.

    ``saving``: only the pieces this rank writes (one copy of each element over all ranks).
    Loading asks for every piece this rank holds; an optimizer that has not stepped yet gets its
    state tensors created here (zeros, to be filled), with the keys and dtypes that ``keys`` gives.
    """
    state: dict = {}
    for place in places(pm):
        if saving and not place.writer:
            continue
        _add(state, f"model.{place.name}", place, place.tensor)
        if optimizer is None or place.tensor not in optimizer.state:
            continue
        for key, value in optimizer.state[place.tensor].items():
            if not torch.is_tensor(value):
                continue
            if value.dim() == 0:
                state[f"optim.{place.name}.{key}"] = value
            elif value.numel() == place.tensor.numel():
                _add(state, f"optim.{place.name}.{key}", place, value)
    return state


def prepare_optimizer(pm, optimizer: torch.optim.Optimizer, saved: dict[str, tuple]) -> None:
    """Create the optimizer's state for every tensor it steps, as the checkpoint holds it:
    ``saved`` maps ``optim.NAME.KEY`` to (shape, dtype). Scalars stay on the CPU (AdamW's ``step``)."""
    for place in places(pm):
        prefix = f"optim.{place.name}."
        keys = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not keys:
            continue
        state = optimizer.state[place.tensor]
        for key, (shape, dtype) in keys.items():
            if key not in state:
                state[key] = torch.zeros((), dtype=dtype) if len(shape) == 0 else torch.zeros_like(place.tensor)


def rng_state(pm) -> dict[str, torch.Tensor]:
    """This rank's random streams, named by its coordinates."""
    c = pm.coord
    prefix = f"rng.pp{c.pp_rank}.dp{c.dp_rank}.tp{c.tp_rank}"
    out = {f"{prefix}.cpu": torch.get_rng_state()}
    device = next(pm.module.parameters()).device
    if device.type == "cuda":
        out[f"{prefix}.cuda"] = torch.cuda.get_rng_state(device)
    if pm.tp is not None and pm.tp.rng is not None:
        out[f"{prefix}.tp"] = pm.tp.rng.state.clone()
    return out


def set_rng_state(pm, state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` saved (after loading it into ``rng_state``'s tensors)."""
    for name, value in state.items():
        kind = name.rsplit(".", 1)[1]
        if kind == "cpu":
            torch.set_rng_state(value)
        elif kind == "cuda":
            torch.cuda.set_rng_state(value, next(pm.module.parameters()).device)
        elif kind == "tp":
            pm.tp.rng.state = value.clone()


def refuse_mismatch(where: str, name: str, there: tuple | None, here: tuple) -> None:
    """One line for a checkpoint of another model: tensor ``name`` is missing there (``there`` None)
    or shaped otherwise than ``here``."""
    if there is None:
        raise ConfigError("checkpoint", where, f"holds no tensor {name!r}: it was saved from another model")
    if tuple(there) != tuple(here):
        raise ConfigError("checkpoint", where, f"tensor {name!r} is {list(there)} there but {list(here)} in this "
                          "model: it was saved from a model of another shape")


def check_shapes(state: dict, metadata, where: str) -> None:
    """Refuse a checkpoint of another model at the first tensor missing or shaped otherwise."""
    saved = metadata.state_dict_metadata
    for name, obj in state.items():
        there = tuple(getattr(saved[name], "size", ())) if name in saved else None
        refuse_mismatch(where, name, there, tuple(obj.shape) if name.startswith(("model.", "optim.")) else there)


class PieceSavePlanner(DefaultSavePlanner):
    """DCP's planner, writing each of a rank's ``Pieces`` as a chunk of the whole tensor."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, obj in self.state_dict.items():
            if not isinstance(obj, Pieces):
                items += _create_write_items(name, obj)
                continue
            for box, view in zip(obj.boxes, obj.views):
                chunk = ChunkStorageMetadata(torch.Size(box.offsets), torch.Size(box.sizes))
                items.append(WriteItem(MetadataIndex(name, torch.Size(box.offsets)), WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, TensorProperties.create_from_tensor(view),
                                                                   torch.Size(obj.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        obj = self.state_dict[write_item.index.fqn]
        if not isinstance(obj, Pieces):
            return super().resolve_data(write_item)
        offsets = tuple(write_item.index.offset)
        view = next(v for b, v in zip(obj.boxes, obj.views) if b.offsets == offsets)
        return view.contiguous()


class PieceLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, filling each of a rank's ``Pieces`` from whatever chunks were saved; objects
    other than tensors are read with ``weights_only`` (nothing executable is loaded)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        """As DCP's, without its pass over the values (which knows only tensors)."""
        self.state_dict = self.original_state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self):
        from torch.distributed.checkpoint.planner import LoadPlan

        items = []
        for name, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata[name]
            if isinstance(obj, Pieces):
                items += create_read_items_for_chunk_list(name, md, obj.chunks())
            else:
                items += _create_read_items(name, md, obj)
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        obj = self.state_dict[read_item.dest_index.fqn]
        if isinstance(obj, Pieces):
            obj = obj.views[read_item.dest_index.index]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            obj = obj.narrow(dim, offset, length)
        return obj

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
