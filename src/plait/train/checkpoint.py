"""Checkpoints through torch.distributed.checkpoint (DCP): every rank writes its part.

A checkpoint is a folder ``checkpoints/step_NNNNNN`` holding the model and optimizer state under
their fully qualified names, plus the step, so that later layouts can load it (DCP reshards).
Tensor-parallel shards are saved as DTensor views (``Shard(dim)`` over the tp mesh), so the files
hold each whole tensor once, not tp different tensors under one name.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every ``every`` steps (and at the end), keeps the newest ``keep``."""

    def __init__(self, root: Path | None, every: int, keep: int, async_save: bool = False):
        self.root, self.every, self.keep, self.async_save = root, every, keep, async_save
        self._pending = None

    def due(self, step: int, last: int) -> bool:
        return self.root is not None and (step == last or (self.every > 0 and step % self.every == 0))

    def save(self, step: int, model, optimizer, extra: dict, shards: tuple | None = None) -> Path:
        """Collective over the default group: every rank must call it at the same step.

        ``shards``: ``(tp_mesh, {name: (dim, size)})`` for tensor-parallel parameters.
        """
        self.wait()
        if optimizer is None:
            model_sd, optim_sd = get_model_state_dict(model), {"state": {}}
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
        if shards is not None:
            model_sd, optim_sd = _as_dtensors(model_sd, optim_sd, *shards)
        state = {"model": model_sd, "optim": optim_sd, "extra": {"step": step, **extra}}
        path = self.root / f"step_{step:06d}"
        if self.async_save:
            self._pending = dcp.async_save(state, checkpoint_id=str(path))
        else:
            dcp.save(state, checkpoint_id=str(path))
        self._prune()
        return path

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _prune(self) -> None:
        if dist.get_rank() != 0:
            return
        saved = sorted(self.root.glob("step_*"))
        for old in saved[: max(0, len(saved) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def _as_dtensors(model_sd: dict, optim_sd: dict, mesh, sharded: dict) -> tuple[dict, dict]:
    """Wrap local shards (and their Adam moments) as DTensor views; no data is copied."""
    from torch.distributed.tensor import DTensor, Shard

    def view(name: str, t):
        if name not in sharded or not hasattr(t, "dim") or t.dim() == 0:
            return t
        return DTensor.from_local(t, mesh, [Shard(sharded[name][0])], run_check=False)

    model_sd = {k: view(k, v) for k, v in model_sd.items()}
    state = {k: {n: view(k, t) for n, t in s.items()} for k, s in optim_sd["state"].items()}
    return model_sd, {**optim_sd, "state": state}
