"""A test model whose attention holds a replicated parameter that acts on this rank's heads only
(a norm over each query and key head, as in OLMo-2 and Gemma 3): under tensor parallel its
gradient is a partial sum over tp. Built through ``model.builder``."""

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
    def __init__(self, vocab: int, width: int, depth: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, vocab, bias=False)

    def embed(self, tokens):
        return self.emb(tokens)

    def head(self, h):
        return self.out(h)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def build(cfg):
    model = Model(cfg.vocab, cfg.hidden, cfg.layers, cfg.heads)
    plan = TensorParallelPlan({"emb": "vocab_embedding", "layers.*.attn": "region", "layers.*.attn.[qkv]": "column",
                               "layers.*.attn.o": "row", "out": "vocab_head"}, divisible={"heads": cfg.heads})
    return model, ModelDescription(embed=Model.embed, blocks="layers", head=Model.head, hidden=cfg.hidden,
                                   input_modules=("emb",), output_modules=("out",), tp=plan)
