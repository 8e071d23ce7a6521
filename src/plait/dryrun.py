"""``plait train --dry-run``: per-rank model-state bytes of a layout, built on the meta device.

Every rank builds the model on ``torch.device("meta")`` (shapes, no storage) and applies the same
``parallelize()`` as training, so tensor shards, pipeline stages and ZeRO slices are exactly the
real ones; nothing is allocated and no step runs. Adam's two moments are counted at the size of
the parameters the optimizer updates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import RunConfig, diloco_shards
from .topology import Topology, build_groups
from .train.metrics import tensor_bytes
from .train.trainer import build_parallel


def dry_run_worker(cfg: RunConfig) -> dict:
    """This rank's coordinates and model-state bytes (collective: builds the process groups)."""
    groups = build_groups(Topology.of(cfg.parallel), "cpu", shards=diloco_shards(cfg.diloco, cfg.parallel))
    pm, _ = build_parallel(cfg, groups, torch.device("meta"))
    held = pm.memory()
    params, grads = held["params"], held["steady_grads"]
    stepped = [t for group in pm.param_groups(0.0) for t in group["params"]]
    optimizer = 2 * tensor_bytes(stepped)  # AdamW: exp_avg and exp_avg_sq
    c = groups.coord
    return {"rank": dist.get_rank(), "pp_rank": c.pp_rank, "dp_rank": c.dp_rank, "tp_rank": c.tp_rank,
            "params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def format_rows(rows: list[dict]) -> str:
    head = (f"{'rank':>4} {'pp':>3} {'dp':>3} {'tp':>3} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} "
            f"{'total MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['pp_rank']:>3} {r['dp_rank']:>3} {r['tp_rank']:>3} "
                     + " ".join(f"{r[k] / 2**20:>{w}.2f}" for k, w in
                                (("params", 10), ("grads", 9), ("optimizer", 9), ("total", 9))))
    return "\n".join(lines)
