"""The training loop, run on every rank: batch -> micro-batches -> backward -> sync -> update.

One optimizer step (``Trainer.step``) reads top to bottom:
1. this dp rank's share of the global batch, cut into micro-batches;
2. forward and backward of each, loss scaled by 1/micro-steps; gradients travel only after the
   last one (earlier ones run under ``no_sync``);
3. wait for the gradient all-reduce, clip by the global norm, AdamW step, zero the buckets.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from ..checkpoint import Checkpointer, restore
from ..config import RunConfig, diloco_shards, microbatches, servers, slow_worker, step_tokens, to_toml
from ..errors import ConfigError
from ..models import build, generate, num_params
from ..models.description import IGNORE, ModelDescription
from ..parallel.hybrid import ParallelModel, parallelize
from ..seeds import seed_for
from ..topology import Groups, Topology, build_groups, setup_logging
from .data import VOCAB, Corpus, Masking, Sampler, load_corpus, val_batches
from .metrics import ActivationMeter, MetricsWriter, optimizer_bytes
from .optim import build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)

RATE_WINDOW = 10  # steps over which an asynchronous worker's tokens_per_s is measured


@dataclass(frozen=True)
class RunOptions:
    """How to run, as opposed to what to train (that is the RunConfig)."""

    out: Path | None = None  # None: write nothing (verify, bench)
    progress: bool = True
    keep_params: bool = False  # return the final parameters (rank 0) for comparison
    sample_tokens: int = 0  # generate this many bytes at the end (rank 0)
    sample_prompt: str = "def "
    timeline_step: int = 0  # record this step's pipeline actions (1-based); 0: off
    resume: Path | None = None  # a checkpoint folder to continue from
    row_extra: dict = field(default_factory=dict)  # added to every metrics row (--layout auto: the predictions)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    params: dict[str, torch.Tensor] | None = None
    sample: str | None = None
    out: str | None = None
    timeline: dict | None = None  # measured vs simulated pipeline step, when recorded


def param_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float64 if cfg.train.dtype == "float64" else torch.float32


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default ("auto"), or when asked; None means plain precision."""
    if cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def fresh_model(cfg: RunConfig, device: torch.device, make=None, skip: tuple[str, ...] = ()
                ) -> tuple[nn.Module, ModelDescription]:
    """The model of ``cfg`` (or of ``make()``, which returns it and its description) and its
    description, the same on every rank (seeded), with ``model.init_from``'s weights (but those
    named from ``skip`` on), on ``device`` in the run's parameter dtype (on the meta device: shapes
    only, nothing allocated)."""
    torch.manual_seed(seed_for(cfg.train.seed, "init"))
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model, desc = make() if make is not None else build(cfg.model)
    if cfg.model.init_from and device.type != "meta":  # a Hugging Face folder's weights
        from ..models.hf import load_weights

        load_weights(model, cfg.model, cfg.model.init_from, skip)
    return model.to(device=device, dtype=param_dtype(cfg)), desc


def build_parallel(cfg: RunConfig, groups: Groups, device: torch.device) -> tuple[ParallelModel, int]:
    """A fresh model of ``cfg`` split by its layout (its description checked on a sample batch
    first, but on the meta device), and the whole model's parameter count."""
    model, desc = fresh_model(cfg, device)
    n = num_params(model)
    sample = None if device.type == "meta" else torch.zeros((1, cfg.model.seq_len), dtype=torch.long, device=device)
    pm = parallelize(model, desc, groups, cfg.parallel, seed=cfg.train.seed, tokens_per_step=step_tokens(cfg),
                     sample=sample, diloco=cfg.diloco, ps=cfg.ps, recompute=cfg.train.recompute)
    return pm, n


