"""Side-by-side benchmarks against PyTorch's own counterparts, in the same run.

Each benchmark builds plait's component and PyTorch's twin on the same model (same seed), the
same batches and the same processes, one thread each. The two take turns step by step (ours,
then torch's, then ours...) so that drifts in machine load hit both alike; we report the median
of the measured steps after a warm-up.

- ``dp``: plait's bucketed data parallel vs ``DistributedDataParallel``.
- ``tp``: plait's tensor parallel (explicit f/g collectives) vs DTensor's ``parallelize_module``
  (ColwiseParallel / RowwiseParallel, SequenceParallel when sequence parallel is on, loss_parallel).
- ``pp``: plait's pipeline runtime vs ``torch.distributed.pipelining``'s Schedule1F1B on the same
  stages (``--set parallel.schedule=gpipe|interleaved``: ScheduleGPipe, ScheduleInterleaved1F1B).
- ``zero``: plait's ZeRO-1/2 vs ``ZeroRedundancyOptimizer`` (PyTorch's ZeRO-1) over DDP, with the
  model-state bytes per rank (parameters, gradients, optimizer moments) of each.
- ``diloco``: plait's DiLoCo and streaming DiLoCo vs torchft's ``DiLoCo`` (``diloco_bench.py``; torchft is
  the ``bench`` extra), windows of H steps in turn, with validation losses and bytes sent.
- ``generate``: not a race against PyTorch: tokens/s of plait's KV-cache sampler against its uncached
  one (the reference), one process, 1 and 8 prompts (``generate.py: bench_worker``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import comm
from .checkpoint.bench import ckpt_worker as _ckpt_worker
from .checkpoint.bench import format_ckpt
from .config import RunConfig, diloco_shards, microbatches
from .diloco_bench import DEFAULTS as DILOCO_DEFAULTS
from .diloco_bench import ITERS as DILOCO_ITERS
from .diloco_bench import check_diloco, diloco_worker, format_diloco
from .errors import ConfigError
from .generate import bench_worker as _generate_worker
from .generate import format_bench
from .launch import run_local
from .models import ModelDescription, num_params
from .models.description import cross_entropy, param_owner, within
from .seeds import seed_for
from .topology import Topology, build_groups
from .train.data import Sampler, load_corpus
from .train.metrics import optimizer_bytes, tensor_bytes
from .train.optim import build_optimizer, plain_groups
from .train.trainer import build_parallel, fresh_model


@dataclass
class Contender:
    """One side of a race: how to run a training step of its model."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable  # (logits, targets) -> scalar loss
    finish: Callable = lambda: None  # after the last backward (gradient sync)
    no_sync: Callable = contextlib.nullcontext  # for accumulation micro-steps
    zero_grad: Callable | None = None
    around: Callable = contextlib.nullcontext  # context for forward and backward (loss_parallel)
    step: Callable | None = None  # runs forward and backward of all micro-batches itself (pipelines)
    after: Callable = lambda: None  # after the optimizer step (ZeRO's parameter all-gather)


def _timed_step(c: Contender, micro: list) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    if c.step is not None:
        c.step(micro)
    else:
        for i, (x, y) in enumerate(micro):
            with c.no_sync() if i < len(micro) - 1 else contextlib.nullcontext(), c.around():
                (c.loss(c.model(x), y) / len(micro)).backward()
    c.finish()
    c.optimizer.step()
    c.after()
    (c.zero_grad or c.optimizer.zero_grad)()  # torch's side: its default, set_to_none=True
    return time.perf_counter() - t0


def _race(cfg: RunConfig, sampler: Sampler, device, ours: Contender, theirs: Contender,
          iters: int, warmup: int) -> dict[str, list[float]]:
    times = {"ours": [], "torch": []}
    mb = cfg.train.micro_batch
    for it in range(warmup + iters):
        x, y = sampler.batch(it)
        micro = [(x[i:i + mb].to(device), y[i:i + mb].to(device)) for i in range(0, len(x), mb)]
        t_ours, t_torch = _timed_step(ours, micro), _timed_step(theirs, micro)
        if it >= warmup:
            times["ours"].append(t_ours)
            times["torch"].append(t_torch)
    return times


def _summary(cfg: RunConfig, times: dict, baseline: str, params: int) -> dict | None:
    if dist.get_rank() != 0:
        return None
    tokens = cfg.train.global_batch * cfg.model.seq_len
    ours, theirs = tokens / statistics.median(times["ours"]), tokens / statistics.median(times["torch"])
    p = cfg.parallel
    return {
        "ours_tokens_per_s": round(ours, 1), "torch_tokens_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 4), "baseline": baseline,
        "layout": f"dp={p.dp},tp={p.tp},pp={p.pp}" + (",sequence_parallel=true" if p.sequence_parallel else ""),
        "flavour": cfg.model.builder or cfg.model.flavour, "params": params, "steps_measured": len(times["ours"]),
        "ours_step_s": [round(t, 4) for t in times["ours"]], "torch_step_s": [round(t, 4) for t in times["torch"]],
    }


