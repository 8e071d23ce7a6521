"""A parameter server: parameters and optimizer states on server ranks; workers push gradients and
pull parameters (Dean et al. 2012; Li et al. 2014).

``ps.servers`` = S server ranks follow the dp x tp x pp workers. Every tensor a worker rank holds
(its tp shard of its pipeline stage's parameters) is a *key*; the keys of all ranks are dealt to
the servers balanced by bytes (largest first, to the server with the fewest bytes). A server holds
its keys' values and their AdamW states, and applies the updates.

What travels over the ps group (point to point, gloo, on CPU tensors):

- after a worker's backward (``after_step``): to every server a header (push, the worker's clock)
  and the flat gradients of that server's keys of the worker's position (pp rank, tp rank);
- back from every server: a header (version, stop, gradient norm, staleness) and the flat values
  of those keys after the update.

Modes (``ps.mode``):

- ``sync``: a server waits for every worker's push, averages each key's gradients over dp (in dp
  order), clips by the global norm (the servers sum their squares over their own group), takes one
  AdamW step and answers everyone: the same update as one process (bulk synchronous).
- ``async``: each push is applied as it arrives (Downpour); a worker clips its own gradient. A
  push carries 1/dp of a global batch and takes 1/dp of the step's learning rate, so that after
  the same samples the parameters have moved as far as under sync.
  A gradient's *staleness* is the updates applied to its keys since the worker pulled them;
  ``staleness_lr`` divides its learning rate by it (Zhang et al. 2016). With ``lookahead`` (the
  default) a server answers a push with the parameters moved on by that push's staleness times
  the last update, ``w + tau (w - w_prev)``: where they will roughly be when the worker's next
  gradient lands, which it then computes there (the look-ahead of DANA, Hakimi et al. 2019, with
  AdamW's last step as the estimate of the next ones). The final answer is the parameters as they are.
- ``ssp`` (Ho et al. 2013): as async, but a worker is answered only while it is at most
  ``staleness`` pushes ahead of the slowest worker, so no applied gradient was computed on
  parameters that miss more than ``staleness`` of any worker's clocks.

Servers block in ``recv`` (in async and ssp, a thread per worker): a waiting server takes no CPU.
Asynchronous runs end after ``train.steps x dp`` pushes per position (the samples of ``steps``
synchronous steps); then every worker pulls the final parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .protocol import DataParallelStrand

log = logging.getLogger(__name__)

PUSH, PULL = 1.0, 2.0  # what a worker's header asks for
LOST_KEY = "plait/lost/{rank}"  # set in the run's TCPStore by the launcher when a worker dies


@dataclass(frozen=True)
class Key:
    """One tensor of one worker position, as the servers know it."""

    position: tuple[int, int]  # (pp rank, tp rank) of the workers that hold it
    name: str
    shape: tuple[int, ...]
    dtype: str
    counts: bool  # in the global gradient norm (a tp-replicated tensor counts on tp rank 0 only)
    decay: bool  # AdamW weight decay (matrices)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * getattr(torch, self.dtype).itemsize


def assign(keys: list[Key], servers: int) -> list[int]:
    """The server of each key: largest first, each to the server holding the fewest bytes so far."""
    load, out = [0] * servers, [0] * len(keys)
    for i in sorted(range(len(keys)), key=lambda i: (-keys[i].nbytes, i)):
        s = min(range(servers), key=lambda s: (load[s], s))
        out[i], load[s] = s, load[s] + keys[i].nbytes
    return out


@dataclass(frozen=True)
class Table:
    """Every key and its server: what every worker and server agrees on at start-up."""

    keys: tuple[Key, ...]
    server_of: tuple[int, ...]
    positions: tuple[tuple[int, int], ...]  # in rank order

    def held(self, position: tuple[int, int], server: int) -> list[Key]:
        return [k for k, s in zip(self.keys, self.server_of) if k.position == position and s == server]


def flat_of(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in tensors])


# --------------------------------------------------------------------------- the workers' strand


class PSWorker(DataParallelStrand):
    """A worker rank's side: local gradients, pushed after each step; parameters pulled back.

    ``counts``: name -> whether the tensor counts in the global norm. Workers hold no optimizer
    (``param_groups`` is empty); in sync mode the servers clip, else each worker clips its own."""

    def __init__(self, module: nn.Module, groups, *, mode: str, counts: dict[str, bool],
                 tally: comm.Tally | None = None):
        self.module, self.groups, self.mode, self.tally = module, groups, mode, tally
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.segments = [(p, p) for _, p in self.named]
        self.lockstep = mode == "sync"
        self.averages_grads = mode == "sync"  # async / ssp: each push is one worker's own gradient
        self.clips_itself = mode == "sync"  # the servers clip the mean gradient
        self.dtype = self.named[0][1].dtype
        c = groups.coord
        self.position = (c.pp_rank, c.tp_rank)
        keys = [Key(self.position, n, tuple(p.shape), str(p.dtype).removeprefix("torch."), counts[n], p.dim() >= 2)
                for n, p in self.named]
        self.table = _agree(keys, groups)
        self.servers = [groups.topology.world + s for s in range(groups.servers)]
        by_name = dict(self.named)
        self._by_server = [[by_name[k.name] for k in self.table.held(self.position, s)]
                           for s in range(groups.servers)]
        self._grads = [self._grad_buffer(ps) for ps in self._by_server]  # each .grad a view into one
        self._pulls = [torch.empty(sum(p.numel() for p in ps), dtype=self.dtype) for ps in self._by_server]
        self.clock = 0  # pushes made
        self.version = 0  # updates of this position's keys applied by server 0 when last pulled
        self.stopped, self.last_norm, self.staleness, self.pulled_bytes = False, 0.0, 0, 0
        self._counted = self._pulled_reported = 0
        if c.dp_rank == 0:
            for s, params in enumerate(self._by_server):  # the initial values
                if params:
                    dist.send(flat_of(params, self.dtype), self.servers[s], group=groups.ps)

    @staticmethod
    def _grad_buffer(params: list[nn.Parameter]) -> torch.Tensor:
        """A zeroed flat buffer that the gradients of ``params`` accumulate into (sent as it is)."""
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype if params else torch.float32,
                           device=params[0].device if params else "cpu")
        for p, view in zip(params, comm.views_of(params, flat)):
            p.grad = view
        return flat

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Nothing: the servers hold the optimizer."""
        return [{"params": [], "weight_decay": weight_decay}]

    def no_sync(self):
        return contextlib.nullcontext()

    def finish(self) -> None:
        """The gradients stay local until ``after_step`` pushes them."""

    def zero_grad(self) -> None:
        for flat in self._grads:
            flat.zero_()

    def after_step(self) -> None:
        """Push this step's gradients to every server, then pull the updated parameters."""
        self.clock += 1
        self._exchange(PUSH, [flat.to("cpu") for flat in self._grads])

    def flush(self) -> None:
        """The end of an asynchronous run: pull the final parameters (every server answers once
        every worker has stopped)."""
        if self.lockstep:
            return
        self._exchange(PULL, [torch.zeros(0, dtype=self.dtype) for _ in self.servers])

    def _exchange(self, kind: float, flats: list[torch.Tensor]) -> None:
        ps, sends = self.groups.ps, []
        for dst, flat in zip(self.servers, flats):
            header = torch.tensor([kind, float(self.clock), 0.0, 0.0], dtype=torch.float64)
            for t in (header, flat) if flat.numel() else (header,):
                sends.append(dist.isend(t, dst, group=ps))
                if self.tally is not None:
                    self.tally.send(t)
        replies = []
        for src, params, values in zip(self.servers, self._by_server, self._pulls):
            header = torch.empty(4, dtype=torch.float64)
            dist.recv(header, src, group=ps)
            if values.numel():
                dist.recv(values, src, group=ps)
            self.pulled_bytes += header.nbytes + values.nbytes
            replies.append(header)
            for p, v in zip(params, comm.views_of(params, values)):
                p.data.copy_(v)
        for w in sends:
            w.wait()
        self.version, stop = int(replies[0][0]), max(float(h[1]) for h in replies)
        self.stopped = stop > 0
        self.last_norm, self.staleness = float(replies[0][2]), int(max(float(h[3]) for h in replies))

    def running(self, step: int, steps: int) -> bool:
        return step < steps if self.lockstep else not self.stopped

    def samples(self, global_batch: int) -> int:
        """Synchronous: the global batch; asynchronous: the pushes of this position that server 0
        applied since the last call, of ``global_batch / dp`` sequences each."""
        if self.lockstep:
            return global_batch
        done, self._counted = self.version - self._counted, self.version
        return done * global_batch // self.groups.topology.dp

    def metrics(self) -> dict:
        pulled, self._pulled_reported = self.pulled_bytes - self._pulled_reported, self.pulled_bytes
        return {"ps_version": self.version, "ps_staleness": self.staleness, "ps_pulled_bytes": pulled}

    def grad_bytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p, _ in self.segments if p.grad is not None)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _ in self.segments)


