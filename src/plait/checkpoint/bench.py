"""``plait bench ckpt``: what a save costs the training loop, plait's async save beside DCP's own.

Training runs in windows of ``checkpoint.every`` steps; each mode saves once a window:

- ``none``: no save (the step time to beat);
- ``sync``: plait's synchronous save at the end of the window (the loop waits for it);
- ``async``: plait's asynchronous save at the window's start (the state copied to the CPU, written by
  a thread while the window's steps run; the window ends when the save is committed);
- ``torch_async``: ``torch.distributed.checkpoint.async_save`` of the model's and optimizer's
  ``get_state_dict`` at the window's start, waited for at its end (plain data parallel only:
  PyTorch's state dict knows no ZeRO slices).

The added time of a mode is its median window time over ``none``'s, minus one.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..topology import side_group
from .store import Checkpointer


def _window(pm, opt, cfg, sampler, device, start: int, every: int, before=None, after=None) -> float:
    """Time ``every`` training steps (``before`` called first, ``after`` last), barrier to barrier."""
    mb = cfg.train.micro_batch
    dist.barrier()
    t0 = time.perf_counter()
    if before is not None:
        before(start)
    for i in range(start, start + every):
        x, y = sampler.batch(i)
        micro = [(x[j:j + mb].to(device), y[j:j + mb].to(device)) for j in range(0, len(x), mb)]
        pm.train_step(micro, opt, cfg.train.grad_clip)
    if after is not None:
        after(start + every)
    dist.barrier()
    return time.perf_counter() - t0


def _folder() -> Path:
    """A scratch folder that every rank agrees on (rank 0 makes it)."""
    box = [tempfile.mkdtemp(prefix="plait-bench-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


class _Savers:
    """The three ways of saving that take turns with windows without saves. A window's time includes
    waiting for its own save to finish (``drain``), so no write spills into another mode's window."""

    def __init__(self, pm, opt, root: Path, every: int):
        self.pm, self.opt, self.every = pm, opt, every
        self.plain = Checkpointer(root / "sync", every, 1, async_save=False)
        self.background = Checkpointer(root / "async", every, 1, async_save=True)
        self.torch_group, self.torch_root, self.pending = side_group(), root / "torch", None
        self.sync_s: list[float] = []
        self.blocked_s: list[float] = []

    def sync(self, step: int) -> None:
        t = time.perf_counter()
        self.plain.save(step, self.pm, self.opt, {})
        self.sync_s.append(time.perf_counter() - t)

    def start_async(self, step: int) -> None:
        t = time.perf_counter()
        self.background.save(step, self.pm, self.opt, {})
        self.blocked_s.append(time.perf_counter() - t)

    def start_torch(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.pm.module, self.opt)
        writer = dcp.FileSystemWriter(str(self.torch_root), overwrite=True)
        self.pending = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                                      process_group=self.torch_group)

    def drain(self, step: int = 0) -> None:
        """Wait for the async saves in flight (``step``: unused, as the other hooks take it)."""
        self.background.wait()
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def modes(self, cfg) -> dict:
        """mode -> (called before the window's steps, after them), each given the step."""
        out = {"none": (None, None), "sync": (None, self.sync), "async": (self.start_async, self.drain)}
        if not cfg.parallel.zero and cfg.parallel.tp == 1 and cfg.parallel.pp == 1:
            out["torch_async"] = (self.start_torch, self.drain)  # torch's state dict knows no ZeRO slices
        return out


def ckpt_worker(cfg, iters: int, warmup: int) -> dict | None:
    from ..bench import _setup
    from ..train.optim import build_optimizer
    from ..train.trainer import build_parallel

    device, groups, sampler = _setup(cfg)
    pm, params = build_parallel(cfg, groups, device)
    opt = build_optimizer(pm.param_groups(cfg.train.weight_decay), cfg.train)
    every, root = max(1, cfg.checkpoint.every or 8), _folder()
    savers = _Savers(pm, opt, root, every)
    modes = savers.modes(cfg)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for step in range(warmup):
        _window(pm, opt, cfg, sampler, device, step, 1)
    step = warmup
    for _ in range(iters):  # the modes take turns, so drifts in machine load hit all alike
        for mode, (before, after) in modes.items():
            times[mode].append(_window(pm, opt, cfg, sampler, device, step, every, before, after))
            step += every
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    shutil.rmtree(root, ignore_errors=True)
    out = _summary(cfg, times, savers.sync_s, every, params)
    out["async_blocked_s"] = round(statistics.median(savers.blocked_s), 4)  # the loop waits this long per save
    return out


def _summary(cfg, times: dict, save_s: list[float], every: int, params: int) -> dict:
    base = statistics.median(times["none"])
    p = cfg.parallel
    out = {"kind": "ckpt", "layout": f"dp={p.dp},tp={p.tp},pp={p.pp},zero={p.zero}", "params": params,
           "every": every, "windows": len(times["none"]), "step_s": round(base / every, 4),
           "sync_save_s": round(statistics.median(save_s), 4)}
    for mode, ts in times.items():
        if ts:
            out[f"{mode}_window_s"] = round(statistics.median(ts), 4)
            if mode != "none":
                out[f"{mode}_added"] = round(statistics.median(ts) / base - 1, 4)
    return out


def format_ckpt(r: dict) -> str:
    lines = [f"{r['layout']}, {r['params'] / 1e6:.1f}M parameters: a step {r['step_s']:.3f} s, a synchronous save "
             f"{r['sync_save_s']:.3f} s; one save every {r['every']} steps (median of {r['windows']} windows)"]
    for mode, label in (("sync", "plait sync save"), ("async", "plait async save"),
                        ("torch_async", "torch dcp.async_save")):
        if f"{mode}_added" in r:
            lines.append(f"  {label:<22} adds {100 * r[f'{mode}_added']:6.1f}% to the time of the steps")
    return "\n".join(lines)


__all__ = ["ckpt_worker", "format_ckpt"]
