"""DiLoCo and streaming DiLoCo: replicas that train alone for H steps, then average where they went.

Each dp rank is a replica (Douillard et al. 2023). With tensor or pipeline parallel inside a
replica, this strand works on the rank's own shard, and its dp group joins the ranks that hold the
same shard in every replica. With ``diloco.replicas`` below dp, a replica is several dp ranks
holding ZeRO over them (``Groups.shard``: the inner strand's traffic every step), and the
exchange below runs over ``Groups.replica`` (the ranks with the same slice in every replica) on
this rank's slices.

- forward and backward: nothing travels over dp. Gradients stay local; each replica clips by its
  own norm and takes its own AdamW step (the inner optimizer).
- every ``inner_steps`` = H steps: the pseudo-gradient ``outer - local`` (where the replica's H
  steps took it) is averaged over dp in one exchange and applied to the outer parameters by SGD
  with Nesterov momentum (``outer_lr`` 0.7, ``outer_momentum`` 0.9); every replica then starts
  again from the outer parameters. ``outer_lr = 1`` with no momentum is local SGD (averaging).
  ``momentum_ramp = "nesterov"`` (the default) raises the momentum along Nesterov's sequence
  (t-1)/(t+2) over the first syncs, up to ``outer_momentum``: a run from scratch makes its largest
  moves in the first syncs, and a full momentum would go on repeating them for tens of syncs
  (:class:`OuterSGD`). ``"none"`` holds it constant, as the paper (from a trained model) does.
- streaming (Douillard et al. 2025, ``fragments`` = F): the parameters are cut into F fragments of
  about equal bytes, in module order. Fragment f syncs after the steps t with
  t = (f+1)H/F (mod H), so the syncs are staggered and each step sends at most one fragment. Its
  exchange is started after step t and merged after step t+1, overlapping that step's compute;
  the progress that step made on the fragment is kept: ``local = outer + (local - local at start)``.
- ``quantize`` (bf16, fp8): the pseudo-gradients travel in that format and are summed in float32.
  The exchange is an all-to-all of the quantized 1/n chunks (each rank sums one chunk), then an
  all-gather of the summed chunks, quantized again. fp8 (e4m3) carries one float32 scale per
  chunk sent (its largest magnitude maps to 448). Without quantization it is one all-reduce in the
  parameters' dtype.

Bytes sent per sync, per rank, for N elements of b bytes over n replicas: 2(n-1)/n N b, the same
for both forms (``comm.Tally``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .protocol import DataParallelStrand

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()  # each byte's value


class OuterSGD(torch.optim.SGD):
    """The outer optimizer: SGD with Nesterov momentum, one ``step`` per sync.

    With ``ramp = "nesterov"`` the momentum of the t-th sync (from 1) is
    ``min(momentum, (t-1)/(t+2))``: 0, 0.25, 0.4, 0.5, ... reaching 0.9 at the 28th sync. The first
    sync is a plain step of ``lr`` and the momentum buffer starts at the second. ``ramp = "none"``
    (or ``momentum = 0``) is ``torch.optim.SGD`` as constructed (``defaults["momentum"]`` keeps
    that value). The count restarts with the buffer (``restart``)."""

    def __init__(self, params, *, lr: float, momentum: float, ramp: str = "nesterov"):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.ramp, self.syncs = ramp, 0

    def momentum_at(self, sync: int) -> float:
        """The momentum of the ``sync``-th step (from 1)."""
        cap = self.defaults["momentum"]
        if self.ramp == "none" or not cap:
            return cap
        return min(cap, (sync - 1) / (sync + 2))

    @torch.no_grad()
    def step(self, closure=None):
        self.syncs += 1
        for group in self.param_groups:
            group["momentum"] = self.momentum_at(self.syncs)
        return super().step(closure)

    def restart(self) -> None:
        """Forget the momentum (a resumed run): the ramp starts again."""
        self.state.clear()
        self.syncs = 0


def fragment_names(model: nn.Module, parts: int, tied: tuple = ()) -> dict[str, int]:
    """Name -> fragment of every trained parameter of the whole (unsplit) model: ``split_by_bytes``
    over them in module order, and a tied pair's output name with its input's. Computed before
    tensor and pipeline parallel split the model, so that every layout syncs the same fragments."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = {id(p): i for i, ps in enumerate(split_by_bytes([p for _, p in named], parts)) for p in ps}
    out = {n: index[id(p)] for n, p in named}
    out.update({o: out[i] for o, i in tied if i in out})
    return out