def _setup(cfg: RunConfig):
    device = comm.pick_device()
    groups = build_groups(Topology.of(cfg.parallel), device.type, shards=diloco_shards(cfg.diloco, cfg.parallel))
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    sampler = Sampler(corpus.train, cfg.model.seq_len, cfg.train.global_batch, seed_for(cfg.train.seed, "data"),
                      groups.coord.dp_rank, cfg.parallel.dp)
    return device, groups, sampler


def _adamw(params, cfg: RunConfig) -> torch.optim.AdamW:
    """The torch side's optimizer: plait's AdamW settings over an unsplit model's parameters."""
    return build_optimizer(plain_groups(params, cfg.train.weight_decay), cfg.train)


def _plait(cfg: RunConfig, groups, device) -> Contender:
    """plait's side: the model as ``parallelize`` builds it for training, stepped as the trainer does."""
    pm, _ = build_parallel(cfg, groups, device)
    opt = build_optimizer(pm.param_groups(cfg.train.weight_decay), cfg.train)
    c = Contender(pm.module, opt, pm.loss, pm.finish_grads, zero_grad=pm.zero_grad, step=pm.forward_backward,
                  after=pm.after_step)

    def state_bytes() -> int:
        held = pm.memory()
        return held["params"] + held["grads"] + optimizer_bytes(opt)

    c.state_bytes = state_bytes
    return c


def _model_params(cfg: RunConfig) -> int:
    """Parameters of the whole model, counted on the meta device (nothing allocated)."""
    return num_params(fresh_model(cfg, torch.device("meta"))[0])


def _ce(logits, y):
    return cross_entropy(logits, y)


def _dp_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    device, groups, sampler = _setup(cfg)
    ours = _plait(cfg, groups, device)
    ddp = DDP(fresh_model(cfg, device)[0], process_group=groups.dp, gradient_as_bucket_view=True)
    theirs = Contender(ddp, _adamw(ddp.parameters(), cfg), _ce, no_sync=ddp.no_sync)
    times = _race(cfg, sampler, device, ours, theirs, iters, warmup)
    return _summary(cfg, times, "torch DistributedDataParallel", num_params(ours.model))  # dp: whole model


def dtensor_plan(model: nn.Module, desc: ModelDescription, sequence_parallel: bool) -> dict:
    """The model's tensor-parallel plan in DTensor's styles (torchtitan's mapping): column ->
    ColwiseParallel, row -> RowwiseParallel, the vocabulary layers as Rowwise / Colwise over the
    vocabulary, and under sequence parallel SequenceParallel on the blocks' and the output stage's
    remaining modules with parameters (the norms) and a re-layout at each region's input."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    seq = Shard(1) if sequence_parallel else Replicate()
    prepare = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    styles = {"column": ColwiseParallel(), "row": RowwiseParallel(output_layouts=seq),
              "vocab_embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
              "vocab_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
              "region": prepare if sequence_parallel else None}
    plan = {pattern: styles[style] for pattern, style in desc.tp.styles.items() if styles[style] is not None}
    if sequence_parallel:
        owner = param_owner(desc)
        styled = [n for n, _ in model.named_modules() if desc.tp.style_of(n) not in (None, "region")]
        for name, module in model.named_modules():
            direct = [f"{name}.{k}" for k, _ in module.named_parameters(recurse=False)]
            if direct and owner(direct[0]) in ("block", "output") and not within(name, styled):
                plan[name] = SequenceParallel()
    return plan


class _Split:
    """AdamW for DTensor parameters and AdamW for plain ones: foreach kernels cannot mix them
    (without sequence parallel the norms stay plain tensors)."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        parts = [[p for p in params if isinstance(p, DTensor) == want] for want in (True, False)]
        self.optimizers = [_adamw(part, cfg) for part in parts if part]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _tp_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    device, groups, sampler = _setup(cfg)
    ours = _plait(cfg, groups, device)
    model, desc = fresh_model(cfg, device)
    model = parallelize_module(model, groups.mesh["tp"], dtensor_plan(model, desc, cfg.parallel.sequence_parallel))
    theirs = Contender(model, _Split(model, cfg), _ce, around=loss_parallel)
    times = _race(cfg, sampler, device, ours, theirs, iters, warmup)
    return _summary(cfg, times, "torch DTensor tensor parallel", _model_params(cfg))


