"""Checkpoints written by a parallel run hold each whole tensor once, loadable at another layout."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from plait.launch import run_local
from plait.models import build_model
from plait.train.trainer import RunOptions, train_worker
from plait.verify import layout_config, parse_layouts
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(240)


def _load_whole(cfg, path):
    model = build_model(cfg.model).double()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flavour, layout", [("llama", "dp=2"), ("llama", "tp=2"), ("gpt2", "tp=2"),
                                             ("llama", "tp=2,sequence_parallel=true"), ("gpt2", "dp=2,tp=2")])
def test_parallel_checkpoint_loads_into_one_process(corpus_file, tmp_path, flavour, layout):
    base = tiny_config(corpus_file, "train.dtype=float64", "train.steps=2", f"model.flavour={flavour}")
    cfg, nproc = layout_config(base, parse_layouts(layout)[0])
    opts = RunOptions(out=tmp_path, progress=False, keep_params=True)
    trained = run_local(train_worker, nproc, (cfg, opts))[0].params
    loaded = run_local(_load_whole, 1, (layout_config(base, {})[0], tmp_path / "checkpoints" / "step_000002"))[0]
    assert loaded.keys() == trained.keys()
    for name, want in trained.items():
        torch.testing.assert_close(loaded[name], want, rtol=0, atol=0, msg=name)
