"""Checkpoints that load at any layout: pieces named by the unsplit model (``pieces.py``), written
through torch.distributed.checkpoint (``state.py``), committed and checked (``store.py``), and
exported for one process (``export.py``). docs/checkpoints.md tells what a checkpoint holds."""

from .store import Checkpointer, newest_good, problem, resolve, restore

__all__ = ["Checkpointer", "newest_good", "problem", "resolve", "restore"]
