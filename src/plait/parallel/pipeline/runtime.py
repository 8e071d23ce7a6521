"""One interpreter for every schedule: it executes a rank's action list with point-to-point transfers.

Per action on global stage s (this rank's chunk c, s = c * pp + pp_rank):

- F: receive the activation of stage s-1 (unless s = 0), run the chunk (the model's own pieces, as
  its description names them: the input stage on stage 0, this chunk's blocks with the micro-batch's
  side inputs, the output stage on the last), send the output to stage s+1, or on the last stage
  compute the micro-batch's loss.
- B: receive the output gradient from stage s+1 (unless last), back-propagate, send the input
  gradient to stage s-1.
- I / W (zero bubble): I back-propagates to the input only (graph kept) and sends the input
  gradient; W later back-propagates from the gradients I kept at the weights' own nodes to the
  parameters only (``zero_bubble.py``), so the two together cost one backward.

Transfers are ``isend``/``irecv`` between global ranks with a tag per (direction, receiving
stage), so messages of different kinds never match each other (gloo honours tags). Activations and
gradients travel in the parameters' dtype (a stage's output under autocast is cast on sending), in
the shape (micro-batch, sequence / sequence shards, hidden) that each rank knows from its own copy
of the micro-batch. Side inputs (a padding mask, positions) never travel: every stage holds the
micro-batch's inputs and builds them there. Receives are
posted one action ahead and block only when their data is needed. A sent tensor is held only until
the schedule proves it received (``transfers.py``), and a sent stage output keeps only its autograd
graph: its data goes with the transfer (Megatron-LM's ``deallocate_output_tensor``). A micro-batch's
saved activations are released as soon as its backward (or W) is done. Gradients are accumulated
over micro-batches; data-parallel traffic is allowed only during each chunk's last backward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError, DescriptionError
from ...models.description import ModelDescription, batch_shape, stage_modules
from ...schedules import ACT, GRAD, Action, Message, Schedule, place, sender
from .transfers import SendTracker, step_plan
from .zero_bubble import input_grad


@dataclass(frozen=True)
class Chunk:
    stage: int
    blocks: tuple[str, ...]  # keys of the model's blocks ModuleDict (their global indices)
    first: bool
    last: bool


@dataclass
class _Live:
    inp: torch.Tensor | None = None  # received activation (requires grad), None on stage 0
    out: torch.Tensor | None = None  # chunk output, or the scaled loss on the last stage
    grad: torch.Tensor | None = None  # output gradient, kept from I for W
    weight_grad: Callable[[], None] | None = None  # W, prepared by I (zero_bubble.py)


@dataclass
class StepContext:
    """What one step's actions share: the micro-batches and how to run them."""

    micro: list  # [(inputs, targets)], this dp rank's micro-batches
    loss_fn: Callable  # (outputs, targets) -> the micro-batch's share of the step's loss (ParallelModel.share)
    autocast: Callable = contextlib.nullcontext
    no_sync: Callable = contextlib.nullcontext  # data parallel's accumulation context
    meter: object = None  # ActivationMeter, on the steps that measure
    total: torch.Tensor | float = 0.0

    def measure(self, a: Action):
        return self.meter.forward((a.mb, a.chunk)) if self.meter is not None else contextlib.nullcontext()

    def release(self, a: Action) -> None:
        if self.meter is not None:
            self.meter.release((a.mb, a.chunk))


