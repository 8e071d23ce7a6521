"""Tensor parallel against one process: collectives, layers, the loss path, RNG, whole runs."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from plait import comm
from plait.launch import run_local
from plait.models import build
from plait.parallel.tensor import RNGTracker
from plait.topology import Topology, build_groups
from plait.train.trainer import RunOptions, train_worker
from plait.verify import compare, layout_config, parse_layouts, run_verify
from tests.conftest import layout_id, tiny_config, verify_layout

pytestmark = pytest.mark.timeout(300)


def _check_collectives():
    """Each op's forward and backward against what the whole tensor says (float64, exact)."""
    g, tp, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    full = torch.randn(2, 4 * tp, 3 * tp, dtype=torch.float64)  # same on every rank
    ups = [torch.randn_like(full) for _ in range(tp)]  # upstream gradient of each rank
    errs = {}

    def run(name, fn, x, up, want_y, want_grad):
        x = x.clone().requires_grad_()
        y = fn(x, g)
        y.backward(up)
        errs[name] = max(float((y - want_y).abs().max()), float((x.grad - want_grad).abs().max()))

    last, seq = lambda t: t.chunk(tp, -1)[r], lambda t: t.chunk(tp, 1)[r]
    run("copy_to_tp", comm.copy_to_tp, full, ups[r], full, sum(ups))
    run("reduce_from_tp", comm.reduce_from_tp, full * (r + 1), ups[0], full * tp * (tp + 1) / 2, ups[0])
    run("gather_last", comm.gather_last, last(full), ups[0], full, last(ups[0]))
    run("scatter_last", comm.scatter_last, full, last(ups[r]), last(full),
        torch.cat([u.chunk(tp, -1)[i] for i, u in enumerate(ups)], -1))
    run("gather_seq", comm.gather_seq, seq(full), ups[r], full, seq(sum(ups)))
    run("reduce_scatter_seq", comm.reduce_scatter_seq, full * (r + 1), seq(ups[r]),
        seq(full) * tp * (tp + 1) / 2, torch.cat([u.chunk(tp, 1)[i] for i, u in enumerate(ups)], 1))
    run("scatter_seq", comm.scatter_seq, full, seq(ups[r]), seq(full),
        torch.cat([u.chunk(tp, 1)[i] for i, u in enumerate(ups)], 1))
    return errs


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_forward_and_backward(tp):
    for errs in run_local(_check_collectives, tp):
        assert all(e < 1e-12 for e in errs.values()), errs


def _tp_runs(cfg, nproc):
    opts = RunOptions(progress=False, keep_params=True)
    return run_local(train_worker, nproc, (cfg, opts))[0]


LAYOUTS = {"tp=2": 2, "tp=2,sequence_parallel=true": 2, "dp=2,tp=2": 4, "tp=4,sequence_parallel=true": 4}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("vocab", [256, 257])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_verify_matches_one_process(corpus_file, layout, flavour, vocab):
    base = tiny_config(corpus_file, f"model.flavour={flavour}", f"model.vocab={vocab}", "train.dtype=float64",
                       "train.steps=4")
    row = verify_layout(base, layout)
    assert row["nproc"] == LAYOUTS[layout] and row["ok"], row


@pytest.mark.parametrize("layout", ["tp=2", "tp=2,sequence_parallel=true"], ids=layout_id)
def test_grouped_query_attention_split(corpus_file, layout):
    base = tiny_config(corpus_file, "model.flavour=llama", "model.kv_heads=2", "train.dtype=float64",
                       "train.steps=4")
    row = verify_layout(base, layout)
    assert row["ok"], row


def test_clipped_grad_norm_counts_each_parameter_once(corpus_file):
    base = tiny_config(corpus_file, "train.dtype=float64", "train.steps=3", "train.grad_clip=0.05")
    ref = _tp_runs(layout_config(base, {})[0], 1)
    assert min(ref.grad_norms) > 10 * 0.05  # clipping is active at every step
    for layout in ("tp=2", "tp=2,sequence_parallel=true"):
        cfg, n = layout_config(base, parse_layouts(layout)[0])
        got = _tp_runs(cfg, n)
        assert got.grad_norms == pytest.approx(ref.grad_norms, rel=1e-12)
        assert max(compare(ref, got)) < 1e-9  # clipping was active (norms >> 0.05) and agreed


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_in_loss_path(cfg):
    from plait.parallel.hybrid import parallelize

    groups = build_groups(Topology(dp=cfg.parallel.dp, tp=cfg.parallel.tp), "cpu")
    torch.manual_seed(0)
    pm = parallelize(*build(cfg.model), groups, cfg.parallel)
    x = torch.randint(0, 256, (2, cfg.model.seq_len))
    hidden = pm.module.blocks[-1](pm.module.embed(x)).detach().requires_grad_()
    with _Largest() as probe:
        pm.loss(pm.module.head(hidden), x).backward()
    return probe.numel


