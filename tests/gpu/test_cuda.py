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
