"""CoNLL-style tagging data: read, label, split into sub-word tokens, batch.

A split is a text file with one token per line (the word first, its BIO tag last, any columns
between ignored), sentences separated by blank lines; ``-DOCSTART-`` lines are skipped. Words are
split into the tokenizer's sub-word tokens (the tokenizer's own special tokens around them, as
the checkpoint was trained); a word's label sits on its first sub-token, every other position
(later sub-tokens, special tokens, padding) has the target ``IGNORE``. Without a tokenizer, words
are byte-level: their UTF-8 bytes, separated by a space.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.description import IGNORE

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_conll(path: Path) -> list[Sentence]:
    """The sentences of one CoNLL file; a line that is not ``WORD ... TAG`` with a BIO tag stops
    with one line naming the file and line number."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(_lines(path), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append(Sentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        if len(parts) < 2:
            raise ConfigError("--data", f"{path}:{number}", f"expected a token and its tag separated by "
                              f"whitespace, got {line.strip()!r}")
        tag = parts[-1]
        if not (tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)):
            raise ConfigError("--data", f"{path}:{number}", f"the tag {tag!r} is not BIO: give O, B-TYPE or "
                              "I-TYPE in the last column")
        words.append(parts[0])
        tags.append(tag)
    if words:
        sentences.append(Sentence(tuple(words), tuple(tags)))
    return sentences


def _lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, if any, is not a word
            return f.readlines()
    except UnicodeDecodeError as e:
        raise ConfigError("--data", str(path), f"is not UTF-8 text (byte {e.start}); convert it, e.g. "
                          "iconv -f latin1 -t utf-8") from None


def read_splits(folder: str) -> dict[str, list[Sentence]]:
    """train.txt (required), dev.txt and test.txt (each used when present) of ``folder``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError("--data", folder, "no such folder; give a folder holding train.txt, dev.txt, test.txt")
    if not (root / "train.txt").is_file():
        raise ConfigError("--data", folder, "holds no train.txt (CoNLL columns: a token and its BIO tag per line)")
    splits = {s: read_conll(root / f"{s}.txt") for s in SPLITS if (root / f"{s}.txt").is_file()}
    for name, sentences in splits.items():
        if not sentences:
            raise ConfigError("--data", str(root / f"{name}.txt"), "holds no sentence")
    return splits


def label_names(splits: dict[str, list[Sentence]]) -> list[str]:
    """Every tag of the data: ``O`` first, then B- and I- of each entity type in order of the type."""
    tags = {t for sentences in splits.values() for s in sentences for t in s.tags}
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in types for p in "BI"]


@dataclass(frozen=True)
class Encoded:
    """A split as model inputs: tokens, padding (1 for a token) and targets, each (N, L); and for
    every sentence the position of each word's first sub-token (-1 for a word cut off by the length,
    or one the tokenizer gives no token)."""

    tokens: torch.Tensor
    padding: torch.Tensor
    targets: torch.Tensor
    firsts: list[list[int]]

    @functools.cached_property
    def labelled(self) -> torch.Tensor:
        """(N,) the words with a target in each sentence (counted once, read every step)."""
        return (self.targets != IGNORE).sum(dim=1)

    def inputs(self, rows) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[rows], "padding": self.padding[rows]}

    def __len__(self) -> int:
        return len(self.firsts)


class WordTokenizer:
    """Words -> sub-word ids with the word of each id (None for special tokens): a ``tokenizers``
    tokenizer, or bytes when there is none."""

    def __init__(self, path: str = ""):
        self.tok, self.pad_id = None, 0  # padding is masked from attention and loss: any id serves
        if path:
            from ..tokenizer import load_tokenizer, token_id

            self.tok = load_tokenizer(path)
            self.pad_id = token_id(self.tok, ("[PAD]", "<pad>")) or 0

    def split(self, sentences: list[Sentence]) -> list[tuple[list[int], list[int | None]]]:
        """(ids, word of each id) of every sentence."""
        if self.tok is not None:
            encs = self.tok.encode_batch([list(s.words) for s in sentences], is_pretokenized=True)
            return [(list(e.ids), list(e.word_ids)) for e in encs]
        out = []
        for s in sentences:
            ids, owners = [], []
            for i, w in enumerate(s.words):
                word = w.encode("utf-8")
                ids += ([32] if i else []) + list(word)  # a space between words
                owners += ([None] if i else []) + [i] * len(word)
            out.append((ids, owners))
        return out


def encode(sentences: list[Sentence], pieces: list, labels: list[str], length: int, pad_id: int) -> Encoded:
    """``sentences`` (split into ``pieces`` by ``WordTokenizer.split``) as (N, length) inputs and
    targets; longer ones are cut at ``length`` (the words beyond take no part in training and count
    as predicted ``O`` in evaluation)."""
    index = {t: i for i, t in enumerate(labels)}
    n = len(sentences)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    padding = torch.zeros((n, length), dtype=torch.long)
    targets = torch.full((n, length), IGNORE, dtype=torch.long)
    firsts = []
    for row, (s, (ids, owners)) in enumerate(zip(sentences, pieces)):
        if len(ids) > length:  # cut, keeping a closing special token ([SEP]) where there is one
            end = 1 if owners[-1] is None else 0
            ids, owners = ids[:length - end] + ids[len(ids) - end:], owners[:length - end] + owners[len(owners) - end:]
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        padding[row, :len(ids)] = 1
        first = [-1] * len(s.words)
        for pos, w in enumerate(owners):
            if w is not None and first[w] < 0:
                first[w] = pos
                targets[row, pos] = index[s.tags[w]]
        firsts.append(first)
    return Encoded(tokens, padding, targets, firsts)


def padded_length(longest_tokens: int, limit: int, multiple: int) -> int:
    """The sequence length of every batch: the longest sentence rounded up to ``multiple`` (a
    multiple of 8 and of tp, which sequence parallel splits by), at most ``limit``."""
    length = -(-longest_tokens // multiple) * multiple
    return min(length, limit - limit % multiple)


def step_rows(n: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """The training sentences of optimizer step ``step``: consecutive slices of a fresh random
    order every epoch, the same on every rank (so every layout sees the same global batches)."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for g in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(g, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(orders[epoch][pos])
    return np.asarray(out)


def multiple_for(tp: int) -> int:
    return 8 * tp // math.gcd(8, tp)
