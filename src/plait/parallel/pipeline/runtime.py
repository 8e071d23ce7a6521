"""One interpreter for every schedule: it executes a rank's action list with point-to-point transfers.

Per action on global stage s (this rank's chunk c, s = c * pp + pp_rank):

- F: receive the activation of stage s-1 (unless s = 0), run the chunk, send the output to stage
  s+1, or on the last stage compute the micro-batch's loss.
- B: receive the output gradient from stage s+1 (unless last), back-propagate, send the input
  gradient to stage s-1.
- I / W (zero bubble): I back-propagates to the input only (``autograd.grad``, graph kept) and sends
  the input gradient; W later back-propagates to the parameters (``inputs=`` the chunk's
  parameters). W walks the chunk's graph again, so it costs about a whole backward here.

Transfers are ``isend``/``irecv`` over the default group with a tag per (direction, receiving
stage), so messages of different kinds never match each other (gloo honours tags). Receives are
posted one action ahead and block only when their data is needed. A sent tensor is held only until
the schedule proves it received (``sends.py``), and a sent stage output keeps only its autograd
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

from .schedules import Action, Schedule
from .sends import ACT, GRAD, SendTracker


@dataclass(frozen=True)
class Chunk:
    stage: int
    blocks: tuple[str, ...]  # keys of the model's ``blocks`` ModuleDict
    first: bool
    last: bool


@dataclass
class _Live:
    inp: torch.Tensor | None = None  # received activation (requires grad), None on stage 0
    out: torch.Tensor | None = None  # chunk output, or the scaled loss on the last stage
    grad: torch.Tensor | None = None  # output gradient, kept from I for W


@dataclass
class StepContext:
    """What one step's actions share: the micro-batches and how to run them."""

    micro: list  # [(tokens, targets)], this dp rank's micro-batches
    loss_fn: Callable  # (logits, targets) -> mean loss of the micro-batch
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

    def __init__(self, model: nn.Module, chunks: list[Chunk], schedule: Schedule, pp: int, pp_rank: int,
                 stage_rank: Callable[[int], int], act_shape: tuple[int, ...], dtype: torch.dtype):
        self.model, self.chunks, self.schedule, self.pp, self.pp_rank = model, chunks, schedule, pp, pp_rank
        self.stage_rank = stage_rank  # global stage -> global rank of this (dp, tp) pipeline
        self.act_shape, self.dtype = act_shape, dtype  # (micro_batch, seq, hidden) between stages
        self.num_stages = pp * len(chunks)
        self.device = next(model.parameters()).device
        self.stage_sizes: list[int] = []  # blocks per global stage (set by apply_pipeline)
        self.trace: list[tuple[Action, float, float]] | None = None  # (action, start, end) when recording
        self._mark = 0.0
        self._sends: list = []  # sends outside a training step (forward only), waited at its end
        self.sends: SendTracker | None = None  # the training step's sends (kept for inspection)
        self._posted: dict[tuple[int, int, int], tuple] = {}  # receive posted ahead: (from, at, kind)
        self._live: dict[tuple[int, int], _Live] = {}

    # ---------------------------------------------------------------- transfers

    def _send(self, t: torch.Tensor, to_stage: int, kind: int, mb: int | None = None) -> None:
        t = t.detach().contiguous()
        work = dist.isend(t, self.stage_rank(to_stage), tag=kind * self.num_stages + to_stage)
        if mb is not None and self.sends is not None:
            self.sends.sent(work, t, to_stage, kind, mb)
        else:
            self._sends.append((work, t))

    def _post_recv(self, from_stage: int, at_stage: int, kind: int, rows: int | None = None):
        shape = (rows or self.act_shape[0], *self.act_shape[1:])
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        return dist.irecv(buf, self.stage_rank(from_stage), tag=kind * self.num_stages + at_stage), buf

    def _recv(self, from_stage: int, at_stage: int, kind: int, rows: int | None = None,
              mb: int | None = None) -> torch.Tensor:
        """The next message of this kind into this stage: posted early by ``_prefetch``, or now."""
        key = (from_stage, at_stage, kind)
        work, buf = self._posted.pop(key) if key in self._posted else self._post_recv(*key, rows)
        work.wait()
        if mb is not None and self.sends is not None:
            self.sends.received(from_stage, kind, mb)
        self._mark = time.perf_counter()  # the action's compute starts once its input is here
        return buf

    def _needs_recv(self, a: Action) -> tuple[int, int, int] | None:
        stage = self.chunks[a.chunk].stage
        if a.op == "F" and stage > 0:
            return stage - 1, stage, ACT
        if a.op in ("B", "I") and stage < self.num_stages - 1:
            return stage + 1, stage, GRAD
        return None

    def _prefetch(self, a: Action) -> None:
        """Post the receive that action ``a`` will need, so the transfer overlaps this compute.
        Receives are posted in action order, so each tag's messages still match in order."""
        key = self._needs_recv(a)
        if key is not None and key not in self._posted:
            self._posted[key] = self._post_recv(*key)

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ---------------------------------------------------------------- compute

    def run_chunk(self, chunk: Chunk, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if chunk.first:
            x = m.embed(x)  # tokens (b, S) -> (b, S, H)
        for key in chunk.blocks:
            x = m.blocks[key](x)
        return m.head(x) if chunk.last else x  # logits (b, S, V[/tp]) on the last stage

    def _forward(self, a: Action, ctx: StepContext) -> None:
        chunk = self.chunks[a.chunk]
        x, y = ctx.micro[a.mb]
        inp = None if chunk.stage == 0 else self._recv(chunk.stage - 1, chunk.stage, ACT, mb=a.mb).requires_grad_()
        with ctx.measure(a), ctx.autocast():
            out = self.run_chunk(chunk, x if inp is None else inp)
            if chunk.last:
                loss = ctx.loss_fn(out, y)
                ctx.total += loss.detach()
                out = loss / len(ctx.micro)
        if not chunk.last:
            self._send(out, chunk.stage + 1, ACT, a.mb)
            _drop_data(out)
        self._live[(a.mb, a.chunk)] = _Live(inp=inp, out=out)

    def _out_grad(self, chunk: Chunk, mb: int) -> torch.Tensor | None:
        return None if chunk.last else self._recv(chunk.stage + 1, chunk.stage, GRAD, mb=mb)

    def _backward(self, a: Action, ctx: StepContext) -> None:
        chunk, live = self.chunks[a.chunk], self._live.pop((a.mb, a.chunk))
        grad = self._out_grad(chunk, a.mb)
        torch.autograd.backward(live.out, grad)
        if live.inp is not None:
            self._send(live.inp.grad, chunk.stage - 1, GRAD, a.mb)
        ctx.release(a)

    def _input_grad(self, a: Action, ctx: StepContext) -> None:
        chunk, live = self.chunks[a.chunk], self._live[(a.mb, a.chunk)]
        live.grad = self._out_grad(chunk, a.mb)
        if live.inp is not None:
            (g,) = torch.autograd.grad(live.out, live.inp, live.grad, retain_graph=True)
            self._send(g, chunk.stage - 1, GRAD, a.mb)

    def _weight_grad(self, a: Action, ctx: StepContext) -> None:
        live = self._live.pop((a.mb, a.chunk))
        params = [p for p in self._chunk_params(a.chunk) if p.requires_grad]
        torch.autograd.backward(live.out, live.grad, inputs=params)
        ctx.release(a)

    def _chunk_params(self, c: int) -> list[nn.Parameter]:
        chunk, m = self.chunks[c], self.model
        mods = [m.blocks[k] for k in chunk.blocks]
        mods += [m.tok_emb, m.pos_emb] if chunk.first else []
        mods += [m.norm, m.lm_head] if chunk.last else []
        return [p for mod in mods if mod is not None for p in mod.parameters()]

    # ---------------------------------------------------------------- steps

    def train_step(self, ctx: StepContext) -> torch.Tensor:
        """Run this rank's schedule over ``ctx.micro``; the mean loss on the last stage, else 0."""
        m, v = len(ctx.micro), len(self.chunks)
        acts = self.schedule.fn(self.pp, m, v, self.pp_rank)
        self.sends = SendTracker(lambda r: self.schedule.fn(self.pp, m, v, r), self.pp)
        final = {a.chunk: i for i, a in enumerate(acts) if a.op in ("B", "W")}  # each chunk's last backward
        run = {"F": self._forward, "B": self._backward, "I": self._input_grad, "W": self._weight_grad}
        for i, a in enumerate(acts):
            self._mark = time.perf_counter()  # the action's work starts now, or once its input arrives (_recv)
            if i + 1 < len(acts):
                self._prefetch(acts[i + 1])
            sync = contextlib.nullcontext() if i in final.values() else ctx.no_sync()
            with sync:
                run[a.op](a, ctx)
            if self.trace is not None:
                self.trace.append((a, self._mark, time.perf_counter()))
        self.sends.finish()
        return ctx.total / len(ctx.micro)

    @torch.no_grad()
    def forward_only(self, ctx: StepContext) -> list[torch.Tensor]:
        """Forward, micro-batch by micro-batch through every chunk; the last stage's outputs."""
        outs = []
        for x, _ in ctx.micro:
            for chunk in self.chunks:
                inp = None if chunk.stage == 0 else self._recv(chunk.stage - 1, chunk.stage, ACT, len(x))
                with ctx.autocast():
                    out = self.run_chunk(chunk, x if inp is None else inp)
                if chunk.last:
                    outs.append(out)
                else:
                    self._send(out, chunk.stage + 1, ACT)
        self._wait_sends()
        return outs


def _drop_data(out: torch.Tensor) -> None:
    """Free a sent stage output's data, keeping its autograd graph (Megatron-LM's
    deallocate_output_tensor). Only where backward cannot need it: the output of an addition (a
    block's residual add, the embedding sum), which saves nothing. The tensor keeps its shape over
    one element, so ``backward(out, grad)`` still checks shapes; the send holds the real data."""
    if out.grad_fn is not None and out._base is None and type(out.grad_fn).__name__ == "AddBackward0":
        out.data = torch.empty(1, dtype=out.dtype, device=out.device).expand(out.shape)
