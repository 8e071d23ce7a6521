"""Tensor parallel: every weight matrix split across the tp group (Shoeybi et al. 2019, Megatron-LM).

The plain model is turned into its tp form from the outside by :func:`apply_tensor_parallel`,
following the tensor-parallel plan of the model's description (module-name pattern -> style). For
a transformer layer (§3 of the paper) the plan reads:

- attention: the query, key and value projections are ``column`` (split by output features, so
  each rank owns heads/tp query heads and kv_heads/tp key/value heads), the output projection
  ``row`` (split by input features).
- MLP: the up (and gate) projections ``column``, the down projection ``row``.
- Attention and MLP are tp ``region``s: the input enters once through Megatron's f (forward
  identity, backward all-reduce over tp), and the row-parallel output leaves through g (forward
  all-reduce, backward identity). One all-reduce each way per region.
- ``vocab_embedding`` and ``vocab_head`` split the vocabulary (padded to a multiple of tp, the
  padding masked; a head's bias split alike); the loss is computed on vocabulary shards and never
  materialises full logits.

Sequence parallel (Korthikanti et al. 2022, §4.2.2): between regions, activations are split along
the sequence, so norms and dropout work on 1/tp of the tokens. f becomes an all-gather along the
sequence (backward: reduce-scatter), g a reduce-scatter (backward: all-gather). Gradients of
parameters used on sequence shards (the blocks' and the output stage's norms, row-parallel
biases) are partial sums and are all-reduced over tp after backward. The hidden states are split
along the sequence as they enter the first block.

With or without sequence parallel, a parameter inside a region that no style splits (a norm over
this rank's heads) sees only this rank's share: its gradient is a partial sum too, all-reduced
over tp after backward. A row-parallel bias is added after g, so it is whole without sp.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import DescriptionError
from ..models.description import IGNORE, ModelDescription, param_owner, set_module, tied_parameters, within


def _enter(x: torch.Tensor, group, sequence_parallel: bool, tally: comm.Tally | None = None) -> torch.Tensor:
    """Into a tp region: f, or the sequence all-gather under sequence parallel."""
    return comm.gather_seq(x, group, tally) if sequence_parallel else comm.copy_to_tp(x, group, tally)


def _shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].detach().clone()


class ColumnParallelLinear(nn.Module):
    """``y[..., out/tp] = x W_r^T + b_r``: this rank's slice of the output features.

    forward: no traffic when inside a region (``entry=False``); as a standalone layer
    (``entry=True``) f or, under sequence parallel, an all-gather along seq over tp.
    backward: the matching all-reduce (or reduce-scatter) of the input gradient over tp.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, entry: bool = False,
                 sequence_parallel: bool = False, tally: comm.Tally | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.entry, self.sequence_parallel = group, entry, sequence_parallel
        self.tally = tally  # counts the bytes sent over tp

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, **kw) -> ColumnParallelLinear:
        r, tp = dist.get_rank(group), dist.get_world_size(group)
        bias = _shard(lin.bias, 0, r, tp) if lin.bias is not None else None
        return cls(_shard(lin.weight, 0, r, tp), bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.entry:
            x = _enter(x, self.group, self.sequence_parallel, self.tally)  # (B, S, H), full sequence
        return F.linear(x, self.weight, self.bias)  # (B, S, out/tp)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T + b`` over the tp ranks, each holding a slice of the input features.

    forward: g, the all-reduce over tp (under sequence parallel a reduce-scatter along seq);
    the replicated bias is added after the reduction. backward: identity (or all-gather along seq).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False,
                 tally: comm.Tally | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sequence_parallel, self.tally = group, sequence_parallel, tally

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, **kw) -> RowParallelLinear:
        r, tp = dist.get_rank(group), dist.get_world_size(group)
        bias = lin.bias.detach().clone() if lin.bias is not None else None
        return cls(_shard(lin.weight, 1, r, tp), bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, S, H), a partial sum
        if self.sequence_parallel:
            y = comm.reduce_scatter_seq(y, self.group, self.tally)  # (B, S/tp, H)
        else:
            y = comm.reduce_from_tp(y, self.group, self.tally)
        return y + self.bias if self.bias is not None else y