class PipelineParallel:
    """Executes schedules on this rank's chunks of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, desc: ModelDescription, chunks: list[Chunk], schedule: Schedule, group,
                 *, seq_shards: int = 1, stage_sizes: tuple[int, ...] = (), tally=None):
        self.model, self.desc, self.chunks, self.schedule = model, desc, chunks, schedule
        self.tally = tally  # comm.Tally: bytes sent to other stages
        self.pp, self.pp_rank = dist.get_world_size(group), dist.get_rank(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.pp)]
        self.seq_shards = seq_shards  # sequence parallel: stages exchange 1/tp of the sequence
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device  # what travels between stages
        self.num_stages = self.pp * len(chunks)
        self.stage_sizes = stage_sizes  # blocks per global stage, for reports
        self.blocks = getattr(model, desc.blocks)  # a ModuleDict of this rank's blocks
        self._micro: list = []  # the running step's micro-batches (receive shapes come from them)
        self._sides: dict[int, dict] = {}  # the running step's side inputs, by micro-batch
        self._params = [[p for mod in self.chunk_modules(c) for p in mod.parameters() if p.requires_grad]
                        for c in range(len(chunks))]  # each chunk's trained parameters (zero bubble's W)
        self.trace: list[tuple[Action, float, float]] | None = None  # (action, start, end) when recording
        self._mark = 0.0
        self._sends: list = []  # sends outside a training step (forward only), waited at its end
        self.sends: SendTracker | None = None  # the running training step's sends
        self.last_sends: SendTracker | None = None  # the last step's, for inspection
        self._posted: dict[Message, tuple] = {}  # receives posted ahead: message -> (work, buffer)
        self._orders: dict[int, list] = {}  # peer pp rank -> [(outgoing, message)] this step
        self._next: dict[int, int] = {}  # peer pp rank -> transfers of its order posted so far
        # NCCL matches a pair's transfers by order alone and runs them in order: post them in the
        # order agreed with the peer. gloo honours tags: post receives as early as wanted.
        self.match_by_order = dist.get_backend() != "gloo"
        self._live: dict[tuple[int, int], _Live] = {}

    # ---------------------------------------------------------------- transfers
    # In a training step every transfer is named by its Message (kind, receiving stage, micro-batch).
    # Matched by order (NCCL), each is posted in the order agreed with the peer
    # (transfers.pair_orders); matched by tag (gloo), a receive is posted one action ahead whatever
    # the order, so the sender's data can flow as soon as it is sent. Outside a training step
    # (forward only: one kind of message per direction, in micro-batch order) transfers go as they come.

    def stage_rank(self, stage: int) -> int:
        """The global rank that holds ``stage`` in this pipeline."""
        return self._global[stage % self.pp]

    def _tag(self, msg: Message) -> int:
        return 0 if self.match_by_order else msg[0] * self.num_stages + msg[1]

    def _shape(self, msg: Message) -> tuple[int, int, int]:
        """What travels for ``msg``: (micro-batch, sequence / sequence shards, hidden)."""
        b, s = batch_shape(self._micro[msg[2]][0])
        return b, s // self.seq_shards, self.desc.hidden

    def _post_recv(self, msg: Message) -> tuple:
        buf = torch.empty(self._shape(msg), dtype=self.dtype, device=self.device)
        return dist.irecv(buf, self.stage_rank(sender(msg)), tag=self._tag(msg)), buf

    def _advance(self, peer: int, upto: tuple[bool, Message]) -> bool:
        """Post the receives that come before ``upto`` in the order agreed with ``peer``, and
        ``upto`` itself if it is a receive; False if a send of ours not yet made comes first."""
        if not upto[0] and upto[1] in self._posted:
            return True
        if not self.match_by_order:
            if not upto[0]:
                self._posted[upto[1]] = self._post_recv(upto[1])
            return True
        order = self._orders[peer]
        while self._next[peer] < len(order):
            item = order[self._next[peer]]
            if item[0]:  # our send: ``upto`` itself, or one whose turn comes first
                return item == upto
            self._posted[item[1]] = self._post_recv(item[1])
            self._next[peer] += 1
            if item == upto:
                return True
        raise RuntimeError(f"pipeline: transfer {upto} is not in the agreed order with pipeline rank {peer}")

    def _send(self, t: torch.Tensor, msg: Message) -> None:
        want = self._shape(msg)
        if tuple(t.shape) != want:  # the receiver's buffer has the described shape
            raise DescriptionError("hidden", tuple(t.shape), f"a pipeline stage must pass (micro-batch, sequence, "
                                   f"hidden) = {want}: check hidden, and that blocks keep the shape")
        t = t.detach().to(self.dtype).contiguous()
        if self.tally is not None:
            self.tally.send(t)
        if self.sends is None:  # forward only
            self._sends.append((dist.isend(t, self.stage_rank(msg[1]), tag=self._tag(msg)), t))
            return
        peer = place(msg[1], self.pp)[0]
        if not self._advance(peer, (True, msg)):
            raise RuntimeError(f"pipeline: send {msg} is out of the agreed order with pipeline rank {peer}")
        work = dist.isend(t, self.stage_rank(msg[1]), tag=self._tag(msg))
        if self.match_by_order:
            self._next[peer] += 1
        self.sends.sent(work, t, msg)

    def _recv(self, msg: Message) -> torch.Tensor:
        """The message, posted early (``_prefetch``) or now; blocks until it is here."""
        if self.sends is None:  # forward only
            work, buf = self._post_recv(msg)
        else:
            if not self._advance(place(sender(msg), self.pp)[0], (False, msg)):
                raise RuntimeError(f"pipeline: receive {msg} would be posted before a send the peer expects first")
            work, buf = self._posted.pop(msg)
        work.wait()
        if self.sends is not None:
            self.sends.received(msg)
        self._mark = time.perf_counter()  # the action's compute starts once its input is here
        return buf

    def _prefetch(self, msg: Message | None) -> None:
        """Post the receive of ``msg`` (if its turn has come), so the transfer overlaps this
        action's compute."""
        if msg is not None:
            self._advance(place(sender(msg), self.pp)[0], (False, msg))

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ---------------------------------------------------------------- compute

    def run_chunk(self, chunk: Chunk, x: torch.Tensor | None, inputs, side: dict) -> torch.Tensor:
        """The chunk's part of the model's own forward: the input stage (first stage; ``x`` is
        unused), the chunk's blocks with the micro-batch's side inputs, the output stage (last stage)."""
        m, d = self.model, self.desc
        if chunk.first:
            x = d.embed(m, inputs)  # (b, S, H)
        for key in chunk.blocks:
            x = self.blocks[key](x, **side)
        return d.head(m, x) if chunk.last else x  # outputs (b, S, V[/tp]) on the last stage

    def _forward(self, a: Action, ctx: StepContext) -> None:
        chunk = self.chunks[a.chunk]
        x, y = ctx.micro[a.mb]
        inp = None if chunk.stage == 0 else self._recv((ACT, chunk.stage, a.mb)).requires_grad_()
        with ctx.measure(a), ctx.autocast():
            if a.mb not in self._sides:  # built once a step: a rank's chunks share them
                self._sides[a.mb] = self.desc.side_inputs(self.model, x)
            out = self.run_chunk(chunk, inp, x, self._sides[a.mb])
            if chunk.last:
                out = ctx.loss_fn(out, y)
                ctx.total += out.detach()
        if not chunk.last:
            self._send(out, (ACT, chunk.stage + 1, a.mb))
            _drop_data(out)
        self._live[(a.mb, a.chunk)] = _Live(inp=inp, out=out)

    def _out_grad(self, chunk: Chunk, mb: int, out: torch.Tensor) -> torch.Tensor | None:
        return None if chunk.last else self._recv((GRAD, chunk.stage, mb)).to(out.dtype)

    def _backward(self, a: Action, ctx: StepContext) -> None:
        chunk, live = self.chunks[a.chunk], self._live.pop((a.mb, a.chunk))
        grad = self._out_grad(chunk, a.mb, live.out)
        torch.autograd.backward(live.out, grad)
        if live.inp is not None:
            self._send(live.inp.grad, (GRAD, chunk.stage - 1, a.mb))
        ctx.release(a)

    def _input_grad(self, a: Action, ctx: StepContext) -> None:
        chunk, live = self.chunks[a.chunk], self._live[(a.mb, a.chunk)]
        live.grad = self._out_grad(chunk, a.mb, live.out)
        if live.inp is not None:
            g, live.weight_grad = input_grad(live.out, live.grad, live.inp, self._params[a.chunk])
            live.grad = None  # W needs only what input_grad kept
            self._send(g, (GRAD, chunk.stage - 1, a.mb))

    def _weight_grad(self, a: Action, ctx: StepContext) -> None:
        live = self._live.pop((a.mb, a.chunk))
        if live.weight_grad is not None:
            live.weight_grad()
        else:  # the first stage: no input gradient, so I did nothing and W is the whole backward
            torch.autograd.backward(live.out, live.grad, inputs=self._params[a.chunk])
        ctx.release(a)

    def chunk_modules(self, c: int) -> list[nn.Module]:
        """The modules of this rank's chunk ``c``: its blocks, plus the input stage's on the first
        stage and the output stage's on the last."""
        chunk = self.chunks[c]
        mods = [self.blocks[k] for k in chunk.blocks]
        mods += stage_modules(self.desc, self.model, "input") if chunk.first else []
        return mods + (stage_modules(self.desc, self.model, "output") if chunk.last else [])


    # ---------------------------------------------------------------- steps

    def train_step(self, ctx: StepContext) -> torch.Tensor:
        """Run this rank's schedule over ``ctx.micro``; the step's loss on the last stage, else 0."""
        if self.schedule.interleaved and len(ctx.micro) % self.pp:
            raise ConfigError("parallel.microbatches", len(ctx.micro), f"the {self.schedule.name} schedule needs "
                              f"a multiple of pp={self.pp} micro-batches a step")
        plan = step_plan(self.schedule, self.pp, len(ctx.micro), len(self.chunks), self.pp_rank)
        self.sends, self._orders, self._micro = SendTracker(plan, self.pp), plan.orders, ctx.micro
        self._next = dict.fromkeys(self._orders, 0)
        run = {"F": self._forward, "B": self._backward, "I": self._input_grad, "W": self._weight_grad}
        for i, a in enumerate(plan.actions):
            self._mark = time.perf_counter()  # the action's work starts now, or once its input arrives (_recv)
            for msg in plan.awaits[i:i + 2]:  # receives posted in action order: per tag, the send order
                self._prefetch(msg)
            sync = contextlib.nullcontext() if i in plan.last_backward else ctx.no_sync()
            with sync:
                run[a.op](a, ctx)
            if self.trace is not None:
                self.trace.append((a, self._mark, time.perf_counter()))
        self.sends.finish()
        self.sends, self.last_sends, self._micro = None, self.sends, []
        self._sides.clear()
        return ctx.total

    @torch.no_grad()
    def forward_only(self, ctx: StepContext) -> list[torch.Tensor]:
        """Forward, micro-batch by micro-batch through every chunk; the last stage's outputs.
        Activations travel point to point to the next stage; nothing travels back."""
        outs = []
        for x, y in ctx.micro:
            self._micro = [(x, y)]  # every message of this micro-batch is number 0
            with ctx.autocast():
                side = self.desc.side_inputs(self.model, x)
            for chunk in self.chunks:
                inp = None if chunk.stage == 0 else self._recv((ACT, chunk.stage, 0))
                with ctx.autocast():
                    out = self.run_chunk(chunk, inp, x, side)
                if chunk.last:
                    outs.append(out)
                else:
                    self._send(out, (ACT, chunk.stage + 1, 0))
        self._wait_sends()
        self._micro = []
        return outs


def _drop_data(out: torch.Tensor) -> None:
    """Free a sent stage output's data, keeping its autograd graph (Megatron-LM's
    deallocate_output_tensor). Only where backward cannot need it: the output of an addition (a
    block's residual add, the embedding sum), which saves nothing. The tensor keeps its shape over
    one element, so ``backward(out, grad)`` still checks shapes; the send holds the real data."""
    if out.grad_fn is not None and out._base is None and type(out.grad_fn).__name__ == "AddBackward0":
        out.data = torch.empty(1, dtype=out.dtype, device=out.device).expand(out.shape)
