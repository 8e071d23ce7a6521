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


def _wrong_hidden():
    import dataclasses

    import torch

    import plait

    own = _example()
    torch.manual_seed(0)
    model = own.TinyDecoder(vocab=256, width=32, depth=2, n_heads=4)
    desc = dataclasses.replace(own.describe(model, 4), hidden=48)  # wrong, and no sample to catch it early
    pm = plait.parallelize(model, desc, plait.ParallelConfig(pp=2))
    x = torch.randint(0, 256, (2, 16))
    pm.train_step([(x[:1], x[:1]), (x[1:], x[1:])], torch.optim.SGD(pm.param_groups(0.0), lr=0.1))


def test_a_wrong_hidden_stops_the_pipeline_with_one_line_not_a_hang():
    from plait.errors import PlaitError

    with pytest.raises(PlaitError, match=r"model description hidden=\(1, 16, 32\): a pipeline stage must pass"):
        run_local(_wrong_hidden, 2, timeout_s=60, collective_timeout_s=30)
