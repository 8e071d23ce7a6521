"""DiLoCo's pieces without processes: fragments, the wire formats, its keys; the traffic counter."""

import pytest
import torch
from torch import nn

from plait import config as C
from plait.comm import Tally, Traffic
from plait.errors import ConfigError
from plait.parallel.diloco import OuterSGD, fragment_names, quantized_mean, split_by_bytes
from plait.verify import layout_name, parse_layouts


def test_tally_counts_the_ring_volume_of_each_collective():
    t, x = Tally(), torch.zeros(1000)  # 4000 bytes
    t.all_reduce(x, 4)
    assert t.sent == 6000  # 2(n-1)/n
    t.all_gather(x, 4)
    assert t.sent == 6000 + 12000  # (n-1) times its own part
    t.reduce_scatter(x, 4)
    assert t.sent == 18000 + 3000  # (n-1)/n
    t.send(x)
    assert t.sent == 25000


def test_traffic_takes_what_was_sent_since_the_last_take():
    tr = Traffic()
    tr.tally("dp").send(torch.zeros(2))
    tr.tally("tp").send(torch.zeros(1, dtype=torch.float64))
    assert tr.take() == {"dp": 8, "tp": 8}
    assert tr.take() == {}
    tr.tally("dp").send(torch.zeros(1))
    assert tr.take() == {"dp": 4} and tr.totals() == {"dp": 12, "tp": 8}


def test_fragments_split_by_bytes_in_order():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 10, 10, 40)]
    parts = split_by_bytes(params, 2)
    assert [len(p) for p in parts] == [4, 1]
    assert [len(p) for p in split_by_bytes(params[:1], 3)].count(0) == 2  # fewer parameters than parts


def test_a_tied_output_weight_syncs_with_its_input():
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    names = fragment_names(model, 2, tied=(("3.weight", "0.weight"),))
    assert names["3.weight"] == names["0.weight"] == 0 and names["2.weight"] == 1


@pytest.mark.parametrize("fmt, tol", [("none", 1e-15), ("bf16", 1e-2), ("fp8", 8e-2)])
def test_quantized_mean_is_the_mean_within_the_format(fmt, tol):
    torch.manual_seed(0)
    flats = [torch.randn(1001, dtype=torch.float64) for _ in range(3)]
    got, want = quantized_mean(flats, fmt), sum(flats) / 3
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < tol


def _outer_run(ramp: str, momentum: float, grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    x = torch.zeros(3, dtype=torch.float64)
    sgd = OuterSGD([x], lr=0.7, momentum=momentum, ramp=ramp)
    used = []
    for g in grads:
        x.grad = g.clone()
        sgd.step()
        used.append(sgd.param_groups[0]["momentum"])
    return x, used


def test_the_outer_momentum_rises_along_nesterovs_sequence():
    torch.manual_seed(0)
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(40)]
    x, used = _outer_run("nesterov", 0.9, grads)
    assert used[:4] == [0.0, 0.25, 0.4, 0.5] and used[26] < 0.9 and used[27:] == [0.9] * 13
    want, buf = torch.zeros(3, dtype=torch.float64), None  # the buffer starts at the first nonzero momentum
    for g, mu in zip(grads, used):
        if mu:
            buf = g.clone() if buf is None else mu * buf + g
        want -= 0.7 * (g + mu * buf if mu else g)
    assert torch.allclose(x, want, rtol=0, atol=1e-12)


def test_without_a_ramp_the_outer_step_is_torchs_nesterov_sgd():
    torch.manual_seed(0)
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(5)]
    x, used = _outer_run("none", 0.9, grads)
    y = torch.zeros(3, dtype=torch.float64)
    sgd = torch.optim.SGD([y], lr=0.7, momentum=0.9, nesterov=True)
    for g in grads:
        y.grad = g.clone()
        sgd.step()
    assert used == [0.9] * 5 and torch.equal(x, y)
    assert _outer_run("nesterov", 0.0, grads)[1] == [0.0] * 5  # local SGD: no momentum to ramp


def test_a_restart_forgets_the_momentum_and_its_ramp():
    x = torch.zeros(2)
    sgd = OuterSGD([x], lr=1.0, momentum=0.9)
    for _ in range(3):
        x.grad = torch.ones(2)
        sgd.step()
    sgd.restart()
    assert sgd.syncs == 0 and not sgd.state
    x.grad = torch.ones(2)
    sgd.step()  # the first sync again: a plain step, no buffer (without the restart: momentum 0.5 on one)
    assert sgd.param_groups[0]["momentum"] == 0.0 and not sgd.state