def _padded_rows(weight: torch.Tensor, padded: int) -> torch.Tensor:
    """The (vocab, H) matrix with zero rows appended up to ``padded`` rows."""
    extra = padded - weight.shape[0]
    return torch.cat([weight.detach(), weight.new_zeros(extra, weight.shape[1])]) if extra else weight.detach()


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary, padded to a multiple of tp) are split over tp.

    forward: each rank looks up the tokens in its range (zeros elsewhere), then g: all-reduce over
    tp. backward: identity; each rank's gradient lands in its own rows only.
    """

    def __init__(self, weight: torch.Tensor, vocab_start: int, group, tally: comm.Tally | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.group, self.tally = vocab_start, group, tally

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, padded_vocab: int, **kw) -> VocabParallelEmbedding:
        r, tp = dist.get_rank(group), dist.get_world_size(group)
        full = _padded_rows(emb.weight, padded_vocab)
        return cls(_shard(full, 0, r, tp), r * padded_vocab // tp, group, **kw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, S, H)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_tp(x, self.group, self.tally)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary (Megatron §3, "parallel output layer").

    forward: all-reduce (max) of the row maxima, then one all-reduce (sum) of [sum of exp, target
    logit] over tp; backward: no traffic, softmax minus one-hot on the local shard.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab, group, tally):
        n_local = logits.shape[-1]
        valid = min(max(vocab - vocab_start, 0), n_local)  # real (unpadded) columns on this rank
        # our own copy, at least float32 (bf16 logits under autocast are upcast by this one copy)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        if valid < n_local:
            logits[:, valid:] = float("-inf")
        gmax = logits.max(dim=-1).values
        comm.all_reduce_(gmax, group, op=dist.ReduceOp.MAX, tally=tally)
        logits.sub_(gmax.unsqueeze(-1))
        local_t = target - vocab_start
        mine = (local_t >= 0) & (local_t < n_local)
        local_t = local_t.masked_fill(~mine, 0)
        picked = logits.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)
        probs = logits.exp_()  # (N, V/tp), in place: the only (N, V/tp) buffer kept
        stats = torch.stack([probs.sum(dim=-1), picked])  # (2, N)
        comm.all_reduce_(stats, group, tally=tally)
        probs.div_(stats[0].unsqueeze(-1))
        ctx.save_for_backward(probs, local_t, mine)
        return stats[0].log() - stats[1]

    @staticmethod
    def backward(ctx, grad):
        probs, local_t, mine = ctx.saved_tensors
        g = probs.clone()
        g[torch.arange(len(g), device=g.device), local_t] -= mine.to(g.dtype)
        return g.mul_(grad.unsqueeze(-1)), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab: int,
                                 group, tally: comm.Tally | None = None) -> torch.Tensor:
    """Per-token loss (N,) from this rank's logits (N, V/tp) and the targets (N,), in float32 or
    better; the gradient returns in the logits' dtype."""
    return _VocabParallelCE.apply(logits, target, vocab_start, vocab, group, tally)


class RNGTracker:
    """A second random stream for work that must differ across tp ranks (Megatron's tracked RNG).

    Dropout on replicated activations uses the default stream, seeded alike on every tp rank, so
    its masks agree; dropout inside a region (attention probabilities, on this rank's heads) and on
    sequence shards runs inside ``fork()``, whose stream is seeded per tp rank.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the stream afresh from ``seed`` (a run resumed at another layout)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.state = self._get()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self):
        outer = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(outer)

    def wrap(self, module: nn.Module) -> None:
        """Run ``module``'s forward on the tracked stream."""
        inner = module.forward

        def forward(*args, **kwargs):
            with self.fork():
                return inner(*args, **kwargs)

        module.forward = forward


