"""``plait bench diloco``: plait's DiLoCo strand beside torchft's ``DiLoCo``, same model, batches and H.

Each local process is one replica (dp rank) of both runs. plait trains with a ``Trainer`` whose
config has ``diloco`` set; torchft trains a second copy of the same model (the same seeded init)
on the same batches with the same inner AdamW, learning-rate schedule and clipping (by the
replica's own global norm), wrapped in ``torchft.local_sgd.DiLoCo`` with the same outer SGD (lr
0.7, Nesterov momentum 0.9 by default) and the same H (``sync_every``). Two pairs of runs:

- plain: one fragment, pseudo-gradients in the parameters' dtype;
- streaming: ``diloco.fragments`` fragments (default 4) and ``diloco.quantize`` (default fp8) on
  plait's side; torchft's ``DiLoCo`` with the same parameters in as many fragments (a module per
  fragment holding exactly the parameters ``fragment_names`` gives plait), ``fragment_sync_delay=1``
  (plait's exchange also overlaps one step) and ``should_quantize=True``.

torchft's set-up: a ``LighthouseServer`` (``min_replicas`` = the replicas) in rank 0, its address
broadcast over plait's default group; in every process a ``TCPStore`` of its own and a ``Manager``
(one replica group of one process, ``min_replica_size`` = the replicas, ``use_async_quorum=False``
as DiLoCo requires, ``init_sync=False`` since the models start equal) over a ``ProcessGroupGloo``.
A fresh lighthouse and fresh managers serve each pair (a manager takes one DiLoCo's state).

The two sides take turns a window of H steps at a time, barrier to barrier (plait then torchft,
then torchft then plait, and so on: neither always goes first), so that drifts in machine load hit
both alike; the first ``ceil(warmup / H)`` windows are not timed. Under streaming, plait's exchange
started after step t is merged after step t+1, so its windows are shifted one step later (none
ends with an exchange in flight; its first timed window starts a step later and its last, which
ends the run with ``flush``, is a step shorter); torchft has nothing in flight at multiples of H.
tokens/s = global batch x sequence length / the median over the timed windows of a window's time
per step: every window is a whole cycle of H steps with its exchanges, and the median, as
``plait bench``'s other races take it, leaves out a window that a hiccup of the machine hit. The
rate over all timed windows together is reported beside it (``*_overall``). Both sides train the
same number of steps.

Plain DiLoCo is the same computation on both sides (the same validation loss to float rounding).
Streaming differs in three ways, so its losses differ: torchft starts fragment f's exchange after
step t - 1 and merges it after step t, t = (f+1)H/F (mod H), plait one step later; with
``fragment_update_alpha=0`` torchft drops what the delayed step learnt on the fragment, plait keeps
it; and torchft's quantized all-reduce needs triton (fp8 e4m3 with row scales on a GPU), without
which ``should_quantize`` sends float32.

Bytes: what rank 0 sent over the whole run by the closed-form ring volumes of ``comm.Tally``:
plait's are the trainer's ``comm_bytes``; torchft's are counted by a ``ProcessGroupGloo`` subclass
whose collectives (all-reduce, all-gather, all-to-all...) add their tensors to a ``Tally`` before
running (torchft's control plane, the lighthouse and manager RPCs, is not counted).

torchft imports only inside functions: it is the ``bench`` extra, never needed by ``plait train``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .config import RunConfig
from .models import num_params
from .models.description import cross_entropy
from .parallel.diloco import OuterSGD, fragment_names
from .seeds import seed_for
from .topology import Topology, build_groups
from .train.data import Sampler, load_corpus, val_batches
from .train.optim import build_optimizer, lr_at, plain_groups, set_lr
from .train.trainer import Trainer, autocast_dtype, fresh_model

BASELINE = "torchft DiLoCo"
# H, and the streaming pair's fragments and wire format (the plain pair: 1 fragment, no quantization)
DEFAULTS = {"diloco.inner_steps": "8", "diloco.fragments": "4", "diloco.quantize": "fp8"}
ITERS = 96  # timed steps per side and pair when --iters is not given (12 windows of H=8)


def torchft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchft")
    except PackageNotFoundError:
        return "unknown"


def quantize_note() -> str:
    """What torchft's ``should_quantize=True`` sends on this machine (its quantized all-reduce
    needs triton; without it ``Manager.allreduce`` falls back to the plain all-reduce)."""
    from torchft import manager

    if not manager.IS_TRITON_AVAILABLE:
        return "none: should_quantize=True needs triton (not importable here), so torchft all-reduces fp32"
    return "fp8 e4m3 with a float32 scale per row (int8 on accelerators without native fp8), via triton"


def check_diloco(cfg: RunConfig) -> None:
    """What the race needs beyond a valid DiLoCo config, as one-line errors: torchft itself, and
    fragments that torchft's streaming schedule accepts with a sync delay of one step."""
    from importlib.util import find_spec

    from .errors import ConfigError

    d = cfg.diloco
    if d is None:
        raise ConfigError("diloco.inner_steps", "", "plait bench diloco needs DiLoCo's H, e.g. diloco.inner_steps=8")
    if d.replicas not in (0, cfg.parallel.dp):
        raise ConfigError("diloco.replicas", d.replicas, "plait bench diloco races one-rank replicas, as torchft's "
                          "DiLoCo here holds them: leave diloco.replicas out")
    if d.fragments > 1 and (d.inner_steps % d.fragments or d.inner_steps // d.fragments < 2):
        raise ConfigError("diloco.fragments", d.fragments, f"torchft's streaming DiLoCo needs fragments to divide "
                          f"inner_steps={d.inner_steps} at least twice over (a sync delay of one step)")
    if find_spec("torchft") is None:  # found, not imported: the workers import it
        raise ConfigError("bench", "diloco", "needs torchft, which is not installed: pip install 'plait[bench]' "
                          "(torchft==0.2.0)")


# --------------------------------------------------------------------------- torchft's side


def _counting_gloo(tally: comm.Tally, timeout: timedelta):
    """torchft's reconfigurable gloo group, adding each collective's closed-form volume to ``tally``."""
    from torchft.process_group import ProcessGroupGloo

    class CountingGloo(ProcessGroupGloo):
        def allreduce(self, tensors, opts):
            for t in tensors:
                tally.all_reduce(t, self.size())
            return super().allreduce(tensors, opts)

        def allreduce_coalesced(self, tensors, opts):
            for t in tensors:
                tally.all_reduce(t, self.size())
            return super().allreduce_coalesced(tensors, opts)

        def allgather(self, output_tensors, input_tensor, opts):
            for t in input_tensor:
                tally.all_gather(t, self.size())
            return super().allgather(output_tensors, input_tensor, opts)

        def allgather_into_tensor_coalesced(self, output_tensors, input_tensors, opts):
            for t in input_tensors:
                tally.all_gather(t, self.size())
            return super().allgather_into_tensor_coalesced(output_tensors, input_tensors, opts)

        def alltoall_base(self, output_buffer, input_buffer, output_split_sizes, input_split_sizes, opts):
            tally.all_to_all(input_buffer, self.size())
            return super().alltoall_base(output_buffer, input_buffer, output_split_sizes, input_split_sizes, opts)

        def send(self, tensors, dst_rank, tag):
            for t in tensors:
                tally.send(t)
            return super().send(tensors, dst_rank, tag)

    return CountingGloo(timeout=timeout)


class _Fragment(nn.Module):
    """Some of a model's parameters (the same Parameter objects) as a module, for torchft's
    ``model_fragments``."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        super().__init__()
        for name, p in named:
            self.register_parameter(name.replace(".", "__"), p)


def torchft_fragments(model: nn.Module, parts: int, tied: tuple = ()) -> list[nn.Module]:
    """The model in ``parts`` modules holding exactly the parameters of plait's fragments
    (``fragment_names``: contiguous groups of about equal bytes in module order); the whole model
    when ``parts`` is 1."""
    if parts == 1:
        return [model]
    index = fragment_names(model, parts, tied)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [_Fragment([(n, p) for n, p in named if index[n] == i]) for i in range(parts)]


class _Lighthouse:
    """torchft's lighthouse in rank 0, its address known to every rank (collective)."""

    def __init__(self, replicas: int):
        from torchft._torchft import LighthouseServer

        self.server = LighthouseServer(bind="[::]:0", min_replicas=replicas) if dist.get_rank() == 0 else None
        box = [self.server.address() if self.server is not None else None]
        dist.broadcast_object_list(box, src=0)
        self.address = box[0]

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class TorchftSide:
    """One replica of torchft's DiLoCo: the model, its inner AdamW, and a Manager of its own."""

    def __init__(self, cfg: RunConfig, corpus, device: torch.device, dp_rank: int, lighthouse: str):
        from torchft.local_sgd import DiLoCo
        from torchft.manager import Manager

        d, t = cfg.diloco, cfg.train
        self.cfg, self.device, self.dp_rank, self.corpus = cfg, device, dp_rank, corpus
        self.model, desc = fresh_model(replace(cfg, diloco=None), device)  # seeded: plait's init
        self.loss_fn = desc.loss or cross_entropy
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(plain_groups(self.params, t.weight_decay), t)
        self.sampler = Sampler(corpus.train, cfg.model.seq_len, t.global_batch, seed_for(t.seed, "data"), dp_rank,
                               cfg.parallel.dp)
        self.amp = autocast_dtype(cfg, device)
        self.tally = comm.Tally()
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        pg = _counting_gloo(self.tally, timedelta(seconds=120))
        self.manager = Manager(pg=pg, load_state_dict=None, state_dict=None, min_replica_size=cfg.parallel.dp,
                               use_async_quorum=False, init_sync=False, replica_id=f"plait_bench_{dp_rank}",
                               store_addr="127.0.0.1", store_port=self.store.port, rank=0, world_size=1,
                               lighthouse_addr=lighthouse, hostname="localhost", timeout=timedelta(seconds=120),
                               quorum_timeout=timedelta(seconds=120), connect_timeout=timedelta(seconds=60))
        self.sync_s = 0.0  # time in the manager's quorum and commit round trips
        self._time(self.manager, "start_quorum")
        self._time(self.manager, "should_commit")
        frags = torchft_fragments(self.model, d.fragments, desc.tied)
        outer = [OuterSGD(f.parameters(), lr=d.outer_lr, momentum=d.outer_momentum, ramp=d.momentum_ramp)
                 for f in frags]
        self.diloco = DiLoCo(self.manager, frags, self.optimizer, outer, sync_every=d.inner_steps,
                             should_quantize=d.quantize != "none", fragment_sync_delay=1 if d.fragments > 1 else 0)
        self.diloco.__enter__()  # the optimizer's step hooks

    def _time(self, obj, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync_s += time.perf_counter() - t0

        setattr(obj, name, timed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()

    def step(self, step: int) -> None:
        """One inner step as plait's trainer takes it; torchft's hooks on the optimizer's step
        sync every H steps (or a fragment every H/F)."""
        t = self.cfg.train
        set_lr(self.optimizer, lr_at(step, t))
        x, y = self.sampler.batch(step)
        mb = t.micro_batch
        micro = [(x[i:i + mb].to(self.device), y[i:i + mb].to(self.device)) for i in range(0, len(x), mb)]
        for xs, ys in micro:
            with self._autocast():
                loss = self.loss_fn(self.model(xs), ys)
            (loss / len(micro)).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss on the windows plait's ``Trainer.evaluate`` uses, shared out over the
        replicas alike (collective over every rank)."""
        t, p = self.cfg.train, self.cfg.parallel
        x, y = val_batches(self.corpus.val, self.cfg.model.seq_len, t.eval_batches * t.global_batch,
                           self.dp_rank, p.dp)
        mb = t.micro_batch
        self.model.eval()
        total = 0.0
        for i in range(0, len(x), mb):
            with self._autocast():
                out = self.model(x[i:i + mb].to(self.device))
                total += float(self.loss_fn(out, y[i:i + mb].to(self.device), "sum"))
        self.model.train()
        return comm.weighted_mean(total, y.numel())

    def close(self) -> None:
        self.diloco.__exit__(None, None, None)
        self.manager.shutdown(wait=False)


# --------------------------------------------------------------------------- the race


def _window(fn, steps: range) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for s in steps:
        fn(s)
    dist.barrier()
    return time.perf_counter() - t0


def median_rate(times: list[float], steps: list[int], tokens_per_step: int) -> float:
    """tokens/s of the median window, by its time per step (windows may differ in steps)."""
    return tokens_per_step / statistics.median(t / n for t, n in zip(times, steps))


def _cuts(total: int, first: int, every: int) -> list[range]:
    """The untimed warm-up [0, first) (perhaps empty), then windows of ``every`` steps up to
    ``total`` (the last may be shorter)."""
    edges = list(range(first, total, every)) + [total]
    return [range(0, first)] + [range(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def race(cfg: RunConfig, corpus, device: torch.device, groups, warm_windows: int, windows: int,
         lighthouse: str) -> dict:
    """One pair of runs (plait's DiLoCo and torchft's, ``cfg.diloco``) taking turns; the figures
    of this rank."""
    d = cfg.diloco
    h = d.inner_steps
    total = (warm_windows + windows) * h
    cfg = replace(cfg, train=replace(cfg.train, steps=total))
    trainer = Trainer(cfg, corpus, device, groups)
    ours_bytes = 0

    def ours_step(s: int) -> None:
        nonlocal ours_bytes
        ours_bytes += trainer.step(s)["comm_bytes"]

    theirs = TorchftSide(cfg, corpus, device, groups.coord.dp_rank, lighthouse)
    shift = 1 if d.fragments > 1 else 0  # plait's exchange is merged a step after it starts
    ours_cuts = _cuts(total, warm_windows * h + shift, h)
    theirs_cuts = _cuts(total, warm_windows * h, h)
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    counts: dict[str, list[int]] = {"ours": [], "torch": []}  # steps in each timed window
    theirs_sync = 0.0
    sides = [("ours", ours_cuts, ours_step), ("torch", theirs_cuts, theirs.step)]
    for i in range(max(len(ours_cuts), len(theirs_cuts))):
        for side, cuts, fn in sides if i % 2 == 0 else sides[::-1]:  # who goes first alternates
            if i >= len(cuts):
                continue
            before = theirs.sync_s
            dt = _window(fn, cuts[i])
            if i > 0:  # the first cut is the warm-up
                times[side].append(dt)
                counts[side].append(len(cuts[i]))
                if side == "torch":
                    theirs_sync += theirs.sync_s - before
    ours_val, theirs_val = trainer.evaluate(), theirs.evaluate()
    tokens = cfg.train.global_batch * cfg.model.seq_len
    out = {
        **{f"{side}_tokens_per_s": median_rate(times[side], counts[side], tokens) for side in times},
        **{f"{side}_tokens_per_s_overall": sum(counts[side]) * tokens / sum(times[side]) for side in times},
        "ours_val_loss": ours_val, "torch_val_loss": theirs_val,
        "ours_bytes": ours_bytes, "torch_bytes": theirs.tally.sent,
        "steps": total, "ours_steps_timed": sum(counts["ours"]), "torch_steps_timed": sum(counts["torch"]),
        "ours_window_s": [round(t, 4) for t in times["ours"]], "torch_window_s": [round(t, 4) for t in times["torch"]],
        "torch_quorum_commit_s": round(theirs_sync, 4), "fragments": d.fragments, "quantize": d.quantize,
        "torch_syncs": theirs.manager.current_step(),
    }
    theirs.close()
    return out


def _no_flight_recorder(record: logging.LogRecord) -> bool:
    """Drop the manager's warning, at every quorum, that NCCL's flight recorder (absent off CUDA)
    cannot be reset."""
    return "flight recorder" not in record.getMessage()


def diloco_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    """Every rank: the plain pair, then the streaming pair; rank 0 returns the result row."""
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's lighthouse and managers log every quorum at info
    for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torchft.manager").addFilter(_no_flight_recorder)
    device = comm.pick_device()
    groups = build_groups(Topology.of(cfg.parallel), device.type)
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    h = cfg.diloco.inner_steps
    warm, windows = math.ceil(warmup / h), max(1, math.ceil(iters / h))
    plain = replace(cfg, diloco=replace(cfg.diloco, fragments=1, quantize="none"))
    runs = {}
    for name, run_cfg in (("plain", plain), ("streaming", cfg)):
        lighthouse = _Lighthouse(cfg.parallel.dp)
        try:
            runs[name] = race(run_cfg, corpus, device, groups, warm, windows, lighthouse.address)
        finally:
            dist.barrier()
            lighthouse.shutdown()
    if dist.get_rank() != 0:
        return None
    return summary(cfg, runs)


def summary(cfg: RunConfig, runs: dict) -> dict:
    plain, stream = runs["plain"], runs["streaming"]
    p = cfg.parallel
    params = num_params(fresh_model(replace(cfg, diloco=None), torch.device("meta"))[0])
    out = {
        "kind": "diloco", "baseline": BASELINE, "torchft_version": torchft_version(),
        "ours_tokens_per_s": round(plain["ours_tokens_per_s"], 1),
        "torch_tokens_per_s": round(plain["torch_tokens_per_s"], 1),
        "ratio": round(plain["ours_tokens_per_s"] / plain["torch_tokens_per_s"], 4),
        "ours_streaming_tokens_per_s": round(stream["ours_tokens_per_s"], 1),
        "torch_streaming_tokens_per_s": round(stream["torch_tokens_per_s"], 1),
        "streaming_ratio": round(stream["ours_tokens_per_s"] / stream["torch_tokens_per_s"], 4),
        "ratio_overall": round(plain["ours_tokens_per_s_overall"] / plain["torch_tokens_per_s_overall"], 4),
        "streaming_ratio_overall": round(stream["ours_tokens_per_s_overall"] / stream["torch_tokens_per_s_overall"],
                                         4),
        "ours_val_loss": round(plain["ours_val_loss"], 4), "torch_val_loss": round(plain["torch_val_loss"], 4),
        "ours_streaming_val_loss": round(stream["ours_val_loss"], 4),
        "torch_streaming_val_loss": round(stream["torch_val_loss"], 4),
        "ours_bytes": plain["ours_bytes"], "torch_bytes": plain["torch_bytes"],
        "ours_streaming_bytes": stream["ours_bytes"], "torch_streaming_bytes": stream["torch_bytes"],
        "H": cfg.diloco.inner_steps, "fragments": cfg.diloco.fragments, "quantize": cfg.diloco.quantize,
        "torch_quantize": quantize_note(), "outer_lr": cfg.diloco.outer_lr,
        "outer_momentum": cfg.diloco.outer_momentum, "steps": plain["steps"],
        "layout": f"dp={p.dp}", "flavour": cfg.model.builder or cfg.model.flavour, "params": params,
        "tokens_per_step": cfg.train.global_batch * cfg.model.seq_len, "interleaved": True,
        "windows_timed": len(plain["torch_window_s"]),
        "runs": runs,
    }
    return out


def format_diloco(r: dict) -> str:
    """The result row as a table."""
    head = (f"DiLoCo, H={r['H']}, {r['layout']}, {r['flavour']} {r['params'] / 1e6:.2f}M params, {r['steps']} steps "
            f"a run, plait and {r['baseline']} {r['torchft_version']} taking turns a window of H steps at a time")
    rows = [("run", "tokens/s", "val loss", "bytes rank 0 sent")]
    for label, key, run in (("plait DiLoCo", "ours", "plain"), ("torchft DiLoCo", "torch", "plain"),
                            (f"plait streaming (F={r['fragments']}, {r['quantize']})", "ours", "streaming"),
                            (f"torchft streaming (F={r['fragments']})", "torch", "streaming")):
        x = r["runs"][run]
        rows.append((label, f"{x[f'{key}_tokens_per_s']:.0f}", f"{x[f'{key}_val_loss']:.4f}",
                     f"{x[f'{key}_bytes'] / 1e6:.2f} MB"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [head] + ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                       enumerate(zip(row, widths))) for row in rows]
    lines.append(f"  ratio plait / torchft (median window): plain {r['ratio']:.3f}, streaming "
                 f"{r['streaming_ratio']:.3f}; over all windows: {r['ratio_overall']:.3f}, "
                 f"{r['streaming_ratio_overall']:.3f}")
    lines.append(f"  torchft's quantized exchange: {r['torch_quantize']}")
    return "\n".join(lines)


__all__ = ["diloco_worker", "format_diloco", "check_diloco", "DEFAULTS", "ITERS", "BASELINE"]