def split_by_bytes(params: list[nn.Parameter], parts: int) -> list[list[nn.Parameter]]:
    """``params`` in order, cut into ``parts`` contiguous groups of about equal bytes (a group may be
    empty when there are fewer parameters than parts)."""
    sizes = [p.numel() * p.element_size() for p in params]
    total, out, acc = sum(sizes), [[] for _ in range(parts)], 0
    for p, size in zip(params, sizes):
        mid = acc + size / 2  # a parameter goes to the part that holds its middle byte
        out[min(int(mid * parts / max(total, 1)), parts - 1)].append(p)
        acc += size
    return out


class Exchange:
    """The mean over ``group`` of a flat tensor, sent in ``quantize`` format and summed in float32
    (or in its own dtype when not quantized). ``start`` returns a handle; ``result`` waits for it.
    ``start`` takes the tensor over (the caller's fresh pseudo-gradient): unquantized, it is reduced
    in place."""

    def __init__(self, group, quantize: str, tally: comm.Tally | None):
        self.group, self.quantize, self.tally = group, quantize, tally
        self.scaled = quantize == "fp8"  # fp8 sends a scale with each chunk
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def start(self, flat: torch.Tensor):
        if self.n == 1:
            return flat, None
        if self.quantize == "none":
            return flat, comm.all_reduce_(flat, self.group, async_op=True, tally=self.tally)
        chunks = _pad(flat.float(), self.n).view(self.n, -1)
        payload, scales = encode(chunks, self.quantize)
        recv, recv_scales = torch.empty_like(payload), torch.empty_like(scales)
        works = [self._all_to_all(recv, payload)] + ([self._all_to_all(recv_scales, scales)] if self.scaled else [])
        return (flat, recv, recv_scales), works

    def _all_to_all(self, out: torch.Tensor, t: torch.Tensor):
        if self.tally is not None:
            self.tally.all_to_all(t, self.n)
        return dist.all_to_all_single(out, t, group=self.group, async_op=True)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty((self.n, *t.shape[1:]) if t.dim() > 1 else (self.n * t.numel(),))
        if self.tally is not None:
            self.tally.all_gather(t, self.n)
        dist.all_gather_single(out, t, group=self.group)
        return out

    def result(self, handle) -> torch.Tensor:
        data, works = handle
        if works is None:
            return data
        if self.quantize == "none":
            works.wait()
            return data.div_(self.n)
        flat, recv, recv_scales = data
        for w in works:
            w.wait()
        mine = decode(recv, recv_scales, self.quantize).sum(dim=0).div_(self.n)  # float32, this rank's chunk
        payload, scale = encode(mine.unsqueeze(0), self.quantize)
        every = self._all_gather(payload)
        scales = self._all_gather(scale) if self.scaled else torch.ones(self.n)
        return decode(every, scales, self.quantize).flatten()[: flat.numel()].to(flat.dtype)