@pytest.mark.parametrize("item, field", [
    ("diloco.inner_steps=0", "diloco.inner_steps"),
    ("diloco.inner_steps=-3", "diloco.inner_steps"),
    ("diloco.outer_lr=0", "diloco.outer_lr"),
    ("diloco.outer_momentum=1", "diloco.outer_momentum"),
    ("diloco.fragments=20", "diloco.fragments"),
    ("diloco.quantize=int4", "diloco.quantize"),
    ("diloco.momentum_ramp=linear", "diloco.momentum_ramp"),
    ("diloco.replicas=3", "diloco.replicas"),
    ("diloco.replicas=-1", "diloco.replicas"),
])
def test_bad_diloco_keys_name_the_field(item, field):
    cfg = C.load(None, ["diloco.inner_steps=10", item])
    with pytest.raises(ConfigError) as e:
        C.resolve(cfg, 2)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_diloco_with_zero_needs_replicas_of_several_ranks():
    with pytest.raises(ConfigError, match="parallel.zero=1: ZeRO shards within a DiLoCo replica"):
        C.resolve(C.load(None, ["diloco.inner_steps=10", "parallel.zero=1"]), 2)
    cfg = C.resolve(C.load(None, ["diloco.inner_steps=10", "parallel.zero=1", "diloco.replicas=2",
                                  "train.micro_batch=4"]), 4)
    assert C.diloco_shards(cfg.diloco, cfg.parallel) == 2
    with pytest.raises(ConfigError, match="diloco.replicas=2: replicas of 2 dp ranks shard their state with ZeRO"):
        C.resolve(C.load(None, ["diloco.inner_steps=10", "diloco.replicas=2", "train.micro_batch=4"]), 4)


def test_diloco_is_off_unless_a_key_is_given():
    assert C.load(None, []).diloco is None and "diloco" not in C.to_toml(C.load(None, []))
    cfg = C.load(None, ["diloco.inner_steps=10"])
    assert cfg.diloco.inner_steps == 10 and cfg.diloco.outer_lr == 0.7
    assert "[diloco]" in C.to_toml(cfg)


def test_verify_layouts_take_section_keys():
    layout = parse_layouts("dp=2,diloco.inner_steps=10,diloco.quantize=fp8")[0]
    assert layout == {"parallel": {"dp": "2"}, "diloco": {"inner_steps": "10", "quantize": "fp8"}}
    assert layout_name(layout) == "dp=2,diloco.inner_steps=10,diloco.quantize=fp8"
    with pytest.raises(ConfigError, match="diloco.inner_steps"):
        parse_layouts("dp=2,diloco.no_such=1")


# --------------------------------------------------------------------------- the parameter server's keys


def test_keys_are_dealt_to_servers_by_bytes():
    from plait.parallel.ps import Key, assign

    keys = [Key((0, 0), f"w{i}", (n,), "float32", True, False) for i, n in enumerate((100, 10, 60, 50, 5))]
    owner = assign(keys, 2)
    load = [sum(k.nbytes for k, s in zip(keys, owner) if s == srv) for srv in (0, 1)]
    assert owner[0] != owner[2] and abs(load[0] - load[1]) <= 5 * 4  # largest first, to the lighter server
    assert assign(keys, 1) == [0] * 5


def test_ps_keys_and_defaults():
    cfg = C.resolve(C.load(None, ["ps.mode=async", "parallel.dp=2"]), 3)
    assert cfg.ps.servers == 1 and cfg.parallel.dp == 2 and C.servers(cfg) == 1
    assert C.resolve(C.load(None, ["ps.servers=2"]), 4).parallel.dp == 2  # dp: the processes left
    assert C.slow_worker("1:3.0", 2) == (1, 3.0) and C.slow_worker("", 2) is None


@pytest.mark.parametrize("sets, nproc, field", [
    (["ps.servers=0"], 3, "ps.servers"),
    (["ps.servers=3", "parallel.dp=2"], 4, "ps.servers"),
    (["ps.mode=ssp", "ps.staleness=-2"], 3, "ps.staleness"),
    (["ps.servers=1", "parallel.zero=2", "parallel.dp=2"], 3, "parallel.zero"),
    (["ps.slow_worker=2:3", "parallel.dp=2"], 3, "ps.slow_worker"),
    (["ps.slow_worker=1:0.5", "parallel.dp=2"], 3, "ps.slow_worker"),
    (["ps.mode=bsp"], 3, "ps.mode"),
    (["ps.slow_worker=fast", "parallel.dp=2"], 3, "ps.slow_worker"),
    (["ps.mode=async", "parallel.tp=2", "parallel.dp=1"], 3, "ps.mode"),
    (["diloco.outer_lr=0.5"], 2, "diloco.inner_steps"),
    (["ps.servers=1", "diloco.inner_steps=4", "parallel.dp=2"], 3, "ps.mode"),
])
def test_bad_ps_keys_name_the_field(sets, nproc, field):
    with pytest.raises(ConfigError) as e:
        C.resolve(C.load(None, sets), nproc)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_verify_refuses_an_asynchronous_server_and_keys_diloco_by_its_replicas():
    from plait.verify import layout_config, own_reference

    base = C.load(None, [])
    with pytest.raises(ConfigError, match="ps.mode=async"):
        own_reference(layout_config(base, parse_layouts("dp=2,ps.mode=async")[0])[0])
    assert own_reference(layout_config(base, parse_layouts("dp=2,ps.servers=1")[0])[0]) is None  # one process
    a, b = (own_reference(layout_config(base, parse_layouts(x)[0])[0])
            for x in ("dp=2,diloco.inner_steps=4", "dp=2,tp=2,diloco.inner_steps=4"))
    assert a == b and a[:2] == ("diloco", 2)  # tp inside the replicas shares the reference


