"""The launcher: results come back in rank order; any failure stops every rank, nothing hangs."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from plait.errors import PlaitError
from plait.launch import WorkerFailed, run_local

pytestmark = pytest.mark.timeout(120)


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return (dist.get_rank(), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), float(t))


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_results_in_rank_order_with_torchrun_environment(nproc):
    out = run_local(_sum_of_ranks, nproc)
    total = nproc * (nproc - 1) / 2
    assert out == [(r, r, nproc, total) for r in range(nproc)]
    assert not mp.active_children()


def _user_error_on_rank1():
    if dist.get_rank() == 1:
        raise PlaitError("train.steps=0: must be positive")
    dist.barrier()  # rank 0 waits for a peer that never comes


def _crash_on_last_rank():
    if dist.get_rank() == dist.get_world_size() - 1:
        raise RuntimeError("boom")
    dist.barrier()


def _killed_on_rank0():
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _sleeps():
    time.sleep(60)


@pytest.mark.parametrize("nproc", [2, 3])
def test_user_error_propagates_and_stops_everyone(nproc):
    t0 = time.monotonic()
    with pytest.raises(PlaitError, match="train.steps=0"):
        run_local(_user_error_on_rank1, nproc)
    assert time.monotonic() - t0 < 30
    assert not mp.active_children()


@pytest.mark.parametrize("fn, match", [(_crash_on_last_rank, "RuntimeError: boom"),
                                        (_killed_on_rank0, "killed by signal 9")])
def test_crash_or_kill_stops_every_rank(fn, match):
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=match):
        run_local(fn, 2)
    assert time.monotonic() - t0 < 30
    assert not mp.active_children()


def test_timeout_stops_every_rank():
    with pytest.raises(WorkerFailed, match="did not finish within"):
        run_local(_sleeps, 2, timeout_s=2)
    assert not mp.active_children()
