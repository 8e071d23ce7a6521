"""The cost model: memory and step time of one layout, as pure functions of the model's shape,
the layout and the hardware. Every term and its source is in docs/planner.md.

Notation (docs/formulas.md): s sequence length, b micro-batch, h hidden, a heads, L layers, V
vocabulary, f the MLP width, t tensor-parallel, p pipeline stages, v virtual stages, m
micro-batches per step, d data-parallel, Ψ parameters.

- Parameters: counted from plait's own blocks (``params``); Narayanan et al. 2021's closed form
  is ``narayanan_params`` (the same for gpt2 with f = 4h, but the final norm).
- FLOPs: 2 per multiply-add of every matmul plus the attention scores (QK^T and the sum over V,
  full s, as Narayanan et al. count them); backward twice the forward; recomputation adds the
  forward of what it recomputes.
- Model states: ZeRO's bytes per parameter by stage (Rajbhandari et al. 2020).
- Activations: the tensors plait's blocks save for backward, counted per token (``layer_elements``),
  in the spirit of Korthikanti et al. 2022 Table 2 (``korthikanti_layer_bytes``), whose figures
  assume unfused attention and 16-bit activations.
- Pipeline: the bubble and the micro-batches in flight of each schedule from the schedule
  simulator (``parallel/pipeline/simulate.py``) on small pipelines, closed forms on large ones;
  the tests hold the two equal where both apply.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..schedules import SCHEDULES

STATE_BYTES = {  # bytes per parameter: (parameters, gradients, optimizer states), AdamW
    "fp32": (4, 4, 8),  # plait: fp32 parameters and Adam moments (CPU, and CUDA under bf16 autocast)
    "fp64": (8, 8, 16),
    "mixed": (2, 2, 12),  # ZeRO paper: 16-bit parameters and gradients, fp32 master copy and moments
}
ACT_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2}  # bytes of one activation element
SIMULATE_UP_TO = 4096  # actions (p x m x v) the simulator handles in the search; closed forms beyond


@dataclass(frozen=True)
class Layout:
    """One way to run the model: the ``parallel`` keys and ``train.micro_batch`` / ``recompute``."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Params:
    """Parameter counts: the input stage, one block (split by tp or not), the output stage."""

    embed_vocab: int  # the token embedding (split by vocabulary under tp)
    embed_other: int  # learned positions (replicated)
    block_split: int  # of one block: the weights and biases tp splits
    block_whole: int  # of one block: what tp replicates (norms, row-parallel biases)
    head_norm: int
    head_vocab: int  # the output layer; 0 when tied to the embedding
    layers: int

    @property
    def block(self) -> int:
        return self.block_split + self.block_whole

    @property
    def total(self) -> int:
        return (self.embed_vocab + self.embed_other + self.layers * self.block + self.head_norm
                + self.head_vocab)


