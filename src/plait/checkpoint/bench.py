"""``plait bench ckpt``: what a save costs the training loop, plait's async save beside DCP's own.

Training runs in windows of ``checkpoint.every`` steps; each mode saves once a window:

- ``none``: no save (the step time to beat);
- ``sync``: plait's synchronous save at the end of the window (the loop waits for it);
- ``async``: plait's asynchronous save (the state copied to the CPU, written by a thread while the
  window's steps run);
- ``torch_async``: ``torch.distributed.checkpoint.async_save`` of the model's and optimizer's
  ``get_state_dict`` (plain data parallel only: PyTorch's state dict knows no ZeRO slices).

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

from .store import Checkpointer


def _window(pm, opt, cfg, sampler, device, start: int, every: int, before=None, after=None) -> float:
    """Time ``every`` training steps (``before`` called first, ``after`` last), barrier to barrier."""
    mb = cfg.train.micro_batch
    dist.barrier()
    t0 = time.perf_counter()
    if before is not None:
        before()
    for i in range(start, start + every):
        x, y = sampler.batch(i)
        micro = [(x[j:j + mb].to(device), y[j:j + mb].to(device)) for j in range(0, len(x), mb)]
        pm.train_step(micro, opt, cfg.train.grad_clip)
    if after is not None:
        after()
    dist.barrier()
    return time.perf_counter() - t0


def _folder() -> Path:
    """A scratch folder that every rank agrees on (rank 0 makes it)."""
    box = [tempfile.mkdtemp(prefix="plait-bench-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def ckpt_worker(cfg, iters: int, warmup: int) -> dict | None:
    from ..bench import _setup
    from ..train.optim import build_optimizer
    from ..train.trainer import build_parallel

    device, groups, sampler = _setup(cfg)
    pm, params = build_parallel(cfg, groups, device)
    opt = build_optimizer(pm.param_groups(cfg.train.weight_decay), cfg.train)
    every = max(1, cfg.checkpoint.every or 4)
    root = _folder()
    plain = Checkpointer(root / "sync", every, 1, async_save=False)
    background = Checkpointer(root / "async", every, 1, async_save=True)
    torch_side = {"pending": None, "group": dist.new_group(backend="gloo")}  # its collectives beside training's
    step = 0
    times: dict[str, list[float]] = {"none": [], "sync": [], "async": [], "torch_async": []}
    save_s: list[float] = []

    def sync_save():
        t = time.perf_counter()
        plain.save(step + every, pm, opt, {})
        save_s.append(time.perf_counter() - t)

    def torch_save():
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if torch_side["pending"] is not None:
            torch_side["pending"].result()
        model_sd, optim_sd = get_state_dict(pm.module, opt)
        writer = dcp.FileSystemWriter(str(root / "torch"), overwrite=True)
        torch_side["pending"] = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                                               process_group=torch_side["group"])

    def async_save():
        t = time.perf_counter()
        background.save(step, pm, opt, {})
        blocked_s.append(time.perf_counter() - t)

    blocked_s: list[float] = []
    modes = {"none": (None, None), "sync": (None, sync_save), "async": (async_save, None)}
    if not cfg.parallel.zero and cfg.parallel.tp == 1 and cfg.parallel.pp == 1:
        modes["torch_async"] = (torch_save, None)
    for _ in range(warmup):
        _window(pm, opt, cfg, sampler, device, step, 1)
        step += 1
    for _ in range(iters):  # the modes take turns, so drifts in machine load hit all alike
        for mode, (before, after) in modes.items():
            times[mode].append(_window(pm, opt, cfg, sampler, device, step, every, before, after))
            step += every
    background.wait()
    if torch_side["pending"] is not None:
        torch_side["pending"].result()
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    shutil.rmtree(root, ignore_errors=True)
    out = _summary(cfg, times, save_s, every, params)
    out["async_blocked_s"] = round(statistics.median(blocked_s), 4)  # the loop waits this long per save
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
