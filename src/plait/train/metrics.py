"""What a run reports: metrics.jsonl, TensorBoard events, a progress bar (rank 0), memory counts.

Memory is accounted by counting tensor bytes (parameters, gradients, optimizer states, saved
activations): on CPU the process RSS hides savings behind the allocator's caches (docs/architecture.md).
On CUDA the allocator's own peak is reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

log = logging.getLogger(__name__)


def tensor_bytes(tensors) -> int:
    """Bytes this rank holds; a DTensor counts its local shard."""
    return sum(t.to_local().nbytes if isinstance(t, DTensor) else t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


class ActivationMeter:
    """Counts the bytes autograd saves for backward (activations), parameters and buffers excluded.

    ``with meter.forward(key):`` around a forward counts what it saves under ``key``;
    ``release(key)`` once its backward is done. ``peak`` is the most held at once, so a pipeline
    schedule with several micro-batches in flight is measured as it runs. Each storage is counted
    once, so a tensor saved by two operations is not counted twice.
    """

    def __init__(self, model: nn.Module):
        self._model = model
        self._param_ptrs = self._params_now()
        self._held = 0  # bytes of every live key
        self._live: dict[object, int] = {}
        self.peak = 0

    @contextlib.contextmanager
    def forward(self, key):
        seen: set[int] = set()
        self._live[key] = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if ptr not in self._param_ptrs and ptr not in seen:
                self._param_ptrs = self._params_now()  # ZeRO-3 gathers parameters into new storage
            if ptr not in self._param_ptrs and ptr not in seen:
                seen.add(ptr)
                self._live[key] += t.untyped_storage().nbytes()
                self._held += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self._held)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def _params_now(self) -> set[int]:
        held = [*self._model.parameters(), *self._model.buffers()]  # model state (rotary tables), not activations
        return {t.untyped_storage().data_ptr() for t in held}

    def release(self, key) -> None:
        self._held -= self._live.pop(key, 0)


def kept_rows(path: Path, start: int) -> list[dict]:
    """The rows of ``path`` up to step ``start``, rewritten in place (all of them dropped when 0)."""
    rows = []
    if start and path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if row.get("step", 0) <= start:
                    rows.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


class MetricsWriter:
    """Rank 0's sink: one JSON object a step in metrics.jsonl, TensorBoard scalars, progress bar."""

    def __init__(self, out: Path, total_steps: int, progress: bool = True, log_every: int = 10, start: int = 0):
        """``start``: the step a resumed run continues from; rows after it (written by the run that
        stopped) are dropped from metrics.jsonl and TensorBoard, so the run keeps one history."""
        self.out, self.total, self.log_every = out, total_steps, log_every
        self.rows: list[dict] = kept_rows(out / "metrics.jsonl", start)
        self._file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole run
        self._tb = self._tensorboard(out, start)
        self._bar = tqdm(total=total_steps, initial=min(start, total_steps), desc="training", unit="step",
                         disable=not progress, mininterval=1.0, dynamic_ncols=True)

    @staticmethod
    def _tensorboard(out: Path, start: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard missing: keep training, say so once
            log.warning("tensorboard is not installed; no tb/ events will be written")
            return None
        return SummaryWriter(str(out / "tb"), purge_step=start + 1)  # a restart's replaced steps go

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])
        if "loss" in row:
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", refresh=False)
            self._bar.update(1)
            if self._bar.disable and (row["step"] % self.log_every == 0 or row["step"] == self.total):
                log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tokens/s", row["step"], self.total,
                         row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"])
        if "val_loss" in row:
            self.say(f"step {row['step']}: validation loss {row['val_loss']:.4f}")

    def say(self, text: str) -> None:
        if self._bar.disable:
            log.info(text)
        else:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb:
            self._tb.close()
