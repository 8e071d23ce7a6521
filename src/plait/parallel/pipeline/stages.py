"""Split a described model into pipeline stages and give this rank its runtime.

Rank ``pp_rank`` holds stages ``c * pp + pp_rank`` for its ``v`` chunks (Narayanan et al. 2021's
interleaved assignment; the plain one when v = 1). The blocks are split into contiguous runs that
even out an estimated cost per stage (``partition.py``), the input stage joins the first stage and
the output stage the last. Blocks keep their global names (``blocks.7...``) in a ModuleDict, so
checkpoints and verification line up with the unsplit model.

A tied parameter (an input embedding shared with the output layer) becomes two copies, on the
first and the last stage; after each backward their gradients are summed over the group of those
two stages (``groups.embed``, ``ParallelModel.finish_grads``), so both take the same update.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import comm, schedules
from ...errors import ConfigError
from ...models.description import ModelDescription, get_parameter, parameter_costs, set_module
from .partition import balanced_split, blocks_of_stages
from .runtime import Chunk, PipelineParallel

__all__ = ["apply_pipeline", "tied_copy"]


def apply_pipeline(model: nn.Module, desc: ModelDescription, group, *, schedule: str, virtual_stages: int = 1,
                   stage_layers: tuple[int, ...] = (), tokens_per_step: int | None = None,
                   seq_shards: int = 1, tally: comm.Tally | None = None) -> PipelineParallel:
    """Keep only this rank's stages of ``model`` (in place) and return their runtime.

    ``group``: the pp group (this rank's pipeline); ``tokens_per_step``: tokens each dp rank
    trains on in a step, to weigh compute against optimizer work when balancing (None: an even
    split of the blocks); ``seq_shards``: the sequence-parallel split of what travels between
    stages (tp, or 1); ``tally``: counts the bytes sent to other stages."""
    pp, v = comm.group_size(group), virtual_stages
    n = len(desc.block_list(model))
    stages = pp * v
    if n < stages:
        raise ConfigError("parallel.pp", pp, f"pp x virtual_stages = {stages} stages need at least {stages} "
                          f"blocks; the model has {n}")
    if stage_layers and (len(stage_layers) != stages or sum(stage_layers) != n or min(stage_layers) < 1):
        raise ConfigError("parallel.stage_layers", ",".join(map(str, stage_layers)),
                          f"give {stages} positive block counts summing to the model's {n} blocks")
    counts = list(stage_layers) or balanced_split(n, stages, _costs(desc, model, tokens_per_step))
    blocks = blocks_of_stages(counts)
    rank = torch.distributed.get_rank(group)
    chunks = [Chunk(s, tuple(str(i) for i in blocks[s]), s == 0, s == stages - 1) for s in range(rank, stages, pp)]
    _keep_local(model, desc, chunks)
    return PipelineParallel(model, desc, chunks, schedules.get(schedule), group, seq_shards=seq_shards,
                            stage_sizes=tuple(counts), tally=tally)


def _costs(desc: ModelDescription, model: nn.Module, tokens: int | None) -> tuple[float, float, float]:
    if tokens is None:
        return 0.0, 1.0, 0.0
    return desc.costs(tokens) if desc.costs is not None else parameter_costs(desc, model, tokens)


def _keep_local(model: nn.Module, desc: ModelDescription, chunks: list[Chunk]) -> None:
    """Drop what lives on other ranks: blocks, and the input / output stage's modules."""
    everything = desc.block_list(model)
    keep = sorted({k for c in chunks for k in c.blocks}, key=int)
    setattr(model, desc.blocks, nn.ModuleDict({k: everything[int(k)] for k in keep}))
    for holds, names in ((any(c.first for c in chunks), desc.input_modules),
                         (any(c.last for c in chunks), desc.output_modules)):
        for name in names if not holds else ():
            set_module(model, name, None)


def tied_copy(desc: ModelDescription, model: nn.Module) -> torch.Tensor | None:
    """This rank's copy of the tied parameter (first stage: the input stage's, last: the output
    stage's), or None. Its gradient is summed over the first and last stage (``groups.embed``)
    after backward, by ``ParallelModel.finish_grads``."""
    for out_name, in_name in desc.tied:
        for name in (in_name, out_name):
            p = get_parameter(model, name)
            if p is not None:
                return p
    return None
