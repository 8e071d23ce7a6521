"""A BERT-style encoder (Devlin et al. 2019); plain PyTorch, no distributed code.

Bidirectional attention with a padding mask, post-norm blocks (``norm(x + sublayer(x))``), token,
learned position and token-type embeddings summed and normalised, exact (erf) GELU. Heads: none
(the last hidden states), or masked-language modelling (a dense layer, GELU and a norm, then the
output layer tied to the token embedding, with a bias), or token classification (dropout and a
linear layer to the labels, as ``BertForTokenClassification``).

The description names the same pieces as the decoders' (``attn`` and ``mlp`` regions, column and
row linears, ``attn.core`` for selective recomputation); the padding mask is the blocks' side input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .description import ModelDescription, TensorParallelPlan
from .gpt import init_weights, layer_costs

HEADS = ("none", "mlm", "token")


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
    """Post-norm: x = norm(x + attn(x)), then x = norm(x + mlp(x)); ``mask`` is used only inside
    the attention (under sequence parallel the hidden states are split, the mask is whole)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.attn_norm = SelfAttention(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp, self.mlp_norm = FeedForward(cfg), nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class Bert(nn.Module):
    """Inputs -> hidden states (B, S, H), vocabulary logits (masked-language-modelling head) or
    per-token label logits (token-classification head).

    The inputs are token ids (B, S), or a dict of them: ``tokens``, and optionally ``padding``
    (B, S; 1 for a token, 0 for padding, which no query attends to) and ``types`` (token types)."""

    def __init__(self, cfg: ModelConfig, head: str = "mlm", labels: int = 0):
        super().__init__()
        if head not in HEADS or (head == "token") != (labels > 0):
            raise ValueError(f"head must be one of {HEADS}, with labels > 0 exactly for 'token'")
        self.cfg, self.head_kind, self.labels = cfg, head, labels
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
        elif head == "token":
            self.head_drop = nn.Dropout(cfg.dropout)
            self.classifier = nn.Linear(cfg.hidden, labels)
        self.apply(init_weights)

    def embed(self, inputs) -> torch.Tensor:
        tokens, _, types = unpack(inputs)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        types = torch.zeros_like(tokens) if types is None else types
        return self.drop(self.emb_norm(self.tok_emb(tokens) + self.pos_emb(pos) + self.type_emb(types)))

    def side(self, inputs) -> dict:
        """The blocks' side input: the attention mask built from the padding (whole on every rank)."""
        return {"mask": attention_mask(unpack(inputs)[1])}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "mlm":
            return self.lm_head(self.mlm_norm(F.gelu(self.mlm_dense(x))))
        if self.head_kind == "token":
            return self.classifier(self.head_drop(x))
        return x

    def forward(self, inputs, padding: torch.Tensor | None = None, types: torch.Tensor | None = None) -> torch.Tensor:
        if padding is not None or types is not None:
            inputs = {"tokens": inputs, "padding": padding, "types": types}
        x = self.embed(inputs)
        side = self.side(inputs)
        for block in self.blocks:
            x = block(x, **side)
        return self.head(x)

    def describe(self) -> ModelDescription:
        """What the strands may know of this model (``models/description.py``): the output layer
        (the tied vocabulary layer, or the classifier) is tp's ``vocab_head``, so its outputs and
        loss are split over tp and sequence parallel gathers the sequence before it."""
        cfg = self.cfg
        styles = {"blocks.*.attn": "region", "blocks.*.attn.w[qkv]": "column", "blocks.*.attn.wo": "row",
                  "blocks.*.mlp": "region", "blocks.*.mlp.up": "column", "blocks.*.mlp.down": "row"}
        if self.head_kind == "mlm":
            styles.update({"tok_emb": "vocab_embedding", "lm_head": "vocab_head"})
        elif self.head_kind == "token":
            styles["classifier"] = "vocab_head"
        plan = TensorParallelPlan(styles, {"heads": cfg.heads, "ffn_hidden": cfg.ffn_hidden},
                                  sharded_random=("blocks.*.attn",) if cfg.dropout > 0 else ())
        heads = {"mlm": ("mlm_dense", "mlm_norm", "lm_head"), "token": ("head_drop", "classifier")}
        out = heads.get(self.head_kind, ())
        return ModelDescription(
            embed=Bert.embed, blocks="blocks", head=Bert.head, hidden=cfg.hidden, side=Bert.side,
            input_modules=("tok_emb", "pos_emb", "type_emb", "emb_norm", "drop"), output_modules=out,
            tied=(("lm_head.weight", "tok_emb.weight"),) if self.head_kind == "mlm" else (), tp=plan,
            attention_core="blocks.*.attn.core", objective="masked" if self.head_kind == "mlm" else "none",
            costs=self._costs)

    def _costs(self, tokens: int) -> tuple[float, float, float]:
        """(input stage, one block, output stage) cost for balancing pipeline stages: the decoders'
        (``gpt.layer_costs``); the output layer's scales with its outputs (labels, or none)."""
        embed, block, head = layer_costs(self.cfg, tokens)  # the head's terms are all per vocabulary row
        outputs = {"mlm": self.cfg.vocab, "token": self.labels}.get(self.head_kind, 0)
        return embed, block, head * outputs / self.cfg.vocab


def unpack(inputs) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens, padding, types) of token ids or of a dict holding them (absent ones None)."""
    if torch.is_tensor(inputs):
        return inputs, None, None
    return inputs["tokens"], inputs.get("padding"), inputs.get("types")


def attention_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) with 1 for tokens and 0 for padding -> (B, 1, 1, S) bool: which keys each query sees."""
    if padding is None:
        return None
    return padding.bool()[:, None, None, :]