def _agree(keys: list[Key], groups) -> Table:
    """Every worker's keys gathered over the workers; the table dealt out the same everywhere and
    sent to every server by rank 0."""
    every: list = [None] * groups.topology.world
    dist.all_gather_object(every, keys, group=groups.world)
    firsts, positions = [], []
    for rank_keys in every:
        if rank_keys and rank_keys[0].position not in positions:
            positions.append(rank_keys[0].position)
            firsts.extend(rank_keys)
    table = Table(tuple(firsts), tuple(assign(firsts, groups.servers)), tuple(positions))
    if groups.rank == 0:
        for s in range(groups.servers):
            dist.send_object_list([table], groups.topology.world + s, group=groups.ps)
    return table


# --------------------------------------------------------------------------- the servers


@dataclass
class _Worker:
    """What a server knows of one worker rank."""

    rank: int
    position: tuple[int, int]
    dp_rank: int
    clock: int = 0  # pushes applied or dropped
    pulled_at: int = 0  # the position's version when it last pulled
    min_clock_at_pull: int = 0  # ssp: the slowest worker's clock when it last pulled
    stopped: bool = False
    lost: bool = False  # its process died; the run goes on without it
    started: float = field(default_factory=time.perf_counter)


class ParameterServer:
    """One server rank (see the module docstring): ``run()`` serves until the run ends.

    ``optimizer(param_groups)`` builds the optimizer and ``lr(step)`` gives the learning rate of
    a step: the trainer's (the server knows no training code)."""

    def __init__(self, cfg, groups, *, optimizer: Callable, lr: Callable[[int], float], out: Path | None = None):
        self.cfg, self.groups, self.out, self.lr = cfg, groups, out, lr
        self.index = groups.rank - groups.topology.world
        self.mode, self.dp = cfg.ps.mode, cfg.parallel.dp
        box = [None]
        dist.recv_object_list(box, 0, group=groups.ps)
        self.table: Table = box[0]
        topo = groups.topology
        self.workers = {r: _Worker(r, (topo.coords(r).pp_rank, topo.coords(r).tp_rank), topo.coords(r).dp_rank)
                        for r in range(topo.world)}
        self.keys = {pos: self.table.held(pos, self.index) for pos in self.table.positions}
        self.flats = {pos: self._receive_initial(pos, keys) for pos, keys in self.keys.items()}
        self.values = {pos: _views(self.flats[pos], keys) for pos, keys in self.keys.items()}  # into the flats
        pairs = [(t, t) for ts in self.values.values() for t in ts]
        decay = {id(t): k.decay for pos, keys in self.keys.items() for k, t in zip(keys, self.values[pos])}
        self.optimizer = optimizer(
            [{"params": [t for t, _ in pairs if decay[id(t)]], "weight_decay": cfg.train.weight_decay},
             {"params": [t for t, _ in pairs if not decay[id(t)]], "weight_decay": 0.0}])
        self.version = Counter()  # position -> updates applied to its keys
        self.last_update: dict = {}  # position -> flat change of the last update (look-ahead)
        self.log: list[dict] = []  # one entry per applied gradient (async, ssp)
        self.bytes_in = self.bytes_out = 0

    def _receive_initial(self, position, keys: list[Key]) -> torch.Tensor:
        """The position's keys, one flat buffer, from its dp rank 0 worker."""
        src = self.groups.topology.rank_of(position[0], 0, position[1])
        flat = torch.empty(sum(k.numel for k in keys), dtype=_dtype(keys))
        if flat.numel():
            dist.recv(flat, src, group=self.groups.ps)
        return flat

    def run(self) -> None:
        if self.mode == "sync":
            for step in range(self.cfg.train.steps):
                self._sync_step(step)
        else:
            self._serve_async()
        self._report()

    # ---------------------------------------------------------------- sync

    def _sync_step(self, step: int) -> None:
        """Every worker's push (in rank order), the mean over dp, the global norm, one update, the
        answers."""
        sums: dict = {}
        for w in self.workers.values():
            header, flat = self._recv_push(w.rank, w.position)
            sums[w.position] = flat if w.position not in sums else sums[w.position] + flat
        for pos, flat in sums.items():
            self._set_grads(pos, flat / self.dp)
        norm = self._global_norm()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._all(), self.cfg.train.grad_clip, norm)
        self._update(step)
        for w in self.workers.values():
            self.version[w.position] = step + 1
            self._answer(w, stop=False, norm=float(norm), staleness=0)

    def _global_norm(self) -> torch.Tensor:
        """sqrt of the squares of every counted key's gradient, summed over the servers."""
        counted = [t.grad for pos, keys in self.keys.items() for k, t in zip(keys, self.values[pos]) if k.counts]
        sq = torch.nn.utils.get_total_norm(counted).double().square() if counted else \
            torch.zeros((), dtype=torch.float64)
        if self.groups.servers > 1:
            dist.all_reduce(sq, group=self.groups.server_group)
        return sq.sqrt()

    # ---------------------------------------------------------------- async and ssp

    def _serve_async(self) -> None:
        """Apply each push as it comes; answer a worker at once (async) or once it is within
        ``staleness`` clocks of the slowest (ssp); end when every worker has pulled at the end or
        was lost. A thread per worker receives its messages (blocked in ``recv``: a dead worker
        breaks only its own); this one waits on their queue, and once a second looks for workers
        the launcher reported lost."""
        held: list[tuple[_Worker, dict]] = []  # ssp: answers waiting for the slowest
        limit = self.cfg.train.steps * self.dp
        inbox: queue.Queue = queue.Queue()
        for w in self.workers.values():
            threading.Thread(target=self._receive, args=(w, inbox), daemon=True, name=f"plait-ps-recv{w.rank}").start()
        looked = time.monotonic()
        while not all(w.stopped or w.lost for w in self.workers.values()):
            try:
                src, header, flat = inbox.get(timeout=1.0)
            except queue.Empty:
                src = None
            if time.monotonic() - looked >= 1.0:
                looked = time.monotonic()
                if self._find_lost():
                    held = self._release(held)
            if src is None:
                continue
            w = self.workers[src]
            if header[0] == PULL:
                w.stopped = True
                continue
            w.clock += 1
            tau = self._apply(w, flat) if self.version[w.position] < limit else 0  # beyond the samples: dropped
            answer = {"stop": self.version[w.position] >= limit, "staleness": tau}
            held.append((w, answer))
            held = self._release(held)
        for w in self.workers.values():  # the final pull: the parameters after every update
            if not w.lost:
                self._answer(w, stop=True, norm=0.0, staleness=0)

    def _receive(self, w: _Worker, inbox: queue.Queue) -> None:
        """A receiving thread: worker ``w``'s messages, up to its final pull. A message cut off by
        the worker's death ends it (the launcher reports the death)."""
        while True:
            header = torch.empty(4, dtype=torch.float64)
            try:
                dist.recv(header, w.rank, group=self.groups.ps)
                flat = self._recv_push(w.rank, w.position, header)[1] if header[0] == PUSH else None
            except RuntimeError as e:
                log.warning("server %d: worker %d's message was cut off (%s)", self.index, w.dp_rank,
                            str(e).split(". ")[0])
                return
            inbox.put((w.rank, header, flat))
            if header[0] == PULL:
                return

    def _find_lost(self) -> bool:
        """Mark the workers the launcher reported dead; True if there is a new one."""
        store, found = dist.distributed_c10d._get_default_store(), False
        while isinstance(store, dist.PrefixStore):  # the launcher writes to the store itself
            store = store.underlying_store
        for w in self.workers.values():
            if not (w.lost or w.stopped) and store.check([LOST_KEY.format(rank=w.rank)]):
                w.lost = found = True
                log.warning("server %d: worker %d (rank %d) was lost after %d pushes; the %d updates applied so far "
                            "stay, and the others go on", self.index, w.dp_rank, w.rank, w.clock,
                            sum(self.version.values()))
        return found

    def _apply(self, w: _Worker, flat: torch.Tensor) -> int:
        """One AdamW step on ``w``'s gradient; returns its staleness (updates since it pulled)."""
        tau = self.version[w.position] - w.pulled_at
        self._set_grads(w.position, flat)
        lr_step = self.version[w.position] // self.dp  # the schedule advances a step per dp pushes
        scale = (1.0 / max(1, tau) if self.cfg.ps.staleness_lr else 1.0) / self.dp  # a push: 1/dp of a batch
        values, last = self.flats[w.position], None
        if self.cfg.ps.lookahead:  # the values before the update, then the change it made: one buffer
            last = self.last_update.get(w.position)
            if last is None:
                last = self.last_update[w.position] = torch.empty_like(values)
            last.copy_(values)
        self._update(lr_step, scale)
        if last is not None:
            torch.sub(values, last, out=last)
        self.version[w.position] += 1
        self.log.append({"worker": w.dp_rank, "rank": w.rank, "clock": w.clock, "version": self.version[w.position],
                         "staleness": tau, "min_clock_at_pull": w.min_clock_at_pull})
        return tau

    def _release(self, held: list) -> list:
        """Answer the held workers that may go on; keep the others (ssp)."""
        bound = self.cfg.ps.staleness if self.mode == "ssp" else None
        waiting = []
        for w, answer in held:
            slowest = min((v.clock for v in self.workers.values() if not (v.stopped or v.lost)), default=w.clock)
            if answer["stop"] or bound is None or w.clock - slowest <= bound:
                w.min_clock_at_pull = slowest
                self._answer(w, stop=answer["stop"], norm=0.0, staleness=answer["staleness"])
            else:
                waiting.append((w, answer))
        return waiting

    # ---------------------------------------------------------------- pieces

    def _recv_push(self, src: int, position, header: torch.Tensor | None = None) -> tuple:
        if header is None:
            header = torch.empty(4, dtype=torch.float64)
            dist.recv(header, src, group=self.groups.ps)
        keys = self.keys[position]
        flat = torch.empty(sum(k.numel for k in keys), dtype=_dtype(keys))
        if flat.numel():
            dist.recv(flat, src, group=self.groups.ps)
        self.bytes_in += header.nbytes + flat.nbytes
        return header, flat

    def _set_grads(self, position, flat: torch.Tensor) -> None:
        """Each key's gradient a view into ``flat`` (a buffer of its own)."""
        for t, g in zip(self.values[position], _views(flat, self.keys[position])):
            t.grad = g

    def _update(self, step: int, scale: float = 1.0) -> None:
        """One AdamW step over the keys that have a gradient (the others' are None: every update
        ends by dropping them), at the learning rate of ``step`` times ``scale``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step) * scale
        self.optimizer.step()
        for t in self._all():
            t.grad = None

    def _all(self) -> list[torch.Tensor]:
        return [t for ts in self.values.values() for t in ts]

    def _answer(self, w: _Worker, *, stop: bool, norm: float, staleness: int) -> None:
        """The header and the position's values; with look-ahead (not at the end), moved on by
        ``staleness`` times the last update."""
        header = torch.tensor([float(self.version[w.position]), float(stop), norm, float(staleness)],
                              dtype=torch.float64)
        values = self.flats[w.position]
        ahead = self.last_update.get(w.position) if staleness and not stop else None
        if ahead is not None:
            values = torch.add(values, ahead, alpha=staleness)
        try:
            dist.send(header, w.rank, group=self.groups.ps)
            if values.numel():
                dist.send(values, w.rank, group=self.groups.ps)
        except RuntimeError as e:
            if self.mode == "sync":  # every worker takes part in every step: the run cannot go on
                raise
            w.lost = True
            log.warning("server %d: worker %d (rank %d) is gone (%s); the others go on", self.index, w.dp_rank,
                        w.rank, str(e).split(". ")[0])
            return
        self.bytes_out += header.nbytes + values.nbytes
        w.pulled_at = self.version[w.position]

    def _report(self) -> None:
        """Per-worker samples/s, the staleness histogram and the bytes this server moved: logged,
        and written by server 0 to ``ps.json`` in the run folder."""
        elapsed = {w.dp_rank: w.clock / max(time.perf_counter() - w.started, 1e-9)
                   for w in self.workers.values() if w.position == self.table.positions[0]}
        share = self.cfg.train.global_batch // self.dp
        stats = {"server": self.index, "mode": self.mode, "bytes_received": self.bytes_in,
                 "bytes_sent": self.bytes_out, "updates": {f"pp{p[0]}.tp{p[1]}": v for p, v in self.version.items()},
                 "samples_per_s": {str(w): c * share for w, c in sorted(elapsed.items())},
                 "staleness": {str(k): v for k, v in sorted(Counter(e["staleness"] for e in self.log).items())},
                 "log": self.log}
        log.info("server %d: %s updates; received %.2f MB, sent %.2f MB%s", self.index,
                 sum(self.version.values()), self.bytes_in / 1e6, self.bytes_out / 1e6,
                 f"; staleness {stats['staleness']}" if self.log else "")
        if self.out is not None:
            (self.out / f"ps_server{self.index}.json").write_text(json.dumps(stats, indent=1))


def _views(flat: torch.Tensor, keys: list[Key]) -> list[torch.Tensor]:
    return [v.view(k.shape) for k, v in zip(keys, flat.split([k.numel for k in keys]))]


def _dtype(keys: list[Key]) -> torch.dtype:
    return getattr(torch, keys[0].dtype) if keys else torch.float32
