"""Sampling text from a model: one window rule, one token choice, two samplers (with and without a KV cache).

Both samplers run the same loop over a batch of prompts (lists of token ids, of any lengths):

- **the window rule** (:func:`window_start`), the same for both so that they stay comparable: a
  row's context is its tokens from its window start on; when the window would hold more than
  ``seq_len`` tokens it restarts from the row's last ``seq_len // 2`` tokens (a prompt longer than
  ``seq_len`` starts that way too). Positions count from the window start (learned positions and
  rotary angles stay inside ``seq_len``). A row's window depends only on its own length, so a row
  generates the same tokens alone as in any batch;
- **the batch**: the rows' windows left-padded to the longest; each row attends only to its own
  tokens (padding is masked) at its own positions, so every row's last token sits in the last column;
- **uncached** (the reference): every step runs the whole windows again;
- **cached**: the first step fills a :class:`~plait.models.gpt.KVCache` from the windows (a
  prefill); each later step runs only the newest token of each row, written into the next slot in
  place. Slots are shared by the rows (left padding keeps them aligned), each row attending only to
  the slots of its own window. A row whose window restarts is refilled alone: its new window (less
  the newest token) is written into the slots just before the next one, its older slots masked.
  The cache holds ``2 x seq_len`` slots; when they run out, a prefill starts it again from the
  windows (at most once every ``seq_len`` steps);
- **the choice** (:func:`choose`): temperature 0 takes the argmax; otherwise logits / temperature,
  then top-k, then top-p (nucleus), then one uniform number per row from the CPU generator, in
  float64, so that a seed gives the same text wherever the logits agree.

What a step runs is a *runner*'s business (``forward(tokens, decoding) -> logits (B, V) or None``
and ``choose(logits, batch) -> tokens (B,)``): :class:`LocalRunner` here for one process,
``plait.generate.ParallelRunner`` for tensor and pipeline parallel. This module holds no
distributed code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .gpt import Decoding, KVCache


@dataclass(frozen=True)
class SampleOptions:
    """How to pick tokens: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        """One line naming the first option out of range."""
        for name, ok, valid in (("--max-tokens", self.max_tokens >= 1, "must be at least 1"),
                                ("--temperature", self.temperature >= 0, "must be 0 (greedy) or more"),
                                ("--top-k", self.top_k >= 0, "must be 0 (off) or more"),
                                ("--top-p", 0 < self.top_p <= 1, "must be in (0, 1] (1: off)")):
            if not ok:
                raise ConfigError(name, getattr(self, name[2:].replace("-", "_")), valid)


# ------------------------------------------------------------------------- choosing a token


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with -inf outside each row's top ``top_k`` (ties at the k-th value stay) and
    outside the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))  # the most likely one always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return logits


