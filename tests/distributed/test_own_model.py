"""A user's own model (examples/own_model.py: not plait's GPT) under every strand, through its
description alone, equal to one process; and a training loop of one's own with plait.parallelize."""

import importlib.util
from pathlib import Path

import pytest

from plait.launch import run_local
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_model.py"
LAYOUTS = ["tp=2", "tp=2,sequence_parallel=true", "pp=2,schedule=1f1b", "pp=2,schedule=zb",
           "pp=2,schedule=interleaved,virtual_stages=2", "dp=2,zero=1", "dp=2,zero=3", "dp=2,tp=2",
           "pp=2,tp=2,sequence_parallel=true", "dp=2,pp=2,zero=2"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_own_model_matches_one_process(corpus_file, layout):
    base = tiny_config(corpus_file, f"model.builder={EXAMPLE}:build", "model.layers=4", "train.dtype=float64",
                       "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


def _example():
    spec = importlib.util.spec_from_file_location("own_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loop_losses(layout: dict) -> list[float]:
    import argparse

    import torch

    torch.set_default_dtype(torch.float64)
    args = argparse.Namespace(**{"tp": 1, "pp": 1, "zero": 0, "steps": 4, "batch": 4, "seq": 16, "width": 32,
                                 "depth": 2, "heads": 4, "lr": 3e-3, "data": str(EXAMPLE), **layout})
    return _example().train(args)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"zero": 3}], ids=["tp2", "pp2", "zero3"])
def test_a_loop_of_ones_own_equals_one_process(layout):
    """plait.parallelize in the example's own loop: the losses of a parallel layout are those of
    one process (float64)."""
    ref = run_local(_loop_losses, 1, ({},), timeout_s=120)[0]
    got = run_local(_loop_losses, 2, (layout,), timeout_s=120)[0]
    assert ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-9, abs=0)


def _misused(how: str):
    """A loop of one's own that gets something wrong the description cannot show in advance."""
    import dataclasses

    import torch

    import plait

    own = _example()
    torch.manual_seed(0)
    model = own.TinyDecoder(vocab=256, width=32, depth=4, n_heads=4)
    desc, layout, seq = own.describe(model, 4), {"pp": 2}, 16
    if how == "hidden":
        desc = dataclasses.replace(desc, hidden=48)  # wrong, and no sample to catch it early
    elif how == "interleaved":
        layout = {"pp": 2, "schedule": "interleaved", "virtual_stages": 2}
    elif how == "sequence":
        layout, seq = {"tp": 2, "sequence_parallel": True}, 15
    elif how == "dtypes":
        layout = {"zero": 3}
        model.layers[0].ffn.w_in.double()
    pm = plait.parallelize(model, desc, plait.ParallelConfig(**layout))
    x = torch.randint(0, 256, (3, seq))
    micro = [(x[i:i + 1], x[i:i + 1]) for i in range(3)]  # 3 micro-batches (the interleaved schedule needs 2k)
    pm.train_step(micro, torch.optim.SGD(pm.param_groups(0.0), lr=0.1))


@pytest.mark.parametrize("how, message", [
    ("hidden", r"model description hidden=\(1, 16, 32\): a pipeline stage must pass"),
    ("interleaved", r"parallel.microbatches=3: the interleaved schedule needs a multiple of pp=2"),
    ("sequence", r"model description embed=\(1, 15, 32\): sequence parallel splits the sequence over tp=2"),
])
def test_a_misused_loop_stops_with_one_line_not_a_hang(how, message):
    from plait.errors import PlaitError

    with pytest.raises(PlaitError, match=message):
        run_local(_misused, 2, (how,), timeout_s=60, collective_timeout_s=30)


def test_zero3_refuses_a_block_of_mixed_dtypes():
    from plait.errors import PlaitError

    with pytest.raises(PlaitError, match=r"parallel.zero=3: ZeRO-3 lays a block's parameters out in one flat buffer"):
        run_local(_misused, 2, ("dtypes",), timeout_s=60, collective_timeout_s=30)
