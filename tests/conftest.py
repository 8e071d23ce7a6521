"""Shared fixtures: a tiny model config, a small text corpus, an isolated token cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from plait import config as C

_CACHE = tempfile.mkdtemp(prefix="plait-test-cache-")
os.environ["PLAIT_CACHE"] = _CACHE  # never touch the user's cache from tests
os.environ.setdefault("MPLCONFIGDIR", _CACHE)

TINY = [
    "model.layers=2", "model.hidden=32", "model.heads=4", "model.seq_len=16",
    "train.global_batch=8", "train.micro_batch=2", "train.steps=4", "train.warmup=1",
    "train.eval_every=0", "train.lr=3e-3",
]


@pytest.fixture(scope="session")
def corpus_file() -> Path:
    """About 60 kB of real text (Python source), the same on every machine with this package."""
    import plait.config as src

    path = Path(_CACHE) / "corpus.txt"
    text = Path(src.__file__).read_text()
    path.write_text(text * max(1, 60_000 // len(text)))
    return path


def tiny_config(corpus: Path, *overrides: str, nproc: int = 1) -> C.RunConfig:
    """A 2-layer, 32-wide model on the test corpus; ``overrides`` as for --set."""
    cfg = C.load(None, [*TINY, f"data.path={corpus}", *overrides])
    return C.resolve(cfg, nproc)


def tiny_args(corpus: Path) -> list[str]:
    """The same tiny run as command-line flags."""
    return [a for s in TINY for a in ("--set", s)] + ["--data", str(corpus)]


_REFERENCES: dict = {}  # reference config -> its one-process run, shared by every test that needs it


def verify_layout(base: C.RunConfig, layout: str, tol: float = 1e-9) -> dict:
    """``layout`` ("dp=2,zero=1") trained and compared with the one-process run of ``base``, which
    is computed once per base config and shared by every test."""
    from plait.verify import (
        check_layout,
        layout_config,
        own_reference,
        parse_layouts,
        reference_config,
        run_own_reference,
        run_reference,
    )

    parsed = parse_layouts(layout)[0]
    cfg = layout_config(base, parsed)[0]
    own = own_reference(cfg)  # DiLoCo: its replicas in one process
    key = (reference_config(base), own)
    if key not in _REFERENCES:
        _REFERENCES[key] = run_reference(base) if own is None else run_own_reference(cfg)
    return check_layout(base, parsed, _REFERENCES[key], tol)


def layout_id(layout: str) -> str:
    """A pytest id that ``-k`` can select: "dp=2,zero=3" -> "dp2-zero3"."""
    return layout.replace("=", "").replace(",", "-").replace(":", "_")
