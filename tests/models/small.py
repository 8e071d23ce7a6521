"""Small described models for tests, built through ``model.builder``.

``build``: a decoder whose attention holds a replicated parameter that acts on this rank's heads
only (a norm over each query and key head, as in OLMo-2 and Gemma 3): under tensor parallel its
gradient is a partial sum over tp. The other builders describe a model wrongly, on purpose.
"""

import torch
import torch.nn.functional as F
from torch import nn

from plait import ModelDescription, TensorParallelPlan


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.head_norm = nn.RMSNorm(self.head_dim)  # one weight for every head, on this rank's heads

    def forward(self, h):
        b, s, _ = h.shape
        q, k, v = (p(h).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(self.head_norm(q), self.head_norm(k), v, is_causal=True)
        return self.o(y.transpose(1, 2).flatten(2))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads)

    def forward(self, h):
        return h + self.attn(self.norm(h))


class Model(nn.Module):
    """emb -> layers -> out."""

    def __init__(self, vocab: int, width: int, layers: list[nn.Module], out: nn.Module | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(layers)
        self.out = out if out is not None else nn.Linear(width, vocab, bias=False)

    def embed(self, tokens):
        return self.emb(tokens)

    def head(self, h):
        return self.out(h)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


PLAN = {"emb": "vocab_embedding", "layers.*.attn": "region", "layers.*.attn.[qkv]": "column",
        "layers.*.attn.o": "row", "out": "vocab_head"}


def _described(cfg, model: Model, **kw) -> tuple[Model, ModelDescription]:
    fields = {"embed": Model.embed, "blocks": "layers", "head": Model.head, "hidden": cfg.hidden,
              "input_modules": ("emb",), "output_modules": ("out",),
              "tp": TensorParallelPlan(PLAN, divisible={"heads": cfg.heads})}
    return model, ModelDescription(**{**fields, **kw})


def build(cfg, out: nn.Module | None = None, **kw):
    return _described(cfg, Model(cfg.vocab, cfg.hidden, [Layer(cfg.hidden, cfg.heads) for _ in range(cfg.layers)],
                                 out), **kw)


class Counted(Layer):
    """A layer that counts its training forwards in a persistent buffer (state a checkpoint must
    carry, though no gradient touches it)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, h):
        if self.training:
            self.calls += 1
        return super().forward(h)


def frozen_and_counted(cfg):
    """``build``'s model with counting layers and the first layer's norm frozen."""
    model, desc = _described(cfg, Model(cfg.vocab, cfg.hidden, [Counted(cfg.hidden, cfg.heads)
                                                                 for _ in range(cfg.layers)]))
    model.layers[0].norm.requires_grad_(False)
    return model, desc


def frozen_column(cfg):
    """``build``'s model with the first layer's query projection (split by tp) frozen."""
    model, desc = build(cfg)
    model.layers[0].attn.q.requires_grad_(False)
    return model, desc


# --------------------------------------------------------------------------- described wrongly


def wide(cfg):
    """The second block widens the hidden states."""
    h = cfg.hidden
    model = Model(cfg.vocab, h, [nn.Linear(h, h), nn.Linear(h, 2 * h)], nn.Linear(2 * h, cfg.vocab, bias=False))
    return _described(cfg, model, tp=TensorParallelPlan({}))


def unmatched(cfg):
    return build(cfg, tp=TensorParallelPlan({"layers.*.proj": "column"}))


def heads(cfg):
    return build(cfg, tp=TensorParallelPlan(PLAN, divisible={"heads": 3}))


def nothing(cfg):
    return "not a model"


def half_tied(cfg):
    model, desc = build(cfg, tied=(("out.weight", "emb.weight"),), tp=TensorParallelPlan({"out": "vocab_head"}))
    model.out.weight = model.emb.weight
    return model, desc


def odd(cfg):
    h = cfg.hidden
    model = Model(cfg.vocab, h, [nn.Sequential(nn.Linear(h, 33), nn.Linear(33, h))])
    return _described(cfg, model, tp=TensorParallelPlan({"layers.*.0": "column", "layers.*.1": "row"}))


def wrong_kind(cfg):
    return build(cfg, tp=TensorParallelPlan({"layers.*.attn": "column"}))


def two_vocabs(cfg):
    return build(cfg, out=nn.Linear(cfg.hidden, cfg.vocab + 1, bias=False))


def no_head(cfg):
    return build(cfg, tp=TensorParallelPlan({k: v for k, v in PLAN.items() if v != "vocab_head"}))


def own_loss(cfg):
    return build(cfg, loss=lambda out, target, reduction="mean": F.cross_entropy(out.flatten(0, 1), target.flatten()))