def choose(logits: torch.Tensor, opts: SampleOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token (B,) of every row from logits (B, V), on the CPU in float64: the argmax at
    temperature 0, else a draw by inverting the cumulative distribution at one uniform number per
    row from ``generator``."""
    logits = logits.detach().to("cpu", torch.float64)
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / opts.temperature, opts.top_k, opts.top_p), dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = 1.0 - torch.rand((len(cdf), 1), generator=generator, dtype=torch.float64)  # in (0, 1]
    return (cdf < u * cdf[:, -1:]).sum(dim=-1).clamp_(max=cdf.shape[-1] - 1)


# ------------------------------------------------------------------------- the window rule and the batch


def window_start(length: int, start: int, seq_len: int) -> int:
    """The window rule (module docstring): the start of a row of ``length`` tokens whose window
    began at ``start``, for a model of ``seq_len`` positions."""
    return length - max(1, seq_len // 2) if length - start > seq_len else start


class Rows:
    """The tokens of every row (prompt and generated) and where each row's window starts."""

    def __init__(self, prompts: Sequence[Sequence[int]], seq_len: int, device: torch.device | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("prompt", "", "every prompt needs at least one token")
        self.tokens = [list(p) for p in prompts]
        self.starts = [0] * len(prompts)
        self.seq_len, self.device = seq_len, device

    def __len__(self) -> int:
        return len(self.tokens)

    def advance(self) -> list[int]:
        """Apply the window rule to every row; the rows whose window restarted."""
        moved = []
        for i, row in enumerate(self.tokens):
            new = window_start(len(row), self.starts[i], self.seq_len)
            if new != self.starts[i]:
                moved.append(i)
            self.starts[i] = new
        return moved

    def append(self, tokens: list[int]) -> None:
        for row, t in zip(self.tokens, tokens):
            row.append(t)

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's newest token and its position in the row's window, both (B, 1)."""
        tokens = [[row[-1]] for row in self.tokens]
        positions = [[len(row) - 1 - s] for row, s in zip(self.tokens, self.starts)]
        return (torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device))

    def restarted(self, rows: list[int]) -> torch.Tensor:
        """The windows of ``rows`` (restarted: all of one length) less their newest token (R, W-1)."""
        return torch.tensor([self.tokens[i][self.starts[i]:-1] for i in rows], dtype=torch.long, device=self.device)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows left-padded to the longest: tokens, positions (both (B, L), padding 0) and
        which entries are real tokens (B, L)."""
        windows = [row[s:] for row, s in zip(self.tokens, self.starts)]
        width = max(len(w) for w in windows)
        tokens = torch.zeros(len(windows), width, dtype=torch.long)
        positions = torch.zeros_like(tokens)
        for i, w in enumerate(windows):
            tokens[i, width - len(w):] = torch.tensor(w)
            positions[i, width - len(w):] = torch.arange(len(w))
        valid = torch.arange(width) >= width - torch.tensor([len(w) for w in windows]).unsqueeze(1)
        return tokens.to(self.device), positions.to(self.device), valid.to(self.device)


def full_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L): causal, and only real tokens as keys; a padding query sees itself, so that
    no row of the softmax is empty (its output is never used)."""
    width = valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye).unsqueeze(1)


# ------------------------------------------------------------------------- the samplers


def causal_mask(width: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, width, width): each token attends to itself and the tokens before it."""
    return torch.ones(width, width, dtype=torch.bool, device=device).tril()[None, None]


class CachedSteps:
    """The cached sampler's steps over ``rows`` (module docstring): a prefill, refills of
    restarted rows, one new slot per step; each returns the logits of every row's newest token."""

    def __init__(self, runner, rows: Rows, seq_len: int):
        self.runner, self.rows = runner, rows
        self.cache = KVCache(len(rows), 2 * seq_len, runner.device)
        self.fresh = True

    def __call__(self, restarted: list[int]) -> torch.Tensor | None:
        if self.fresh or self.cache.length == self.cache.capacity:
            return self.prefill()
        if restarted:
            self.refill(restarted)
        return self.decode()

    def prefill(self) -> torch.Tensor | None:
        """Every row's window, left-padded, into slots 0..L-1."""
        cache, (tokens, positions, valid) = self.cache, self.rows.pack()
        cache.reset()
        cache.valid[:, :valid.shape[1]] = valid
        logits = self.runner.forward(tokens, Decoding(positions, full_mask(valid), cache, 0))
        cache.length, self.fresh = valid.shape[1], False
        return logits

    def refill(self, restarted: list[int]) -> None:
        """The restarted rows' windows but their newest token into the slots just before the next
        one (the rows' older slots masked from now on)."""
        cache, tokens, device = self.cache, self.rows.restarted(restarted), self.runner.device
        n, start, idx = tokens.shape[1], self.cache.length - tokens.shape[1], torch.tensor(restarted, device=device)
        cache.valid[idx] = False
        cache.valid[idx, start:cache.length] = True
        if n:
            positions = torch.arange(n, device=device).expand_as(tokens)
            self.runner.forward(tokens, Decoding(positions, causal_mask(n, device), cache, start, idx))

    def decode(self) -> torch.Tensor | None:
        """Every row's newest token into the next slot, attending to its row's valid slots."""
        cache, slot = self.cache, self.cache.length
        tokens, positions = self.rows.newest()
        cache.valid[:, slot] = True
        logits = self.runner.forward(tokens, Decoding(positions, cache.valid[:, None, None, :slot + 1], cache, slot))
        cache.length = slot + 1
        return logits


@torch.no_grad()
def sample(runner, prompts: Sequence[Sequence[int]], opts: SampleOptions, seq_len: int, *, cached: bool = True,
           on_tokens: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """Generate ``opts.max_tokens`` tokens after each prompt; every row's tokens, prompt first.

    ``cached``: run each step's new tokens against a KV cache (else the whole windows, the
    reference). ``on_tokens`` receives each step's tokens (one per row) as they are chosen.
    Collective when the runner is (every rank of a parallel runner calls it alike)."""
    rows = Rows(prompts, seq_len, runner.device)
    steps = CachedSteps(runner, rows, seq_len) if cached else None
    for _ in range(opts.max_tokens):
        restarted = rows.advance()
        if steps is not None:
            logits = steps(restarted)
        else:  # the reference: the whole windows again
            tokens, positions, valid = rows.pack()
            logits = runner.forward(tokens, Decoding(positions, full_mask(valid)))
        chosen = runner.choose(logits, len(rows)).tolist()
        rows.append(chosen)
        if on_tokens is not None:
            on_tokens(chosen)
    return rows.tokens


class LocalRunner:
    """One process: a model with ``decode(tokens, decoding) -> logits (B, V)`` (plait's GPT)."""

    def __init__(self, model: nn.Module, opts: SampleOptions, generator: torch.Generator | None = None):
        self.model, self.opts, self.generator = model, opts, generator
        self.device = next(model.parameters()).device

    def forward(self, tokens: torch.Tensor, decoding: Decoding) -> torch.Tensor:
        return self.model.decode(tokens, decoding)

    def choose(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        return choose(logits, self.opts, self.generator)


def sample_local(model: nn.Module, prompts: Sequence[Sequence[int]], opts: SampleOptions, *, cached: bool = True,
                 seed: int = 0, on_tokens: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """:func:`sample` on one process with plait's GPT (evaluation mode for the call), the CPU
    generator seeded with ``seed``."""
    was_training = model.training
    model.eval()
    try:
        runner = LocalRunner(model, opts, torch.Generator().manual_seed(seed))
        return sample(runner, prompts, opts, model.cfg.seq_len, cached=cached, on_tokens=on_tokens)
    finally:
        model.train(was_training)


class _PlainRunner:
    """The uncached sampler over any ``forward(tokens (1, S)) -> logits (1, S, V)`` (one row, so
    no padding and positions 0..S-1: the model's own forward), the input right-padded to a
    multiple of ``pad_to`` (causal attention: padding after the last token changes nothing before it)."""

    def __init__(self, forward: Callable, opts: SampleOptions, generator, pad_to: int, device):
        self.fwd, self.opts, self.generator, self.pad_to, self.device = forward, opts, generator, pad_to, device

    def forward(self, tokens: torch.Tensor, decoding: Decoding) -> torch.Tensor:
        n = tokens.shape[1]
        return self.fwd(F.pad(tokens, (0, -n % self.pad_to)))[:, n - 1]

    def choose(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        return choose(logits, self.opts, self.generator)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, context: int, temperature: float = 0.8,
             top_k: int = 40, generator: torch.Generator | None = None, forward=None, pad_to: int = 1,
             top_p: float = 1.0) -> torch.Tensor:
    """Sample ``new_tokens`` after ``prompt`` (1-D) with the uncached sampler and the window rule
    of ``context`` positions; returns prompt and new tokens (1-D).

    ``forward`` (default: ``model``) maps tokens (1, S) to logits (1, S, V) and may be collective
    (a parallel model's ``full_logits``: every rank then draws the same tokens from generators
    seeded alike). With ``pad_to`` > 1 the context is right-padded to a multiple of it.
    """
    if new_tokens < 1:
        return prompt.clone()
    was_training = model.training
    model.eval()
    try:
        opts = SampleOptions(new_tokens, temperature, top_k, top_p)
        runner = _PlainRunner(forward or model, opts, generator, pad_to, prompt.device)
        rows = sample(runner, [prompt.tolist()], opts, context, cached=False)
    finally:
        model.train(was_training)
    return torch.tensor(rows[0], dtype=prompt.dtype, device=prompt.device)


__all__ = ["CachedSteps", "LocalRunner", "Rows", "SampleOptions", "causal_mask", "choose", "filter_logits", "full_mask",
           "generate", "sample", "sample_local", "window_start"]