class Trainer:
    """Model, optimizer and data of one rank; ``step()`` is one optimizer step."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, device: torch.device, groups: Groups | None = None):
        p, t = cfg.parallel, cfg.train
        self.cfg, self.device = cfg, device
        self.groups = groups or build_groups(Topology.of(p), device.type, shards=diloco_shards(cfg.diloco, p))
        self.coord = self.groups.coord
        self.pm, self.model_params = build_parallel(cfg, self.groups, device)  # params: the whole model's
        self.model = self.pm.module
        self.optimizer = build_optimizer(self.pm.param_groups(t.weight_decay), t)
        torch.manual_seed(seed_for(t.seed, "dropout", dp_rank=self.coord.dp_rank, pp_rank=self.coord.pp_rank))
        self.corpus = corpus
        self.masking = masking(cfg, self.pm.desc)  # an encoder learns masked-language modelling
        self.sampler = Sampler(corpus.train, cfg.model.seq_len, t.global_batch, seed_for(t.seed, "data"),
                               self.coord.dp_rank, p.dp, self.masking)
        self.amp = autocast_dtype(cfg, device)
        self.meter = ActivationMeter(self.model)
        self.activation_peak = 0
        self.mem: dict[str, int] | None = None  # bytes by kind, counted once after the first step
        self.first_step = 0  # a resumed run's first step is the checkpoint's
        self.window: collections.deque = collections.deque(maxlen=RATE_WINDOW)  # (tokens, seconds) of steps
        slow = slow_worker(cfg.ps.slow_worker, p.dp) if cfg.ps is not None else None
        self.slowdown = slow[1] if slow is not None and slow[0] == self.coord.dp_rank else 1.0

    def _autocast(self):
        return autocast_context(self.device, self.amp)

    def _micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> list:
        mb = self.cfg.train.micro_batch  # (B/dp, S) -> [(micro_batch, S)], each in storage of its own
        return [(x[i:i + mb].to(self.device, copy=True), y[i:i + mb].to(self.device, copy=True))
                for i in range(0, len(x), mb)]

    def step(self, step: int) -> dict:
        """One optimizer step; returns the metrics row (loss averaged over dp)."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.cfg.train)
        set_lr(self.optimizer, lr)
        x, y, every = self.sampler.draw(step)
        micro = self._micro_batches(x, y)
        first = step == self.first_step  # the activations are measured on this process's first step
        # masked windows hold different numbers of targets: every target of the step weighs alike
        targets = (every, int((y != IGNORE).sum())) if self.masking is not None else None
        loss, grad_norm = self.pm.train_step(micro, self.optimizer, self.cfg.train.grad_clip, self._autocast,
                                             self.meter if first else None, self.slowdown, targets)
        if first:
            self.activation_peak = self.meter.peak
        if not self.pm.data.running(step + 1, self.cfg.train.steps):
            self.pm.flush()  # the run's last step: nothing may stay in flight
        dt = time.perf_counter() - t0
        tokens = self.pm.data.samples(self.cfg.train.global_batch) * self.cfg.model.seq_len
        self.window.append((tokens, dt))
        rate = tokens / dt
        if not self.pm.data.lockstep:  # a step sees 0, 1, 2... pushes applied: the rate over the last steps
            rate = sum(t for t, _ in self.window) / sum(s for _, s in self.window)
        if self.mem is None:  # the tensors do not change after the first step (its optimizer states included)
            self.mem = self.memory()
        mem = self.mem
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else sum(mem.values())
        return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate,
                "step_time_s": dt, "mem_peak_bytes": peak, **{f"mem_{k}_bytes": v for k, v in mem.items()},
                **self.sent(), **self.pm.data.metrics()}

    def sent(self) -> dict[str, int]:
        """What this rank sent since the last call (one step): ``comm_bytes``, the same as
        ``comm_peak_bytes`` (the most in one step of the row; a row is a step), and one
        ``comm_<strand>_bytes`` per strand that sent anything."""
        by_strand = self.pm.traffic.take()
        total = sum(by_strand.values())
        return {"comm_bytes": total, "comm_peak_bytes": total, **{f"comm_{k}_bytes": v for k, v in by_strand.items()}}

    def memory(self) -> dict[str, int]:
        """Bytes per rank by kind, counted from the tensors themselves."""
        held = self.pm.memory()
        return {"params": held["params"], "grads": held["grads"], "optimizer": optimizer_bytes(self.optimizer),
                "activations": self.activation_peak}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per token over a fixed set of windows, shared out over dp. Workers
        that do not go in lockstep share nothing: rank 0 evaluates every window (NaN elsewhere)."""
        t, p = self.cfg.train, self.cfg.parallel
        alone = not self.pm.data.lockstep
        if alone and self.groups.rank != 0:
            return float("nan")
        x, y = val_batches(self.corpus.val, self.cfg.model.seq_len, t.eval_batches * t.global_batch,
                           0 if alone else self.coord.dp_rank, 1 if alone else p.dp, self.masking)
        self.model.eval()
        total = float(self.pm.loss_sum(self._micro_batches(x, y), self._autocast))
        self.model.train()
        self.pm.traffic.take()  # evaluation's forward passes are not training's traffic
        count = max(int((y != IGNORE).sum()), 1)  # the tokens with a target (masked-language modelling: the masked)
        if alone:
            return total / count
        held = self.pm.holds_loss  # only the last pipeline stage has the loss
        return comm.weighted_mean(total if held else 0.0, count if held else 0.0, self.groups.world)



def masking(cfg: RunConfig, desc: ModelDescription) -> Masking | None:
    """How a masked-language model's batches are masked (None for next-token models): with the
    tokenizer's mask token, or byte 0, which text never holds."""
    if desc.objective != "masked":
        return None
    if not cfg.data.tokenizer:
        return Masking(0, VOCAB)
    from ..tokenizer import load_tokenizer, mask_id, vocab_size

    tok = load_tokenizer(cfg.data.tokenizer)
    mid = mask_id(tok)
    if mid is None:
        raise ConfigError("data.tokenizer", cfg.data.tokenizer, "has no [MASK] token, which masked-language "
                          "modelling (an encoder's training) needs")
    return Masking(mid, vocab_size(tok))


