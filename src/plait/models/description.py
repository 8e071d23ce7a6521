"""What a strand may know of a model: its description.

A model that plait can split is three pieces run in order, each the model's own code:

    outputs = head(model, blocks[n-1](... blocks[0](embed(model, inputs), **side) ..., **side))

- the **input stage** ``embed(model, inputs) -> hidden (B, S, H)``, using ``input_modules``;
- the **repeated blocks**, a ``ModuleList`` attribute (``blocks``), each hidden -> hidden, the
  hidden states as the first positional argument; every block may take **side inputs** (a padding
  mask, positions, rotary tables, token types) built by ``side(model, inputs) -> dict`` and passed
  as keywords to every block;
- the **output stage** ``head(model, hidden) -> outputs`` (logits, or per-token outputs with their
  own ``loss``), using ``output_modules``.

Every parameter belongs to one block or to a module of one stage; a parameter shared by two places
is declared in ``tied`` (at most one pair: an input embedding reused by the output layer).

Strands know a model only through this object: tensor parallel follows ``tp`` (module-name
pattern -> style), pipeline parallel keeps a contiguous run of blocks plus the input stage (first
stage) or the output stage (last stage) and runs ``embed`` / the blocks / ``head`` itself, ZeRO-3
makes each block a unit, and clipping and checkpoints find tied parameters through ``tied``. A
model's own ``forward`` must equal the composition above (``compose`` is that composition).

Tensor-parallel styles (Shoeybi et al. 2019; what travels is documented in ``parallel/tensor.py``):

- ``column``: an ``nn.Linear`` split by output features (heads, MLP width);
- ``row``: an ``nn.Linear`` split by input features; its output is summed over tp;
- ``region``: a module whose input enters tp once (Megatron's f; under sequence parallel the
  sequence all-gather), e.g. attention or the MLP around column and row layers;
- ``vocab_embedding`` / ``vocab_head``: an ``nn.Embedding`` / ``nn.Linear`` (its bias split alike) split by
  vocabulary rows (padded to a multiple of tp); a ``vocab_head`` makes the loss vocabulary-parallel.

A region's input is the hidden states as its first positional argument. Inside a region, a
parameter that no style splits (a norm over this rank's heads) sees only this rank's share and
its gradient is summed over tp. Under sequence parallel the hidden states between regions are split
along the sequence while side inputs stay whole, so blocks may use side inputs only inside regions.

Random numbers under tp: ``nn.Dropout`` modules inside a region work on this rank's shard and draw
from a stream per tp rank; under sequence parallel so do the blocks' other dropouts (each rank holds
other tokens). Modules that draw random numbers internally on their shard (attention dropout inside
``scaled_dot_product_attention``) are named in ``tp.sharded_random``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DescriptionError

TP_STYLES = ("column", "row", "region", "vocab_embedding", "vocab_head")


@dataclass(frozen=True)
class TensorParallelPlan:
    """How tensor parallel splits the model.

    ``styles``: fnmatch pattern over module names (``blocks.*.attn.wq``) -> one of ``TP_STYLES``;
    every pattern must match at least one module. ``divisible``: sizes that tp must divide, named for
    the error message (``{"heads": 8, "kv_heads": 2}``). ``sharded_random``: patterns of modules
    whose forward draws random numbers on this rank's shard (their stream differs per tp rank)."""

    styles: dict[str, str] = field(default_factory=dict)
    divisible: dict[str, int] = field(default_factory=dict)
    sharded_random: tuple[str, ...] = ()

    def style_of(self, name: str) -> str | None:
        """The style of module ``name`` (the first pattern that matches), or None."""
        return next((s for pattern, s in self.styles.items() if fnmatch.fnmatchcase(name, pattern)), None)


