"""ZeRO-1/2 against one process, and model-state bytes per rank against the ZeRO paper's formulas."""

import json

import pytest

from plait.launch import run_local
from plait.models import build_model, num_params
from plait.train.trainer import RunOptions, train_worker
from plait.verify import layout_config, parse_layouts
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

LAYOUTS = ["dp=2,zero=1", "dp=2,zero=2", "dp=2,zero=2,micro_batch=1", "dp=4,zero=1,micro_batch=1",
           "dp=2,tp=2,zero=2", "dp=2,zero=3", "dp=2,zero=3,micro_batch=1", "dp=4,zero=3,micro_batch=1",
           "dp=2,tp=2,zero=3", "dp=2,tp=2,zero=1,sequence_parallel=true",
           "dp=2,tp=2,zero=2,sequence_parallel=true", "dp=2,tp=2,zero=3,sequence_parallel=true",
           "dp=2,pp=2,zero=1", "dp=2,pp=2,zero=2", "dp=2,pp=2,zero=3", "dp=2,pp=2,zero=3,schedule=zb"]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_zero_layouts_match_one_process(corpus_file, layout, flavour):
    base = tiny_config(corpus_file, f"model.flavour={flavour}", "model.layers=4", "train.dtype=float64",
                       "train.steps=3", "model.vocab=257")
    row = verify_layout(base, layout)
    assert row["ok"], row


def _formula(zero: int, dp: int, psi: int) -> float:
    """fp32 AdamW: 4 bytes of parameter, 4 of gradient, 8 of moments per parameter (docs/formulas.md)."""
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / dp, 2: 4 * psi + 12 * psi / dp, 3: 16 * psi / dp}[zero]


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_model_state_bytes_follow_the_formula(corpus_file, tmp_path, zero, dp):
    cfg, nproc = layout_config(tiny_config(corpus_file, "model.hidden=64", "train.steps=2"),
                               parse_layouts(f"dp={dp},zero={zero},micro_batch=1")[0])
    run_local(train_worker, nproc, (cfg, RunOptions(out=tmp_path, progress=False)))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    states = row["mem_params_bytes"] + row["mem_grads_bytes"] + row["mem_optimizer_bytes"]
    want = _formula(zero, dp, num_params(build_model(cfg.model)))
    assert abs(states / want - 1) < 0.10, (states, want)


def test_zero3_gathered_weights_are_not_counted_as_activations(corpus_file, tmp_path):
    """ZeRO-3 gathers each block's weights into fresh storage before it runs; autograd saves them
    for backward, but they are parameters, so the activation figure must equal plain dp's."""
    rows = {}
    for zero in (0, 3):
        cfg, nproc = layout_config(tiny_config(corpus_file, "train.steps=1"),
                                   parse_layouts(f"dp=2,zero={zero}")[0])
        out = tmp_path / str(zero)
        out.mkdir()
        run_local(train_worker, nproc, (cfg, RunOptions(out=out, progress=False)))
        rows[zero] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[3]["mem_activations_bytes"] == rows[0]["mem_activations_bytes"] > 0
    assert rows[3]["mem_params_bytes"] < rows[0]["mem_params_bytes"]


@pytest.mark.parametrize("layout", ["dp=2", "dp=2,zero=1", "dp=2,zero=2", "dp=2,zero=3", "tp=2", "pp=2",
                                    "dp=2,tp=2,zero=2", "dp=2,tp=2,zero=3"])
def test_dry_run_agrees_with_a_real_run(corpus_file, tmp_path, layout):
    from plait.dryrun import dry_run_worker

    cfg, nproc = layout_config(tiny_config(corpus_file, "model.layers=4", "train.steps=1", "model.vocab=257"),
                               parse_layouts(layout)[0])
    dry = run_local(dry_run_worker, nproc, (cfg,))[0]
    run_local(train_worker, nproc, (cfg, RunOptions(out=tmp_path, progress=False)))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for kind in ("params", "grads", "optimizer"):
        assert abs(dry[kind] / row[f"mem_{kind}_bytes"] - 1) < 0.05, (kind, dry[kind], row[f"mem_{kind}_bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_eight_processes_dp_tp_pp(corpus_file, zero):
    """The 3-D layout of the standard matrix: dp=2 x tp=2 x pp=2 on 8 processes."""
    base = tiny_config(corpus_file, "model.layers=4", "train.dtype=float64", "train.steps=2")
    row = verify_layout(base, f"dp=2,tp=2,pp=2,zero={zero}")
    assert row["nproc"] == 8 and row["ok"], row