class _TorchStage(nn.Module):
    """One of this rank's chunks as a module for torch.distributed.pipelining (the same split as
    ours); it owns only the chunk's modules, so torch scales each gradient once."""

    def __init__(self, modules: list[nn.Module], run):
        super().__init__()
        self.parts, self._run = nn.ModuleList(modules), run

    def forward(self, x):
        return self._run(x)


TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


def _pp_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    import torch.distributed.pipelining as tp_pipe

    device, groups, sampler = _setup(cfg)
    ours = _plait(cfg, groups, device)
    split, _ = build_parallel(replace(cfg, parallel=replace(cfg.parallel, zero=0)), groups, device)  # same stages
    p = cfg.parallel
    stages = [tp_pipe.PipelineStage(_TorchStage(modules, forward), stage, p.pp * p.virtual_stages, device,
                                    group=groups.pp) for stage, modules, forward in split.stages()]
    name = TORCH_SCHEDULES[p.schedule]
    cls = getattr(tp_pipe, name)
    schedule = cls(stages, microbatches(cfg), loss_fn=_ce) if len(stages) > 1 else \
        cls(stages[0], microbatches(cfg), loss_fn=_ce)
    opt = _adamw(split.module.parameters(), cfg)
    first, last = stages[0].is_first, stages[-1].is_last
    theirs = Contender(split.module, opt, _ce, split.sum_tied_grads,  # the same work after backward as ours
                       step=lambda micro: _torch_pipeline_step(schedule, first, last, micro))
    times = _race(cfg, sampler, device, ours, theirs, iters, warmup)
    result = _summary(cfg, times, f"torch.distributed.pipelining {name}", _model_params(cfg))
    if result is not None:
        result.update(schedule=p.schedule, virtual_stages=p.virtual_stages)
    return result


def _torch_pipeline_step(schedule, first: bool, last: bool, micro: list) -> None:
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    kwargs = {"target": y} if last else {}
    if first:
        schedule.step(x, **kwargs)
    else:
        schedule.step(**kwargs)


def _fsdp_contender(cfg: RunConfig, groups, device) -> tuple[Contender, Callable[[], int]]:
    """PyTorch's ZeRO-3: fully_shard on every block, then on the whole model, over the dp mesh."""
    from torch.distributed.fsdp import fully_shard

    model, desc = fresh_model(cfg, device)
    for block in desc.block_list(model):
        fully_shard(block, mesh=groups.mesh["dp"])
    fully_shard(model, mesh=groups.mesh["dp"])
    opt = _adamw(model.parameters(), cfg)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def states() -> int:  # parameters, their sharded gradients (alive from backward to zero_grad), moments
        return 2 * tensor_bytes(model.parameters()) + optimizer_bytes(opt)

    return Contender(model, opt, _ce, no_sync=no_sync), states