@dataclass(frozen=True)
class ModelDescription:
    """The pieces and facts of a model that strands may use (see the module docstring)."""

    embed: Callable[[nn.Module, Any], torch.Tensor]  # (model, inputs) -> hidden (B, S, H)
    blocks: str  # attribute holding the repeated blocks (an nn.ModuleList)
    head: Callable[[nn.Module, torch.Tensor], Any]  # (model, hidden) -> outputs
    hidden: int  # width H of the hidden states between blocks
    input_modules: tuple[str, ...] = ()  # attributes used by ``embed`` (the first pipeline stage)
    output_modules: tuple[str, ...] = ()  # attributes used by ``head`` (the last pipeline stage)
    tied: tuple[tuple[str, str], ...] = ()  # (output-stage name, input-stage name) of one shared parameter
    tp: TensorParallelPlan = field(default_factory=TensorParallelPlan)
    side: Callable[[nn.Module, Any], dict] | None = None  # (model, inputs) -> side inputs of every block
    loss: Callable | None = None  # (outputs, targets, reduction) -> loss; None: next-token cross-entropy
    costs: Callable[[int], tuple[float, float, float]] | None = None  # tokens -> (embed, block, head) cost
    attention_core: str = ""  # pattern of the modules (q, k, v) -> attention output; selective recompute
    objective: str = "next_token"  # what train and verify teach it: next_token, masked (an encoder's MLM),
    # or none (a task of its own: a tagger, which plait finetune trains)

    def side_inputs(self, model: nn.Module, inputs: Any) -> dict:
        """What every block receives beside the hidden states (``{}`` when the model has none)."""
        return self.side(model, inputs) if self.side is not None else {}

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        """The blocks this model holds now, in order (all of them, or a pipeline stage's)."""
        blocks = getattr(model, self.blocks)
        return list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)


def compose(desc: ModelDescription, model: nn.Module, inputs: Any) -> Any:
    """The whole forward as the description states it: head(blocks(embed(inputs)))."""
    x = desc.embed(model, inputs)
    side = desc.side_inputs(model, inputs)
    for block in desc.block_list(model):
        x = block(x, **side)
    return desc.head(model, x)


IGNORE = -100  # a target that takes no part in the loss (padding), as in torch's cross-entropy


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The default loss: cross-entropy of (B, S, V) logits against (B, S) targets, per token
    (mean or sum over the targets that are not ``IGNORE``); 16-bit logits are upcast first."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=IGNORE)


def batch_shape(inputs: Any) -> tuple[int, int]:
    """(batch, sequence) of a micro-batch's inputs: a tensor (B, S, ...) or a dict of them."""
    t = inputs if torch.is_tensor(inputs) else next(v for v in inputs.values() if torch.is_tensor(v))
    return t.shape[0], t.shape[1]