def train_worker(cfg: RunConfig, opts: RunOptions) -> TrainResult | None:
    """Everything one rank does for ``plait train`` (and for verify, without outputs)."""
    device = comm.pick_device()
    groups = build_groups(Topology.of(cfg.parallel), device.type, servers(cfg), diloco_shards(cfg.diloco, cfg.parallel))
    setup_logging(groups.prefix)
    if groups.is_server:
        from ..parallel.ps import ParameterServer

        ParameterServer(cfg, groups, optimizer=lambda g: build_optimizer(g, cfg.train),
                        lr=lambda step: lr_at(step, cfg.train), out=opts.out).run()
        return None
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    trainer = Trainer(cfg, corpus, device, groups)
    lead = groups.rank == 0
    start = _resume(trainer, opts.resume, lead) if opts.resume else 0  # a wrong checkpoint: one line, first
    if lead and opts.out:
        threads = torch.get_num_threads()
        log.info("model: %s, %.2fM parameters; layout dp=%d tp=%d pp=%d on %s (%d thread%s a process); %d steps",
                 cfg.model.builder or cfg.model.flavour, trainer.model_params / 1e6, cfg.parallel.dp,
                 cfg.parallel.tp, cfg.parallel.pp, device.type, threads, "s" if threads > 1 else "", cfg.train.steps)
    pipe = trainer.pm.pipeline_summary()
    if lead and opts.out and pipe is not None:
        log.info("pipeline: %s schedule, %d micro-batches a step, blocks per stage %s", pipe["schedule"],
                 microbatches(cfg), pipe["stage_sizes"])
    result = _loop(trainer, opts, lead, start)
    if opts.keep_params:
        result.params = trainer.pm.full_params()  # collective over tp
    if opts.sample_tokens and trainer.coord.dp_rank == 0 and trainer.pm.desc.objective == "next_token":
        result.sample = _sample(trainer, opts)
    return result if lead else None