def encode(chunks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float32 -> (their bytes in the wire format ``fmt``, one float32 scale a row)."""
    if fmt == "bf16":
        return chunks.to(torch.bfloat16).view(torch.uint8), torch.ones(len(chunks), device=chunks.device)
    scales = chunks.abs().amax(dim=1).clamp_min(1e-30) / FP8_MAX
    return (chunks / scales.unsqueeze(1)).to(FP8).view(torch.uint8), scales


def decode(payload: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 rows that ``encode`` sent."""
    if fmt == "bf16":
        return payload.view(torch.bfloat16).float()
    if payload.device.type == "cpu":  # a table of the 256 values: 4.5x torch's CPU cast (benchmarks/fp8_decode.py)
        values = FP8_VALUES.index_select(0, payload.flatten().int()).view(payload.shape)
    else:
        values = payload.view(FP8).float()
    return values * scales.unsqueeze(1)


def quantized_mean(flats: list[torch.Tensor], fmt: str) -> torch.Tensor:
    """What ``Exchange`` computes over n ranks holding ``flats``, in one process (the reference
    that tests and ``plait verify`` compare with)."""
    n = len(flats)
    if fmt == "none":
        return sum(flats[1:], flats[0].clone()) / n
    sent = [encode(_pad(f.float(), n).view(n, -1), fmt) for f in flats]  # per source rank
    sums = [decode(torch.stack([p[j] for p, _ in sent]), torch.stack([s[j] for _, s in sent]), fmt).sum(dim=0) / n
            for j in range(n)]  # chunk j is summed by rank j
    back = [encode(s.unsqueeze(0), fmt) for s in sums]
    every = decode(torch.cat([p for p, _ in back]), torch.cat([s for _, s in back]), fmt)
    return every.flatten()[: flats[0].numel()].to(flats[0].dtype)


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    extra = -t.numel() % n
    return torch.cat([t, t.new_zeros(extra)]) if extra else t


@dataclass
class Fragment:
    """Tensors synchronised together (parameters, or under ZeRO inside a replica this rank's slices
    of them), their outer copy and its optimizer (Nesterov SGD)."""

    params: list[torch.Tensor]
    outer: torch.Tensor  # flat, the parameters' dtype
    optimizer: OuterSGD
    phase: int  # synced after the inner steps t with t % H == phase
    pending: tuple | None = None  # (exchange handle, local parameters when it started)

    def local(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.params])

    @torch.no_grad()
    def assign(self, flat: torch.Tensor) -> None:
        for p, v in zip(self.params, comm.views_of(self.params, flat)):
            p.copy_(v)


