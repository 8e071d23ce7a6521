import numpy as np
import pytest
import torch

from plait import config as C
from plait.errors import ConfigError
from plait.train.data import Sampler, corpus_files, load_corpus, stdlib_files, val_batches


def test_embedded_corpus_is_the_sorted_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_corpus_split_and_cache(corpus_file):
    cfg = C.DataConfig(path=str(corpus_file), val_fraction=0.1)
    c1 = load_corpus(cfg, 16, progress=False)
    c2 = load_corpus(cfg, 16, progress=False)
    n = corpus_file.stat().st_size
    assert len(c1.train) + len(c1.val) == n and len(c1.val) == int(n * 0.1)
    assert bytes(c1.train[:20]) == corpus_file.read_bytes()[:20]
    assert np.array_equal(c1.val, c2.val)


def test_folder_skips_binary_and_hidden_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello " * 10)
    (tmp_path / "b.bin").write_bytes(b"\0\1\2" * 10)
    (tmp_path / ".hidden").write_text("secret")
    assert [f.name for f in corpus_files(str(tmp_path))] == ["a.txt", "b.bin"]
    c = load_corpus(C.DataConfig(path=str(tmp_path), val_fraction=0.0), 8, progress=False)
    assert bytes(c.train) == b"hello " * 10 + b"\n"


@pytest.mark.parametrize("make", ["missing", "empty_dir", "empty_file", "tiny_file"])
def test_unusable_data_is_a_config_error(tmp_path, make):
    path = tmp_path / "x"
    if make == "empty_dir":
        path.mkdir()
    elif make == "empty_file":
        path.write_text("")
    elif make == "tiny_file":
        path.write_text("abc")
    with pytest.raises(ConfigError) as e:
        load_corpus(C.DataConfig(path=str(path)), 16, progress=False)
    assert e.value.field == "data.path"


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_shares_make_up_the_global_batch(dp):
    tokens = np.arange(1000, dtype=np.int64) % 251
    whole = Sampler(tokens, 8, 8, seed=3, dp_rank=0, dp=1).batch(5)
    parts = [Sampler(tokens, 8, 8, seed=3, dp_rank=r, dp=dp).batch(5) for r in range(dp)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(whole[1][:, :-1], whole[0][:, 1:])  # targets are inputs shifted by one


def test_sampler_resumes_at_exact_position():
    """The data position is the step: a fresh sampler (a resumed run) draws step 3's batch as the
    first one did, whatever it drew before, and other steps differ."""
    tokens = np.arange(500, dtype=np.uint8)
    a = Sampler(tokens, 8, 4, seed=1, dp_rank=0, dp=1)
    first = [a.batch(s)[0] for s in range(5)]
    b = Sampler(tokens, 8, 4, seed=1, dp_rank=0, dp=1)
    assert torch.equal(b.batch(3)[0], first[3])
    assert not torch.equal(first[2], first[3])


def test_validation_windows_are_fixed_and_shared_out():
    tokens = np.arange(300, dtype=np.uint8)
    full = val_batches(tokens, 8, 6, 0, 1)[0]
    parts = [val_batches(tokens, 8, 6, r, 2)[0] for r in range(2)]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, full.tolist()))