@dataclass(frozen=True)
class TensorParallel:
    """What apply_tensor_parallel did, and the tp-aware pieces the parallel model needs."""

    mesh: object  # the 1-D tp DeviceMesh (DTensor views of the shards, for checkpoints)
    group: object
    tp: int
    sequence_parallel: bool
    sharded: dict[str, tuple[int, int]]  # parameter name -> (split dim, unsplit size)
    partial: frozenset[str] = frozenset()  # replicated parameters whose gradients are partial sums over tp
    vocab: int = 0  # of the vocab_head (0: none; the loss is then not vocabulary-parallel)
    vocab_start: int = 0
    padded_vocab: int = 0
    rng: RNGTracker | None = None  # the stream of sharded dropout (its state is checkpointed)
    tally: comm.Tally | None = None  # bytes sent over tp in training

    @property
    def vocab_parallel(self) -> bool:
        """Whether the outputs are logits split by vocabulary (the loss must be too)."""
        return self.vocab > 0

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of vocabulary-split logits (B, S, V/tp): mean or sum over the targets that
        are not ``IGNORE``. forward: two small all-reduces over tp (row maxima, then sums);
        backward: no traffic."""
        target = target.flatten()
        keep = target != IGNORE
        losses = vocab_parallel_cross_entropy(logits.flatten(0, 1), target.masked_fill(~keep, 0), self.vocab_start,
                                              self.vocab, self.group, self.tally) * keep
        return losses.sum() if reduction == "sum" else losses.sum() / keep.sum().clamp_min(1)

    def finish_grads(self, grads: list[torch.Tensor | None]) -> None:
        """After backward: all-reduce (sum) over tp the partial gradients of replicated parameters
        (``grads``: theirs, or under ZeRO this rank's slices of them, which line up across tp)."""
        grads = [g for g in grads if g is not None]
        if not grads or self.tp == 1:
            return
        flat = torch.cat([g.flatten() for g in grads])
        comm.all_reduce_(flat, self.group, tally=self.tally)
        for g, summed in zip(grads, comm.views_of(grads, flat)):
            g.copy_(summed)

    def full_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter unsharded (padding stripped), on CPU. Collective over tp."""
        out = {}
        for name, p in model.named_parameters():
            t = p.detach()
            if name in self.sharded:
                dim, size = self.sharded[name]
                t = comm.all_gather_dim(t, self.group, dim).narrow(dim, 0, size)
            out[name] = t.cpu().clone()
        return out

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(…, V/tp) on each rank -> (…, V) on every rank, by an all-gather over tp (for sampling,
        not for training)."""
        if not self.vocab_parallel:
            return logits
        return comm.gather_last(logits, self.group)[..., : self.vocab]


def apply_tensor_parallel(model: nn.Module, desc: ModelDescription, mesh, *, sequence_parallel: bool = False,
                          seed: int = 0, tally: comm.Tally | None = None) -> TensorParallel:
    """Replace the modules that ``desc.tp`` names with their tp form, in place, copying weight slices.

    ``mesh``: the 1-D tp DeviceMesh; ``seed``: of the stream that sharded dropout draws from (this
    rank's; ``seeds.seed_for(..., "tp")``); ``tally``: counts the bytes sent over tp. Every rank
    must hold the same full model (same seed).
    Tied parameters stay tied: the output layer and the embedding share the same vocabulary shard.
    """
    group = mesh.get_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    for fact, value in desc.tp.divisible.items():
        if value % tp:
            raise DescriptionError(f"tp.divisible[{fact!r}]", value, f"must be divisible by parallel.tp={tp}")
    styles = {n: s for n, _ in model.named_modules() if (s := desc.tp.style_of(n)) is not None}
    tied = list(tied_parameters(desc, model))
    for out_name, in_name in tied:  # one shard must serve both: both split by vocabulary, or neither
        pair = {styles.get(n.rpartition(".")[0]) for n in (out_name, in_name)}
        if pair not in ({"vocab_embedding", "vocab_head"}, {None}):
            raise DescriptionError("tp.styles", f"{in_name}/{out_name}", "a tied pair must be styled "
                                   "vocab_embedding and vocab_head together, or neither")
    vocab, has_head = _vocab_of(model, styles)
    if sequence_parallel and not has_head:  # nothing would gather the sequence before the loss
        raise DescriptionError("tp.styles", "no vocab_head", "sequence parallel needs the output layer styled "
                               "vocab_head, which gathers the sequence before the outputs")
    padded = -(-vocab // tp) * tp if vocab else 0
    ctx = _Styling(group, tp, rank, sequence_parallel, padded, tally)
    for name, style in styles.items():
        ctx.apply(model, name, model.get_submodule(name), style)
    for out_name, in_name in tied:
        set_module(model, out_name, model.get_parameter(in_name))
    if sequence_parallel:
        desc.block_list(model)[0].register_forward_pre_hook(
            lambda _m, args: (_scatter(args[0], group, tally), *args[1:]))
    regions = [n for n, s in styles.items() if s == "region"]
    partial = _partial(model, desc, styles, regions, ctx.sharded, sequence_parallel)
    tracker = RNGTracker(seed, next(model.parameters()).device)
    _track_random(model, desc, regions, sequence_parallel, tracker)
    return TensorParallel(mesh, group, tp, sequence_parallel, ctx.sharded, partial, vocab if has_head else 0,
                          rank * padded // tp if has_head else 0, padded, tracker, tally)


def _scatter(x: torch.Tensor, group, tally: comm.Tally | None = None) -> torch.Tensor:
    """Into the sequence-parallel part of the model: keep this rank's slice of the sequence."""
    tp = comm.group_size(group)
    if x.shape[1] % tp:
        raise DescriptionError("embed", tuple(x.shape), f"sequence parallel splits the sequence over tp={tp}: "
                               "its length must divide by tp")
    return comm.scatter_seq(x, group, tally)


def _partial(model: nn.Module, desc: ModelDescription, styles: dict[str, str], regions: list[str], sharded: dict,
             sequence_parallel: bool) -> frozenset[str]:
    """Replicated parameters whose gradient is this rank's share: those inside a region (but a row
    layer's bias, added after the sum), and under sequence parallel every other one of the blocks
    and the output stage (they see 1/tp of the tokens)."""
    owner = param_owner(desc)
    out = set()
    for name, _ in model.named_parameters():
        module = name.rpartition(".")[0]
        in_region = within(module, regions) and styles.get(module) != "row"
        if name not in sharded and (in_region or (sequence_parallel and owner(name) in ("block", "output"))):
            out.add(name)
    return frozenset(out)


def _vocab_of(model: nn.Module, styles: dict[str, str]) -> tuple[int, bool]:
    """Rows of the vocabulary-split layers (0 if there are none; they must agree), and whether
    the output layer is one of them (then the loss is vocabulary-parallel)."""
    sizes, head = set(), False
    for name, style in styles.items():
        module = model.get_submodule(name)
        if style == "vocab_embedding":
            sizes.add(module.num_embeddings)
        elif style == "vocab_head":
            sizes.add(module.out_features)
            head = True
    if len(sizes) > 1:
        raise DescriptionError("tp.styles", sorted(sizes), "vocab_embedding and vocab_head must have one vocabulary")
    return (sizes.pop() if sizes else 0), head


@dataclass
class _Styling:
    """Turns one module at a time into its tp form, recording what it shards."""

    group: object
    tp: int
    rank: int
    sequence_parallel: bool
    padded_vocab: int
    tally: comm.Tally | None = None
    sharded: dict[str, tuple[int, int]] = field(default_factory=dict)

    def apply(self, model: nn.Module, name: str, module: nn.Module, style: str) -> None:
        g, sp, c = self.group, self.sequence_parallel, self.tally
        if style == "region":  # f (or the seq all-gather) once at the input
            module.register_forward_pre_hook(lambda _m, args: (_enter(args[0], g, sp, c), *args[1:]))
            return
        kind = {"column": nn.Linear, "row": nn.Linear, "vocab_head": nn.Linear, "vocab_embedding": nn.Embedding}
        if not isinstance(module, kind[style]):
            raise DescriptionError(f"tp style of {name}", style, f"needs an nn.{kind[style].__name__}, "
                                   f"not {type(module).__name__}")
        new = self._build(name, module, style)
        for what in ("weight", "bias"):  # a frozen weight stays frozen in its tp form
            old, fresh = getattr(module, what, None), getattr(new, what, None)
            if isinstance(old, nn.Parameter) and isinstance(fresh, nn.Parameter):
                fresh.requires_grad_(old.requires_grad)
        set_module(model, name, new)

    def _build(self, name: str, module: nn.Module, style: str) -> nn.Module:
        g, sp = self.group, self.sequence_parallel
        split = {"column": "out_features", "row": "in_features"}.get(style)
        if split and getattr(module, split) % self.tp:
            raise DescriptionError(f"tp style of {name}", style, f"{split}={getattr(module, split)} must be "
                                   f"divisible by parallel.tp={self.tp}")
        if style == "column":
            for what in ("weight", "bias") if module.bias is not None else ("weight",):
                self.sharded[f"{name}.{what}"] = (0, module.out_features)
            return ColumnParallelLinear.from_linear(module, g, tally=self.tally)
        if style == "row":
            self.sharded[f"{name}.weight"] = (1, module.in_features)
            return RowParallelLinear.from_linear(module, g, sequence_parallel=sp, tally=self.tally)
        if style == "vocab_embedding":
            self.sharded[f"{name}.weight"] = (0, module.num_embeddings)
            return VocabParallelEmbedding.from_embedding(module, g, self.padded_vocab, tally=self.tally)
        bias = None
        if module.bias is not None:  # split like the rows (BERT's output layer has one)
            self.sharded[f"{name}.bias"] = (0, module.out_features)
            bias = _shard(_padded_rows(module.bias[:, None], self.padded_vocab)[:, 0], 0, self.rank, self.tp)
        self.sharded[f"{name}.weight"] = (0, module.out_features)
        weight = _padded_rows(module.weight, self.padded_vocab)
        return ColumnParallelLinear(_shard(weight, 0, self.rank, self.tp), bias, g, entry=True, sequence_parallel=sp,
                                    tally=self.tally)


def _track_random(model: nn.Module, desc: ModelDescription, regions: list[str], sequence_parallel: bool,
                  tracker: RNGTracker) -> None:
    """Run on the tracked stream (per tp rank) what draws random numbers on this rank's shard: the
    description's ``sharded_random`` modules, dropout inside a region, and under sequence parallel
    the blocks' and the output stage's other dropout (each rank holds other tokens). Dropout that
    is off is left alone."""
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if within(name, wrapped):
            continue  # already on the tracked stream through a module around it
        sharded = any(fnmatch.fnmatchcase(name, pattern) for pattern in desc.tp.sharded_random)
        if not sharded and isinstance(module, nn.Dropout) and module.p > 0:
            if within(name, (desc.blocks,)):
                sharded = sequence_parallel or within(name, regions)
            else:  # the output stage's (a tagger's) runs on sequence shards under sequence parallel
                sharded = sequence_parallel and within(name, desc.output_modules)
        if sharded:
            tracker.wrap(module)
            wrapped.append(name)
