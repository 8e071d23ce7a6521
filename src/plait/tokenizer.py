"""Real tokenizers for training text: a Hugging Face ``tokenizer.json`` (``data.tokenizer``) read
with the ``tokenizers`` library, imported only here and only when one is given (bytes need none).

Text is encoded without special tokens; decoding turns ids back into text, ids the tokenizer
does not know (a model's padded vocabulary) dropped.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

FIELD = "data.tokenizer"
MASK_TOKENS = ("[MASK]", "<mask>")  # BERT's WordPiece, RoBERTa's byte-level BPE


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of the tokenizer.json at ``path``; one-line ConfigError when the
    file is missing or not a tokenizer the library reads."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(FIELD, path, "no such file; give a tokenizer.json (Hugging Face tokenizers), or leave "
                          "it empty for byte-level tokens")
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise ConfigError(FIELD, path, "needs the tokenizers library: pip install 'plait[hf]'") from None
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(FIELD, path, f"is not a tokenizer.json the tokenizers library reads ({reason})") from None
    tok.no_truncation()  # a file may carry an export's settings: plait cuts and pads itself
    tok.no_padding()
    return tok


def vocab_size(tokenizer) -> int:
    """Ids the tokenizer can produce (added tokens included): the least ``model.vocab``."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def mask_id(tokenizer) -> int | None:
    """The id of the mask token ("[MASK]" or "<mask>"), None when the tokenizer has none."""
    return token_id(tokenizer, MASK_TOKENS)


def token_id(tokenizer, names: tuple[str, ...]) -> int | None:
    """The id of the first of ``names`` the tokenizer knows, else None."""
    return next((i for i in map(tokenizer.token_to_id, names) if i is not None), None)


def encode(tokenizer, text: str) -> list[int]:
    """The ids of ``text``, no special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer, ids) -> str:
    """The text of ``ids`` (special tokens left out, unknown ids dropped)."""
    return tokenizer.decode([int(i) for i in ids])


__all__ = ["decode", "encode", "load_tokenizer", "mask_id", "token_id", "vocab_size"]