def test_replicas_of_several_ranks_are_refused_where_no_reference_or_peer_fits():
    """verify cannot hold a quantized exchange of slices to its reference, and torchft's DiLoCo in
    plait bench diloco holds one-rank replicas: one line each."""
    from plait.diloco_bench import check_diloco
    from plait.verify import own_reference

    cfg = C.resolve(C.load(None, ["diloco.inner_steps=4", "diloco.replicas=2", "diloco.quantize=fp8",
                                  "parallel.zero=1", "train.micro_batch=4"]), 4)
    with pytest.raises(ConfigError, match="^--layouts='diloco.quantize=fp8': replicas of several ranks"):
        own_reference(cfg)
    with pytest.raises(ConfigError, match="^diloco.replicas=2: plait bench diloco races one-rank replicas"):
        check_diloco(cfg)


def _server(lookahead: bool):
    """A server of one position holding one 4-element key, without processes: what it would send
    is captured instead."""
    from collections import Counter
    from types import SimpleNamespace

    from plait.parallel.ps import Key, ParameterServer, _Worker

    s = ParameterServer.__new__(ParameterServer)
    s.cfg = C.resolve(C.load(None, ["ps.mode=async", f"ps.lookahead={str(lookahead).lower()}", "parallel.dp=2",
                                    "train.weight_decay=0"]), 3)
    s.mode, s.dp, s.lr, s.groups = "async", 2, (lambda step: 0.1), SimpleNamespace(ps=None)
    pos, flat = (0, 0), torch.zeros(4)
    s.keys, s.flats, s.values = {pos: [Key(pos, "w", (4,), "float32", True, True)]}, {pos: flat}, {pos: [flat]}
    s.optimizer = torch.optim.AdamW([flat], lr=0.1, weight_decay=0.0)
    s.version, s.log, s.last_update, s.bytes_out = Counter(), [], {}, 0
    return s, _Worker(rank=1, position=pos, dp_rank=1)


@pytest.mark.parametrize("lookahead", [True, False])
def test_an_async_server_answers_with_the_parameters_moved_on_by_the_staleness(monkeypatch, lookahead):
    sent = []
    monkeypatch.setattr("torch.distributed.send", lambda t, dst, group=None: sent.append(t.clone()))
    s, w = _server(lookahead)
    s._apply(w, torch.ones(4))  # staleness 0: pulled the current version
    first = s.flats[(0, 0)].clone()
    s._apply(w, torch.ones(4))  # staleness 1 (it has not pulled since)
    step = s.flats[(0, 0)] - first
    assert float(step.abs().min()) > 0
    s._answer(w, stop=False, norm=0.0, staleness=2)
    want = s.flats[(0, 0)] + 2 * step if lookahead else s.flats[(0, 0)]
    assert torch.allclose(sent[-1], want, rtol=0, atol=1e-7) and sent[-2][3] == 2  # the header says so
    s._answer(w, stop=True, norm=0.0, staleness=2)  # the end: the parameters as they are
    assert torch.equal(sent[-1], s.flats[(0, 0)])
    assert [e["staleness"] for e in s.log] == [0, 1]


def test_fp8_decodes_every_byte_as_torchs_cast_does():
    from plait.parallel.diloco import FP8, decode

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 128)
    scales = torch.tensor([1.0, 0.5])
    got, want = decode(every, scales, "fp8"), every.view(FP8).float() * scales.unsqueeze(1)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2  # 0x7f, 0xff
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_bench_diloco_rates_the_median_window_by_its_time_per_step():
    from plait.diloco_bench import median_rate

    # windows of 8, 8, 8 and 7 steps; the second was hit by a hiccup of the machine
    assert median_rate([1.6, 4.0, 1.6, 1.4], [8, 8, 8, 7], 100) == pytest.approx(100 / 0.2)
    assert median_rate([2.0, 1.0], [8, 8], 100) == pytest.approx(100 / 0.1875)  # the mean of the two middle
