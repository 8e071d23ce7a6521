import math

import pytest
import torch

from plait import config as C
from plait.parallel.clip import ClipSets, clip_grad_norm
from plait.parallel.data import plan_buckets
from plait.train.optim import lr_at


def test_warmup_then_cosine_to_min_lr():
    t = C.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.55)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


def test_clip_scales_to_max_norm_and_returns_the_norm():
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    ps[0].grad, ps[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = clip_grad_norm(ClipSets(tuple(ps[:1]), tuple(ps[1:])), 1.0)
    assert norm == pytest.approx(math.sqrt(27 + 64))
    total = torch.cat([p.grad for p in ps]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_no_clip_below_max_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([0.3, 0.4])
    assert clip_grad_norm(ClipSets(replicated=(p,)), 1.0) == pytest.approx(0.5)
    assert torch.allclose(p.grad, torch.tensor([0.3, 0.4]))


def test_buckets_respect_caps_and_dtypes():
    ps = [torch.nn.Parameter(torch.zeros(256)) for _ in range(10)]  # 1 kB each
    ps.insert(5, torch.nn.Parameter(torch.zeros(256, dtype=torch.float64)))
    buckets = plan_buckets(ps, cap_bytes=3000, first_cap_bytes=1024)
    assert [len(b) for b in buckets] == [1, 2, 2, 1, 2, 2, 1]
    assert all(len({p.dtype for p in b}) == 1 for b in buckets)
    assert [p for b in buckets for p in b] == ps  # order kept