def params(m: ModelConfig) -> Params:
    """Exact parameter counts of plait's ``gpt2`` and ``llama`` models (``models/gpt.py``)."""
    h, f, kv = m.hidden, m.ffn_hidden, m.kv_heads * (m.hidden // m.heads)
    attn = h * (h + 2 * kv) + h * h
    if m.flavour == "llama":
        return Params(m.vocab * h, 0, attn + 3 * h * f, 2 * h, h, m.vocab * h, m.layers)
    # gpt2: biases on every linear (column biases split, row biases replicated), two LayerNorms
    return Params(m.vocab * h, m.seq_len * h, attn + (h + 2 * kv) + 2 * h * f + f, 2 * h + 4 * h, 2 * h, 0,
                  m.layers)


def narayanan_params(m: ModelConfig) -> float:
    """P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)) (Narayanan et al. 2021, Eq. 2; GPT, f = 4h)."""
    l, h = m.layers, m.hidden
    return 12 * l * h * h * (1 + 13 / (12 * h) + (m.vocab + m.seq_len) / (12 * l * h))


def rank_params(m: ModelConfig, layout: Layout, stage: int) -> int:
    """Parameters held by one rank of pipeline ``stage`` (0 .. p-1): its blocks, split by tp,
    plus the input stage on the first and the output stage (a tied copy under pp) on the last."""
    pc, t, p = params(m), layout.tp, layout.pp
    n = stage_layers(m.layers, p, layout.virtual_stages)[stage] * (pc.block_split / t + pc.block_whole)
    vocab = math.ceil(m.vocab / t) * m.hidden  # vocabulary rows padded to a multiple of tp
    if stage == 0:
        n += vocab + pc.embed_other
    if stage == p - 1:
        n += pc.head_norm + (vocab if pc.head_vocab or p > 1 else 0)
    return int(n)


def stage_layers(layers: int, p: int, v: int = 1) -> list[int]:
    """Blocks per pipeline rank when every chunk gets layers / (p v), the first ones one more."""
    chunks = [layers // (p * v) + (1 if c < layers % (p * v) else 0) for c in range(p * v)]
    return [sum(chunks[c] for c in range(p * v) if c % p == r) for r in range(p)]


# ------------------------------------------------------------------------------------- FLOPs

def flops_per_token(m: ModelConfig, recompute: str = "none") -> float:
    """Training FLOPs per token: 3 forward-equivalents (forward, and backward at twice the
    forward), plus the forward of what is recomputed (full: every block; selective: the
    attention scores and the sum over V)."""
    pc = params(m)
    matmul = 2 * (pc.block_split - _biases(m))  # 2 FLOPs per weight (multiply and add)
    scores = 4 * m.seq_len * m.hidden  # QK^T and A V, 2 s h each per token
    head = 2 * m.hidden * m.vocab
    blocks = m.layers * (matmul + scores)
    extra = {"none": 0.0, "full": blocks, "selective": m.layers * scores}[recompute]
    return 3 * (blocks + head) + extra


def model_flops_per_token(m: ModelConfig) -> float:
    """What MFU counts (Chowdhery et al. 2022): training FLOPs without recomputation."""
    return flops_per_token(m, "none")


def _biases(m: ModelConfig) -> int:
    kv = m.kv_heads * (m.hidden // m.heads)
    return (m.hidden + 2 * kv + m.ffn_hidden) if m.flavour == "gpt2" else 0


def narayanan_flops(m: ModelConfig, tokens: int, recompute: bool = False) -> float:
    """Narayanan et al. 2021, Eq. 3/4: 72 (96 with full recomputation) B s l h^2
    (1 + s/(6h) + V/(12 l h)) (V/(16 l h)) for ``tokens`` = B s."""
    l, h, s, v = m.layers, m.hidden, m.seq_len, m.vocab
    if recompute:
        return 96 * tokens * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return 72 * tokens * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


# ------------------------------------------------------------------------------- model states

def state_bytes(psi: float, zero: int, dp: int, precision: str = "fp32") -> dict[str, float]:
    """Bytes per rank of parameters, gradients and AdamW states for ``psi`` parameters held by the
    rank before dp sharding (ZeRO-1 shards the optimizer states over dp, 2 also the gradients,
    3 also the parameters)."""
    pb, gb, ob = STATE_BYTES[precision]
    return {"params": psi * pb / (dp if zero >= 3 else 1), "grads": psi * gb / (dp if zero >= 2 else 1),
            "optimizer": psi * ob / (dp if zero >= 1 else 1)}


# ------------------------------------------------------------------------------- activations

def layer_elements(m: ModelConfig, t: int = 1, sp: bool = False, recompute: str = "none") -> float:
    """Elements one block saves for backward, per token, on one tp rank (plait's blocks, fused
    attention): the block's input and each norm's input (split by t under sequence parallel), each
    norm's output as the column layers take it (whole), and everything inside attention and the
    MLP (split by t). Full recomputation keeps only the input; selective drops what the attention
    core alone keeps (its output where it is a copy, and the softmax's log-sum-exp)."""
    h, a, f = m.hidden, m.heads, m.ffn_hidden
    kv = m.kv_heads * (h // m.heads)
    seq = t if sp else 1  # what lies between regions is split along the sequence
    if recompute == "full":
        return h / seq
    llama = m.flavour == "llama"
    stats = (2 if llama else 4) / seq  # per norm: rstd (RMSNorm) or mean and rstd (LayerNorm)
    between = (4 if llama else 2) * h / seq  # block input, residual; RMSNorm also keeps x * rstd
    norm_out = 2 * h  # each norm's output, whole (all-gathered under sequence parallel)
    core_out = (2 if llama else 1) * h / t  # attention output (+ its copy, laid out for the next layer)
    attn = (h + 2 * kv) / t + core_out + a / t  # q, k, v (rotated under llama), output, log-sum-exp
    if recompute == "selective":
        attn -= (h / t if llama else 0) + a / t
    mlp = (4 if llama else 2) * f / t  # gelu: up, gelu(up); swiglu: gate, silu(gate), up, their product
    return between + stats + norm_out + attn + mlp


def head_elements(m: ModelConfig, t: int = 1, sp: bool = False) -> float:
    """Elements the output stage saves per token: the last hidden states and the norm (as in a
    block), the norm's output, and the log-softmax over this rank's vocabulary."""
    seq = t if sp else 1
    llama = m.flavour == "llama"
    return (2 if llama else 1) * m.hidden / seq + (1 if llama else 2) / seq + m.hidden + math.ceil(m.vocab / t)


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: str = "none") -> float:
    """Korthikanti et al. 2022, Table 2: activation bytes of one layer (16-bit, unfused attention)."""
    if recompute == "full":
        return 2 * s * b * h
    scores = 0 if recompute == "selective" else 5 * a * s / (h * t)
    inner = 34 / t if sp else 10 + 24 / t
    return s * b * h * (inner + scores)


def activation_bytes(m: ModelConfig, layout: Layout, stage: int, microbatches: int, act: str = "fp32") -> float:
    """Peak activation bytes of one rank of ``stage``: the micro-batch chunks it holds at once
    (the schedule's, ``inflight``) times one chunk's layers, plus the output stage's tensors for
    each micro-batch held there (interleaved: the last chunk runs its backward right after its
    forward) and the input's token ids."""
    tokens = layout.micro_batch * m.seq_len
    e = ACT_BYTES[act]
    p, v = layout.pp, layout.virtual_stages
    per_layer = layer_elements(m, layout.tp, layout.sequence_parallel, layout.recompute) * tokens * e
    chunk_layers = stage_layers(m.layers, p, v)[stage] / v
    held = inflight(layout.schedule, p, microbatches, v)[stage]
    total = held * chunk_layers * per_layer
    ends = held if v == 1 else 1  # micro-batches whose output stage is held (the last chunk's)
    if stage == p - 1:
        total += ends * (head_elements(m, layout.tp, layout.sequence_parallel) * tokens * e + 8 * tokens)  # + targets
    if stage == 0:
        total += math.ceil(held / v) * 8 * tokens  # token ids
    return total


# ----------------------------------------------------------------------------------- pipeline

def inflight(schedule: str, p: int, m: int, v: int = 1) -> list[int]:
    """Per pipeline rank, the most micro-batch chunks whose activations it holds at once."""
    if p == 1:
        return [1]
    if p * m * v <= SIMULATE_UP_TO:
        return list(_simulated(schedule, p, m, v)[1])
    if schedule == "gpipe":
        return [m] * p
    if schedule == "zb":
        return [min(p, m)] * p
    if SCHEDULES[schedule].interleaved:  # rank r: (v-1) p + 2 (p - r) - 1 chunks, at most m v
        return [min(m * v, (v - 1) * p + 2 * (p - r) - 1) for r in range(p)]
    return [min(p - r, m) for r in range(p)]  # 1f1b


def pipeline_time(schedule: str, p: int, m: int, v: int, tf: float, tb: float, tw: float) -> float:
    """Makespan of one step's schedule where a stage's forward of one micro-batch takes ``tf``,
    its backward ``tb`` (of which the weight gradients ``tw``), transfers free."""
    if p == 1:
        return m * (tf + tb)
    if p * m * v <= SIMULATE_UP_TO:
        unit = _simulated(schedule, p, m, v, round(tb / tf, 3), round(tw / tf, 3))[0]
        return unit * tf / (v if SCHEDULES[schedule].interleaved else 1)
    if schedule == "zb":
        return m * (tf + tb) + (p - 1) * max(tb - tw, tf + tb - 2 * tw)
    if SCHEDULES[schedule].interleaved:
        return m * (tf + tb) + (p - 1) * (tf + tb) / v
    return (m + p - 1) * (tf + tb)


@functools.lru_cache(maxsize=4096)
def _simulated(schedule: str, p: int, m: int, v: int, b: float = 2.0, w: float = 1.0) -> tuple[float, tuple]:
    """(makespan in forward units, peak in flight per rank) from the schedule simulator."""
    from ..parallel.pipeline.simulate import Costs, simulate

    s = SCHEDULES[schedule]
    timeline = simulate(s.actions(p, m, v if s.interleaved else 1), Costs(f=1.0, b=b, w=w))
    return timeline.makespan, tuple(timeline.peak_inflight())