@pytest.mark.parametrize("tp", [2, 4])
def test_loss_path_never_holds_the_full_vocabulary(corpus_file, tp):
    vocab, tokens = 1003, 2 * 16
    cfg = tiny_config(corpus_file, f"model.vocab={vocab}", f"parallel.tp={tp}", nproc=tp)
    largest = max(run_local(_largest_in_loss_path, tp, (cfg,)))
    assert largest == tokens * -(-vocab // tp)  # (tokens x vocab/tp), padded: the logits shard
    single = tiny_config(corpus_file, f"model.vocab={vocab}")
    assert run_local(_largest_in_loss_path, 1, (single,))[0] >= tokens * vocab  # the check can fail


def _dropout_streams(cfg):
    """One forward in training mode. Every tp rank is given the same local attention weights, so
    its local heads compute the same scores: the attention output (before the row-parallel
    projection) can then differ between ranks only through the dropout on those heads."""
    from plait.parallel.hybrid import parallelize

    groups = build_groups(Topology(tp=cfg.parallel.tp), "cpu")
    torch.manual_seed(cfg.train.seed)
    pm = parallelize(*build(cfg.model), groups, cfg.parallel, seed=cfg.train.seed)
    attn = pm.module.blocks[0].attn
    with torch.no_grad():
        for proj in (attn.wq, attn.wk, attn.wv):
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(3)))
    heads, blocks = [], []
    attn.wo.register_forward_pre_hook(lambda _m, args: heads.append(args[0].detach()))
    for block in pm.module.blocks:
        block.register_forward_hook(lambda _m, _a, out: blocks.append(out.detach()))
    torch.manual_seed(5)  # the default stream, alike on every tp rank
    pm.module(torch.randint(0, 256, (2, cfg.model.seq_len)))
    return heads[0], [h.sum().item() for h in blocks], torch.rand(4)


def test_dropout_agrees_where_it_must_and_differs_where_it_must(corpus_file):
    cfg = tiny_config(corpus_file, "parallel.tp=2", "model.dropout=0.2", nproc=2)
    (heads0, h0, d0), (heads1, h1, d1) = run_local(_dropout_streams, 2, (cfg,))
    assert not torch.allclose(heads0, heads1)  # each rank's heads drop on its own stream (the tracker)
    assert h0 == pytest.approx(h1, rel=1e-6)  # replicated activations stay identical over tp
    assert torch.equal(d0, d1)  # the default stream moved alike on every rank


def test_tracked_stream_differs_per_rank_and_leaves_the_default_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    draws = []
    for rank in range(2):
        with RNGTracker(7 + rank, torch.device("cpu")).fork():
            draws.append(torch.rand(4))
    assert not torch.equal(*draws)
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_under_sequence_parallel_trains(corpus_file):
    cfg = tiny_config(corpus_file, "parallel.tp=2", "parallel.sequence_parallel=true", "model.dropout=0.1",
                      "train.steps=6", nproc=2)
    losses = run_local(train_worker, 2, (cfg, RunOptions(progress=False)))[0].losses
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def _identity(x, group, tally=None):
    return x


@pytest.mark.parametrize("collective", ["copy_to_tp", "reduce_from_tp", "reduce_scatter_seq"])
def test_verify_catches_a_missing_tensor_parallel_collective(corpus_file, monkeypatch, collective):
    """The tp layouts are not equal to one process by accident: removing f's backward all-reduce,
    g's forward all-reduce or sequence parallel's reduce-scatter is caught by a wide margin."""
    monkeypatch.setattr(comm, collective, _identity if collective != "reduce_scatter_seq"
                        else lambda x, g, tally=None: comm.split_dim(x, g, 1))  # keeps the shapes, drops the sum
    base = tiny_config(corpus_file, "train.dtype=float64", "train.steps=3")
    layout = "tp=2,sequence_parallel=true" if collective == "reduce_scatter_seq" else "tp=2"
    row = run_verify(base, parse_layouts(layout), tol=1e-9, progress=False)[0]
    assert not row["ok"]
    assert max(row["max_loss_rel_diff"], row["max_param_rel_diff"]) > 1e-4, row


QK_NORM = Path(__file__).resolve().parents[1] / "models" / "small.py"


@pytest.mark.parametrize("layout", ["tp=2", "tp=2,sequence_parallel=true", "dp=2,tp=2,zero=2"], ids=layout_id)
def test_a_replicated_parameter_inside_a_region_is_summed_over_tp(corpus_file, layout):
    """The head norm acts on this rank's heads only: its gradient is this rank's share, summed over tp."""
    base = tiny_config(corpus_file, f"model.builder={QK_NORM}:build", "train.dtype=float64", "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


@pytest.mark.parametrize("layout", ["tp=2", "dp=2,tp=2,zero=1"], ids=layout_id)
def test_a_frozen_weight_stays_frozen_when_split(corpus_file, layout):
    """A frozen projection that tensor parallel splits keeps its flag: it does not train (the
    one-process reference leaves it alone too)."""
    base = tiny_config(corpus_file, f"model.builder={QK_NORM}:frozen_column", "train.dtype=float64",
                       "train.steps=3")
    row = verify_layout(base, layout)
    assert row["ok"], row


def _losses_with_ignored_targets(tp: int):
    from plait.parallel.tensor import TensorParallel

    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64)
    target = torch.tensor([1, -100, 9, 3, -100, 0])
    want = torch.nn.functional.cross_entropy(logits, target)  # ignore_index=-100
    rank = dist.get_rank()
    shard = logits.chunk(tp, dim=1)[rank].clone().requires_grad_()
    head = TensorParallel(None, dist.group.WORLD, tp, False, {}, vocab=10, vocab_start=rank * 10 // tp,
                          padded_vocab=10)
    got = head.loss(shard.unsqueeze(0), target.unsqueeze(0))
    got.backward()
    full = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(full, target).backward()
    return float(got), float(want), torch.equal(shard.grad[[1, 4]], torch.zeros(2, 10 // tp, dtype=torch.float64)), \
        float((shard.grad - full.grad.chunk(tp, dim=1)[rank]).abs().max())


def test_vocabulary_parallel_loss_ignores_padding_targets_as_torch_does():
    for got, want, ignored_zero, grad_err in run_local(_losses_with_ignored_targets, 2, (2,)):
        assert got == pytest.approx(want, rel=1e-12) and ignored_zero and grad_err < 1e-14
