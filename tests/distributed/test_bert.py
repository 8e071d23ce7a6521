"""BERT under the strands: masked-language modelling (plait train / verify) and token-classification
fine-tuning (plait finetune) at every kind of layout equal one process in float64."""

import importlib.util
from pathlib import Path

import pytest
import torch

from plait import config as C
from plait.launch import run_local
from plait.verify import layout_config, parse_layouts
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("transformers")
pytest.importorskip("seqeval")

MLM_LAYOUTS = ["dp=2,zero=1", "dp=2,zero=3", "tp=2,sequence_parallel=true", "pp=2,schedule=zb",
               "tp=2,recompute=selective", "dp=2,micro_batch=1", "pp=2,micro_batch=1",
               "dp=2,ps.servers=1", "dp=2,diloco.inner_steps=2"]  # the last against DiLoCo's own reference


@pytest.mark.parametrize("layout", MLM_LAYOUTS, ids=layout_id)
def test_masked_language_modelling_equals_one_process(corpus_file, layout):
    base = tiny_config(corpus_file, "model.flavour=bert", "train.dtype=float64", "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


def test_masked_batches_follow_bert(corpus_file):
    """15% of positions are targets (the rest IGNORE); of those most show the mask token, some a
    random token, some themselves; the whole batch is masked alike at any dp."""
    from plait.models.description import IGNORE
    from plait.train.data import Masking, Sampler, load_corpus

    cfg = tiny_config(corpus_file, "model.seq_len=64")
    tokens = load_corpus(cfg.data, 64, progress=False).train
    m = Masking(mask_id=0, vocab=256)
    x, y, every = Sampler(tokens, 64, 64, 7, 0, 1, m).draw(3)
    plain, _ = Sampler(tokens, 64, 64, 7, 0, 1).batch(3)
    chosen = y != IGNORE
    assert every == int(chosen.sum())  # the whole batch's count, as each dp rank reports it below
    assert 0.12 < chosen.float().mean() < 0.18
    assert torch.equal(y[chosen], plain[chosen]) and torch.equal(x[~chosen], plain[~chosen])
    masked = (x[chosen] == 0).float().mean()
    kept = (x[chosen] == plain[chosen]).float().mean()
    assert 0.7 < masked < 0.9 and 0.04 < kept < 0.2
    halves = [Sampler(tokens, 64, 64, 7, r, 2, m).draw(3) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    assert [h[2] for h in halves] == [every, every]


# ---------------------------------------------------------------- token classification


def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "ner_synthetic.py"
    spec = importlib.util.spec_from_file_location("ner_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tagging(tmp_path_factory):
    """A small tagging set and a tiny BERT folder (a WordPiece tokenizer that splits some words)."""
    ex, root = _example(), tmp_path_factory.mktemp("ner")
    return ex.write_data(root / "data", {"train": 40, "dev": 9, "test": 7}, seed=3), ex.write_bert(root / "bert", 32)


def _finetune_config(bert: Path, *overrides: str) -> C.RunConfig:
    sets = [f"model.init_from={bert}", "train.dtype=float64", "train.steps=10", "train.global_batch=8",
            "train.micro_batch=2", "train.lr=1e-3", "train.warmup=2", "train.eval_every=5", *overrides]
    return C.load(None, sets)


def _run(cfg: C.RunConfig, data_dir: Path, layout: str):
    from plait.finetune.commands import prepare
    from plait.finetune.ner import finetune_worker

    cfg, nproc = layout_config(cfg, parse_layouts(layout)[0] if layout else {})
    data = prepare(cfg, str(data_dir))
    return run_local(finetune_worker, nproc, (cfg, data, None, False, True), timeout_s=240)[0]


_ONE: dict = {}


FINETUNE_LAYOUTS = ["tp=2", "pp=2", "tp=2,sequence_parallel=true", "dp=2,zero=3", "dp=2,micro_batch=1",
                    "pp=2,micro_batch=1,schedule=zb"]


@pytest.mark.parametrize("layout", FINETUNE_LAYOUTS, ids=layout_id)
def test_finetuning_equals_one_process(tagging, layout):
    """10 steps of the imported BERT tagging padded sentences: losses and parameters equal one
    process within 1e-9 (float64), and the dev and test reports are the same. Every labelled word
    weighs alike, so micro-batches of another size (other counts of words) change nothing."""
    data_dir, bert = tagging
    cfg = _finetune_config(bert)
    if "one" not in _ONE:
        _ONE["one"] = _run(cfg, data_dir, "")
    one, got = _ONE["one"], _run(cfg, data_dir, layout)
    assert len(got.losses) == 10
    for a, b in zip(got.losses, one.losses):
        assert abs(a - b) <= 1e-9 * abs(b)
    scale = torch.cat([t.flatten() for t in one.params.values()]).pow(2).mean().sqrt()
    for name, want in one.params.items():
        assert (got.params[name] - want).pow(2).mean().sqrt() <= 1e-9 * scale, name
    assert got.reports == one.reports and set(one.reports) == {"dev@5", "dev@10", "test"}
