"""What one update of staleness costs AdamW on the default task, without any server: two workers'
half-batch gradients applied in turn, each computed on the parameters ``--staleness`` updates old
(1: what an asynchronous parameter server with two equal workers does; 0: no asynchrony), at
half the step's learning rate, for the samples of ``--steps`` synchronous steps. With
``--lookahead`` a worker computes on the parameters it pulled moved on by ``staleness`` times their
last update (what ``ps.lookahead`` sends). Prints the validation loss (docs/strands.md compares it
with `plait train --set ps.mode=async`).

    .venv/bin/python benchmarks/stale_adam.py --staleness 1 [--lookahead]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from plait import config as C
from plait.seeds import seed_for
from plait.train.data import Sampler, load_corpus, val_batches
from plait.train.optim import build_optimizer, lr_at, plain_groups
from plait.train.trainer import fresh_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lookahead", action="store_true", help="pull the parameters moved on by the staleness")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = C.resolve(C.load(None, [f"train.steps={args.steps}"]), 1)
    t = cfg.train
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    model, _ = fresh_model(cfg, torch.device("cpu"))
    opt = build_optimizer(plain_groups(model.parameters(), t.weight_decay), t)
    data_seed = seed_for(t.seed, "data")
    shares = [Sampler(corpus.train, cfg.model.seq_len, t.global_batch, data_seed, r, 2) for r in (0, 1)]
    history, worker = [copy.deepcopy(model.state_dict())], copy.deepcopy(model)
    for k in range(2 * t.steps):
        worker.load_state_dict(pulled(history, args.staleness, args.lookahead))
        x, y = shares[k % 2].batch(k // 2)
        worker.zero_grad()
        F.cross_entropy(worker(x).flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(worker.parameters(), t.grad_clip)  # each worker clips its own
        for mine, theirs in zip(model.parameters(), worker.parameters()):
            mine.grad = theirs.grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr_at(k // 2, t) / 2  # a push is half a global batch
        opt.step()
        history = (history + [copy.deepcopy(model.state_dict())])[-(args.staleness + 2):]
    x, y = val_batches(corpus.val, cfg.model.seq_len, t.eval_batches * t.global_batch, 0, 1)
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x[i:i + 8]).flatten(0, 1), y[i:i + 8].flatten(), reduction="sum")
                    for i in range(0, len(x), 8))
    loss = float(total / y.numel())
    print(f"staleness {args.staleness}: validation loss {loss:.3f} after {args.steps} steps' samples")


def pulled(history: list[dict], staleness: int, lookahead: bool) -> dict:
    """The parameters ``staleness`` updates old; with ``lookahead``, moved on by ``staleness`` times
    the update that made them."""
    i = max(0, len(history) - 1 - staleness)
    if not (lookahead and staleness and i):
        return history[i]
    prev = history[i - 1]
    return {n: v + staleness * (v - prev[n]) if v.is_floating_point() else v for n, v in history[i].items()}


if __name__ == "__main__":
    main()
