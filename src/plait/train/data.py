"""Corpora, byte-level tokens, and a deterministic, resumable sampler sharded over dp.

The embedded corpus is the Python standard library's own ``.py`` files on this machine (found
through ``sysconfig``, in sorted order). Text is tokenised once into bytes (vocab 256) and cached
as a memory-mapped file, keyed by the files' names, sizes and modification times. With
``data.tokenizer`` (a tokenizer.json) it is encoded into that tokenizer's ids instead, cached as
uint16 (or uint32 past 65535 tokens) and keyed by the tokenizer's contents too.
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
from ..models.description import IGNORE

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


TOKEN_DTYPES = {".u8": np.uint8, ".u16": np.uint16, ".u32": np.uint32}  # cache file suffix -> its ids' dtype
ENCODE_CHUNK = 1 << 22  # characters of text encoded in one encode_batch call (a few files, or one big one)


def tokenize(files: list[Path], progress: bool = True, tokenizer: str = "") -> Path:
    """Byte tokens of every text file (binary files, those holding NUL, are skipped), cached;
    with ``tokenizer`` (a tokenizer.json) its ids instead (``TOKEN_DTYPES`` by the file's suffix)."""
    if tokenizer:
        return _encode_files(files, progress, tokenizer)

    def write(w, bar) -> None:
        for f in files:
            text = _text_of(f)
            if text:
                w.write(text)
            bar.update(1)

    return _cached(cache_dir() / f"corpus-{_fingerprint(files)}.u8", len(files), progress, write)


def _encode_files(files: list[Path], progress: bool, path: str) -> Path:
    """The tokenizer's ids of every text file (no special tokens), cached like the bytes."""
    from ..tokenizer import load_tokenizer, vocab_size

    tok = load_tokenizer(path)
    key = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:12]
    suffix = ".u16" if vocab_size(tok) <= 65535 else ".u32"

    def write(w, bar) -> None:
        for texts, read in _text_batches(files):
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                np.asarray(enc.ids, dtype=TOKEN_DTYPES[suffix]).tofile(w)
            bar.update(read)

    return _cached(cache_dir() / f"corpus-{_fingerprint(files)}-tok{key}{suffix}", len(files), progress, write)


def _cached(out: Path, files: int, progress: bool, write) -> Path:
    """``out``, built once: ``write(file, bar)`` fills a temporary file (``bar`` counts ``files``),
    renamed into place atomically (concurrent ranks under torchrun may both build it)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as w, tqdm(total=files, desc="tokenising corpus", unit="file", disable=not progress,
                                    leave=False) as bar:
        write(w, bar)
    os.replace(tmp, out)
    return out


def _text_of(f: Path) -> bytes | None:
    """A text file's bytes ending in a newline; None for an empty or binary one (holding NUL)."""
    data = f.read_bytes()
    if not data or b"\0" in data:
        return None
    return data if data.endswith(b"\n") else data + b"\n"


def _text_batches(files: list[Path]):
    """(texts, files read) in batches of about ``ENCODE_CHUNK`` characters: each text file's
    contents as ``_text_of`` gives them, decoded (binary files skipped)."""
    texts: list[str] = []
    size = read = 0
    for f in files:
        data, read = _text_of(f), read + 1
        if data:
            texts.append(data.decode("utf-8", errors="replace"))
            size += len(texts[-1])
        if size >= ENCODE_CHUNK:
            yield texts, read
            texts, size, read = [], 0, 0
    if read:
        yield texts, read


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
        cached = tokenize(files, progress, cfg.tokenizer)
        if cached.stat().st_size:  # all files binary: nothing was kept
            tokens = np.memmap(cached, dtype=TOKEN_DTYPES[cached.suffix], mode="r")
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


@dataclass(frozen=True)
class Masking:
    """Masked-language modelling's inputs and targets (Devlin et al. 2019, §3.1): ``fraction`` of
    the positions are predicted; of those 80% show ``mask_id``, 10% a random token of ``vocab``,
    10% the token itself. The other positions' targets are ``IGNORE``. Byte-level text never holds
    byte 0 (files with NUL are skipped), so 0 serves as the mask token there."""

    mask_id: int = 0
    vocab: int = VOCAB
    fraction: float = 0.15

    def apply(self, x: torch.Tensor, rng: np.random.Generator, rows: int, share: slice):
        """(inputs, targets, positions chosen over all ``rows``) of the windows ``x``, which are rows
        ``share`` of ``rows``; the draws cover all ``rows``, so every dp rank masks its share as one
        process masks the whole, and knows the whole batch's count of targets."""
        shape = (rows, x.shape[1])
        every = rng.random(shape) < self.fraction
        chosen, how = every[share], rng.random(shape)[share]
        random_tok = torch.from_numpy(rng.integers(0, self.vocab, shape)[share])
        chosen_t, how_t = torch.from_numpy(chosen), torch.from_numpy(how)
        targets = x.masked_fill(~chosen_t, IGNORE)
        inputs = torch.where(chosen_t & (how_t < 0.8), torch.full_like(x, self.mask_id), x)
        inputs = torch.where(chosen_t & (how_t >= 0.8) & (how_t < 0.9), random_tok, inputs)
        return inputs, targets, int(every.sum())


class Sampler:
    """Random windows of ``seq_len+1`` tokens, a fixed set per step for the whole global batch.

    Step ``s`` draws ``global_batch`` window starts from a generator seeded by ``(seed, s)``;
    dp rank ``r`` takes the r-th contiguous share. So every layout sees exactly the same global
    batch, and resuming at step ``s`` continues the same stream (the position is just ``s``).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, dp_rank: int, dp: int,
                 masking: Masking | None = None):
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.dp_rank, self.dp, self.masking = seed, dp_rank, dp, masking

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (global_batch/dp, seq_len), of this rank for ``step``: the next
        tokens, or with ``masking`` the window masked and its targets at the masked positions."""
        return self.draw(step)[:2]

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``batch`` and the targets in the whole global batch of ``step`` (every dp rank's: every
        token of every window, or the masked positions), known without communication."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)
        n = self.global_batch // self.dp
        share = slice(self.dp_rank * n, (self.dp_rank + 1) * n)
        x, y = _windows(self.tokens, starts[share], self.seq_len)
        if self.masking is None:
            return x, y, self.global_batch * self.seq_len
        return self.masking.apply(x, np.random.default_rng([self.seed, step, 1]), self.global_batch, share)


def val_batches(tokens: np.ndarray, seq_len: int, count: int, dp_rank: int, dp: int, masking: Masking | None = None):
    """A fixed, evenly spaced set of ``count`` validation windows; this rank's share of it (masked
    the same way on every run with ``masking``)."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    x, y = _windows(tokens, starts[dp_rank::dp], seq_len)
    if masking is None:
        return x, y
    return masking.apply(x, np.random.default_rng(VAL_MASK_SEED), count, slice(dp_rank, None, dp))[:2]


VAL_MASK_SEED = 20190524  # validation's masks are fixed: the same positions at every evaluation
