"""Activation recomputation: full and selective equal no recomputation under every strand (float64,
against the shared one-process reference), replay tensor parallel's dropout stream, and keep fewer
activations (measured by the trainer's meter)."""

import pytest

from plait.verify import _run, compare, layout_config, parse_layouts
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)

LAYOUTS = [
    "dp=2,recompute=full", "dp=2,recompute=selective",
    "tp=2,recompute=full", "tp=2,recompute=selective",
    "pp=2,recompute=full", "pp=2,recompute=selective",
    "dp=2,zero=3,recompute=full",
    "pp=2,schedule=zb,recompute=selective",
    "pp=2,tp=2,sequence_parallel=true,schedule=zb,recompute=full",
    "pp=2,schedule=interleaved,virtual_stages=2,recompute=full",
    "dp=2,diloco.inner_steps=2,recompute=full",  # against DiLoCo's own one-process reference
    "dp=2,ps.servers=1,recompute=selective",
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_recomputation_equals_one_process(corpus_file, layout):
    base = tiny_config(corpus_file, "model.layers=4", "train.dtype=float64", "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_recomputation_replays_dropout_under_tensor_and_sequence_parallel(corpus_file, flavour):
    """With dropout on heads and sequence shards (tensor parallel's own stream), recomputing gives
    the masks the forward drew: the run equals the same layout without recomputation."""
    base = tiny_config(corpus_file, f"model.flavour={flavour}", "model.dropout=0.2", "train.dtype=float64",
                       "train.steps=3")
    runs = {}
    for mode in ("none", "full", "selective"):
        cfg, nproc = layout_config(base, parse_layouts(f"tp=2,sequence_parallel=true,recompute={mode}")[0])
        runs[mode] = _run(cfg, nproc)
    for mode in ("full", "selective"):
        loss, param = compare(runs["none"], runs[mode])
        assert loss < 1e-12 and param < 1e-12, (mode, loss, param)


def _activations(cfg):
    """(pipeline stage, activation bytes held at the peak of one training step) of this rank."""
    from plait import comm
    from plait.train.data import load_corpus
    from plait.train.trainer import Trainer

    trainer = Trainer(cfg, load_corpus(cfg.data, cfg.model.seq_len, progress=False), comm.pick_device())
    trainer.step(0)
    return trainer.coord.pp_rank, trainer.memory()["activations"]


MEASURED = [  # (flavour, overrides): the activation meter against the planner's formulas
    ("gpt2", ()), ("llama", ()),
    ("gpt2", ("train.recompute=selective",)), ("llama", ("train.recompute=selective",)),
    ("gpt2", ("train.recompute=full",)),
    ("llama", ("parallel.tp=2",)), ("gpt2", ("parallel.tp=2", "parallel.sequence_parallel=true")),
    ("llama", ("parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=full")),
    ("gpt2", ("parallel.pp=2", "parallel.schedule=gpipe")), ("llama", ("parallel.pp=2", "train.recompute=full")),
    ("gpt2", ("parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2")),
]


@pytest.mark.parametrize("flavour,overrides", MEASURED, ids=lambda x: x if isinstance(x, str) else layout_id(
    ",".join(o.split(".", 1)[1] for o in x) or "plain"))
def test_measured_activations_follow_the_formulas(corpus_file, flavour, overrides):
    """What autograd saves (counted by the trainer's meter) on every pipeline stage is what
    ``plan.cost.activation_bytes`` predicts, within 5% (the acceptance asks for 15%)."""
    from plait.launch import run_local
    from plait.plan.cost import Layout, activation_bytes

    nproc = 2 if any("tp=" in o or "pp=" in o for o in overrides) else 1
    cfg = tiny_config(corpus_file, f"model.flavour={flavour}", "model.layers=4", "model.hidden=64",
                      "model.seq_len=32", "train.micro_batch=1", *overrides, nproc=nproc)
    p, t = cfg.parallel, cfg.train
    layout = Layout(p.dp, p.tp, p.pp, p.zero, t.micro_batch, p.schedule, p.virtual_stages, p.sequence_parallel,
                    t.recompute)
    m = t.global_batch // (p.dp * t.micro_batch)
    for stage, measured in run_local(_activations, nproc, (cfg,), timeout_s=120):
        predicted = activation_bytes(cfg.model, layout, stage, m)
        assert abs(predicted - measured) <= 0.05 * measured, (stage, predicted, measured)


def test_recomputation_drops_activations_as_the_formulas_say(corpus_file):
    """Measured on one process: selective keeps less than none, full much less, by the formulas'
    ratios."""
    from plait.launch import run_local
    from plait.plan.cost import Layout, activation_bytes

    got, want = {}, {}
    for mode in ("none", "selective", "full"):
        cfg = tiny_config(corpus_file, "model.flavour=llama", "model.layers=4", "model.hidden=64",
                          f"train.recompute={mode}")
        got[mode] = run_local(_activations, 1, (cfg,), timeout_s=120)[0][1]
        want[mode] = activation_bytes(cfg.model, Layout(micro_batch=cfg.train.micro_batch, recompute=mode), 0, 4)
    assert got["full"] < got["selective"] < got["none"]
    for mode in ("selective", "full"):
        assert abs(got[mode] / got["none"] - want[mode] / want["none"]) <= 0.15 * want[mode] / want["none"]
