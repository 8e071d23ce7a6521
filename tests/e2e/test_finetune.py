"""``plait finetune --task token-classification`` from the command line: the example learns its
synthetic task (entity F1 above 0.9) and leaves a folder that transformers loads with plait's
logits; an encoder trains by masked-language modelling from a BERT folder; bad data is one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.test_bert import _example
from tests.e2e.test_cli import plait

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
T = pytest.importorskip("transformers")
pytest.importorskip("seqeval")


def test_the_example_learns_its_task_and_exports_a_transformers_tagger(tmp_path):
    r = subprocess.run([sys.executable, "examples/ner_synthetic.py", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "ner_report.json").read_text())
    assert report["test"]["micro avg"]["f1-score"] > 0.9
    assert {"LOC", "ORG", "PER", "micro avg", "macro avg", "weighted avg"} <= set(report["test"])
    assert "precision" in r.stderr and "weighted avg" in r.stderr  # the printed per-label table
    folder = tmp_path / "run" / "model"
    theirs = T.AutoModelForTokenClassification.from_pretrained(folder).eval()
    assert theirs.config.id2label[0] == "O" and len(theirs.config.id2label) == 7
    import plait

    ours = plait.load_hf(folder).eval()
    ids = torch.randint(0, theirs.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return _example().write_bert(tmp_path_factory.mktemp("bert") / "bert", 32)


def test_train_from_a_bert_folder_learns_masked_language_modelling(bert_folder, tmp_path):
    """plait train on an encoder masks the corpus (the folder's tokenizer and its [MASK] token):
    the loss on the masked tokens starts at chance over the vocabulary and falls to the text's own
    word distribution (twenty words in turn: log 20) within 80 steps at tp=2. (Using the context
    to beat that takes a tiny post-norm BERT some hundreds of steps, in transformers as here.)"""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(_example().FILLER * 200))
    out = tmp_path / "run"
    r = plait("train", "--set", f"model.init_from={bert_folder}", "--data", str(text), "--set", "model.seq_len=32",
              "--nproc", "2", "--tp", "2", "--steps", "80", "--set", "train.eval_every=40", "--set", "train.lr=3e-3",
              "--set", "train.warmup=3", "--out", str(out), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [row["val_loss"] for row in rows if "val_loss" in row]
    vocab = json.loads((bert_folder / "config.json").read_text())["vocab_size"]
    assert abs(vals[0] - math.log(vocab)) < 0.1 and vals[-1] < math.log(20) + 0.05, vals
    assert "--- sample ---" not in r.stdout  # an encoder does not generate
    r = plait("generate", "--ckpt", str(out), "--prompt", "the")
    assert r.returncode == 2 and "does not generate text" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = plait("export", "--ckpt", str(out), "--out", str(tmp_path / "hf"), "--hf")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = T.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (bert_folder / "tokenizer.json").read_bytes()
    from plait.models.hf import load_hf

    ids = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        assert (load_hf(tmp_path / "hf").eval()(ids) - theirs(ids).logits).abs().max() <= 1e-5


BAD = [  # (file contents of train.txt, the one line expected)
    ("alice B-PER\nsmith\n", "train.txt:2': expected a token and its tag"),
    ("alice PERSON\n", "train.txt:1': the tag 'PERSON' is not BIO"),
]


@pytest.mark.parametrize("text, part", BAD, ids=["malformed", "not-bio"])
def test_a_bad_conll_line_is_one_line_with_file_and_line(bert_folder, tmp_path, text, part):
    (tmp_path / "train.txt").write_text(text)
    r = plait("finetune", "--task", "token-classification", "--data", str(tmp_path), "--nproc", "1",
              "--set", f"model.init_from={bert_folder}", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and part in lines[0] and lines[0].startswith("plait: error: --data="), lines


def test_finetune_needs_an_encoder_and_its_data(bert_folder, tmp_path):
    gpt = tmp_path / "gpt"
    T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=32).save_pretrained(gpt)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("alice B-PER\n")
    cases = [(["--data", str(tmp_path / "data"), "--set", f"model.init_from={gpt}"], "model.flavour='gpt2'"),
             (["--data", str(tmp_path), "--set", f"model.init_from={bert_folder}"], "holds no train.txt"),
             (["--data", str(tmp_path / "none"), "--set", f"model.init_from={bert_folder}"], "no such folder")]
    for args, part in cases:
        r = plait("finetune", "--task", "token-classification", *args, "--nproc", "1")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and part in lines[0], r.stderr[-2000:]


def test_refusals_before_anything_runs(bert_folder, tmp_path, monkeypatch, capsys):
    """One line each: a BERT folder without its tokenizer (finetune needs its sub-words), a
    tokenizer without [MASK] for masked-language modelling, finetune under torchrun."""
    import shutil

    from tokenizers import Tokenizer, models

    from plait import cli
    from plait import config as C
    from plait.errors import ConfigError
    from plait.finetune.ner import check
    from plait.models.bert import Bert
    from plait.train.trainer import masking

    bare = tmp_path / "bare"  # a real BERT's vocabulary (above 256), its tokenizer left behind
    bare.mkdir()
    shutil.copy(bert_folder / "model.safetensors", bare / "model.safetensors")
    hf = json.loads((bert_folder / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**hf, "vocab_size": 30522}))
    with pytest.raises(ConfigError, match=r"^data.tokenizer='': .* has no tokenizer.json"):
        check(C.resolve(C.load(None, [f"model.init_from={bare}"]), 1))
    no_mask = tmp_path / "words.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "alice": 1}, unk_token="[UNK]")).save(str(no_mask))
    cfg = C.resolve(C.load(None, [f"model.init_from={bert_folder}", f"data.tokenizer={no_mask}"]), 1)
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.*has no \[MASK\] token"):
        masking(cfg, Bert(cfg.model).describe())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    code = cli.main(["finetune", "--task", "token-classification", "--data", str(tmp_path),
                     "--set", f"model.init_from={bert_folder}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "finetune='torchrun'" in err[0], err
