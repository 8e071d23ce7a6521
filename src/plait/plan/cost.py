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
SIMULATE_UP_TO = 256  # actions (p x m x v) the simulator times; closed forms beyond (tested equal when m >= p)


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
    """Exact parameter counts of plait's ``gpt2`` and ``llama`` models (``models/gpt.py``) and of
    ``bert`` with its masked-language-modelling head (``models/bert.py``; the head's vocabulary
    bias counted as replicated)."""
    h, f, kv = m.hidden, m.ffn_hidden, m.kv_heads * (m.hidden // m.heads)
    attn = h * (h + 2 * kv) + h * h
    if m.flavour == "llama":
        return Params(m.vocab * h, 0, attn + 3 * h * f, 2 * h, h, m.vocab * h, m.layers)
    if m.flavour == "bert":  # positions, token types and a norm; the head's dense layer, norm and bias
        return Params(m.vocab * h, (m.seq_len + m.type_vocab + 2) * h, attn + (h + 2 * kv) + 2 * h * f + f,
                      2 * h + 4 * h, h * h + 3 * h + m.vocab, 0, m.layers)
    # gpt2: biases on every linear (column biases split, row biases replicated), two LayerNorms
    return Params(m.vocab * h, m.seq_len * h, attn + (h + 2 * kv) + 2 * h * f + f, 2 * h + 4 * h, 2 * h, 0,
                  m.layers)


def narayanan_params(m: ModelConfig) -> float:
    """P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)) (Narayanan et al. 2021, Eq. 2; GPT, f = 4h)."""
    l, h = m.layers, m.hidden
    return 12 * l * h * h * (1 + 13 / (12 * h) + (m.vocab + m.seq_len) / (12 * l * h))


def rank_params(m: ModelConfig, layout: Layout, stage: int, tokens: int | None = None) -> int:
    """Parameters held by one rank of pipeline ``stage`` (0 .. p-1): its blocks, split by tp,
    plus the input stage on the first and the output stage (a tied copy under pp) on the last;
    ``tokens`` per dp rank and step balance the stages as the runtime does (None: evenly)."""
    pc, t, p = params(m), layout.tp, layout.pp
    n = stage_layers(m.layers, p, layout.virtual_stages, m, tokens)[stage] * (pc.block_split / t + pc.block_whole)
    vocab = math.ceil(m.vocab / t) * m.hidden  # vocabulary rows padded to a multiple of tp
    if stage == 0:
        n += vocab + pc.embed_other
    if stage == p - 1:
        n += pc.head_norm + (vocab if pc.head_vocab or p > 1 else 0)
    return int(n)


BALANCE_UP_TO = 48  # layers the planner splits as the runtime does (its balancing); evenly beyond


def stage_layers(layers: int, p: int, v: int = 1, m: ModelConfig | None = None, tokens: int | None = None) -> list[int]:
    """Blocks per pipeline rank: with the model and the tokens per dp rank and step, the runtime's
    own balanced split (``parallel/pipeline/partition.py``) on models of up to ``BALANCE_UP_TO``
    layers; otherwise layers / (p v) per chunk, the first chunks one more."""
    if p * v == 1:
        return [layers]
    if m is not None and tokens and layers <= BALANCE_UP_TO:
        from ..models.gpt import layer_costs

        embed, block, head = layer_costs(m, tokens)
        return list(_per_rank(layers, p, v, round(embed / block, 4), round(head / block, 4)))
    return list(_per_rank(layers, p, v))


@functools.lru_cache(maxsize=4096)
def _per_rank(layers: int, p: int, v: int, embed: float | None = None, head: float | None = None) -> tuple[int, ...]:
    """Blocks per rank from the chunks' split (balanced when the costs are given, else even);
    rank r holds chunks r, r + p, r + 2p, ..."""
    if embed is None:
        chunks = [layers // (p * v) + (1 if c < layers % (p * v) else 0) for c in range(p * v)]
    else:
        chunks = _balanced(layers, p * v, embed, head)
    ranks = [0] * p
    for c, n in enumerate(chunks):
        ranks[c % p] += n
    return tuple(ranks)


@functools.lru_cache(maxsize=1024)
def _balanced(layers: int, stages: int, embed: float, head: float) -> tuple[int, ...]:
    from ..parallel.pipeline.partition import balanced_split

    return tuple(balanced_split(layers, stages, (embed, 1.0, head)))


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
    return (m.hidden + 2 * kv + m.ffn_hidden) if m.flavour in ("gpt2", "bert") else 0


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


def activation_bytes(m: ModelConfig, layout: Layout, stage: int, microbatches: int, act: str = "fp32",
                     tokens: int | None = None) -> float:
    """Peak activation bytes of one rank of ``stage``: the micro-batch chunks it holds at once
    (the schedule's, ``inflight``) times one chunk's layers, plus the output stage's tensors for
    each micro-batch held there (interleaved: the last chunk runs its backward right after its
    forward) and the input's token ids."""
    n = layout.micro_batch * m.seq_len  # tokens of a micro-batch
    e = ACT_BYTES[act]
    p, v = layout.pp, layout.virtual_stages
    per_layer = layer_elements(m, layout.tp, layout.sequence_parallel, layout.recompute) * n * e
    chunk_layers = stage_layers(m.layers, p, v, m, tokens)[stage] / v
    held = inflight(layout.schedule, p, microbatches, v)[stage]
    total = held * chunk_layers * per_layer
    ends = held if v == 1 else 1  # micro-batches whose output stage is held (the last chunk's)
    if stage == p - 1:
        total += ends * (head_elements(m, layout.tp, layout.sequence_parallel) * n * e + 8 * n)  # + targets
    if stage == 0:
        total += math.ceil(held / v) * 8 * n  # token ids
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
    its backward ``tb`` (of which the weight gradients ``tw``), transfers free. Beyond the
    simulator's size, zero bubble with fewer micro-batches than stages is costed as 1F1B (its
    upper bound)."""
    if p == 1:
        return m * (tf + tb)
    if p * m * v <= SIMULATE_UP_TO:  # the ratios rounded to 1/20 of a forward, so that runs share
        unit = _simulated(schedule, p, m, v, round(tb / tf * 20) / 20, round(tw / tf * 20) / 20)[0]
        return unit * tf / (v if SCHEDULES[schedule].interleaved else 1)
    if schedule == "zb" and m >= p:
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


# ------------------------------------------------------------------------------ the estimate

OPS_PER_LAYER = 24  # operations one block's forward runs (norms, matmuls, attention, activations, adds)
TENSORS_PER_LAYER = {"gpt2": 12, "llama": 9, "bert": 12}  # parameter tensors of one block (the optimizer's loop)


@dataclass
class Estimate:
    """What the cost model predicts for one layout (per device: the busiest pipeline stage)."""

    layout: Layout
    microbatches: int
    memory: dict[str, float]  # bytes by kind on the device that holds the most
    mem_bytes: float
    fits: bool
    times: dict[str, float]  # seconds of a step by term
    step_time_s: float
    tflops_per_device: float
    mfu: float
    bottleneck: str
    reason: str = ""  # why the layout cannot run ("" when it can)

    def row(self) -> dict:
        return {**self.layout.as_dict(), "microbatches": self.microbatches, "fits": self.fits,
                "mem_bytes_per_device": self.mem_bytes, "step_time_s": self.step_time_s,
                "tflops_per_device": self.tflops_per_device, "mfu": self.mfu, "bottleneck": self.bottleneck,
                "memory": self.memory, "times": self.times, "reason": self.reason}


@dataclass(frozen=True)
class Job:
    """What is being planned besides the layout: the model, the batch, the numbers' format."""

    model: ModelConfig
    global_batch: int
    precision: str = "fp32"  # model states: fp32 (AdamW in fp32), fp64, mixed
    act: str = "fp32"  # activations: fp32, fp64 or bf16 (autocast)
    matmul: str = "fp32"  # the matmul dtype whose rate applies


def memory(job: Job, layout: Layout, stage: int) -> dict[str, float]:
    """Bytes held by one rank of ``stage``: model states by ZeRO stage, peak activations, and
    ZeRO-3's gathered unit (one block's full parameters and gradients, and the whole input and
    output stages, gathered for the step)."""
    m, d = job.model, layout.dp
    micro = job.global_batch // (d * layout.micro_batch)
    tokens = job.global_batch // d * m.seq_len
    psi = rank_params(m, layout, stage, tokens)
    out = state_bytes(psi, layout.zero, d, job.precision)
    out["activations"] = activation_bytes(m, layout, stage, micro, job.act, tokens)
    if layout.zero >= 3 and d > 1:
        pb, gb, _ = STATE_BYTES[job.precision]
        pc = params(m)
        block = (pc.block_split / layout.tp + pc.block_whole) * (pb + gb)
        ends = (psi - stage_layers(m.layers, layout.pp, layout.virtual_stages, m, tokens)[stage]
                * (pc.block_split / layout.tp + pc.block_whole))
        out["gathered"] = block + ends * (pb + gb) * (d - 1) / d
    return out


def _stage_times(job: Job, layout: Layout, hw, stage: int, tokens: int) -> tuple[float, float, float, dict]:
    """(t_F, t_B, t_W) of one micro-batch on ``stage`` (all its chunks), and their parts."""
    m, t = job.model, layout.tp
    n = layout.micro_batch * m.seq_len  # tokens of a micro-batch
    layers = stage_layers(m.layers, layout.pp, layout.virtual_stages, m, tokens)[stage]
    pc = params(m)
    last = stage == layout.pp - 1
    matmuls = 7 if m.flavour == "llama" else 6
    mm = n * layers * 2 * (pc.block_split - _biases(m)) / t  # forward matmul FLOPs of the blocks
    att = 3 * n * 4 * m.seq_len * m.hidden / t  # fused attention, forward and backward, one layer
    att_time = layers * att / hw.attention_rate(job.matmul, att)
    other = n * layers * layer_elements(m, t, layout.sequence_parallel) * hw.elementwise_s  # fwd and bwd
    blocks = (mm / hw.rate(job.matmul, 2 * n * (pc.block_split / matmuls) / t) + (att_time + other) / 3
              + layers * OPS_PER_LAYER * hw.op_latency_s)  # one forward of the stage's blocks
    head = 0.0
    if last:  # the output layer and its norm and loss
        flops = n * 2 * m.hidden * math.ceil(m.vocab / t)
        head = flops / hw.rate(job.matmul, flops) + n * head_elements(m, t, layout.sequence_parallel) \
            * hw.elementwise_s / 3
    compute = blocks + head
    e = ACT_BYTES[job.act]
    x = _crossing(layout, hw)
    tp = 0.0
    if t > 1:  # per layer two all-reduces forward (sp: an all-gather and a reduce-scatter each)
        size = n * m.hidden * e
        one = (hw.collective("all_gather", size, t, x["tp"]) + hw.collective("reduce_scatter", size, t, x["tp"])
               if layout.sequence_parallel else hw.collective("all_reduce", size, t, x["tp"]))
        tp = 2 * layers * one
    p2p = 0.0
    if layout.pp > 1:  # one activation in, one out, per chunk (gradients the same way back)
        seq = t if layout.sequence_parallel else 1
        p2p = layout.virtual_stages * hw.collective("send_recv", n * m.hidden * e / seq, 2, x["pp"])
    recompute = {"none": 0.0, "full": blocks + tp, "selective": att_time / 3}[layout.recompute]
    twice = layout.schedule == "zb" and layout.pp > 1  # recomputed in I and again in W
    tf = compute + tp + p2p
    tb = 2 * compute + tp + recompute * (2 if twice else 1) + p2p
    tw = compute + (recompute if twice else 0.0)  # weight gradients: half of the backward's matmuls
    recompute *= 2 if twice else 1
    parts = {"compute": 3 * compute, "tp": 2 * tp, "pp": 2 * p2p, "recompute": recompute}
    return tf, tb, tw, parts


def estimate(job: Job, layout: Layout, hw) -> Estimate:
    """Memory and step time of ``layout`` for ``job`` on ``hw`` (see docs/planner.md)."""
    m, d, p = job.model, layout.dp, layout.pp
    micro = job.global_batch // (d * layout.micro_batch)
    tokens = job.global_batch // d * m.seq_len
    split = stage_layers(m.layers, p, layout.virtual_stages, m, tokens)
    kinds = sorted({0, p - 1, max(range(p), key=split.__getitem__)})  # the stages that can be the worst
    mems = {s: memory(job, layout, s) for s in kinds}
    mem = max(mems.values(), key=lambda x: sum(x.values()))
    total = sum(mem.values())
    stages = [_stage_times(job, layout, hw, s, tokens) for s in kinds]
    tf, tb, tw, parts = max(stages, key=lambda x: x[0] + x[1])
    span = pipeline_time(layout.schedule, p, micro, layout.virtual_stages, tf, tb, tw)
    ideal = micro * (tf + tb)
    times = {k: micro * v for k, v in parts.items()}
    times["bubble"] = span - ideal
    times.update(_dp_times(job, layout, hw, tokens, micro, tb))
    step = span + sum(v for k, v in times.items() if k in ("dp", "zero", "optimizer", "latency"))
    useful = model_flops_per_token(m) * job.global_batch * m.seq_len / (d * layout.tp * p)
    peak = hw.peak_flops.get(job.matmul) or hw.rate(job.matmul, 1e12)
    fits = total <= hw.memory_bytes
    bottleneck = max(times, key=times.get)
    return Estimate(layout, micro, mem, total, fits, times, step, useful / step / 1e12, useful / step / peak,
                    bottleneck, "" if fits else f"needs {total / 2**30:.1f} GiB per device, "
                    f"{hw.memory_bytes / 2**30:.1f} GiB available")


def _crossing(layout: Layout, hw) -> dict[str, bool]:
    """Which groups cross nodes: ranks are laid out tp fastest, then dp, then pp, so a group
    spans nodes once the ranks up to its extent outnumber a node's devices."""
    tp, dp, node = layout.tp, layout.dp, hw.devices_per_node
    return {"tp": tp > node, "dp": tp * dp > node, "pp": tp * dp * layout.pp > node}


def _dp_times(job: Job, layout: Layout, hw, tokens: int, micro: int, tb: float) -> dict:
    """Data parallel's collectives (the gradient all-reduce overlaps the last backward; ZeRO's do
    not), the optimizer's pass over its parameters (memory-bound), and the step's small
    all-reduces (loss, gradient norm)."""
    m, d = job.model, layout.dp
    pb, gb, ob = STATE_BYTES[job.precision]
    split = stage_layers(m.layers, layout.pp, layout.virtual_stages, m, tokens)
    psi = max(rank_params(m, layout, s, tokens) for s in {0, layout.pp - 1, split.index(max(split))})
    grads, x = psi * gb, _crossing(layout, hw)["dp"]
    out = {"dp": 0.0, "zero": 0.0}
    if d > 1 and layout.zero == 0:
        out["dp"] = max(0.0, hw.collective("all_reduce", grads, d, x) - tb)
    elif d > 1 and layout.zero < 3:
        out["zero"] = hw.collective("reduce_scatter", grads, d, x) + hw.collective("all_gather", psi * pb, d, x)
    elif d > 1:  # each block gathered forward and backward per micro-batch; the input and output
        pc = params(m)  # stages (the root unit) once a step
        block = pc.block_split / layout.tp + pc.block_whole
        layers = max(split)
        ends = max(0.0, psi - layers * block)
        out["zero"] = (2 * micro * layers * hw.collective("all_gather", block * pb, d, x)
                       + hw.collective("reduce_scatter", grads, d, x) + hw.collective("all_gather", ends * pb, d, x))
    stepped = psi / (d if layout.zero >= 1 else 1)
    tensors = m.layers * TENSORS_PER_LAYER[m.flavour] / layout.pp + 4
    out["optimizer"] = stepped * 2 * (pb + gb + ob) / hw.memory_bw + tensors * 12 * hw.op_latency_s
    out["latency"] = 2 * hw.link("all_reduce", max(d * layout.tp * layout.pp, 2)).latency_s
    return out
