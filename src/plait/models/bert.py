"""A BERT-style encoder (Devlin et al. 2019); plain PyTorch, no distributed code.

Bidirectional attention with a padding mask, post-norm blocks (``norm(x + sublayer(x))``), token,
learned position and token-type embeddings summed and normalised, exact (erf) GELU. Heads: none
(the last hidden states), or masked-language modelling (a dense layer, GELU and a norm, then the
output layer tied to the token embedding, with a bias).

The description names the same pieces as the decoders' (``attn`` and ``mlp`` regions, column and
row linears, ``attn.core`` for selective recomputation); the padding mask is the blocks' side input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .description import ModelDescription, TensorParallelPlan
from .gpt import init_weights

HEADS = ("none", "mlm")


class BidirectionalCore(nn.Module):
    """Attention of every token to every token that the padding mask keeps (B, 1, 1, S)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=self.dropout if self.training else 0.0)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.wq, self.wk, self.wv = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(3))
        self.wo = nn.Linear(cfg.hidden, cfg.hidden)
        self.core = BidirectionalCore(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        return self.wo(self.core(q, k, v, mask).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up, self.down = nn.Linear(cfg.hidden, cfg.ffn_hidden), nn.Linear(cfg.ffn_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderBlock(nn.Module):
    """Post-norm: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.attn_norm = SelfAttention(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp, self.mlp_norm = FeedForward(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class Bert(nn.Module):
    """tokens (B, S) [, padding mask (B, S), token types (B, S)] -> hidden states (B, S, H), or
    vocabulary logits with the masked-language-modelling head."""

    def __init__(self, cfg: ModelConfig, head: str = "mlm"):
        super().__init__()
        self.cfg, self.head_kind = cfg, head
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.type_emb = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.emb_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.layers))
        if head == "mlm":
            self.mlm_dense = nn.Linear(cfg.hidden, cfg.hidden)
            self.mlm_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab)
            self.lm_head.weight = self.tok_emb.weight  # tied, with a bias of its own
        self.apply(init_weights)

    def embed(self, tokens: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        types = torch.zeros_like(tokens) if types is None else types
        return self.drop(self.emb_norm(self.tok_emb(tokens) + self.pos_emb(pos) + self.type_emb(types)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "none":
            return x
        return self.lm_head(self.mlm_norm(F.gelu(self.mlm_dense(x))))

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None,
                types: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens, types)
        mask = attention_mask(padding)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)

    def describe(self) -> ModelDescription:
        """What the strands may know of this model (``models/description.py``)."""
        cfg = self.cfg
        styles = {"blocks.*.attn": "region", "blocks.*.attn.w[qkv]": "column", "blocks.*.attn.wo": "row",
                  "blocks.*.mlp": "region", "blocks.*.mlp.up": "column", "blocks.*.mlp.down": "row"}
        plan = TensorParallelPlan(styles, {"heads": cfg.heads, "ffn_hidden": cfg.ffn_hidden},
                                  sharded_random=("blocks.*.attn",) if cfg.dropout > 0 else ())
        out = ("mlm_dense", "mlm_norm", "lm_head") if self.head_kind == "mlm" else ()
        return ModelDescription(
            embed=Bert.embed, blocks="blocks", head=Bert.head, hidden=cfg.hidden,
            input_modules=("tok_emb", "pos_emb", "type_emb", "emb_norm", "drop"), output_modules=out,
            tied=(("lm_head.weight", "tok_emb.weight"),) if self.head_kind == "mlm" else (), tp=plan,
            attention_core="blocks.*.attn.core")


def attention_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) with 1 for tokens and 0 for padding -> (B, 1, 1, S) bool: which keys each query sees."""
    if padding is None:
        return None
    return padding.bool()[:, None, None, :]
