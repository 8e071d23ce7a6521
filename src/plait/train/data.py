"""Corpora, byte-level tokens, and a deterministic, resumable sampler sharded over dp.

The embedded corpus is the Python standard library's own ``.py`` files on this machine (found
through ``sysconfig``, in sorted order). Text is tokenised once into bytes (vocab 256) and cached
as a memory-mapped file, keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, DataConfig

VOCAB = 256  # byte-level tokens


def cache_dir() -> Path:
    root = os.environ.get("PLAIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "plait"
    )
    return Path(root)


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted; third-party site-packages are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())


def corpus_files(path: str) -> list[Path]:
    """The files of ``data.path``: one text file, or every non-hidden file under a folder."""
    if not path:
        return stdlib_files()
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = (f for f in p.rglob("*") if f.is_file())
        return sorted(f for f in files if not any(s.startswith(".") for s in f.relative_to(p).parts))
    raise ConfigError("data.path", path, "no such file or folder; give a text file or a folder of text files")


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def tokenize(files: list[Path], progress: bool = True) -> Path:
    """Byte tokens of every text file (binary files, those holding NUL, are skipped), cached."""
    out = cache_dir() / f"corpus-{_fingerprint(files)}.u8"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as w:
        for f in tqdm(files, desc="tokenising corpus", unit="file", disable=not progress, leave=False):
            data = f.read_bytes()
            if data and b"\0" not in data:
                w.write(data if data.endswith(b"\n") else data + b"\n")
    os.replace(tmp, out)  # atomic: concurrent ranks under torchrun may both build it
    return out


@dataclass(frozen=True)
class Corpus:
    """Token ids split into a training part and a validation tail."""

    train: np.ndarray
    val: np.ndarray


def load_corpus(cfg: DataConfig, seq_len: int, progress: bool = True) -> Corpus:
    """Load (tokenising on first use) and split; a corpus too small for one sequence is an error."""
    files = corpus_files(cfg.path)
    if not files:
        raise ConfigError("data.path", cfg.path, "the folder holds no files (empty corpus)")
    tokens = np.zeros(0, np.uint8)
    if _nonempty(files):
        cached = tokenize(files, progress)
        if cached.stat().st_size:  # all files binary: nothing was kept
            tokens = np.memmap(cached, dtype=np.uint8, mode="r")
    n_val = int(len(tokens) * cfg.val_fraction)
    need = seq_len + 1
    if len(tokens) - n_val < need or (cfg.val_fraction > 0 and n_val < need):
        what = cfg.path or "the embedded corpus"
        raise ConfigError(
            "data.path", what, f"corpus of {len(tokens)} tokens is too small (empty corpus?): need at least "
            f"{need} for training{f' and {need} for validation' if cfg.val_fraction > 0 else ''} at seq_len={seq_len}",
        )
    return Corpus(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val:])


def _nonempty(files: list[Path]) -> bool:
    return any(f.stat().st_size > 0 for f in files)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # (B, S+1)
    return chunk[:, :-1], chunk[:, 1:]


class Sampler:
    """Random windows of ``seq_len+1`` tokens, a fixed set per step for the whole global batch.

    Step ``s`` draws ``global_batch`` window starts from a generator seeded by ``(seed, s)``;
    dp rank ``r`` takes the r-th contiguous share. So every layout sees exactly the same global
    batch, and resuming at step ``s`` continues the same stream (the position is just ``s``).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, dp_rank: int, dp: int):
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.dp_rank, self.dp = seed, dp_rank, dp

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (global_batch/dp, seq_len), of this rank for ``step``."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)
        share = self.global_batch // self.dp
        return _windows(self.tokens, starts[self.dp_rank * share:(self.dp_rank + 1) * share], self.seq_len)


def val_batches(tokens: np.ndarray, seq_len: int, count: int, dp_rank: int, dp: int):
    """A fixed, evenly spaced set of ``count`` validation windows; this rank's share of it."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    return _windows(tokens, starts[dp_rank::dp], seq_len)
