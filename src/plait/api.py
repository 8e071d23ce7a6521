"""What a training loop of one's own needs: ``parallelize`` a described model, ``launch`` processes.

A script runs the same function on every process, either started by ``plait.launch(fn, nproc)``
(local processes, forked, with torchrun's environment) or by ``torchrun`` itself::

    def main():
        model, description = build_my_model()          # an nn.Module and its ModelDescription
        pm = plait.parallelize(model.to(plait.device()), description, plait.ParallelConfig(tp=2))
        optimizer = torch.optim.AdamW(pm.param_groups(0.1), lr=1e-3)
        for step in range(steps):
            micro = my_batches(step, pm.dp_rank, pm.dp)  # [(inputs, targets)], this dp rank's share
            loss, grad_norm = pm.train_step(micro, optimizer, max_norm=1.0)

    if __name__ == "__main__":
        plait.launch(main, nproc=2)

docs/own-model.md walks through it with examples/own_model.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .config import ParallelConfig, resolve_layout
from .errors import PlaitError
from .launch import local_slots, run_in_process, run_local, threads_per_process, under_torchrun
from .models.description import ModelDescription
from .parallel.hybrid import ParallelModel
from .parallel.hybrid import parallelize as _parallelize
from .topology import Topology, build_groups


def device() -> torch.device:
    """This process's device: its GPU (by LOCAL_RANK) where there is one, else the CPU."""
    return comm.pick_device()


def parallelize(model: nn.Module, description: ModelDescription, parallel: ParallelConfig | None = None, *,
                seed: int = 0, tokens_per_step: int | None = None, sample=None,
                recompute: str = "none") -> ParallelModel:
    """Split ``model`` (the same on every process, already on its device) over the processes of
    this run as ``parallel`` says (default: data parallel over all of them; ``dp=0``: the
    processes left after tp and pp). Collective: every process calls it.

    ``seed`` seeds tensor parallel's per-rank dropout stream; ``tokens_per_step`` (tokens each dp
    rank trains on per step) balances pipeline stages by cost, else blocks are split evenly;
    ``sample`` (one micro-batch's inputs) checks the description by running its pieces once;
    ``recompute`` (none, selective, full) trades compute for activation memory in backward.
    With dropout, seed the default stream per rank after this call (it must differ over dp and
    pp): ``torch.manual_seed(plait.seed_for(seed, "dropout", dp_rank=pm.dp_rank, pp_rank=pm.coord.pp_rank))``."""
    if not dist.is_initialized():
        raise PlaitError("plait.parallelize: no process group; start the script's function with "
                         "plait.launch(fn, nproc) or under torchrun")
    layout = resolve_layout(parallel or ParallelConfig(), dist.get_world_size())
    groups = build_groups(Topology.of(layout), next(model.parameters()).device.type)
    return _parallelize(model, description, groups, layout, seed=seed, tokens_per_step=tokens_per_step,
                        sample=sample, recompute=recompute)


def launch(fn: Callable, nproc: int | None = None, *args):
    """Run ``fn(*args)`` on every process of a run and return rank 0's result.

    Under torchrun, in this process (torchrun started the others). Otherwise on ``nproc`` local
    processes (default: one per GPU, else one per CPU core), each with its share of the cores; if
    one fails, all are stopped and the error is raised here."""
    if under_torchrun():
        return run_in_process(fn, args)
    nproc = nproc or local_slots()
    return run_local(fn, nproc, args, threads=threads_per_process(nproc))[0]


__all__ = ["ParallelConfig", "ParallelModel", "device", "launch", "parallelize"]
