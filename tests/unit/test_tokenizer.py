"""``data.tokenizer``: a tokenizer.json's ids as the corpus (cached), the vocabulary rule, an
``init_from`` folder's own tokenizer, and ``plait train`` / ``plait generate`` decoding with it."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from plait import cli
from plait import config as C
from plait.errors import ConfigError
from plait.generate import TextStream, continuation
from plait.tokenizer import decode, encode, load_tokenizer, mask_id, vocab_size
from plait.train import data as D
from tests.conftest import tiny_args

tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.timeout(180)

LINES = ["def foo ( x ) : return x + 1", "def bar ( y ) : return y * 2", "class Baz : pass", "import os",
         "héllo wörld"]


def _bpe(path):
    """A byte-level BPE of about 280 ids (more than the 256 bytes), with a [MASK] token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[MASK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return path


def _words(path):
    """A word-level tokenizer of a few dozen ids: far fewer than 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False))
    tok.save(str(path))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_helpers(tmp_path):
    tok = load_tokenizer(str(_bpe(tmp_path / "tokenizer.json")))
    assert vocab_size(tok) > 256 and mask_id(tok) == tok.token_to_id("[MASK]")
    ids = encode(tok, "def foo ( x )")
    assert ids == tok.encode("def foo ( x )", add_special_tokens=False).ids
    assert decode(tok, ids) == "def foo ( x )"
    assert mask_id(load_tokenizer(str(_words(tmp_path / "words.json")))) is None


def test_a_files_own_truncation_and_padding_are_dropped(tmp_path):
    """A tokenizer.json saved with truncation and padding on (some exports are) would cut the
    corpus and pad sentences with tokens that count; plait turns both off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_words(tmp_path / "w.json")))
    tok.enable_truncation(max_length=3)
    tok.enable_padding(length=12, pad_id=0)
    tok.save(str(tmp_path / "cut.json"))
    text = "def foo ( x ) : return x + 1"
    assert len(load_tokenizer(str(tmp_path / "cut.json")).encode(text).ids) == len(text.split())


def test_corpus_is_the_tokenizers_ids_cached_as_uint16(tmp_path, cache, monkeypatch):
    path = _bpe(tmp_path / "tokenizer.json")
    text = "\n".join(LINES * 20)  # no final newline: one is added, as for bytes
    (tmp_path / "text.txt").write_text(text)
    cfg = C.DataConfig(path=str(tmp_path / "text.txt"), val_fraction=0.0, tokenizer=str(path))
    c = D.load_corpus(cfg, 8, progress=False)
    tok = load_tokenizer(str(path))
    assert c.train.dtype == np.uint16
    assert c.train.tolist() == tok.encode(text + "\n", add_special_tokens=False).ids
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".u16" and "-tok" in files[0].name
    stamp = files[0].stat().st_mtime_ns

    def no_encoding(files):
        raise AssertionError("encoded again")

    batches = D._text_batches
    monkeypatch.setattr(D, "_text_batches", no_encoding)
    again = D.load_corpus(cfg, 8, progress=False)
    assert np.array_equal(again.train, c.train) and files[0].stat().st_mtime_ns == stamp
    assert sorted(cache.iterdir()) == files
    monkeypatch.setattr(D, "_text_batches", batches)
    other = _words(tmp_path / "words.json")  # another tokenizer: another cache file
    D.load_corpus(C.DataConfig(path=str(tmp_path / "text.txt"), val_fraction=0.0, tokenizer=str(other)), 8,
                  progress=False)
    assert len(list(cache.iterdir())) == 2
    bytes_corpus = D.load_corpus(C.DataConfig(path=str(tmp_path / "text.txt"), val_fraction=0.0), 8, progress=False)
    assert bytes_corpus.train.dtype == np.uint8 and bytes(bytes_corpus.train) == (text + "\n").encode()


def _cfg(*sets):
    return C.load(None, ["model.layers=1", "model.hidden=32", "model.heads=2", "model.seq_len=16", *sets])


