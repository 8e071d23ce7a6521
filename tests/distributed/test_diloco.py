"""DiLoCo and streaming DiLoCo against their one-process reference (float64), and the bytes every
strand sends against the closed-form volume of its collectives."""

import pytest
import torch

from plait.launch import run_local
from plait.parallel import diloco as diloco_mod
from plait.train.data import load_corpus
from plait.train.trainer import Trainer
from plait.verify import check_layout, parse_layouts, run_reference
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

F64 = ("train.dtype=float64", "train.steps=6")


@pytest.mark.parametrize("layout", [
    "dp=2,diloco.inner_steps=2",
    "dp=2,diloco.inner_steps=4,diloco.fragments=2,diloco.quantize=fp8",
    "dp=2,tp=2,diloco.inner_steps=3,diloco.fragments=3",
    "dp=2,pp=2,diloco.inner_steps=2,diloco.fragments=2,diloco.quantize=bf16,diloco.momentum_ramp=none",
    "dp=4,diloco.inner_steps=2,diloco.outer_lr=1,diloco.outer_momentum=0",
    # replicas of two dp ranks each: ZeRO inside, DiLoCo between
    "dp=4,zero=1,diloco.replicas=2,diloco.inner_steps=2",
    "dp=4,zero=2,diloco.replicas=2,diloco.inner_steps=3,diloco.fragments=3",
    "dp=4,zero=3,diloco.replicas=2,diloco.inner_steps=2",
    "dp=2,tp=2,zero=1,diloco.replicas=1,diloco.inner_steps=2",
], ids=layout_id)
def test_diloco_equals_its_replicas_in_one_process(corpus_file, layout):
    row = verify_layout(tiny_config(corpus_file, *F64), layout)
    assert row["ok"], row


def _unscaled(self, handle):
    data, works = handle
    works.wait()
    return data  # the sum over replicas, not their mean


def test_verify_catches_a_wrong_mean(corpus_file, monkeypatch):
    monkeypatch.setattr(diloco_mod.Exchange, "result", _unscaled)
    row = verify_layout(tiny_config(corpus_file, *F64), "dp=2,diloco.inner_steps=2")
    assert not row["ok"] and row["max_param_rel_diff"] > 1e-3, row


def test_zero_inside_replicas_exchanges_over_the_replicas_only(corpus_file, monkeypatch):
    """Caught by its reference: the exchange over every dp rank would average ZeRO's different
    slices with each other."""
    import torch.distributed as dist

    from plait.parallel import hybrid

    real = hybrid.DiLoCo  # at dp=4 alone, every rank is the dp group
    monkeypatch.setattr(hybrid, "DiLoCo", lambda model, group, **kw: real(model, dist.group.WORLD, **kw))
    row = verify_layout(tiny_config(corpus_file, *F64), "dp=4,zero=1,diloco.replicas=2,diloco.inner_steps=2")
    assert not row["ok"], row


def test_diloco_is_not_plain_data_parallel(corpus_file):
    """Held to synchronous training's reference, DiLoCo fails: its own reference is another run."""
    base = tiny_config(corpus_file, *F64)
    row = check_layout(base, parse_layouts("dp=2,diloco.inner_steps=2")[0], run_reference(base), 1e-9)
    assert not row["ok"] and row["max_loss_rel_diff"] > 1e-6, row


# --------------------------------------------------------------------------- bytes sent, per strand


def _traffic(cfg):
    """Every step's comm columns of this rank, its coordinates and its parameter count."""
    torch.set_num_threads(1)
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    trainer = Trainer(cfg, corpus, torch.device("cpu"))
    rows = [{k: v for k, v in trainer.step(s).items() if k.startswith("comm_")} for s in range(cfg.train.steps)]
    local = sum(p.numel() for p in trainer.model.parameters())
    return rows, tuple(trainer.coord), local


def _run(corpus_file, *sets, nproc):
    cfg = tiny_config(corpus_file, "train.dtype=float64", "train.steps=2", *sets, nproc=nproc)
    return cfg, run_local(_traffic, nproc, (cfg,), timeout_s=240)


@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_sends_two_n_minus_one_over_n_of_the_gradients(corpus_file, dp):
    cfg, ranks = _run(corpus_file, f"parallel.dp={dp}", nproc=dp)
    for rows, _, params in ranks:
        for row in rows:  # a ring all-reduce of float64 gradients each step
            assert row == {"comm_bytes": 2 * (dp - 1) * params * 8 // dp, "comm_peak_bytes": row["comm_bytes"],
                           "comm_dp_bytes": row["comm_bytes"]}


