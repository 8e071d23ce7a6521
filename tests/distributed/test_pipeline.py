"""Pipeline parallel against one process: every schedule, and composed with dp and tp (float64)."""

import pytest

from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

LAYOUTS = {  # layout -> processes
    "pp=2,schedule=gpipe": 2, "pp=2,schedule=1f1b": 2, "pp=4,schedule=1f1b": 4,
    "pp=2,schedule=interleaved,virtual_stages=2": 2, "pp=2,schedule=zb": 2,
    "pp=2,dp=2": 4, "pp=2,tp=2": 4,
}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_schedules_and_compositions_match_one_process(corpus_file, layout, flavour):
    base = tiny_config(corpus_file, f"model.flavour={flavour}", "model.layers=4", "train.dtype=float64",
                       "train.steps=3")
    row = verify_layout(base, layout)
    assert row["nproc"] == LAYOUTS[layout] and row["ok"], row


@pytest.mark.parametrize("layout", [
    "pp=2,stage_layers=1:3", "pp=2,dp=2,schedule=interleaved,virtual_stages=2,micro_batch=2",
    "pp=2,tp=2,sequence_parallel=true,schedule=zb", "pp=2,micro_batch=1,schedule=interleaved,virtual_stages=2",
], ids=layout_id)
def test_more_pipeline_layouts(corpus_file, layout):
    base = tiny_config(corpus_file, "model.layers=4", "train.dtype=float64", "train.steps=3", "model.vocab=257")
    row = verify_layout(base, layout)
    assert row["ok"], row


def _trainer(cfg):
    """One rank's Trainer, as train_worker builds it (inside a spawned worker)."""
    from plait import comm
    from plait.train.data import load_corpus
    from plait.train.trainer import Trainer

    return Trainer(cfg, load_corpus(cfg.data, cfg.model.seq_len, progress=False), comm.pick_device())


def _held_sends(cfg):
    """One training step; (peak bytes of sends held, bytes of one activation, micro-batches)."""
    import torch

    trainer = _trainer(cfg)
    trainer.step(0)
    pipe = trainer.pm.pipeline
    one = cfg.train.micro_batch * cfg.model.seq_len * cfg.model.hidden * torch.finfo(pipe.dtype).bits // 8
    return pipe.last_sends.peak_bytes, one, len(trainer.sampler.batch(0)[0]) // cfg.train.micro_batch


@pytest.mark.parametrize("schedule", ["1f1b", "zb", "interleaved"])
def test_sent_tensors_are_let_go_in_flight_not_at_the_end_of_the_step(corpus_file, schedule):
    from plait.launch import run_local

    v = 2 if schedule == "interleaved" else 1
    cfg = tiny_config(corpus_file, "model.layers=4", "parallel.pp=2", f"parallel.schedule={schedule}",
                      f"parallel.virtual_stages={v}", "train.micro_batch=1", nproc=2)
    for peak, one, m in run_local(_held_sends, 2, (cfg,), timeout_s=120):
        assert m >= 8
        # each rank sends m activations or m gradients per chunk; without the tracker all are held
        assert one <= peak <= (2 * v + 1) * one < m * v * one


def _losses(cfg, by_order):
    """Three steps with messages matched by tag (gloo) or by order alone (tag 0, as NCCL does)."""
    trainer = _trainer(cfg)
    trainer.pm.pipeline.match_by_order = by_order
    return [(row["loss"], row["grad_norm"]) for row in (trainer.step(s) for s in range(3))]


@pytest.mark.parametrize("layout", [
    "parallel.schedule=interleaved,parallel.virtual_stages=2",  # activations and gradients share a pair
    "parallel.schedule=zb", "parallel.schedule=gpipe",
    "parallel.pp=4,parallel.schedule=interleaved,parallel.virtual_stages=2,model.layers=8",
])
def test_transfers_match_by_order_alone_as_on_nccl(corpus_file, layout):
    from plait.launch import run_local

    sets = ["model.layers=4", "parallel.pp=2", "train.dtype=float64", "train.micro_batch=1", *layout.split(",")]
    cfg = tiny_config(corpus_file, *sets, nproc=4 if "pp=4" in layout else 2)
    n = cfg.parallel.pp
    by_tag = run_local(_losses, n, (cfg, False), timeout_s=240)[0]
    by_order = run_local(_losses, n, (cfg, True), timeout_s=240)[0]
    assert by_order == by_tag, (by_order, by_tag)
    assert all(loss > 1 for loss, _ in by_tag)


def _zeros_for_gradients(send):
    def patched(self, t, msg):
        from plait.schedules import GRAD

        return send(self, t.detach() * 0 if msg[0] == GRAD else t, msg)
    return patched


@pytest.mark.parametrize("mutation", ["input gradient not sent", "tied embedding not summed"])
def test_verify_catches_a_broken_pipeline_transfer(corpus_file, monkeypatch, mutation):
    """The pipeline layouts are not equal to one process by accident: a stage that sends zeros
    instead of its input gradient, or a tied embedding whose two copies' gradients are not summed
    over the first and last stage, is caught by a wide margin."""
    from plait.parallel import hybrid
    from plait.parallel.pipeline.runtime import PipelineParallel
    from plait.verify import parse_layouts, run_verify

    if mutation == "input gradient not sent":
        monkeypatch.setattr(PipelineParallel, "_send", _zeros_for_gradients(PipelineParallel._send))
    else:
        monkeypatch.setattr(hybrid, "tied_copy", lambda desc, module: None)
    base = tiny_config(corpus_file, "model.flavour=gpt2", "model.layers=4", "train.dtype=float64", "train.steps=3")
    row = run_verify(base, parse_layouts("pp=2"), tol=1e-9, progress=False)[0]
    assert not row["ok"]
    assert max(row["max_loss_rel_diff"], row["max_param_rel_diff"]) > 1e-4, row


def _logits_under_autocast(cfg):
    import torch

    trainer = _trainer(cfg)
    tokens = torch.randint(0, 256, (1, cfg.model.seq_len))
    with trainer._autocast():
        logits = trainer.pm.full_logits(tokens)
    return logits, trainer.pm.holds_loss


def test_sampling_through_a_pipeline_under_bf16_autocast(corpus_file):
    """The last stage computes the logits under autocast (bf16); every stage receives them in one
    agreed dtype, so sampling through a pipeline works under bf16 as in float32."""
    import torch

    from plait.launch import run_local

    cfg = tiny_config(corpus_file, "model.layers=4", "parallel.pp=2", "train.dtype=bfloat16", nproc=2)
    (first, held0), (last, held1) = run_local(_logits_under_autocast, 2, (cfg,), timeout_s=120)
    assert not held0 and held1
    assert first.dtype == last.dtype == torch.float32 and first.shape == (1, 16, 256)
    assert torch.equal(first, last) and torch.isfinite(first).all()