def layout_of(cfg: RunConfig) -> dict:
    """The parallel layout as plain data (what a checkpoint records, to tell a resumed run whether
    its random streams still apply)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg.parallel)))


def _resume(trainer: Trainer, path: Path, lead: bool) -> int:
    """Load the checkpoint at ``path`` (any layout) and return its step. At the same layout every
    rank's random streams continue where they were; at another the dropout stream is re-seeded."""
    from ..checkpoint.store import manifest

    cfg, c = trainer.cfg, trainer.coord
    saved = manifest(path).get("layout", {})
    same = saved == layout_of(cfg)
    info = restore(path, trainer.pm, trainer.optimizer, same_layout=same)
    step = int(info["step"])
    world = trainer.groups.world
    if comm.weighted_mean(float(step), 1.0, world) != step or \
            comm.weighted_mean(float(step) ** 2, 1.0, world) != step ** 2:
        raise ConfigError("--out", str(path.parent.parent), "the ranks found different newest checkpoints (under "
                          "torchrun each looks itself): put --out on storage every rank sees alike")
    if not same:  # the ranks that drew these streams are gone: fresh ones, by the step
        seed = seed_for(cfg.train.seed, "dropout", dp_rank=c.dp_rank, pp_rank=c.pp_rank) + step
        torch.manual_seed(seed)
        if trainer.pm.tp is not None and trainer.pm.tp.rng is not None:
            trainer.pm.tp.rng.reseed(seed_for(cfg.train.seed, "tp", dp_rank=c.dp_rank, tp_rank=c.tp_rank,
                                              pp_rank=c.pp_rank) + step)
    trainer.first_step = step
    if lead:
        how = "at the same layout" if same else "resharded from " + ", ".join(
            f"{k}={saved.get(k)}" for k in ("dp", "tp", "pp", "zero", "virtual_stages") if k in saved)
        log.info("resumed from %s (step %d) %s", path, step, how)
    return step


def _loop(trainer: Trainer, opts: RunOptions, lead: bool, start: int = 0) -> TrainResult:
    cfg = trainer.cfg
    steps, every = cfg.train.steps, cfg.train.eval_every
    writer = MetricsWriter(opts.out, steps, opts.progress, cfg.train.log_every, start) if lead and opts.out else None
    ckpt = Checkpointer(opts.out / "checkpoints" if opts.out else None, cfg.checkpoint.every, cfg.checkpoint.keep,
                        cfg.checkpoint.async_, {"layout": layout_of(cfg), "config": to_toml(cfg)}, trainer.groups.world,
                        alone=not trainer.pm.data.lockstep)
    result = TrainResult(out=str(opts.out) if opts.out else None)
    evaluating = every > 0 and len(trainer.corpus.val) > cfg.model.seq_len
    if evaluating and start == 0:
        _record_val(trainer, writer, result, {"step": 0})
    if lead and start >= steps:
        log.info("the run is already at step %d of train.steps=%d: nothing to train", start, steps)
    data, step = trainer.pm.data, start
    while data.running(step, steps):  # asynchronous workers: until the server has used the samples
        recording = step + 1 == opts.timeline_step and trainer.pm.pipeline_summary() is not None
        if recording:
            trainer.pm.record_actions()
        row = {**trainer.step(step), **opts.row_extra}
        if recording:
            result.timeline = _timeline(trainer, opts, lead)
        result.losses.append(row["loss"])
        result.grad_norms.append(row["grad_norm"])
        step += 1
        last = not data.running(step, steps)  # between workers that do not go in lockstep, only the end
        if evaluating and (last or (data.lockstep and step % every == 0)):
            _record_val(trainer, writer, result, row)
        elif writer:
            writer.write(row)
        if ckpt.root is not None and (last or (data.lockstep and ckpt.due(step, steps))):
            ckpt.save(step, trainer.pm, trainer.optimizer, {})
    ckpt.wait()
    _report_traffic(trainer, writer, step - start)
    if writer:
        writer.close()
        from ..viz import plot_losses

        plot_losses(writer.rows, opts.out / "loss.png")
    return result


