"""``plait generate``: text from a trained model, on one process or split by the training strands.

The samplers, the window rule and the KV cache live with the model (``models/sampling.py``,
``models/gpt.py``); this module runs them across processes (no data parallel: ``nproc = tp x pp``):

- **tensor parallel** (``--tp``): ``apply_tensor_parallel`` as in training, without sequence
  parallel. Each rank computes and caches its own heads; per block two all-reduces over tp (the
  row-parallel outputs of attention and MLP) and one for the vocabulary-split embedding; the last
  stage all-gathers the vocabulary-split logits (B, V/tp) over tp before sampling.
- **pipeline parallel** (``--pp``): ``apply_pipeline`` splits the blocks into balanced stages; a
  decoding step runs them one after the other: stage s receives the hidden states (B, S, H) from
  stage s-1 and sends its own to stage s+1, point-to-point over the pp group. Each stage caches
  the keys and values of its own blocks.
- **the choice**: one rank (the last stage's tp rank 0) samples from the full logits with the CPU
  generator seeded by ``--seed``, then broadcasts the tokens (B,) to every rank, so all ranks agree
  and a seed gives the same text at every layout.

Global rank 0 streams the text as it is chosen (one prompt); logs go to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError
from .models.description import ModelDescription
from .models.gpt import Decoding
from .models.sampling import SampleOptions, choose, sample, sample_local

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layout:
    """How generation is split: tensor parallel ``tp`` x pipeline stages ``pp`` processes."""

    tp: int = 1
    pp: int = 1

    @property
    def nproc(self) -> int:
        return self.tp * self.pp


@dataclass
class Generated:
    """Every row's tokens (prompt first) and the seconds the sampler took."""

    tokens: list[list[int]]
    seconds: float


# ------------------------------------------------------------------------- one rank of a parallel run


