"""A decoder of one's own, in plain PyTorch, parallelised by plait through its description.

Nothing here is plait's GPT: pre-norm layers hold ``self_attn`` and ``ffn``, every linear and norm
is bias-free, the feed-forward uses a squared ReLU, and positions are rotary angles that the model
computes once per forward and hands to every layer (a *side input*, as Hugging Face's Llama does).
The model file itself knows nothing of processes; ``describe`` tells plait what it may know.

Two ways to use it (docs/own-model.md walks through both):

    # plait's own trainer, verifier and benchmarks, through the builder function below
    plait verify --set model.builder=examples/own_model.py:build --layouts "tp=2;pp=2" --dtype float64
    plait train --set model.builder=examples/own_model.py:build --tp 2

    # your own training loop, run on 2 local processes (or under torchrun)
    python examples/own_model.py --tp 2 --steps 30
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import plait
from plait import ModelDescription, TensorParallelPlan


class SelfAttention(nn.Module):
    """Causal attention with rotary positions; the number of heads it holds is read from its
    projections' shapes (under tensor parallel each rank holds n_heads / tp of them)."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.head_dim = width // n_heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = (proj(h).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, S, hd)
        q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).flatten(2))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head by the position's angles (GPT-NeoX's rotary layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class FeedForward(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.w_in = nn.Linear(width, inner, bias=False)
        self.w_out = nn.Linear(inner, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w_out(torch.relu(self.w_in(h)).square())


class DecoderLayer(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width, bias=False)
        self.self_attn = SelfAttention(width, n_heads)
        self.ln_ffn = nn.LayerNorm(width, bias=False)
        self.ffn = FeedForward(width, 4 * width)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.self_attn(self.ln_attn(h), rope)
        return h + self.ffn(self.ln_ffn(h))


class TinyDecoder(nn.Module):
    """tokens (B, S) -> logits (B, S, vocab), as ``logits(layers(embed_tokens(tokens), rope))``."""

    def __init__(self, vocab: int, width: int, depth: int, n_heads: int):
        super().__init__()
        self.width = width
        self.embedding = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(DecoderLayer(width, n_heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, bias=False)
        self.unembed = nn.Linear(width, vocab, bias=False)
        half = width // n_heads // 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half),
                             persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens) * math.sqrt(self.width)  # (B, S, width)

    def rotary(self, tokens: torch.Tensor) -> dict:
        """The side input of every layer: cos and sin of each position's angles, (S, head_dim/2)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq.to(tokens.device))
        return {"rope": (angles.cos(), angles.sin())}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.final_norm(h))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, side = self.embed_tokens(tokens), self.rotary(tokens)
        for layer in self.layers:
            h = layer(h, **side)
        return self.logits(h)


def describe(model: TinyDecoder, n_heads: int) -> ModelDescription:
    """What plait may know of the model: its three pieces, its side input, how tp splits it."""
    plan = TensorParallelPlan(
        styles={
            "embedding": "vocab_embedding",
            "layers.*.self_attn": "region",                 # f (or the sequence all-gather) at its input
            "layers.*.self_attn.[qkv]_proj": "column",      # heads split over tp
            "layers.*.self_attn.out_proj": "row",           # g: the partial sums all-reduced
            "layers.*.ffn": "region",
            "layers.*.ffn.w_in": "column",
            "layers.*.ffn.w_out": "row",
            "unembed": "vocab_head",                        # the loss is computed on vocabulary shards
        },
        divisible={"n_heads": n_heads, "ffn width": 4 * model.width},
    )
    return ModelDescription(
        embed=TinyDecoder.embed_tokens, blocks="layers", head=TinyDecoder.logits, hidden=model.width,
        input_modules=("embedding",), output_modules=("final_norm", "unembed"),
        side=TinyDecoder.rotary, tp=plan,
    )


def build(cfg) -> tuple[TinyDecoder, ModelDescription]:
    """plait's builder hook (``model.builder = "examples/own_model.py:build"``): sizes from the
    ``[model]`` section (vocab, hidden, layers, heads)."""
    model = TinyDecoder(cfg.vocab, cfg.hidden, cfg.layers, cfg.heads)
    return model, describe(model, cfg.heads)


# --------------------------------------------------------------------------- a training loop of one's own


def batches(data: torch.Tensor, step: int, batch: int, seq: int, dp_rank: int, dp: int) -> tuple:
    """This dp rank's share of step ``step``'s batch: windows drawn from (step), the same on every rank."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=torch.Generator().manual_seed(step))
    mine = starts.chunk(dp)[dp_rank]
    x = torch.stack([data[s:s + seq] for s in mine.tolist()])
    y = torch.stack([data[s + 1:s + seq + 1] for s in mine.tolist()])
    return x.long(), y.long()


def train(args: argparse.Namespace) -> list[float]:
    """Runs on every process: build, parallelise, train; returns the losses (every rank)."""
    dev = plait.device()
    torch.manual_seed(0)  # the same initial weights on every process
    model = TinyDecoder(vocab=256, width=args.width, depth=args.depth, n_heads=args.heads).to(dev)
    layout = plait.ParallelConfig(tp=args.tp, pp=args.pp, zero=args.zero)
    sample = torch.zeros((1, args.seq), dtype=torch.long, device=dev)  # to check the description once
    pm = plait.parallelize(model, describe(model, args.heads), layout, seed=0, sample=sample)
    optimizer = torch.optim.AdamW(pm.param_groups(weight_decay=0.1), lr=args.lr)
    data = torch.frombuffer(bytearray(Path(args.data).read_bytes()), dtype=torch.uint8)
    losses = []
    for step in range(args.steps):
        x, y = batches(data, step, args.batch, args.seq, pm.dp_rank, pm.dp)
        micro = [(x.to(dev), y.to(dev))]  # one micro-batch per step (a pipeline wants several)
        if args.pp > 1:
            micro = list(zip(x.to(dev).split(1), y.to(dev).split(1)))
        loss, grad_norm = pm.train_step(micro, optimizer, max_norm=1.0)
        losses.append(loss)
        if (step + 1) % 10 == 0 and torch.distributed.get_rank() == 0:
            print(f"step {step + 1}: loss {loss:.3f}, gradient norm {grad_norm:.2f}", flush=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description="Train TinyDecoder with plait's strands in a loop of one's own.")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step, over all dp ranks")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--data", default=__file__, help="a text file (default: this script)")
    args = ap.parse_args()
    losses = plait.launch(train, args.nproc, args)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")


if __name__ == "__main__":
    main()