def test_tensor_parallel_sends_its_activations(corpus_file):
    cfg, ranks = _run(corpus_file, "parallel.tp=2", nproc=2)
    m, t = cfg.model, cfg.train
    tokens = t.global_batch * m.seq_len  # over the step's micro-batches
    # per block two all-reduces forward (g of attention and MLP) and two backward (f); g of the
    # vocab-parallel embedding; f of the output layer (backward); the loss's row maxima and
    # (sum of exp, target logit). An all-reduce over 2 ranks sends its size once.
    activations = (4 * m.layers + 2) * tokens * m.hidden
    expect = (activations + 3 * tokens) * 8
    for rows, _, _ in ranks:
        assert [r["comm_tp_bytes"] for r in rows] == [expect, expect]


def test_pipeline_sends_activations_and_gradients(corpus_file):
    cfg, ranks = _run(corpus_file, "parallel.pp=2", nproc=2)
    m, t = cfg.model, cfg.train
    boundary = t.global_batch * m.seq_len * m.hidden * 8  # every micro-batch crosses once each way
    tied = m.vocab * m.hidden * 8  # the tied embedding's gradient, summed over the first and last stage
    for rows, _, _ in ranks:
        assert [r["comm_pp_bytes"] for r in rows] == [boundary + tied] * 2


def test_zero_sends_what_its_collectives_carry(corpus_file):
    cfg, ranks = _run(corpus_file, "parallel.dp=2", "parallel.zero=2", nproc=2)
    for rows, _, params in ranks:  # a reduce-scatter and an all-gather, half of each (padding aside)
        for row in rows:
            assert 0 <= row["comm_zero_bytes"] - params * 8 < 64, row


@pytest.mark.parametrize("quantize, width", [("none", 8), ("bf16", 2), ("fp8", 1)])
def test_diloco_sends_only_when_it_syncs(corpus_file, quantize, width):
    cfg, ranks = _run(corpus_file, "parallel.dp=2", "diloco.inner_steps=2", f"diloco.quantize={quantize}",
                      "train.steps=4", nproc=2)
    for rows, _, params in ranks:
        sent = [r.get("comm_diloco_bytes", 0) for r in rows]
        assert sent[0] == sent[2] == 0
        padded = params + params % 2  # the quantized exchange cuts the fragment into 2 equal chunks
        expect = params * 8 if quantize == "none" else padded * width + (8 if quantize == "fp8" else 0)
        assert sent[1] == sent[3] == expect, sent  # fp8: a float32 scale to the other rank, and one back


def test_replicas_of_zero_ranks_checkpoint_replica_zero_and_resume(corpus_file, tmp_path):
    """With ZeRO inside two replicas, replica 0's ranks write the checkpoint (replica 1 holds the
    same slices and must not write them too): a step after a sync, when the replicas differ, it
    holds rank 0's model, and a run resumes from it at the same layout and at another."""
    from plait.checkpoint.export import load_for_inference
    from plait.train.trainer import RunOptions, train_worker
    from plait.verify import layout_config

    base = tiny_config(corpus_file, *F64, "train.steps=3", "checkpoint.every=3")
    layout = "dp=4,zero=1,diloco.replicas=2,diloco.inner_steps=2"
    cfg, nproc = layout_config(base, parse_layouts(layout)[0])
    out = tmp_path / "run"
    out.mkdir()
    got = run_local(train_worker, nproc, (cfg, RunOptions(out=out, progress=False, keep_params=True)), timeout_s=240)[0]
    _, model, _ = load_for_inference(str(out / "checkpoints" / "step_000003"))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), got.params[name], rtol=0, atol=0, msg=name)
    more = tiny_config(corpus_file, *F64, "train.steps=6")
    for resumed in (layout, "dp=2,zero=3"):
        cfg, nproc = layout_config(more, parse_layouts(resumed)[0])
        opts = RunOptions(out=tmp_path / resumed, progress=False, resume=out / "checkpoints" / "step_000003")
        (tmp_path / resumed).mkdir()
        assert len(run_local(train_worker, nproc, (cfg, opts), timeout_s=240)[0].losses) == 3