class ParallelRunner:
    """One rank's part of a decoding step under tp and pp (module docstring): the forward of its
    stage, and the choice made on the sampling rank and broadcast to all."""

    def __init__(self, model: nn.Module, desc: ModelDescription, groups, tp, opts: SampleOptions, seed: int):
        self.model, self.tp, self.opts = model, tp, opts
        self.blocks = desc.block_list(model)
        self.hidden = desc.hidden
        self.device = next(model.parameters()).device
        topo = groups.topology
        pp_rank = groups.coord.pp_rank
        self.first, self.last = pp_rank == 0, pp_rank == topo.pp - 1
        self.prev = topo.rank_of(pp_rank - 1, 0, groups.coord.tp_rank) if not self.first else None
        self.next = topo.rank_of(pp_rank + 1, 0, groups.coord.tp_rank) if not self.last else None
        self.chooser = topo.rank_of(topo.pp - 1, 0, 0)
        self.generator = torch.Generator().manual_seed(seed) if groups.rank == self.chooser else None
        self.dtype = next(model.parameters()).dtype

    def forward(self, tokens: torch.Tensor, decoding: Decoding) -> torch.Tensor | None:
        """This stage's blocks on the hidden states of stage s-1 (or the embedded tokens); the
        full logits (B, V) on the last stage, None elsewhere. Sends (B, S, H) to stage s+1 over pp."""
        if self.first:
            x = self.model.embed(tokens, decoding.positions)
        else:
            x = torch.empty((*tokens.shape, self.hidden), dtype=self.dtype, device=self.device)
            dist.recv(x, self.prev)
        for block in self.blocks:
            x = block(x, decoding)
        if not self.last:
            dist.send(x.contiguous(), self.next)
            return None
        logits = self.model.head(x[:, -1])  # (B, V[/tp])
        return self.tp.full_logits(logits) if self.tp is not None else logits  # all-gather over tp

    def choose(self, logits: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The next tokens (B,), chosen on the sampling rank and broadcast to every rank."""
        if dist.get_rank() == self.chooser:
            tokens = choose(logits, self.opts, self.generator).to(self.device)
        else:
            tokens = torch.empty(batch, dtype=torch.long, device=self.device)
        dist.broadcast(tokens, self.chooser)
        return tokens


def _worker(model: nn.Module, desc: ModelDescription, prompts: list[list[int]], opts: SampleOptions, layout: Layout,
            cached: bool, seed: int, stream: Callable | None) -> Generated | None:
    """One rank: split its copy of the whole model by ``layout``, generate; rank 0 returns the rows."""
    from . import comm
    from .parallel.pipeline.stages import apply_pipeline
    from .parallel.tensor import apply_tensor_parallel
    from .topology import Topology, build_groups

    device = comm.pick_device()
    groups = build_groups(Topology(pp=layout.pp, dp=1, tp=layout.tp), device.type)
    model = model.eval()  # split on the CPU first: only this rank's part goes to the device
    tp = apply_tensor_parallel(model, desc, groups.mesh["tp"]) if layout.tp > 1 else None
    if layout.pp > 1:  # this rank's blocks (a balanced split), the input / output stage where they live
        apply_pipeline(model, desc, groups.pp, schedule="1f1b")
    model = model.to(device)
    runner = ParallelRunner(model, desc, groups, tp, opts, seed)
    dist.barrier()
    t0 = time.perf_counter()
    rows = sample(runner, prompts, opts, model.cfg.seq_len, cached=cached,
                  on_tokens=stream if groups.rank == 0 else None)
    seconds = time.perf_counter() - t0
    if groups.rank == 0:
        _close(stream)
    return Generated(rows, seconds) if groups.rank == 0 else None


def generate_tokens(model: nn.Module, desc: ModelDescription, prompts: Sequence[Sequence[int]], opts: SampleOptions,
                    layout: Layout = Layout(), *, cached: bool = True, seed: int = 0,
                    stream: Callable[[list[int]], None] | None = None, timeout_s: float | None = None,
                    threads: int | None = None) -> Generated:
    """Generate after every prompt with the whole model ``model`` (plait's GPT, on the CPU),
    split by ``layout``: in this process when it is one process, else on ``layout.nproc`` forked
    ranks (each splits its own copy). ``stream`` receives each step's tokens (on rank 0), and
    its ``close()``, if it has one, is called there at the end."""
    check_layout(model, layout)
    prompts = [list(p) for p in prompts]
    if layout.nproc == 1:
        t0 = time.perf_counter()
        rows = sample_local(model, prompts, opts, cached=cached, seed=seed, on_tokens=stream)
        seconds = time.perf_counter() - t0
        _close(stream)
        return Generated(rows, seconds)
    from .launch import run_local, threads_per_process

    sys.stdout.flush()  # a forked rank would write the parent's unflushed output again
    sys.stderr.flush()
    threads = threads or threads_per_process(layout.nproc)
    return run_local(_worker, layout.nproc, (model, desc, prompts, opts, layout, cached, seed, stream),
                     timeout_s=timeout_s, threads=threads)[0]


def _close(stream) -> None:
    """End a stream (a :class:`TextStream` writes its last partial character) where it ran."""
    if hasattr(stream, "close"):
        stream.close()


def check_layout(model: nn.Module, layout: Layout) -> None:
    """One line when the model cannot generate here or ``layout`` cannot split it."""
    cfg = getattr(model, "cfg", None)
    if not hasattr(model, "decode") or cfg is None:
        raise ConfigError("model", type(model).__name__, "plait generate runs plait's own GPT flavours "
                          "(gpt2, llama), whose attention takes a KV cache")
    for flag, value in (("--tp", layout.tp), ("--pp", layout.pp)):
        if value < 1:
            raise ConfigError(flag, value, "must be at least 1")
    for key in ("heads", "kv_heads", "ffn_hidden"):
        if getattr(cfg, key) % layout.tp:
            raise ConfigError("--tp", layout.tp, f"must divide model.{key}={getattr(cfg, key)} "
                              f"(heads={cfg.heads}, kv_heads={cfg.kv_heads}, ffn_hidden={cfg.ffn_hidden})")
    if layout.pp > cfg.layers:
        raise ConfigError("--pp", layout.pp, f"must be at most model.layers={cfg.layers} (one block per stage)")


# ------------------------------------------------------------------------- text


def encode(text: str, vocab: int, field: str = "--prompt", tokenizer=None) -> list[int]:
    """The byte-level tokens of ``text`` (UTF-8), or its ids by ``tokenizer`` (a run's
    ``data.tokenizer``, no special tokens); every token must be in the model's vocabulary."""
    if tokenizer is not None:
        from .tokenizer import encode as tok_encode

        tokens = tok_encode(tokenizer, text) if text else []
    else:
        tokens = list(text.encode("utf-8"))
    if not tokens:
        raise ConfigError(field, text, "must not be empty" if not text else "the tokenizer makes no tokens of it")
    if max(tokens) >= vocab:
        raise ConfigError(field, text, f"holds {'ids' if tokenizer is not None else 'bytes'} outside the model's "
                          f"vocabulary of {vocab}")
    return tokens


def decode(tokens: Sequence[int], tokenizer=None) -> str:
    """Bytes (tokens below 256) as UTF-8 text, invalid sequences replaced; or the text of the
    ids by ``tokenizer``."""
    if tokenizer is not None:
        from .tokenizer import decode as tok_decode

        return tok_decode(tokenizer, tokens)
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def continuation(row: Sequence[int], prompt_len: int, tokenizer=None) -> str:
    """The text ``row`` adds after its first ``prompt_len`` tokens. With a tokenizer, the whole row
    is decoded and the prompt's text cut off (a decoder may join a token to the one before it)."""
    if tokenizer is None:
        return decode(row[prompt_len:])
    full, base = decode(row, tokenizer), decode(row[:prompt_len], tokenizer)
    return full[len(base):] if full.startswith(base) else decode(row[prompt_len:], tokenizer)


class TextStream:
    """Writes the text of each step's token (row 0) to ``out`` as it comes, whole UTF-8 characters only.

    With ``tokenizer`` (and row 0's ``prompt`` ids) the whole row so far is decoded each step and
    the text it adds is written; a trailing incomplete character waits for the next token."""

    def __init__(self, out=None, tokenizer=None, prompt: Sequence[int] = ()):
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokenizer, self.row = tokenizer, list(prompt)
        self.shown = decode(self.row, tokenizer) if tokenizer is not None else ""

    def __call__(self, tokens: list[int]) -> None:
        out = self.out or sys.stdout
        if self.tokenizer is not None:
            self.row.extend(int(t) for t in tokens[:1])
            text = self._new_text(final=False)
        else:
            text = self.decoder.decode(bytes(t for t in tokens[:1] if t < 256))
        if text:
            out.write(text)
            out.flush()

    def _new_text(self, final: bool) -> str:
        full = decode(self.row, self.tokenizer)
        if not full.startswith(self.shown):  # the text so far was decoded differently: wait
            return ""
        new = full[len(self.shown):]
        if not final:
            new = new.rstrip("\ufffd")  # part of a character (byte fallback): the rest may follow
        self.shown += new
        return new

    def close(self) -> None:
        out = self.out or sys.stdout
        out.write(self._new_text(final=True) if self.tokenizer is not None else self.decoder.decode(b"", final=True))
        out.flush()


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt``, or the non-empty lines of ``--prompts FILE``."""
    if args.prompts is None:
        if not args.prompt:
            raise ConfigError("--prompt", args.prompt, "must not be empty")
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise ConfigError("--prompts", args.prompts, "no such file; give a text file with one prompt a line")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ConfigError("--prompts", args.prompts, "holds no prompt; give one prompt a line")
    return lines


def load_model(path: str) -> tuple:
    """``(RunConfig, whole model on the CPU, its description)`` from a run folder, a checkpoint
    folder or an exported .safetensors file (``plait.checkpoint.export.load_for_inference``)."""
    if not Path(path).exists():
        raise ConfigError("--ckpt", path, "no such file or folder; give a run folder, a checkpoint folder or an "
                          "exported .safetensors file")
    try:
        from .checkpoint.export import load_for_inference
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("plait.checkpoint"):
            raise
        raise ConfigError("--ckpt", path, "this plait cannot load checkpoints for inference yet "
                          "(plait.checkpoint.export is missing)") from None
    cfg, model, desc = load_for_inference(path)
    if desc.objective != "next_token":
        raise ConfigError("--ckpt", path, f"holds a {cfg.model.builder or cfg.model.flavour} model whose objective is "
                          f"{desc.objective!r}, not next-token prediction: it does not generate text")
    return cfg, model, desc


def run_tokenizer(cfg):
    """The run's ``data.tokenizer`` (a ``tokenizers.Tokenizer``), None for byte-level text."""
    tokenizer = getattr(getattr(cfg, "data", None), "tokenizer", "")
    if not tokenizer:
        return None
    from .tokenizer import load_tokenizer

    return load_tokenizer(tokenizer)


# ------------------------------------------------------------------------- the command


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """``plait generate``'s flags."""
    p = subparsers.add_parser("generate", help="generate text from a trained model (KV cache; --tp/--pp split it)")
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a run folder (its newest good checkpoint), a checkpoint folder or an exported .safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompts", metavar="FILE", help="one prompt a line, generated as one batch")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens after each prompt (bytes, or the run's "
                   "data.tokenizer's)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this "
                   "much probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="of the CPU generator that draws the tokens")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of the weights and the computation")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--nproc", type=int, help="local processes: tp x pp, the default (no data parallel)")
    p.add_argument("--no-cache", action="store_true", help="the uncached sampler (re-runs the whole context every "
                   "token), for comparison")
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    """Load, split, generate; the text on stdout (streamed for one prompt), the rest on stderr."""
    layout = Layout(args.tp, args.pp)
    if args.nproc is not None and args.nproc != layout.nproc:
        raise ConfigError("--nproc", args.nproc, f"must be tp x pp = {layout.nproc} (generation runs no data "
                          "parallel)")
    opts = SampleOptions(args.max_tokens, args.temperature, args.top_k, args.top_p)
    opts.check()
    texts = read_prompts(args)
    cfg, model, desc = load_model(args.ckpt)
    check_layout(model, layout)
    tok = run_tokenizer(cfg)
    field = "--prompt" if args.prompts is None else "--prompts"
    prompts = [encode(t, model.cfg.vocab, field, tok) for t in texts]
    model = model.to(DTYPES[args.dtype])
    stream = TextStream(tokenizer=tok, prompt=prompts[0]) if len(prompts) == 1 else None
    if stream is not None:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    out = generate_tokens(model, desc, prompts, opts, layout, cached=not args.no_cache, seed=args.seed, stream=stream)
    if stream is not None:
        print()
    else:
        for i, (text, row) in enumerate(zip(texts, out.tokens)):
            print(f"=== {i + 1}/{len(texts)} ===\n{text}{continuation(row, len(prompts[i]), tok)}")
    new = len(prompts) * opts.max_tokens
    print(f"{len(prompts)} x {opts.max_tokens} new tokens in {out.seconds:.2f} s ({new / out.seconds:.1f} tokens/s; "
          f"tp={layout.tp}, pp={layout.pp}, {'no cache' if args.no_cache else 'KV cache'}, {args.dtype})",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------------- plait bench generate

BENCH_PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    ", "    return self._",
                 "# Copyright 2001 Python Software Foundation\n", "for i in range(len(items)):\n",
                 "if __name__ == '__main__':\n    ", "    def __init__(self, name, value=None):\n"]
BENCH_TOKENS = 256


def bench_worker(cfg, iters: int, warmup: int) -> dict:
    """``plait bench generate`` on one process: tokens/s of the cached and the uncached sampler
    at ``BENCH_TOKENS`` new tokens for 1 and for 8 prompts, greedy, on the seeded random model of
    ``cfg``; each measured ``iters`` times, taking turns, median reported."""
    from .models import num_params
    from .train.trainer import fresh_model

    model, _ = fresh_model(cfg, torch.device("cpu"))
    model.eval()
    cases = [(n, cached) for n in (1, len(BENCH_PROMPTS)) for cached in (True, False)]
    prompts = {n: [list(p.encode()) for p in BENCH_PROMPTS[:n]] for n in (1, len(BENCH_PROMPTS))}
    greedy = SampleOptions(BENCH_TOKENS, temperature=0.0)
    for _ in range(warmup):
        for n, cached in cases:
            sample_local(model, prompts[n], SampleOptions(16, 0.0), cached=cached)
    times: dict = {case: [] for case in cases}
    outs: dict = {}
    for _ in range(iters):
        for n, cached in cases:
            t0 = time.perf_counter()
            outs[(n, cached)] = sample_local(model, prompts[n], greedy, cached=cached)
            times[(n, cached)].append(time.perf_counter() - t0)
    rows = []
    for n in (1, len(BENCH_PROMPTS)):
        fast, slow = statistics.median(times[(n, True)]), statistics.median(times[(n, False)])
        rows.append({"prompts": n, "new_tokens": BENCH_TOKENS, "cached_tokens_per_s": round(n * BENCH_TOKENS / fast, 1),
                     "uncached_tokens_per_s": round(n * BENCH_TOKENS / slow, 1), "speedup": round(slow / fast, 2),
                     "cached_s": round(fast, 3), "uncached_s": round(slow, 3),
                     "same_tokens": outs[(n, True)] == outs[(n, False)]})
    m = cfg.model
    return {"kind": "generate", "flavour": m.flavour, "params": num_params(model), "seq_len": m.seq_len,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "runs": iters, "rows": rows}


def format_bench(r: dict) -> str:
    """The table of ``plait bench generate``."""
    lines = [f"generation, {r['flavour']}, {r['params'] / 1e6:.2f}M params, seq_len {r['seq_len']}, {r['dtype']}, "
             f"one process, {r['threads']} thread(s), greedy, median of {r['runs']} run(s)",
             "| prompts | new tokens | KV cache tokens/s | uncached tokens/s | speedup | same tokens |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['prompts']} | {row['new_tokens']} | {row['cached_tokens_per_s']:.0f} | "
                     f"{row['uncached_tokens_per_s']:.0f} | {row['speedup']:.1f}x | "
                     f"{'yes' if row['same_tokens'] else 'no'} |")
    return "\n".join(lines)


__all__ = ["Generated", "Layout", "ParallelRunner", "TextStream", "add_generate_parser", "bench_worker",
           "check_layout", "cmd_generate", "continuation", "decode", "encode", "format_bench", "generate_tokens",
           "load_model", "read_prompts", "run_tokenizer"]
