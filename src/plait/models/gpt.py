"""A decoder-only transformer in two flavours; plain PyTorch, no distributed code.

- ``gpt2``: LayerNorm, GELU MLP, learned positions, biases, tied input/output embeddings.
- ``llama``: RMSNorm, SwiGLU MLP, rotary positions (RoPE), grouped-query attention, no biases,
  untied output layer.

Parallel code replaces modules from the outside (tensor parallel swaps the linears, pipeline
parallel keeps a slice of ``blocks``), guided by the model's description (``GPT.describe``), so
layers infer their local head counts from the shapes of their projections and never from the config.

Generation passes a :class:`Decoding` (positions, attention mask, optional :class:`KVCache`) to the
blocks; training passes nothing and runs exactly the code it always ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .description import PARAM_COST, ModelDescription, TensorParallelPlan


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.flavour == "llama":
        return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seq_len, head_dim/2), of RoPE (Su et al. 2021)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, heads, S, head_dim) by the position's angles."""
    s = x.shape[-2]
    return _rotate(x, cos[:s].to(x.dtype), sin[:s].to(x.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with the angles already picked: cos and sin broadcast against x's (..., S, head_dim/2) pairs."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def init_weights(m: nn.Module) -> None:
    """GPT-2's and BERT's initialisation: linear and embedding weights N(0, 0.02), biases 0."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class KVCache:
    """Keys and values of every attention layer while generating, so that a step feeds only the new
    tokens (Pope et al. 2022). Per layer two buffers (batch, kv heads, capacity, head_dim), allocated
    at the layer's first write from the shapes it writes (a tensor-parallel rank holds only its own
    heads, a pipeline stage only its own layers), then written in place: a step costs no copy of
    what is cached. ``valid`` (batch, capacity) marks the slots each row may attend (left padding
    is never valid), ``length`` the slots filled so far (the same for every row)."""

    def __init__(self, batch: int, capacity: int, device: torch.device | None = None):
        self.capacity, self.length = capacity, 0
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        """Forget what is cached (the buffers stay allocated for the next fill)."""
        self.length = 0
        self.valid.zero_()

    def write(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor, start: int,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``layer``'s keys and values (B, kv heads, S, hd) at slots [start, start + S) and
        return views of all its slots up to there; with ``rows`` (R,) store them in those rows only
        (a refill) and return them as they are (the refilled tokens attend only to each other)."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots cannot hold slots up to {end}")
        bufs = self._kv.get(layer)
        if bufs is None:
            shape = (self.valid.shape[0], k.shape[1], self.capacity, k.shape[3])
            bufs = self._kv[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        if rows is not None:
            bufs[0][rows, :, start:end] = k
            bufs[1][rows, :, start:end] = v
            return k, v
        bufs[0][:, :, start:end] = k
        bufs[1][:, :, start:end] = v
        return bufs[0][:, :, :end], bufs[1][:, :, :end]


@dataclass
class Decoding:
    """What a generation forward gives every block besides the hidden states: ``positions`` (B, S)
    of the tokens in their rows' windows, ``mask`` (B, 1, S, T) of the keys each query may attend
    (T: the cached slots after this step, or S without a cache), and the ``cache`` (None: attend to
    this forward's own keys) written from slot ``start``, in every row or only in ``rows`` (a refill)."""

    positions: torch.Tensor
    mask: torch.Tensor
    cache: KVCache | None = None
    start: int = 0
    rows: torch.Tensor | None = None


class AttentionCore(nn.Module):
    """Causal attention of (B, heads, S, hd) queries over keys and values: QK^T, softmax, dropout,
    the sum over V (one fused ``scaled_dot_product_attention``). A module of its own so that
    selective recomputation can name it (Korthikanti et al. 2022's attention core)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1],
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        bias = cfg.flavour == "gpt2"
        self.wq = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=bias)
        self.core = AttentionCore(cfg.dropout)
        self.rope = cfg.flavour == "llama"
        if self.rope:
            cos, sin = rope_tables(cfg.seq_len, self.head_dim, cfg.rope_theta)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape  # (B, S, heads*hd) -> (B, heads, S, hd); heads may be a tp shard
        return t.view(b, s, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, decoding: Decoding | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(x)), self._heads(self.wv(x))
        if decoding is not None:
            return self._decode(q, k, v, decoding)
        if self.rope:
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        y = self.core(q, k, v)  # (B, heads, S, hd)
        return self.wo(y.transpose(1, 2).flatten(2))

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Decoding) -> torch.Tensor:
        """Attention while generating: per-row positions, an explicit mask, the keys and values of
        earlier steps from the cache."""
        if self.rope:
            cos, sin = self.cos[d.positions].unsqueeze(1).to(q.dtype), self.sin[d.positions].unsqueeze(1).to(q.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # angles (B, 1, S, hd/2)
        if d.cache is not None:
            k, v = d.cache.write(self, k, v, d.start, d.rows)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=d.mask, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.flavour == "llama"
        bias = not self.swiglu
        if self.swiglu:
            self.gate = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = _norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, decoding: Decoding | None = None) -> torch.Tensor:
        if decoding is None:
            x = x + self.drop(self.attn(self.attn_norm(x)))
        else:
            x = x + self.drop(self.attn(self.attn_norm(x), decoding))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """tokens (B, S) -> logits (B, S, vocab), as ``head(blocks(embed(tokens)))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.flavour == "gpt2":
            self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.down.weight")):  # GPT-2's residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token (and learned position) embeddings (B, S, H); ``positions`` (B, S) default to 0..S-1."""
        x = self.tok_emb(tokens)  # (B, S, H)
        if self.pos_emb is not None:
            pos = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
            x = x + self.pos_emb(pos)
        return self.drop(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))  # (B, S, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def decode(self, tokens: torch.Tensor, decoding: Decoding) -> torch.Tensor:
        """A generation forward of tokens (B, S): logits (B, vocab) of each row's last token."""
        x = self.embed(tokens, decoding.positions)
        for block in self.blocks:
            x = block(x, decoding)
        return self.head(x[:, -1])

    def describe(self) -> ModelDescription:
        """What the strands may know of this model (``models/description.py``)."""
        cfg = self.cfg
        styles = {"tok_emb": "vocab_embedding", "blocks.*.attn": "region", "blocks.*.attn.w[qkv]": "column",
                  "blocks.*.attn.wo": "row", "blocks.*.mlp": "region", "blocks.*.mlp.up": "column",
                  "blocks.*.mlp.down": "row", "lm_head": "vocab_head"}
        if cfg.flavour == "llama":
            styles["blocks.*.mlp.gate"] = "column"
        plan = TensorParallelPlan(styles, {"heads": cfg.heads, "kv_heads": cfg.kv_heads, "ffn_hidden": cfg.ffn_hidden},
                                  sharded_random=("blocks.*.attn",) if cfg.dropout > 0 else ())
        return ModelDescription(
            embed=GPT.embed, blocks="blocks", head=GPT.head, hidden=cfg.hidden,
            input_modules=("tok_emb", "pos_emb", "drop") if cfg.flavour == "gpt2" else ("tok_emb", "drop"),
            output_modules=("norm", "lm_head"),
            tied=(("lm_head.weight", "tok_emb.weight"),) if cfg.flavour == "gpt2" else (),
            tp=plan, costs=lambda tokens: layer_costs(cfg, tokens), attention_core="blocks.*.attn.core")


def layer_costs(m: ModelConfig, tokens: int) -> tuple[float, float, float]:
    """(embedding, one block, head) cost of one optimizer step over ``tokens`` tokens, for balancing
    pipeline stages: training FLOPs (forward + backward = 3x forward, attention scores included)
    plus ``PARAM_COST`` FLOP-equivalents per parameter for the optimizer and gradient work."""
    hd = m.hidden // m.heads
    attn = m.hidden * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * m.hidden
    mlp = (3 if m.flavour == "llama" else 2) * m.hidden * m.ffn_hidden
    block = 3 * (2 * tokens * (attn + mlp) + 4 * tokens * m.seq_len * m.hidden) + PARAM_COST * (attn + mlp)
    head = 3 * 2 * tokens * m.hidden * m.vocab + 3 * 5 * tokens * m.vocab + PARAM_COST * m.hidden * m.vocab
    embed = 3 * tokens * m.hidden + PARAM_COST * m.hidden * m.vocab
    return embed, block, head


def num_params(model: nn.Module) -> int:
    """Parameters counted once (tied weights are one parameter)."""
    return sum(p.numel() for p in model.parameters())
