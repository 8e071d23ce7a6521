"""plait's data parallel against one process: gradients, and whole training runs (float64)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.launch import run_local
from plait.models import build_model
from plait.parallel.data import DataParallel
from plait.train.data import Sampler, load_corpus
from plait.verify import compare, layout_config, run_verify
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(240)


def _grads(cfg, micro: int, bucket_mb: float):
    """Gradients after one global batch on this rank, with accumulation over micro-batches."""
    dp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    sync = DataParallel(model, dist.group.WORLD, bucket_mb=bucket_mb, first_bucket_mb=bucket_mb / 4)
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    x, y = Sampler(corpus.train, cfg.model.seq_len, 8, 0, rank, dp).batch(0)
    chunks = list(zip(x.split(micro), y.split(micro)))
    for i, (xb, yb) in enumerate(chunks):
        ctx = sync.no_sync() if i < len(chunks) - 1 else torch.enable_grad()
        with ctx:
            (F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()) / len(chunks)).backward()
    sync.finish()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(sync.buckets)


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("micro, bucket_mb", [(8, 25.0), (1, 0.01)])
def test_gradients_equal_one_process(corpus_file, dp, micro, bucket_mb):
    cfg = tiny_config(corpus_file)
    ref, _ = run_local(_grads, 1, (cfg, 8, bucket_mb))[0]
    results = run_local(_grads, dp, (cfg, max(1, min(micro, 8 // dp)), bucket_mb))
    for grads, n_buckets in results:
        assert n_buckets >= (2 if bucket_mb < 1 else 1)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["dp=2", "dp=2,micro_batch=1", "dp=4,micro_batch=1"], ids=layout_id)
def test_verify_matches_one_process(corpus_file, layout, flavour):
    base = tiny_config(corpus_file, f"model.flavour={flavour}", "train.dtype=float64", "train.steps=5",
                       "model.kv_heads=2")
    row = verify_layout(base, layout)
    assert row["ok"], row


def _no_all_reduce(self, bucket):
    pass


def test_verify_catches_a_missing_all_reduce(corpus_file, monkeypatch):
    """The harness is not vacuous: dropping the gradient all-reduce is caught by a wide margin."""
    monkeypatch.setattr(DataParallel, "_launch", _no_all_reduce)
    base = tiny_config(corpus_file, "train.dtype=float64", "train.steps=5")
    from plait.verify import parse_layouts

    row = run_verify(base, parse_layouts("dp=2"), tol=1e-9, progress=False)[0]
    assert not row["ok"]
    assert max(row["max_loss_rel_diff"], row["max_param_rel_diff"]) > 1e-4


def test_float32_band(corpus_file):
    """float32 differs from one process only by rounding: the documented band (1e-4) holds."""
    base = tiny_config(corpus_file, "train.dtype=float32", "train.steps=10")
    cfg, nproc = layout_config(base, {"parallel": {"dp": "2"}, "train": {"micro_batch": "1"}})
    from plait.verify import _run

    ref_cfg, _ = layout_config(base, {})
    loss, param = compare(_run(ref_cfg, 1), _run(cfg, nproc))
    assert loss < 1e-4 and param < 1e-4