def test_the_vocabulary_must_hold_the_tokenizers_ids(tmp_path):
    bpe, words = str(_bpe(tmp_path / "tokenizer.json")), str(_words(tmp_path / "words.json"))
    size = vocab_size(load_tokenizer(bpe))
    with pytest.raises(ConfigError) as e:
        C.resolve(_cfg(f"data.tokenizer={bpe}"), 1)  # the default vocab, 256, is too small
    assert e.value.field == "model.vocab" and e.value.value == 256 and str(size) in str(e.value)
    C.resolve(_cfg(f"data.tokenizer={bpe}", f"model.vocab={size}"), 1)
    small = vocab_size(load_tokenizer(words))
    assert small < 256
    C.resolve(_cfg(f"data.tokenizer={words}", f"model.vocab={small}"), 1)  # no bytes: no vocab >= 256 rule
    with pytest.raises(ConfigError) as e:
        C.resolve(_cfg(f"model.vocab={small}"), 1)
    assert e.value.field == "model.vocab" and "256" in str(e.value)


@pytest.mark.parametrize("bad", ["missing", "not_json"])
def test_a_bad_tokenizer_file_is_one_line(tmp_path, capsys, bad):
    path = tmp_path / "tokenizer.json"
    if bad == "not_json":
        path.write_text("{not json\n at all")
    with pytest.raises(ConfigError) as e:
        C.resolve(_cfg(f"data.tokenizer={path}"), 1)
    assert e.value.field == "data.tokenizer" and "\n" not in str(e.value)
    assert cli.main(["train", "--set", f"data.tokenizer={path}", "--nproc", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plait: error: data.tokenizer=" in err, err


def test_init_from_uses_the_folders_tokenizer(tmp_path):
    T = pytest.importorskip("transformers")
    folder = tmp_path / "gpt2"
    bpe = _bpe(tmp_path / "tokenizer.json")
    size = vocab_size(load_tokenizer(str(bpe)))
    T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=size, n_positions=64).save_pretrained(folder)
    cfg = C.resolve(C.load(None, [f"model.init_from={folder}"]), 1)
    assert cfg.data.tokenizer == "" and cfg.model.vocab == size  # no tokenizer.json there yet
    (folder / "tokenizer.json").write_bytes(bpe.read_bytes())
    cfg = C.resolve(C.load(None, [f"model.init_from={folder}"]), 1)
    assert cfg.data.tokenizer == str(folder / "tokenizer.json")
    words = str(_words(tmp_path / "words.json"))  # one given wins
    assert C.resolve(C.load(None, [f"model.init_from={folder}", f"data.tokenizer={words}"]), 1).data.tokenizer == words


def test_stream_writes_what_the_whole_row_decodes_to(tmp_path):
    tok = load_tokenizer(str(_bpe(tmp_path / "tokenizer.json")))
    prompt = encode(tok, "def")
    row = prompt + encode(tok, " foo ( héllo wörld )")
    out = io.StringIO()
    stream = TextStream(out, tokenizer=tok, prompt=prompt)
    for t in row[len(prompt):]:
        stream([t])
    stream.close()
    assert out.getvalue() == continuation(row, len(prompt), tok) == " foo ( héllo wörld )"


def test_train_and_generate_with_a_tokenizer(tmp_path, cache):
    words = _words(tmp_path / "words.json")
    tok = load_tokenizer(str(words))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("\n".join(LINES * 60))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plait = [sys.executable, "-m", "plait"]
    r = subprocess.run([*plait, "train", *tiny_args(tmp_path / "text"), "--set", f"data.tokenizer={words}",
                        "--set", f"model.vocab={vocab_size(tok)}", "--steps", "3", "--nproc", "1", "--out", str(out),
                        "--no-progress", "--sample", "8"], capture_output=True, text=True, timeout=150, env=env)
    assert r.returncode == 0, r.stderr
    sample = r.stdout.split("--- sample ---\n")[1].split("\n---")[0]
    known = set(tok.get_vocab())
    assert sample.startswith("def") and set(sample.split()) <= known, sample  # the tokenizer's words, spaced
    assert any(p.suffix == ".u16" for p in cache.iterdir())
    r = subprocess.run([*plait, "generate", "--ckpt", str(out), "--prompt", "def foo", "--max-tokens", "6"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    text = r.stdout.strip()
    assert text.startswith("def foo ") and set(text.split()) <= known and len(text.split()) >= 4, text
    assert json.dumps(str(words)) in (out / "config.toml").read_text()
