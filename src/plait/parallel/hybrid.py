"""``parallelize()``: the one place where the strands are composed, in a fixed order.

tensor parallel -> pipeline parallel -> data parallel / ZeRO. Each strand is applied to the
plain model from the outside; the model file never imports torch.distributed. Training, verify
and bench all build their parallel model here, and the trainer drives a step only through
``ParallelModel``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..config import RunConfig
from ..topology import Groups
from ..train.optim import clip_grad_norm
from .data import DataParallel
from .pipeline import PipelineParallel, StepContext, apply_pipeline, sum_tied_grads, tied_weight
from .tensor import TensorParallel, apply_tensor_parallel
from .zero import ZeroDataParallel
from .zero3 import Zero3


@dataclass
class ParallelModel:
    """The local part of the model and the strand objects that act on it around each step."""

    module: nn.Module
    groups: Groups
    grad_sync: DataParallel
    tp: TensorParallel | None = None
    pipeline: PipelineParallel | None = None
    tied: bool = False  # gpt2's embedding split over the first and last pipeline stage
    _clip_sets: tuple | None = field(default=None, repr=False)  # clip_grads' partition, built once

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy per token (mean or sum); vocabulary-parallel under tp."""
        if self.tp is not None:
            return self.tp.loss(logits, target, reduction)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction)

    def forward_backward(self, micro: list, autocast=contextlib.nullcontext, meter=None) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; gradients accumulate (scaled 1/len).
        Returns the mean loss where this rank computes it (every rank, or the last stage), else 0."""
        self.grad_sync.begin_step()
        ctx = StepContext(micro, self.loss, autocast, self.grad_sync.no_sync, meter)
        if self.pipeline is not None:
            return self.pipeline.train_step(ctx)
        for i, (x, y) in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else self.grad_sync.no_sync()
            a = _Key(i)
            with sync:
                with ctx.measure(a), autocast():
                    loss = self.loss(self.module(x), y)
                (loss / len(micro)).backward()
            ctx.release(a)
            ctx.total += loss.detach()
        return ctx.total / len(micro)

    @torch.no_grad()
    def loss_sum(self, micro: list, autocast=contextlib.nullcontext) -> torch.Tensor:
        """Sum of the per-token losses of ``micro`` (0 on pipeline stages without the loss)."""
        with self.grad_sync.gathered():
            return self._loss_sum(micro, autocast)

    def _loss_sum(self, micro: list, autocast) -> torch.Tensor:
        if self.pipeline is not None:
            outs = self.pipeline.forward_only(StepContext(micro, self.loss, autocast))
            return sum((self.loss(o, y, "sum") for o, (_, y) in zip(outs, micro)), torch.zeros(()))
        total = torch.zeros(())
        for x, y in micro:
            with autocast():
                total = total + self.loss(self.module(x), y, reduction="sum").cpu()
        return total

    @property
    def holds_loss(self) -> bool:
        """Whether this rank computes the loss (every rank, or the last pipeline stage's)."""
        return self.pipeline is None or self.pipeline.chunks[-1].last

    def global_loss(self, local: torch.Tensor | float) -> float:
        """Mean over dp of the loss, which only the last pipeline stage has: one all-reduce over
        every rank of (loss, 1) from the ranks that hold it (tp copies weigh alike)."""
        held = self.holds_loss
        return comm.weighted_mean(float(local) if held else 0.0, 1.0 if held else 0.0)

    def finish_grads(self) -> None:
        """After the last backward of a step: mean over dp, sp partial sums over tp, tied copies summed."""
        self.grad_sync.finish()
        if self.tp is not None:
            self.tp.finish_grads(self._sp_slices())
        if self.tied:
            isolated = getattr(self.grad_sync, "isolated_grad", None)
            if isolated is not None:  # ZeRO: the two stages' slices of the tied weight line up
                comm.all_reduce_(isolated, self.groups.embed)
            else:
                sum_tied_grads(self.module, self.groups.embed)

    def _sp_slices(self) -> list[torch.Tensor]:
        """The gradients of the sequence-parallel replicated parameters as the optimizer holds them:
        under ZeRO the full gradients are gone (or stale) after the dp reduction, so the sum over
        tp is applied to the slices (sums over dp and tp commute)."""
        wanted = {id(p) for p in self.tp.sp_replicated}
        return [seg.grad for seg, src in self.grad_sync.segments if id(src) in wanted]

    def optimizer_params(self) -> list[nn.Parameter]:
        """What the optimizer updates: the local parameters, or under ZeRO this rank's slices."""
        return self.grad_sync.optimizer_params()

    def after_step(self) -> None:
        """After the optimizer step (ZeRO: all-gather the updated parameters over dp)."""
        self.grad_sync.after_step()

    def clip_grads(self, max_norm: float) -> float:
        """Global-norm clip over what the optimizer steps (ZeRO: this rank's slices, squares summed
        over dp): tp shards summed over tp, stages summed over pp, the tied weight's copy scaled
        but counted once."""
        if self._clip_sets is None:
            self._clip_sets = self._clip_partition()
        sharded, replicated, copies = self._clip_sets
        return clip_grad_norm(sharded, replicated, max_norm, self.tp.group if self.tp is not None else None,
                              self.groups.pp if self.pipeline is not None else None, copies,
                              self.groups.dp if self.grad_sync.shards_grads else None)

    def _clip_partition(self) -> tuple[list, list, tuple]:
        """(tp-sharded, replicated, tied copies) among the optimizer's parameters; fixed for the run."""
        sharded = self.tp.sharded if self.tp is not None else {}
        name = {id(p): n for n, p in self.module.named_parameters()}
        copy = self.module.lm_head.weight if self.tied and self.module.lm_head is not None else None
        segs = [(s, name[id(src)] in sharded) for s, src in self.grad_sync.segments if src is not copy]
        return ([s for s, split in segs if split], [s for s, split in segs if not split],
                tuple(s for s, src in self.grad_sync.segments if src is copy))

    def full_params(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by name, on CPU (collective over tp and pp; ZeRO-3: dp)."""
        with self.grad_sync.gathered():
            return self._full_params()

    def _full_params(self) -> dict[str, torch.Tensor]:
        if self.tp is not None:
            params = self.tp.full_params(self.module)
        else:
            params = {n: p.detach().cpu().clone() for n, p in self.module.named_parameters()}
        if self.pipeline is None:
            return params
        parts: list = [None] * comm.group_size(self.groups.pp)
        dist.all_gather_object(parts, params, group=self.groups.pp)
        merged = {k: v for part in parts for k, v in part.items()}
        if self.tied:
            merged.pop("lm_head.weight", None)  # the reference has one tied weight, tok_emb.weight
        return merged

    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary on every rank (for sampling; collective over tp, pp)."""
        with self.grad_sync.gathered():
            return self._full_logits(tokens)

    def _full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pipeline is not None:
            logits = self._pipeline_logits(tokens)
        else:
            logits = self.module(tokens)
        return self.tp.full_logits(logits) if self.tp is not None else logits

    def _pipeline_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        outs = self.pipeline.forward_only(StepContext([(tokens, None)], self.loss))
        last = self.pipeline.stage_rank(self.pipeline.num_stages - 1)
        shape = (*tokens.shape, self.module_vocab_local())
        logits = outs[0] if outs else torch.empty(shape, dtype=self.pipeline.dtype, device=tokens.device)
        dist.broadcast(logits.contiguous(), last, group=self.groups.pp)
        return logits

    def module_vocab_local(self) -> int:
        """Columns of the logits on this rank (vocabulary, padded and split under tp)."""
        return self.tp.padded_vocab // self.tp.tp if self.tp is not None else self.module.cfg.vocab

    def checkpoint_shards(self) -> tuple | None:
        """``(tp_mesh, {name: (dim, size)})`` of the tensor-parallel shards, for checkpoints."""
        return (self.tp.mesh, self.tp.sharded) if self.tp is not None else None


@dataclass(frozen=True)
class _Key:
    """Activation-meter key of a micro-batch outside the pipeline (same fields as an Action)."""

    mb: int
    chunk: int = 0


def parallelize(model: nn.Module, groups: Groups, cfg: RunConfig) -> ParallelModel:
    """Apply the layout of ``cfg.parallel`` to ``model`` (already on its device and dtype)."""
    p = cfg.parallel
    tp = pipeline = None
    tied = model.lm_head.weight is model.tok_emb.weight
    if p.tp > 1 or p.sequence_parallel:
        seed = cfg.train.seed + 100_003 * (1 + groups.coord.dp_rank)  # dropout streams differ over dp and tp
        tp = apply_tensor_parallel(model, groups.tp, p.sequence_parallel, seed)
        tp.mesh = groups.mesh["tp"]
    if p.pp > 1:
        pipeline = apply_pipeline(model, groups, cfg)
        if tp is not None:  # forget what now lives on other stages
            local = {id(q) for q in model.parameters()}
            tp.sp_replicated = [q for q in tp.sp_replicated if id(q) in local]
    split_tie = tied and p.pp > 1
    isolate = tied_weight(model) if split_tie and p.zero else None  # its ZeRO slices must line up
    if p.zero == 3:
        sync = Zero3(model, groups.dp, isolate)
    elif p.zero:
        sync = ZeroDataParallel(model, groups.dp, p.zero, isolate=isolate)
    else:
        sync = DataParallel(model, groups.dp)
    return ParallelModel(model, groups, sync, tp, pipeline, split_tie)