def get_module(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` (dotted), or None where it is absent (another pipeline stage's)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter ``name`` (dotted), or None where its module is absent."""
    module_name, _, attr = name.rpartition(".")
    module = get_module(model, module_name)
    return getattr(module, attr, None) if module is not None else None


def set_module(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Replace (or, with None, drop) the submodule ``name`` in place."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def stage_modules(desc: ModelDescription, model: nn.Module, which: str) -> list[nn.Module]:
    """The modules of the input (``"input"``) or output (``"output"``) stage this model holds."""
    names = desc.input_modules if which == "input" else desc.output_modules
    return [m for m in (get_module(model, n) for n in names) if m is not None]


def tied_parameters(desc: ModelDescription, model: nn.Module) -> Iterator[tuple[str, str]]:
    """The pairs of ``desc.tied`` that are one parameter in this (whole) model."""
    for out_name, in_name in desc.tied:
        a, b = get_parameter(model, out_name), get_parameter(model, in_name)
        if a is not None and a is b:
            yield out_name, in_name


def within(name: str, prefixes) -> bool:
    """Whether the dotted ``name`` is one of ``prefixes`` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_owner(desc: ModelDescription) -> Callable[[str], str | None]:
    """name -> ``"input"``, ``"block"`` or ``"output"``: which piece a parameter belongs to."""
    def owner(name: str) -> str | None:
        if within(name, (desc.blocks,)):
            return "block"
        for which, prefixes in (("input", desc.input_modules), ("output", desc.output_modules)):
            if within(name, prefixes):
                return which
        return None
    return owner


def check(desc: ModelDescription, model: nn.Module, sample: Any | None = None) -> None:
    """Stop with one line naming the part of ``desc`` that does not fit ``model`` and why.

    With ``sample`` inputs, the pieces are also run once (no gradients, evaluation mode, random
    state restored): the input stage must give (B, S, hidden) and every block keep that shape."""
    blocks = getattr(model, desc.blocks, None)
    if not isinstance(blocks, (nn.ModuleList, nn.ModuleDict)) or len(blocks) == 0:
        raise DescriptionError("blocks", desc.blocks, "must name a non-empty nn.ModuleList attribute of the model")
    for which, names in (("input_modules", desc.input_modules), ("output_modules", desc.output_modules)):
        for name in names:
            if get_module(model, name) is None or not name:
                raise DescriptionError(which, name, "names no submodule of the model")
    both = set(desc.input_modules) & set(desc.output_modules)
    if both:
        raise DescriptionError("output_modules", sorted(both)[0], "is in input_modules too: a module belongs to "
                               "one stage (share a parameter through tied instead)")
    _check_parameters(desc, model)
    _check_tp_plan(desc.tp, model)
    if sample is not None:
        _check_shapes(desc, model, sample)


def _check_parameters(desc: ModelDescription, model: nn.Module) -> None:
    """Every parameter belongs to one piece, and one shared by two names is the declared tie."""
    owner = param_owner(desc)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        if owner(name) is None:
            hint = ("hold it in a submodule and list that" if "." not in name else "list its module") + \
                " in input_modules or output_modules, or move it into a block"
            raise DescriptionError("parameters", name, f"belongs to no piece: {hint}")
    if len(desc.tied) > 1:
        raise DescriptionError("tied", desc.tied, "plait shares at most one parameter between the stages")
    for out_name, in_name in desc.tied:
        if get_parameter(model, out_name) is None or get_parameter(model, in_name) is None:
            raise DescriptionError("tied", f"{out_name}={in_name}", "both names must be parameters of the model")
    declared = {frozenset(pair) for pair in desc.tied}
    for shared in (n for n in names.values() if len(n) > 1):
        if frozenset(shared) not in declared:
            raise DescriptionError("tied", "=".join(shared), "these names are one parameter: declare the pair "
                                   "in tied as (output-stage name, input-stage name), or give each its own")


def _check_tp_plan(plan: TensorParallelPlan, model: nn.Module) -> None:
    names = [n for n, _ in model.named_modules()]
    for pattern, style in plan.styles.items():
        if style not in TP_STYLES:
            raise DescriptionError(f"tp.styles[{pattern!r}]", style, f"valid styles: {', '.join(TP_STYLES)}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise DescriptionError(f"tp.styles[{pattern!r}]", style, "the pattern matches no module of the model")


@torch.no_grad()
def _check_shapes(desc: ModelDescription, model: nn.Module, sample: Any) -> None:
    was_training = model.training
    model.eval()
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            x = desc.embed(model, sample)
            want = (*batch_shape(sample), desc.hidden)
            if tuple(x.shape) != want:
                raise DescriptionError("embed", tuple(x.shape),
                                       f"the input stage must give (batch, seq, hidden) = {want}")
            side = desc.side_inputs(model, sample)
            for i, block in enumerate(desc.block_list(model)):
                y = block(x, **side)
                if not torch.is_tensor(y) or y.shape != x.shape:
                    got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
                    raise DescriptionError(f"blocks[{i}]", got, f"a block must map hidden {tuple(x.shape)} to the "
                                           "same shape")
                x = y
    finally:
        model.train(was_training)


def parameter_costs(desc: ModelDescription, model: nn.Module, tokens: int) -> tuple[float, float, float]:
    """A model-free estimate of (input stage, one block, output stage) cost for balancing pipeline
    stages, when the description gives no ``costs``: 6 FLOPs per token per matrix parameter
    (forward and backward; lookups are free) plus ``PARAM_COST`` per parameter for the optimizer."""
    def cost(modules: list[nn.Module], lookups: bool) -> float:
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        flops = 0 if lookups else 6 * tokens * sum(p.numel() for p in params if p.dim() >= 2)
        return flops + PARAM_COST * sum(p.numel() for p in params)

    blocks = desc.block_list(model)
    return (cost(stage_modules(desc, model, "input"), True), cost(blocks, False) / len(blocks),
            cost(stage_modules(desc, model, "output"), False))


PARAM_COST = 40.0  # FLOP-equivalents per parameter per step (AdamW, zeroing, clipping: memory-bound)
