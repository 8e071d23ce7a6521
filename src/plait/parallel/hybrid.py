"""``parallelize()``: the one place where the strands are composed, in a fixed order.

tensor parallel -> recomputation -> pipeline parallel -> a data-parallel strand (plain, ZeRO-1/2,
ZeRO-3, DiLoCo or a parameter server). Each is applied to the plain model from the outside, guided
only by the model's description; the model never imports torch.distributed. Training, verify,
bench and users' own loops build their parallel model here and drive it only through ``ParallelModel``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from ..config import DilocoConfig, ParallelConfig, PsConfig
from ..errors import DescriptionError
from ..models.description import ModelDescription, check, cross_entropy, get_parameter, tied_parameters
from ..seeds import seed_for
from ..topology import Groups
from .clip import ClipSets, NormGroups, clip_grad_norm
from .data import DataParallel
from .diloco import DiLoCo, fragment_names
from .pipeline.runtime import PipelineParallel, StepContext
from .pipeline.stages import apply_pipeline, tied_copy
from .protocol import DataParallelStrand
from .ps import PSWorker
from .recompute import apply_recompute
from .tensor import TensorParallel, apply_tensor_parallel
from .zero import ZeroDataParallel
from .zero3 import Zero3


@dataclass
class ParallelModel:
    """The local part of the model and the strands that act on it around each step: the one face
    that the trainer, verify, bench and users' loops use."""

    module: nn.Module
    desc: ModelDescription
    groups: Groups
    data: DataParallelStrand
    tp: TensorParallel | None = None
    pipeline: PipelineParallel | None = None
    tied_split: bool = False  # a tied parameter split over the first and last pipeline stage
    tied_param: nn.Parameter | None = None  # this rank's copy of it (first or last stage), else None
    traffic: comm.Traffic = field(default_factory=comm.Traffic)  # bytes this rank sends, by strand
    _clip: tuple | None = field(default=None, repr=False)  # (ClipSets, NormGroups), built once
    _partial_segs: list | None = field(default=None, repr=False)  # segments of tp-partial gradients, found once

    # ---------------------------------------------------------------- one training step

    def train_step(self, micro: list, optimizer: torch.optim.Optimizer, max_norm: float = 0.0,
                   autocast=contextlib.nullcontext, meter=None, slowdown: float = 1.0,
                   targets: tuple[int, int] | None = None) -> tuple[float, float]:
        """Forward and backward of this rank's micro-batches ``[(inputs, targets)]``, gradient
        sync, global-norm clip (``max_norm`` 0: measure only), optimizer step. Returns the loss
        (mean over dp; collective over every rank) and the gradient norm. ``slowdown`` > 1 makes
        this rank a straggler: it waits ``slowdown - 1`` times its forward and backward's time.
        ``targets``: see ``share``."""
        start = time.perf_counter()
        local = self.forward_backward(micro, autocast, meter, targets)
        if slowdown > 1:
            time.sleep((slowdown - 1) * (time.perf_counter() - start))
        self.finish_grads()
        norm = None if self.data.clips_itself else self.clip_grads(max_norm)
        optimizer.step()
        self.after_step()
        self.zero_grad()
        return self.global_loss(local), self.data.last_norm if norm is None else norm

    def loss(self, outputs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The model's loss (mean or sum over tokens); vocabulary-parallel under tp."""
        if self.tp is not None and self.tp.vocab_parallel:
            return self.tp.loss(outputs, target, reduction)
        return (self.desc.loss or cross_entropy)(outputs, target, reduction)

    def forward_backward(self, micro: list, autocast=contextlib.nullcontext, meter=None,
                         targets: tuple[int, int] | None = None) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; gradients accumulate (each micro-batch's
        loss weighted by ``share``). Returns the step's loss where this rank computes it (every rank,
        or the last stage), else 0. What travels: activations and their gradients over pp (the
        schedule), tp's collectives inside the model, and the data-parallel strand's over dp during
        the last backward."""
        self.data.begin_step()
        ctx = StepContext(micro, self.share(len(micro), targets), autocast, self.data.no_sync, meter)
        if self.pipeline is not None:
            return self.pipeline.train_step(ctx)
        for i, (x, y) in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else self.data.no_sync()
            a = _Key(i)
            with sync:
                with ctx.measure(a), autocast():
                    loss = ctx.loss_fn(self.module(x), y)
                loss.backward()
            ctx.release(a)
            ctx.total += loss.detach()
        return ctx.total

    def share(self, micro_batches: int, targets: tuple[int, int] | None = None):
        """(outputs, targets) -> one micro-batch's share of the step's loss. Without ``targets``,
        its mean over its targets / ``micro_batches`` (every micro-batch weighs alike: exact when
        all hold as many targets, as next-token windows do). With ``targets`` = (the step's
        targets over every dp rank, this rank's), every target weighs alike whatever the
        micro-batches and dp (masked-language modelling, tagging padded sentences): the sum over
        the micro-batch's targets, times dp / the step's, as the strand averages gradients over dp
        (a strand whose gradients stand alone, DiLoCo or an asynchronous server: / this rank's)."""
        if targets is None:
            return lambda out, y: self.loss(out, y) / micro_batches
        every, mine = targets
        averaged = self.data.averages_grads and self.dp > 1  # at dp=1 this rank's targets are the step's
        scale = self.dp / max(every, 1) if averaged else 1 / max(mine, 1)
        return lambda out, y: self.loss(out, y, "sum") * scale

    def finish_grads(self) -> None:
        """After the last backward: mean over dp, partial sums over tp, tied copies summed over the
        first and last pipeline stage (``groups.embed``)."""
        self.data.finish()
        if self.tp is not None and self.tp.partial:
            self.tp.finish_grads(self._partial_grads())
        self.sum_tied_grads()

    def sum_tied_grads(self) -> None:
        """All-reduce (sum) the tied parameter's gradient over the first and last pipeline stage
        (``groups.embed``), so both copies take the same update (ZeRO: their slices line up)."""
        if self.tied_param is not None:  # the first or the last stage
            grad = self.data.tied_grad(self.tied_param)
            if grad is not None:
                comm.all_reduce_(grad, self.groups.embed, tally=self.traffic.tally("pp"))

    def _partial_grads(self) -> list[torch.Tensor]:
        """The gradients of the tp-partial parameters as the optimizer holds them: under ZeRO the
        full gradients are gone (or stale) after the dp reduction, so the sum over tp is applied to
        the slices (sums over dp and tp commute)."""
        if self._partial_segs is None:
            wanted = {id(p) for n, p in self.module.named_parameters() if n in self.tp.partial}
            self._partial_segs = [seg for seg, src in self.data.segments if id(src) in wanted]
        return [seg.grad for seg in self._partial_segs]

    def clip_grads(self, max_norm: float) -> float:
        """Global-norm clip over what the optimizer steps (``clip.py``); returns the norm."""
        if self._clip is None:
            self._clip = self._clip_partition()
        return clip_grad_norm(self._clip[0], max_norm, self._clip[1])

    def _clip_partition(self) -> tuple[ClipSets, NormGroups]:
        """(tp-sharded, replicated, tied copy) among the optimizer's segments; fixed for the run."""
        sharded = self.tp.sharded if self.tp is not None else {}
        name = {id(p): n for n, p in self.module.named_parameters()}
        copies = {id(get_parameter(self.module, out)) for out, _ in self.desc.tied} if self.tied_split else set()
        segs = [(s, name[id(src)] in sharded) for s, src in self.data.segments if id(src) not in copies]
        sets = ClipSets(tuple(s for s, split in segs if split), tuple(s for s, split in segs if not split),
                        tuple(s for s, src in self.data.segments if id(src) in copies))
        groups = NormGroups(self.tp.group if self.tp is not None else None,
                            self.groups.pp if self.pipeline is not None else None,
                            self.data.group if self.data.shards_grads else None)  # the ranks sharing a gradient
        return sets, groups

    def param_groups(self, weight_decay: float) -> list[dict]:
        """What the optimizer updates (ZeRO: this rank's slices), with weight decay on matrices."""
        return self.data.param_groups(weight_decay)

    def after_step(self) -> None:
        """After the optimizer step (ZeRO-1/2: all-gather the updated parameters over dp)."""
        self.data.after_step()

    def zero_grad(self) -> None:
        """Zero the gradients in place for the next step (never ``optimizer.zero_grad()``)."""
        self.data.zero_grad()

    def flush(self) -> None:
        """At the end of training: finish what the data-parallel strand still has in flight
        (streaming DiLoCo's last exchanges)."""
        self.data.flush()

    # ---------------------------------------------------------------- losses over the run

    @property
    def holds_loss(self) -> bool:
        """Whether this rank computes the loss (every rank, or the last pipeline stage's)."""
        return self.pipeline is None or self.pipeline.chunks[-1].last

    def global_loss(self, local: torch.Tensor | float) -> float:
        """Mean over dp of the loss, which only the last pipeline stage has: one all-reduce over
        every rank of (loss, 1) from the ranks that hold it (tp copies weigh alike)."""
        held = self.holds_loss
        if not self.data.lockstep:  # the workers go at their own pace: this rank's own loss
            return float(local)
        return comm.weighted_mean(float(local) if held else 0.0, 1.0 if held else 0.0, self.groups.world)

    @torch.no_grad()
    def loss_sum(self, micro: list, autocast=contextlib.nullcontext) -> torch.Tensor:
        """Sum of the per-token losses of ``micro`` (0 on pipeline stages without the loss).
        Forward only: activations over pp, tp's collectives, ZeRO-3's gathers over dp."""
        with self.gathered():
            if self.pipeline is not None:
                outs = self.pipeline.forward_only(StepContext(micro, self.loss, autocast))
                return sum((self.loss(o, y, "sum") for o, (_, y) in zip(outs, micro)), torch.zeros(()))
            total = torch.zeros(())
            for x, y in micro:
                with autocast():
                    total = total + self.loss(self.module(x), y, reduction="sum").cpu()
            return total

    # ---------------------------------------------------------------- reading the whole model

    def gathered(self):
        """A context in which the whole local model is readable (ZeRO-3 gathers it over dp)."""
        return self.data.gathered()

    def full_params(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by name, on CPU (collective over tp and pp; ZeRO-3: dp)."""
        with self.gathered():
            params = self.tp.full_params(self.module) if self.tp is not None else \
                {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}
            if self.pipeline is None:
                return params
            parts: list = [None] * comm.group_size(self.groups.pp)
            dist.all_gather_object(parts, params, group=self.groups.pp)
        merged = {k: v for part in parts for k, v in part.items()}
        for out_name, _ in self.desc.tied if self.tied_split else ():
            merged.pop(out_name, None)  # the unsplit model holds one tied parameter, the input stage's
        return merged

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs over the whole vocabulary on every rank (for sampling; collective over tp, pp)."""
        with self.gathered():
            logits = self._pipeline_logits(tokens) if self.pipeline is not None else self.module(tokens)
        return self.tp.full_logits(logits) if self.tp is not None else logits

    def _pipeline_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's outputs, broadcast over pp: first their shape (up to 7 dimensions),
        then the values in the parameters' dtype (under autocast the last stage computes them in bf16)."""
        pipe = self.pipeline
        outs = pipe.forward_only(StepContext([(tokens, None)], self.loss))
        last = pipe.stage_rank(pipe.num_stages - 1)
        header = torch.zeros(8, dtype=torch.long, device=pipe.device)
        if outs:
            header[0] = outs[0].dim()
            header[1:1 + outs[0].dim()] = torch.tensor(outs[0].shape)
        dist.broadcast(header, last, group=self.groups.pp)
        shape = header[1:1 + int(header[0])].tolist()
        logits = outs[0].to(pipe.dtype).contiguous() if outs else \
            torch.empty(shape, dtype=pipe.dtype, device=pipe.device)
        dist.broadcast(logits, last, group=self.groups.pp)
        return logits

    # ---------------------------------------------------------------- what this rank holds

    @property
    def dp(self) -> int:
        return self.groups.topology.dp

    @property
    def dp_rank(self) -> int:
        """This rank's share of the batch: ranks with the same dp_rank see the same data."""
        return self.groups.coord.dp_rank

    @property
    def coord(self):
        """This rank's (pp_rank, dp_rank, tp_rank)."""
        return self.groups.coord

    def memory(self) -> dict[str, int]:
        """Parameter and gradient bytes held now, and gradient bytes held between steps."""
        return {"params": self.data.param_bytes(), "grads": self.data.grad_bytes(),
                "steady_grads": self.data.steady_grad_bytes()}

    def pipeline_summary(self) -> dict | None:
        """The schedule and the blocks of every stage, or None without pipeline parallel."""
        if self.pipeline is None:
            return None
        return {"schedule": self.pipeline.schedule.name, "stage_sizes": list(self.pipeline.stage_sizes)}

    def stages(self) -> list[tuple[int, list[nn.Module], Callable]]:
        """This rank's pipeline stages as (global stage, its modules, its forward), for another
        pipeline runtime to drive (``plait bench pp`` races torch's schedules on them). The first
        stage's forward takes the model's inputs, the others only the hidden states: their side
        inputs are built from token ids of zeros in the hidden states' (batch, sequence) shape,
        exact for side inputs that depend on positions alone (rotary tables), not for a padding
        mask."""
        pipe = self.pipeline
        return [(c.stage, pipe.chunk_modules(i), functools.partial(_stage_forward, pipe, c))
                for i, c in enumerate(pipe.chunks)]

    # ---------------------------------------------------------------- recording a pipeline step

    def record_actions(self) -> None:
        """Record the (action, start, end) of this rank's next pipeline step."""
        self.pipeline.trace = []

    def recorded_actions(self) -> list[list[tuple]]:
        """Every stage's recorded actions, on every rank of the pipeline (collective over pp)."""
        traces: list = [None] * comm.group_size(self.groups.pp)
        dist.all_gather_object(traces, self.pipeline.trace, group=self.groups.pp)
        self.pipeline.trace = None
        return traces

    def schedule_actions(self, microbatches: int) -> list[list]:
        """Every pipeline rank's action list for a step of ``microbatches``."""
        p = self.pipeline
        return p.schedule.actions(p.pp, microbatches, len(p.chunks))


@dataclass(frozen=True)
class _Key:
    """Activation-meter key of a micro-batch outside the pipeline (same fields as an Action)."""

    mb: int
    chunk: int = 0


def _stage_forward(pipe: PipelineParallel, chunk, x):
    inputs = x if chunk.first else torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    return pipe.run_chunk(chunk, None if chunk.first else x, inputs, pipe.desc.side_inputs(pipe.model, inputs))


def parallelize(model: nn.Module, desc: ModelDescription, groups: Groups, parallel: ParallelConfig, *,
                seed: int = 0, tokens_per_step: int | None = None, sample=None,
                diloco: DilocoConfig | None = None, ps: PsConfig | None = None,
                recompute: str = "none") -> ParallelModel:
    """Apply the layout ``parallel`` to ``model`` (already on its device and dtype, the same on
    every rank) as its description ``desc`` allows; with ``diloco``, DiLoCo over dp in place of
    synchronous data parallel, with ``ps`` a parameter server on ``groups``' server ranks.

    ``seed``: the run's seed (tensor parallel's dropout stream derives from it); ``tokens_per_step``:
    tokens each dp rank trains on in a step (balances pipeline stages); ``sample``: inputs of one
    micro-batch, to check the description by running its pieces once before anything is split;
    ``recompute``: none, selective (attention cores) or full (blocks), see ``recompute.py``."""
    check(desc, model, sample)
    p, coord = parallel, groups.coord
    traffic = comm.Traffic()
    fragments = fragment_names(model, diloco.fragments, desc.tied) if diloco is not None else None
    tp = pipeline = None
    tied = bool(list(tied_parameters(desc, model)))
    if p.tp > 1 or p.sequence_parallel:
        tp = apply_tensor_parallel(model, desc, groups.mesh["tp"], sequence_parallel=p.sequence_parallel,
                                   seed=seed_for(seed, "tp", dp_rank=coord.dp_rank, tp_rank=coord.tp_rank,
                                                 pp_rank=coord.pp_rank), tally=traffic.tally("tp"))
        if tp.vocab_parallel and desc.loss is not None:
            raise DescriptionError("loss", getattr(desc.loss, "__name__", "loss"), "a vocab_head makes the loss "
                                   "vocabulary-parallel (next-token cross-entropy): leave loss unset, or style "
                                   "the output layer otherwise")
    apply_recompute(model, desc, recompute, streams=[tp.rng] if tp is not None and tp.rng is not None else [])
    if p.pp > 1:
        pipeline = apply_pipeline(model, desc, groups.pp, schedule=p.schedule, virtual_stages=p.virtual_stages,
                                  stage_layers=p.stage_layers, tokens_per_step=tokens_per_step,
                                  seq_shards=p.tp if p.sequence_parallel else 1, tally=traffic.tally("pp"))
    split_tie = tied and p.pp > 1
    copy = tied_copy(desc, model) if split_tie else None
    if ps is not None:
        second = {out for out, _ in desc.tied} if split_tie else set()
        data = PSWorker(model, groups, mode=ps.mode, counts=_norm_counts(model, tp, second, coord.tp_rank),
                        tally=traffic.tally("ps"))
    else:
        data = _data_strand(model, desc, groups, p, copy, traffic, diloco, fragments)
    return ParallelModel(model, desc, groups, data, tp, pipeline, split_tie, copy, traffic)


def _norm_counts(model: nn.Module, tp: TensorParallel | None, second: set[str], tp_rank: int) -> dict[str, bool]:
    """Name -> whether a tensor counts in the global gradient norm when the parameter server sums
    every worker position's squares: a tp shard always, a tp-replicated tensor on tp rank 0 only,
    a tied weight's second copy (the last stage's, named ``second``) never (the rule of ``clip.py``)."""
    sharded = tp.sharded if tp is not None else {}
    return {n: (n in sharded or tp_rank == 0) and n not in second for n, _ in model.named_parameters()}


def _data_strand(model: nn.Module, desc: ModelDescription, groups: Groups, p: ParallelConfig,
                 tied: nn.Parameter | None, traffic: comm.Traffic, diloco: DilocoConfig | None,
                 fragments: dict[str, int] | None) -> DataParallelStrand:
    """The data-parallel strand: DiLoCo if asked (with ZeRO over ``groups.shard`` inside replicas of
    several dp ranks, exchanging over ``groups.replica``), else by ``p.zero`` over dp; under ZeRO this rank's copy
    of a tied weight split over pipeline stages gets storage of its own, so that its slices line up
    between the two stages."""
    if diloco is not None:  # replicas of several dp ranks hold ZeRO over them
        shards = p.dp // diloco.replicas if diloco.replicas else 1
        if shards > 1 and (groups.shard is None or comm.group_size(groups.shard) != shards):
            raise ValueError(f"diloco.replicas={diloco.replicas} needs build_groups(..., shards={shards})")
        inner = _sync_strand(model, desc, groups.shard, p, tied, traffic) if shards > 1 else None
        return DiLoCo(model, groups.replica if inner is not None else groups.dp, inner_steps=diloco.inner_steps,
                      outer_lr=diloco.outer_lr, outer_momentum=diloco.outer_momentum,
                      momentum_ramp=diloco.momentum_ramp, fragments=diloco.fragments,
                      quantize=diloco.quantize, fragment_of=fragments, tally=traffic.tally("diloco"), inner=inner)
    return _sync_strand(model, desc, groups.dp, p, tied, traffic)


def _sync_strand(model: nn.Module, desc: ModelDescription, group, p: ParallelConfig, tied: nn.Parameter | None,
                 traffic: comm.Traffic) -> DataParallelStrand:
    """Synchronous data parallel over ``group``, by ``p.zero``."""
    isolate = tied if p.zero else None
    if p.zero == 3:
        return Zero3(model, group, units=desc.block_list(model), isolate=isolate, tally=traffic.tally("zero"))
    if p.zero:
        return ZeroDataParallel(model, group, stage=p.zero, isolate=isolate, tally=traffic.tally("zero"))
    return DataParallel(model, group, tally=traffic.tally("dp"))


__all__ = ["ParallelModel", "parallelize"]
