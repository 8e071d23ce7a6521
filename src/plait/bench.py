"""Side-by-side benchmarks against PyTorch's own counterparts, in the same run.

``bench_dp``: plait's bucketed data parallel against ``DistributedDataParallel`` on the same
model (same seed), the same batches and the same processes, one thread each. The two take turns
step by step (ours, then DDP, then ours...) so that drifts in machine load hit both alike; we
report the median of the measured steps after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import RunConfig
from .launch import run_local
from .models import build_model, num_params
from .parallel.data import DataParallel
from .topology import Topology, build_groups
from .train.data import Sampler, load_corpus
from .train.optim import build_optimizer

# A model where gradient traffic matters: 4.8M parameters, 19 MB of fp32 gradients a step.
BENCH_DEFAULTS = {
    "model.layers": "6", "model.hidden": "256", "model.heads": "8", "model.seq_len": "128",
    "train.global_batch": "16", "train.micro_batch": "8",
}


def _step(model, sync, opt, micro, no_sync) -> float:
    """One timed optimizer step; ``sync()`` waits for the gradient all-reduce (ours only)."""
    dist.barrier()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(micro):
        ctx = no_sync() if i < len(micro) - 1 else _Null()
        with ctx:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / len(micro)
            loss.backward()
    sync()
    opt.step()
    return time.perf_counter() - t0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bench_dp_worker(cfg: RunConfig, iters: int, warmup: int) -> dict | None:
    groups = build_groups(Topology(dp=cfg.parallel.dp), "cpu" if not torch.cuda.is_available() else "cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    sampler = Sampler(corpus.train, cfg.model.seq_len, cfg.train.global_batch, cfg.train.seed,
                      groups.coord.dp_rank, cfg.parallel.dp)
    torch.manual_seed(cfg.train.seed)
    ours_model = build_model(cfg.model).to(device)
    torch.manual_seed(cfg.train.seed)
    ddp_model = DDP(build_model(cfg.model).to(device), process_group=groups.dp, gradient_as_bucket_view=True)
    ours = DataParallel(ours_model, groups.dp)
    ours_opt, ddp_opt = build_optimizer(ours_model, cfg.train), build_optimizer(ddp_model, cfg.train)
    times = {"ours": [], "torch": []}
    for it in range(warmup + iters):
        x, y = sampler.batch(it)
        mb = cfg.train.micro_batch
        micro = [(x[i:i + mb].to(device), y[i:i + mb].to(device)) for i in range(0, len(x), mb)]
        t_ours = _step(ours_model, ours.finish, ours_opt, micro, ours.no_sync)
        ours.zero_grad()
        t_ddp = _step(ddp_model, lambda: None, ddp_opt, micro, ddp_model.no_sync)
        ddp_opt.zero_grad(set_to_none=False)
        if it >= warmup:
            times["ours"].append(t_ours)
            times["torch"].append(t_ddp)
    if dist.get_rank() != 0:
        return None
    tokens = cfg.train.global_batch * cfg.model.seq_len
    ours_tps, torch_tps = tokens / statistics.median(times["ours"]), tokens / statistics.median(times["torch"])
    return {
        "ours_tokens_per_s": round(ours_tps, 1), "torch_tokens_per_s": round(torch_tps, 1),
        "ratio": round(ours_tps / torch_tps, 4), "baseline": "torch DistributedDataParallel",
        "dp": cfg.parallel.dp, "params": num_params(ours_model), "steps_measured": iters,
        "ours_step_s": [round(t, 4) for t in times["ours"]], "torch_step_s": [round(t, 4) for t in times["torch"]],
    }


def bench_dp(cfg: RunConfig, nproc: int, iters: int = 8, warmup: int = 3) -> dict:
    load_corpus(cfg.data, cfg.model.seq_len)
    return run_local(_bench_dp_worker, nproc, (cfg, max(iters, 5), warmup), timeout_s=1800)[0]


def format_result(r: dict) -> str:
    return (f"plait dp: {r['ours_tokens_per_s']:.0f} tokens/s   {r['baseline']}: {r['torch_tokens_per_s']:.0f} "
            f"tokens/s   ratio {r['ratio']:.3f}  (dp={r['dp']}, {r['params'] / 1e6:.1f}M params, "
            f"median of {r['steps_measured']} steps)")
