"""The same code on CUDA with NCCL and bf16 autocast; skipped where there is no GPU."""

import pytest
import torch

from plait.launch import run_local
from plait.train.trainer import RunOptions, train_worker
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]


def test_training_on_every_visible_gpu_with_bf16_autocast(corpus_file):
    n = torch.cuda.device_count()
    cfg = tiny_config(corpus_file, "train.steps=20", "train.global_batch=8", f"parallel.dp={n}",
                      "train.micro_batch=1", nproc=n)
    result = run_local(train_worker, n, (cfg, RunOptions(progress=False)))[0]
    assert len(result.losses) == 20
    assert result.losses[-1] < result.losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pipelines need 2 GPUs (one rank each)")
def test_pipeline_schedules_on_nccl_match_one_process(corpus_file):
    """NCCL matches a pair's transfers by order alone: the agreed order (transfers.pair_orders)."""
    from plait.verify import parse_layouts, run_verify

    base = tiny_config(corpus_file, "model.layers=4", "train.dtype=float64", "train.steps=3")
    layouts = "pp=2,schedule=1f1b;pp=2,schedule=zb;pp=2,schedule=interleaved,virtual_stages=2;pp=2,schedule=gpipe"
    rows = run_verify(base, parse_layouts(layouts), tol=1e-9, progress=False)
    assert all(r["ok"] for r in rows), rows