class DiLoCo(DataParallelStrand):
    """Local training on each replica, synced every ``inner_steps`` (see the module docstring).

    A replica is one dp rank, or with ``inner`` (a synchronous strand: data parallel or ZeRO over
    the replica's dp ranks, ``Groups.shard``) several: the inner strand then owns gradients,
    optimizer segments and checkpoints, and the exchange runs over ``group`` (``Groups.replica``:
    the ranks holding the same slice in every replica) on this rank's segments only."""

    averages_grads = False  # an inner step's gradient is this replica's own

    def __init__(self, module: nn.Module, group, *, inner_steps: int, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, momentum_ramp: str = "nesterov", fragments: int = 1,
                 quantize: str = "none", fragment_of: dict[str, int] | None = None, tally: comm.Tally | None = None,
                 inner: DataParallelStrand | None = None):
        """``fragment_of``: name -> fragment (``fragment_names`` of the whole model; default: the
        local parameters split by bytes)."""
        self.module, self.replicas, self.inner_steps, self.inner = module, group, inner_steps, inner
        self.group = inner.group if inner is not None else group  # what gradients are sharded over
        self.exchange = Exchange(group, quantize, tally)
        names = {id(p): n for n, p in module.named_parameters()}
        self.segments = inner.segments if inner is not None else \
            [(p, p) for p in module.parameters() if p.requires_grad]
        named = [(names[id(src)], seg) for seg, src in self.segments if src.requires_grad]
        self.copy = inner is not None and dist.get_rank(group) > 0  # another replica writes checkpoints
        if fragment_of is None:
            parts = split_by_bytes([t for _, t in named], fragments)
        else:
            parts = [[t for n, t in named if fragment_of[n] == i] for i in range(fragments)]
        self.delay = 1 if fragments > 1 else 0  # streaming overlaps each exchange with the next step
        outer = {"lr": outer_lr, "momentum": outer_momentum, "ramp": momentum_ramp}
        self.fragments = [self._fragment(ps, (i + 1) * inner_steps // fragments % inner_steps, outer)
                          for i, ps in enumerate(parts)]
        self.steps = 0  # inner steps taken

    @staticmethod
    def _fragment(params: list[nn.Parameter], phase: int, outer_opts: dict) -> Fragment:
        outer = torch.cat([p.detach().flatten() for p in params]) if params else torch.zeros(0)
        return Fragment(params, outer, OuterSGD([outer], **outer_opts), phase)

    # ---------------------------------------------------------------- the protocol
    # With ``inner``, what happens within a replica is the inner strand's (over ``Groups.shard``).

    @property
    def shards_grads(self) -> bool:
        return self.inner is not None and self.inner.shards_grads

    @property
    def isolated(self):
        return self.inner.isolated if self.inner is not None else {}

    def no_sync(self):
        """Nothing travels in backward (a replica of several ranks: the inner strand's)."""
        return self.inner.no_sync() if self.inner is not None else contextlib.nullcontext()

    def finish(self) -> None:
        """The gradients are this replica's own: nothing to wait for (or the inner strand's)."""
        if self.inner is not None:
            self.inner.finish()

    def begin_step(self) -> None:
        if self.inner is not None:
            self.inner.begin_step()

    def zero_grad(self) -> None:
        """Drop the gradients: nothing keeps them between steps (backward allocates them afresh,
        which is cheaper than adding into zeroed ones); the inner strand zeroes its own."""
        if self.inner is not None:
            return self.inner.zero_grad()
        for p, _ in self.segments:
            p.grad = None

    def tied_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        return self.inner.tied_grad(param) if self.inner is not None else param.grad

    @contextlib.contextmanager
    def gathered(self):
        """The whole local model readable (ZeRO-3 inside: gathered over the replica's ranks)."""
        with self.inner.gathered() if self.inner is not None else contextlib.nullcontext():
            yield

    def places(self) -> list:
        return self.inner.places() if self.inner is not None else super().places()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.inner.param_groups(weight_decay) if self.inner is not None else super().param_groups(weight_decay)

    def after_step(self) -> None:
        """After inner step t: the outer work on this rank's segments (below: exchanges over the
        replicas' group), then the inner strand's (ZeRO-1/2: the all-gather of the updated slices,
        merged ones included, over the replica's own ranks)."""
        self._outer_step()
        if self.inner is not None:
            self.inner.after_step()

    def _outer_step(self) -> None:
        """Merge the exchanges started ``delay`` steps ago, start those of the fragments due at
        this step (and merge them at once when nothing overlaps)."""
        self.steps += 1
        for frag in self.fragments:
            if frag.pending is not None and self.delay:
                self._merge(frag)
        for frag in self.fragments:
            if frag.params and self.steps % self.inner_steps == frag.phase:
                local = frag.local()
                frag.pending = (self.exchange.start(frag.outer - local), local)
                if not self.delay:
                    self._merge(frag)

    def flush(self) -> None:
        """Merge every exchange in flight (the end of training)."""
        for frag in self.fragments:
            if frag.pending is not None:
                self._merge(frag)
        if self.inner is not None and self.delay:  # streaming merged now: every rank of the replica
            self.inner.after_step()  # gathers (ZeRO-1/2), whether or not it held a slice of them

    def _merge(self, frag: Fragment) -> None:
        """The outer step on the fragment's mean pseudo-gradient; the replica continues from it,
        keeping what it learnt on the fragment since the exchange started."""
        handle, at_start = frag.pending
        frag.pending = None
        frag.outer.grad = self.exchange.result(handle).to(frag.outer.dtype)
        frag.optimizer.step()
        frag.outer.grad = None
        frag.assign(frag.outer + (frag.local() - at_start))

    def loaded(self, step: int) -> None:
        """A resumed run: the outer parameters start from the loaded ones (replica 0's, saved at
        ``step``) and the sync phase from ``step``; the outer momentum (and its ramp) starts afresh."""
        if self.inner is not None:
            self.inner.loaded(step)
        self.steps = step
        for frag in self.fragments:
            if frag.params:
                frag.outer.copy_(frag.local())
            frag.optimizer.restart()
            frag.pending = None

    def grad_bytes(self) -> int:
        """The gradients a step holds (from backward to ``zero_grad``)."""
        if self.inner is not None:
            return self.inner.grad_bytes()
        return sum(p.numel() * p.element_size() for p, _ in self.segments)

    def steady_grad_bytes(self) -> int:
        return self.inner.steady_grad_bytes() if self.inner is not None else 0

    def param_bytes(self) -> int:
        """The replica's parameters (this rank's part), and the outer copy with its momentum."""
        local = self.inner.param_bytes() if self.inner is not None else \
            sum(p.numel() * p.element_size() for p, _ in self.segments)
        outer = sum(f.outer.numel() * f.outer.element_size() for f in self.fragments)
        return local + outer * (2 if self.fragments[0].optimizer.defaults["momentum"] else 1)