def _report_traffic(trainer: Trainer, writer: MetricsWriter | None, steps: int) -> None:
    """Say how much this rank, and the rank that sent most, sent over the run, by strand
    (collective: every rank's totals are gathered)."""
    totals = trainer.pm.traffic.totals()
    every: list = [sum(totals.values())]  # workers not in lockstep may have lost one of them: no collective
    if trainer.pm.data.lockstep:
        every = [None] * trainer.groups.topology.world
        dist.all_gather_object(every, sum(totals.values()), group=trainer.groups.world)
    if writer is None or steps <= 0:
        return
    peak = max((r.get("comm_peak_bytes", 0) for r in writer.rows[-steps:]), default=0)
    strands = ", ".join(f"{k} {_mb(v)}" for k, v in sorted(totals.items())) or "nothing"
    busiest = max(range(len(every)), key=every.__getitem__)
    writer.say(f"communication: rank 0 sent {_mb(sum(totals.values()))} in {steps} steps ({strands}); at most "
               f"{_mb(peak)} in one step; the busiest rank, {busiest}, sent {_mb(every[busiest])}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _timeline(trainer: Trainer, opts: RunOptions, lead: bool) -> dict | None:
    """Gather the recorded step over pp; rank 0 compares it with the simulator and draws both."""
    from ..parallel.pipeline.report import compare

    traces = trainer.pm.recorded_actions()
    if not lead:
        return None
    p = trainer.cfg.parallel
    report = compare(traces, trainer.pm.schedule_actions(microbatches(trainer.cfg)))
    real, replay, predicted = report.pop("timelines")
    if opts.out:
        from ..viz import plot_schedules

        (opts.out / "timeline.json").write_text(json.dumps(report, indent=1))
        plot_schedules([(f"measured step {opts.timeline_step} ({p.schedule})", real),
                        ("simulated: each action at its measured time", replay),
                        ("predicted: mean time of each action kind per stage", predicted)], opts.out / "timeline.png")
    return report


def _record_val(trainer: Trainer, writer: MetricsWriter | None, result: TrainResult, row: dict) -> None:
    val = trainer.evaluate()
    result.val_losses.append((row["step"], val))
    if writer:
        writer.write({**row, "val_loss": val})


def _sample(trainer: Trainer, opts: RunOptions) -> str:
    """``opts.sample_prompt`` and the text the model adds: bytes, or the run's ``data.tokenizer``'s ids."""
    from ..generate import decode, encode, run_tokenizer

    tok = run_tokenizer(trainer.cfg)
    if tok is None:
        ids = list(opts.sample_prompt.encode())
    else:
        try:
            ids = encode(opts.sample_prompt, trainer.cfg.model.vocab, "sample prompt", tok)
        except ConfigError:  # a tokenizer that makes nothing of the prompt: no sample rather than a failed run
            return ""
    prompt = torch.tensor(ids, dtype=torch.long, device=trainer.device)
    gen = torch.Generator().manual_seed(seed_for(trainer.cfg.train.seed, "sample"))
    p, seq = trainer.cfg.parallel, trainer.cfg.model.seq_len
    pad_to = seq if p.pp > 1 else p.tp if p.sequence_parallel else 1
    with trainer._autocast():
        out = generate(trainer.model, prompt, opts.sample_tokens, seq, generator=gen, forward=trainer.pm.full_logits,
                       pad_to=pad_to)
    return decode(out.tolist(), tok)  # bytes: below 256, as UTF-8


def write_config(cfg: RunConfig, out: Path) -> None:
    (out / "config.toml").write_text(to_toml(cfg))
