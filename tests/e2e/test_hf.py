"""A Hugging Face Llama folder trained further by `plait train --set model.init_from=DIR` at dp=2
and tp=2, exported with `plait export --hf`, loaded back by transformers with the same logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_args, tiny_config, verify_layout

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)
PLAIT = [sys.executable, "-m", "plait"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=300, max_position_embeddings=16)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _hf_val_loss(folder, corpus_file):
    """The validation loss the run starts from, computed by transformers on plait's windows."""
    from plait.train.data import load_corpus, val_batches

    cfg = tiny_config(corpus_file, f"model.init_from={folder}")
    corpus = load_corpus(cfg.data, cfg.model.seq_len, progress=False)
    x, y = val_batches(corpus.val, cfg.model.seq_len, cfg.train.eval_batches * cfg.train.global_batch, 0, 1)
    model = T.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(x).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


@pytest.mark.parametrize("layout", [["--dp", "2"], ["--tp", "2"]], ids=["dp2", "tp2"])
def test_train_from_a_llama_folder_and_export_it_back(llama_folder, corpus_file, tmp_path, layout):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([*PLAIT, "train", *tiny_args(corpus_file), *layout, "--set", f"model.init_from={llama_folder}",
                        "--set", "train.eval_every=2", "--steps", "2", "--out", str(out), "--no-progress",
                        "--sample", "0"], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(row["val_loss"] for row in rows if row["step"] == 0)
    assert start == pytest.approx(_hf_val_loss(llama_folder, corpus_file), rel=1e-5)
    r = subprocess.run([*PLAIT, "export", "--ckpt", str(out), "--out", str(tmp_path / "hf"), "--hf"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    if layout == ["--dp", "2"]:  # --hf onto a file: one line, the file untouched
        (tmp_path / "f").write_text("keep")
        r = subprocess.run([*PLAIT, "export", "--ckpt", str(out), "--out", str(tmp_path / "f"), "--hf"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and "--out" in r.stderr and r.stderr.count("\n") == 1
        assert (tmp_path / "f").read_text() == "keep"
    from plait.checkpoint.export import load_for_inference

    _, mine, _ = load_for_inference(out)
    theirs = T.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (mine.float()(ids) - theirs(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["tp=2", "pp=2"])
def test_an_imported_model_trains_at_any_layout_as_on_one_process(llama_folder, corpus_file, layout):
    base = tiny_config(corpus_file, f"model.init_from={llama_folder}", "train.dtype=float64", "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


def test_bad_init_from_is_one_line(corpus_file, tmp_path):
    r = subprocess.run([*PLAIT, "train", *tiny_args(corpus_file), "--set", f"model.init_from={tmp_path}",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "model.init_from" in r.stderr and "config.json" in r.stderr
    assert r.stderr.count("\n") == 1
