"""One-process references for the data-parallel strands whose result is not plain training's.

DiLoCo's replicas drift apart between syncs, so a DiLoCo run equals, not one process training the
global batch, but ``dp`` models trained one after another in one process, each on its share of
every global batch with its own AdamW, and merged as DiLoCo merges them. :func:`diloco_worker`
is that reference, written without the strand's code (only the wire format's rounding,
``diloco.quantized_mean``, is shared), so that ``plait verify`` and the tests check the strand's
schedule, exchange and merge against it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import comm
from .config import RunConfig
from .parallel.diloco import OuterSGD, quantized_mean, split_by_bytes
from .seeds import seed_for
from .train.data import Sampler, load_corpus
from .train.trainer import RunOptions, Trainer, TrainResult


def diloco_worker(cfg: RunConfig, opts: RunOptions) -> TrainResult:
    """DiLoCo over its replicas (``diloco.replicas``, else ``cfg.parallel.dp``) in this one process
    (the whole model in each, trained on the replica's share of every global batch);
    returns the mean loss over replicas at every step and replica 0's final parameters."""
    d, t = cfg.diloco, cfg.train
    dp = d.replicas or cfg.parallel.dp  # replicas (of dp / replicas ranks each: one process trains the same)
    one = replace(cfg, parallel=replace(cfg.parallel, dp=1, tp=1, pp=1, zero=0, sequence_parallel=False,
                                        schedule="1f1b", virtual_stages=1, microbatches=0, stage_layers=()),
                  train=replace(t, global_batch=t.global_batch // dp), diloco=None)
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    device = comm.pick_device()
    replicas = []
    for r in range(dp):
        rep = Trainer(one, corpus, device)
        rep.sampler = Sampler(corpus.train, cfg.model.seq_len, t.global_batch, seed_for(t.seed, "data"), r, dp,
                              rep.masking)
        replicas.append(rep)
    frags = [split_by_bytes([p for p in rep.model.parameters() if p.requires_grad], d.fragments) for rep in replicas]
    outer = [_flat(ps) for ps in frags[0]]
    sgd = [OuterSGD([o], lr=d.outer_lr, momentum=d.outer_momentum, ramp=d.momentum_ramp) for o in outer]
    delay = 1 if d.fragments > 1 else 0
    pending: dict[int, tuple] = {}
    result = TrainResult()

    def merge(f: int) -> None:
        mean, at_start = pending.pop(f)
        outer[f].grad = mean
        sgd[f].step()
        for r in range(dp):
            _assign(frags[r][f], outer[f] + (_flat(frags[r][f]) - at_start[r]))

    for step in range(t.steps):
        result.losses.append(sum(rep.step(step)["loss"] for rep in replicas) / dp)
        done = step + 1
        for f in sorted(pending) if delay else ():
            merge(f)
        for f in range(d.fragments):
            if frags[0][f] and done % d.inner_steps == (f + 1) * d.inner_steps // d.fragments % d.inner_steps:
                locals_ = [_flat(frags[r][f]) for r in range(dp)]
                pending[f] = (quantized_mean([outer[f] - loc for loc in locals_], d.quantize), locals_)
                if not delay or done == t.steps:
                    merge(f)
        if done == t.steps:
            for f in sorted(pending):
                merge(f)
    if opts.keep_params:
        result.params = {n: p.detach().cpu().clone() for n, p in replicas[0].model.named_parameters()}
    return result


def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def _assign(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    for p, v in zip(params, comm.views_of(params, flat)):
        p.data.copy_(v)
