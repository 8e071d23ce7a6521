"""The parameter server: sync equals one process (float64) with 1 and 2 servers and tp / pp workers;
async and ssp apply exactly the samples of the run, ssp within its staleness bound."""

import json

import pytest
import torch

from plait.launch import run_local
from plait.parallel import ps as ps_mod
from plait.train.trainer import RunOptions, train_worker
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

F64 = ("train.dtype=float64", "train.steps=5")


@pytest.mark.parametrize("layout", [
    "dp=2,ps.servers=1,ps.mode=sync",
    "dp=2,ps.servers=2",
    "dp=2,tp=2,ps.servers=1",
    "dp=1,pp=2,ps.servers=2",  # the tied embedding's two copies on two positions, one in the norm
], ids=layout_id)
def test_sync_server_equals_one_process(corpus_file, layout):
    row = verify_layout(tiny_config(corpus_file, *F64), layout)
    assert row["ok"], row


def test_verify_catches_a_server_that_sums(corpus_file, monkeypatch):
    real = ps_mod.ParameterServer._set_grads

    def summed(self, position, flat):  # the sum over dp, not the mean
        real(self, position, flat * self.dp)

    monkeypatch.setattr(ps_mod.ParameterServer, "_set_grads", summed)
    row = verify_layout(tiny_config(corpus_file, *F64, "train.grad_clip=0"), "dp=2,ps.servers=1")
    assert not row["ok"] and row["max_param_rel_diff"] > 1e-5, row  # Adam hides most of a wrong scale


def _train(cfg, out, nproc):
    return run_local(train_worker, nproc, (cfg, RunOptions(out=out, progress=False, keep_params=True)),
                     timeout_s=240)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_asynchronous_modes_apply_the_samples_of_the_run(corpus_file, tmp_path, mode):
    cfg = tiny_config(corpus_file, "train.steps=8", "ps.servers=2", f"ps.mode={mode}", "ps.staleness=1",
                      "ps.slow_worker=1:3", nproc=4)
    results = _train(cfg, tmp_path, 4)
    for server in (0, 1):
        stats = json.loads((tmp_path / f"ps_server{server}.json").read_text())
        assert sum(stats["updates"].values()) == 8 * 2  # steps x dp pushes, no more
        assert len(stats["log"]) == 16 and stats["mode"] == mode
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["ps_version"] == 16 and all(r["comm_ps_bytes"] > 0 for r in steps)
    assert results[0].params is not None


def test_ssp_never_applies_a_gradient_staler_than_its_bound(corpus_file, tmp_path):
    """The server's log: each applied gradient's clock, and the slowest worker's clock when the
    pushing worker pulled the parameters it was computed on."""
    bound = 1
    cfg = tiny_config(corpus_file, "train.steps=12", "ps.servers=1", "ps.mode=ssp", f"ps.staleness={bound}",
                      "ps.slow_worker=1:4", nproc=3)
    _train(cfg, tmp_path, 3)
    entries = json.loads((tmp_path / "ps_server0.json").read_text())["log"]
    lags = [e["clock"] - 1 - e["min_clock_at_pull"] for e in entries]
    assert max(lags) == bound  # the bound is reached (the fast worker runs ahead) and never passed
    assert any(e["staleness"] > 0 for e in entries)


def test_a_push_carries_the_servers_keys_and_a_header(corpus_file):
    cfg = tiny_config(corpus_file, "train.steps=2", "ps.servers=2", "train.dtype=float64", nproc=4)

    def traffic(cfg):
        from plait.parallel.ps import ParameterServer
        from plait.topology import Topology, build_groups
        from plait.train.data import load_corpus
        from plait.train.optim import build_optimizer, lr_at
        from plait.train.trainer import Trainer

        groups = build_groups(Topology.of(cfg.parallel), "cpu", 2)
        if groups.is_server:
            return ParameterServer(cfg, groups, optimizer=lambda g: build_optimizer(g, cfg.train),
                                   lr=lambda s: lr_at(s, cfg.train)).run()
        trainer = Trainer(cfg, load_corpus(cfg.data, cfg.model.seq_len, progress=False), torch.device("cpu"), groups)
        rows = [trainer.step(s) for s in range(2)]
        return rows, sum(p.numel() for p in trainer.model.parameters())

    for rows, params in run_local(traffic, 4, (cfg,), timeout_s=240)[:2]:
        for row in rows:  # every gradient once, in float64, and a 4-number header to each server
            assert row["comm_ps_bytes"] == params * 8 + 2 * 32
            assert row["ps_pulled_bytes"] == params * 8 + 2 * 32
