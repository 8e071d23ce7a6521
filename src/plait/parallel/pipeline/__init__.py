"""Pipeline parallel: balanced stages (partition), schedules as data, one runtime, a simulator."""

from __future__ import annotations

import torch
from torch import nn

from ... import comm
from ...config import RunConfig
from ...topology import Groups
from . import schedules
from .partition import stage_blocks
from .runtime import Chunk, PipelineParallel, StepContext

__all__ = ["Chunk", "PipelineParallel", "StepContext", "apply_pipeline", "microbatches"]


def microbatches(cfg: RunConfig) -> int:
    """Micro-batches per step on each dp rank."""
    return cfg.train.global_batch // (cfg.parallel.dp * cfg.train.micro_batch)


def apply_pipeline(model: nn.Module, groups: Groups, cfg: RunConfig) -> PipelineParallel:
    """Keep only this rank's stages of ``model`` (in place) and return their runtime.

    Rank ``pp_rank`` holds stages ``c * pp + pp_rank`` for its ``v`` chunks. Blocks keep their
    global names (``blocks.7...``) in a ModuleDict, so checkpoints and verification line up with
    the unsplit model. A tied embedding (gpt2) becomes two copies, on the first and last stage,
    whose gradients are summed over ``groups.embed`` after each step.
    """
    p, m = cfg.parallel, cfg.model
    pp, v, coord = p.pp, p.virtual_stages, groups.coord
    tokens = cfg.train.micro_batch * m.seq_len * microbatches(cfg)
    blocks = stage_blocks(m, pp * v, tokens, p.stage_layers)
    stages = [c * pp + coord.pp_rank for c in range(v)]
    chunks = [Chunk(s, tuple(str(i) for i in blocks[s]), s == 0, s == pp * v - 1) for s in stages]
    _keep_local(model, chunks)

    def stage_rank(stage: int) -> int:
        return groups.topology.rank_of(stage % pp, coord.dp_rank, coord.tp_rank)

    seq = m.seq_len // p.tp if p.sequence_parallel else m.seq_len
    dtype = next(model.parameters()).dtype
    pipe = PipelineParallel(model, chunks, schedules.get(p.schedule), pp, coord.pp_rank, stage_rank,
                            (cfg.train.micro_batch, seq, m.hidden), dtype)
    pipe.stage_sizes = [len(b) for b in blocks]  # blocks per global stage, for reports
    return pipe


def _keep_local(model: nn.Module, chunks: list[Chunk]) -> None:
    keep = sorted({k for c in chunks for k in c.blocks}, key=int)
    model.blocks = nn.ModuleDict({k: model.blocks[int(k)] for k in keep})
    if not any(c.first for c in chunks):
        model.tok_emb, model.pos_emb = None, None
    if not any(c.last for c in chunks):
        model.norm, model.lm_head = None, None


def tied_weight(model: nn.Module) -> torch.Tensor | None:
    """This rank's copy of a tied embedding (first stage: the embedding, last: the output layer)."""
    if getattr(model, "tok_emb", None) is not None:
        return model.tok_emb.weight
    return model.lm_head.weight if getattr(model, "lm_head", None) is not None else None


def sum_tied_grads(model: nn.Module, group) -> None:
    """Forward: nothing. After backward: all-reduce (sum) the tied embedding's gradient over the
    first and last stage (``group``), so both copies take the same update."""
    w = tied_weight(model)
    if group is not None and w is not None and w.grad is not None:
        comm.all_reduce_(w.grad, group)