def _zero_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    device, groups, sampler = _setup(cfg)
    ours = _plait(cfg, groups, device)
    if cfg.parallel.zero == 3:
        theirs, torch_states = _fsdp_contender(cfg, groups, device)
        baseline = "torch fully_shard (FSDP2)"
    else:
        ddp = DDP(fresh_model(cfg, device)[0], process_group=groups.dp, gradient_as_bucket_view=True)
        t, params = cfg.train, list(ddp.parameters())
        zro = ZeroRedundancyOptimizer(plain_groups(params, t.weight_decay), optimizer_class=torch.optim.AdamW,
                                      process_group=groups.dp, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        theirs = Contender(ddp, zro, _ce, no_sync=ddp.no_sync)
        baseline = "torch ZeroRedundancyOptimizer + DDP"

        def torch_states() -> int:
            return 2 * tensor_bytes(params) + optimizer_bytes(zro.optim)  # params, gradients, moments
    times = _race(cfg, sampler, device, ours, theirs, iters, warmup)
    ours_bytes = ours.state_bytes()
    torch_bytes = torch_states()
    out = _summary(cfg, times, baseline, _model_params(cfg))
    if out is not None:
        out.update(zero=cfg.parallel.zero, ours_state_bytes=ours_bytes, torch_state_bytes=torch_bytes)
    return out


BENCHES = {
    # A model where gradient traffic matters: 4.8M parameters, 19 MB of fp32 gradients a step.
    "dp": ({"model.layers": "6", "model.hidden": "256", "model.heads": "8", "model.seq_len": "128",
            "train.global_batch": "16", "train.micro_batch": "8"}, _dp_worker),
    # ZeRO-3 on the dp bench model against fully_shard; --zero 1 / 2 against ZeroRedundancyOptimizer + DDP.
    "zero": ({"model.layers": "6", "model.hidden": "256", "model.heads": "8", "model.seq_len": "128",
              "train.global_batch": "16", "train.micro_batch": "8", "parallel.zero": "3"}, _zero_worker),
    # 8 layers over 2 stages, 8 micro-batches of 4 sequences: 1F1B's bubble is 1/9 of the step.
    "pp": ({"model.layers": "8", "model.hidden": "256", "model.heads": "8", "model.seq_len": "128",
            "train.global_batch": "32", "train.micro_batch": "4", "parallel.pp": "2",
            "parallel.schedule": "1f1b"}, _pp_worker),
    # 10.8M parameters; activations of 8 x 128 tokens cross the tp group twice a layer each way.
    "tp": ({"model.flavour": "llama", "model.layers": "6", "model.hidden": "384", "model.heads": "6",
            "model.seq_len": "128", "train.global_batch": "8", "train.micro_batch": "8",
            "parallel.tp": "2"}, _tp_worker),
    # A model whose synchronous save (300 MB of parameters and Adam moments) outlasts a step.
    "ckpt": ({"model.layers": "8", "model.hidden": "512", "model.heads": "8", "model.seq_len": "64",
              "train.global_batch": "2", "train.micro_batch": "2", "checkpoint.every": "8"}, _ckpt_worker),
    # The default model (random init), one process: the KV-cache sampler vs the uncached one.
    "generate": ({"parallel.dp": "1"}, _generate_worker),
    # The default model (1.85M parameters), H=8; the streaming pair in 4 fragments, plait's in fp8.
    "diloco": (DILOCO_DEFAULTS, diloco_worker),
}


ITERS = {"generate": 3, "diloco": DILOCO_ITERS}  # measured runs / steps when --iters is not given (else 8 steps)


# What each race compares, as (field, test on its value, what is valid): other layouts would be
# labelled as a race they are not.
REQUIRES = {
    "ckpt": [],
    "dp": [("parallel.tp", lambda v: v == 1, "1"), ("parallel.pp", lambda v: v == 1, "1"),
           ("parallel.zero", lambda v: v == 0, "0 (plait bench zero races ZeRO)")],
    "zero": [("parallel.zero", lambda v: v > 0, "1, 2 or 3 (plait bench dp races plain data parallel)")],
    "tp": [("parallel.tp", lambda v: v > 1, "more than 1"), ("parallel.pp", lambda v: v == 1, "1")],
    "generate": [("parallel.tp", lambda v: v == 1, "1 (it runs one process)"),
                 ("parallel.pp", lambda v: v == 1, "1 (it runs one process)"),
                 ("model.builder", lambda v: not v, "unset (it samples from plait's own GPT, whose attention "
                  "takes a KV cache)")],
    "diloco": [("parallel.tp", lambda v: v == 1, "1 (torchft's DiLoCo here holds whole replicas)"),
               ("parallel.pp", lambda v: v == 1, "1 (torchft's DiLoCo here holds whole replicas)")],
    "pp": [("parallel.pp", lambda v: v > 1, "more than 1"),
           ("parallel.schedule", lambda v: v in TORCH_SCHEDULES,
            f"one of {', '.join(TORCH_SCHEDULES)}: torch has no ZB-H1 with one stage per rank")],
}


def run_bench(what: str, cfg: RunConfig, nproc: int, iters: int | None = None, warmup: int = 3) -> dict:
    """Run benchmark ``what`` on ``nproc`` local processes; the result row of rank 0."""
    for field, ok, valid in REQUIRES[what]:
        section, key = field.split(".")
        value = getattr(getattr(cfg, section), key)
        if not ok(value):
            raise ConfigError(field, value, f"plait bench {what} needs {valid}")
    if what == "diloco":
        check_diloco(cfg)
    elif cfg.diloco is not None or cfg.ps is not None:  # the race would be labelled as one it is not
        key = "diloco.*" if cfg.diloco is not None else "ps.*"
        raise ConfigError(key, "given", f"plait bench {what} races its strand against PyTorch's; DiLoCo races "
                          "torchft's in plait bench diloco, and the parameter server in benchmarks/strands.py")
    iters = ITERS.get(what, 8) if iters is None else iters
    for field, value, least in (("--iters", iters, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise ConfigError(field, value, f"must be at least {least}")
    load_corpus(cfg.data, cfg.model.seq_len)
    worker = BENCHES[what][1]
    return run_local(worker, nproc, (cfg, iters, warmup), timeout_s=1800)[0]


def format_result(r: dict) -> str:
    if r.get("kind") == "ckpt":
        return format_ckpt(r)
    if r.get("kind") == "generate":
        return format_bench(r)
    if r.get("kind") == "diloco":
        return format_diloco(r)
    return (f"plait: {r['ours_tokens_per_s']:.0f} tokens/s   {r['baseline']}: {r['torch_tokens_per_s']:.0f} "
            f"tokens/s   ratio {r['ratio']:.3f}  ({r['layout']}, {r['flavour']}, {r['params'] / 1e6:.1f}M params, "
            f"median of {r['steps_measured']} steps)")

