"""Pipeline schedules and their simulator against the formulas (docs/formulas.md)."""

import pytest

from plait.parallel.pipeline.report import compare
from plait.parallel.pipeline.simulate import Costs, ScheduleError, simulate, validate
from plait.schedules import SCHEDULES, Action, get

GRID = [(pp, m) for pp in (1, 2, 3, 4) for m in (1, 2, 4, 8)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb"])
@pytest.mark.parametrize("pp, m", GRID)
def test_every_schedule_is_valid(name, pp, m):
    validate(SCHEDULES[name].actions(pp, m), m)


@pytest.mark.parametrize("pp, m, v", [(2, 2, 2), (2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 6, 2), (2, 8, 4)])
def test_interleaved_is_valid(pp, m, v):
    validate(SCHEDULES["interleaved"].actions(pp, m, v), m, v)


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 16), (3, 7)])
def test_1f1b_makespan_is_m_plus_p_minus_1_times_tf_plus_tb(pp, m):
    t = simulate(SCHEDULES["1f1b"].actions(pp, m), Costs(f=1, b=2))
    assert t.makespan == (m + pp - 1) * 3
    assert t.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 2), (3, 7)])
def test_peak_in_flight_first_stage(pp, m):
    assert simulate(SCHEDULES["1f1b"].actions(pp, m)).peak_inflight()[0] == min(pp, m)
    assert simulate(SCHEDULES["gpipe"].actions(pp, m)).peak_inflight()[0] == m


@pytest.mark.parametrize("pp, m, v", [(4, 8, 2), (4, 8, 4), (2, 8, 2), (4, 16, 2)])
def test_interleaving_divides_the_bubble_by_v(pp, m, v):
    plain = simulate(SCHEDULES["1f1b"].actions(pp, m))
    inter = simulate(SCHEDULES["interleaved"].actions(pp, m, v), Costs(f=1 / v, b=2 / v))
    idle_plain, idle_inter = plain.idle()[0], inter.idle()[0]
    assert idle_inter == pytest.approx(idle_plain / v)  # (p-1)(tf+tb)/v of idle per rank
    assert inter.bubble_fraction < plain.bubble_fraction


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 4), (4, 2), (3, 7)])
def test_zero_bubble_h1_beats_1f1b_at_the_same_memory(pp, m):
    one = simulate(SCHEDULES["1f1b"].actions(pp, m), Costs(f=1, b=2))
    zb = simulate(SCHEDULES["zb"].actions(pp, m), Costs(f=1, b=2, w=1))
    assert zb.bubble_fraction <= one.bubble_fraction
    assert max(zb.peak_inflight()) <= max(one.peak_inflight())
    if m >= pp:
        assert zb.idle()[0] == pytest.approx((pp - 1) * 1.0)  # (p-1)(t_F + t_I - t_W), a third of 1F1B's


def test_transfer_cost_lengthens_the_step():
    free = simulate(SCHEDULES["1f1b"].actions(4, 8)).makespan
    assert simulate(SCHEDULES["1f1b"].actions(4, 8), Costs(comm=0.5)).makespan > free


def _durations(tl):
    return {(e.rank, e.action): e.end - e.start for e in tl.events}


def test_replaying_each_actions_time_reproduces_the_timeline():
    acts = SCHEDULES["zb"].actions(3, 6)
    costs = [Costs(1.0, 2.0, 0.5), Costs(1.5, 2.5, 1.0), Costs(0.7, 1.1, 0.3, comm=0.2)]
    tl = simulate(acts, costs)
    other = [Costs(9.0, 9.0, 1.0, c.comm) for c in costs]  # every action's time overridden, transfers kept
    replay = simulate(acts, other, _durations(tl))
    assert [(e.rank, e.action, e.start, e.end) for e in replay.events] == \
        [(e.rank, e.action, e.start, e.end) for e in tl.events]


def test_one_long_backward_on_the_critical_path_delays_the_whole_step():
    acts = SCHEDULES["1f1b"].actions(2, 4)
    base = simulate(acts)
    slow = _durations(base) | {(1, Action("B", 0)): 3.0}  # last stage's first backward: 2 -> 3
    assert simulate(acts, None, slow).makespan == base.makespan + 1.0


def _traces(tl, after=float("inf"), by=0.0):
    """Recorded (action, start, end) per rank from a timeline; the actions that start from time
    ``after`` on shifted ``by`` later, as if a rank idled there without waiting for anything."""
    traces = [[] for _ in range(tl.pp)]
    for e in sorted(tl.events, key=lambda e: e.start):
        shift = by if e.start >= after else 0.0
        traces[e.rank].append((e.action, e.start + shift, e.end + shift))
    return traces


def test_compare_finds_idle_that_the_schedule_does_not_explain():
    acts = SCHEDULES["1f1b"].actions(2, 8)
    tl = simulate(acts, [Costs(1.0, 2.0), Costs(1.2, 2.2)])
    exact = compare(_traces(tl), acts)
    assert exact["measured"]["bubble_fraction"] == pytest.approx(exact["simulated"]["bubble_fraction"])
    assert exact["predicted"]["makespan"] == pytest.approx(tl.makespan)  # equal costs: the means are exact
    assert exact["expected"]["makespan"] == pytest.approx(tl.makespan)  # and there is no spread to draw from
    last_b = next(e for e in tl.events if e.rank == 1 and e.action == Action("B", 7))
    late = compare(_traces(tl, after=last_b.start, by=1.0), acts)  # rank 1 idles 1.0 before its last B
    assert late["measured"]["makespan"] == pytest.approx(tl.makespan + 1.0)
    assert late["simulated"]["makespan"] == pytest.approx(tl.makespan)
    assert late["measured"]["bubble_fraction"] > late["simulated"]["bubble_fraction"]


def test_a_spread_of_action_times_lengthens_the_expected_step():
    """The makespan is a maximum of sums of action times, so convex in them: drawing times from
    their spread gives a longer step on average than the mean times do (Jensen)."""
    acts = SCHEDULES["1f1b"].actions(2, 8)
    tl = simulate(acts)
    traces = _traces(tl)
    for trace in traces:  # every other backward takes 3 instead of 2, shifting what follows
        late = 0.0
        for i, (a, start, end) in enumerate(trace):
            extra = 1.0 if a.op == "B" and a.mb % 2 else 0.0
            trace[i] = (a, start + late, end + late + extra)
            late += extra
    report = compare(traces, acts)
    assert report["expected"]["makespan"] > report["predicted"]["makespan"]
    low, high = report["expected"]["bubble_p10_p90"]
    assert low <= report["expected"]["bubble_fraction"] <= high


def test_validator_rejects_missing_duplicate_and_deadlock():
    good = SCHEDULES["1f1b"].actions(2, 2)
    with pytest.raises(ScheduleError, match="needs one F and one B"):
        validate([good[0][:-1], good[1]], 2)
    with pytest.raises(ScheduleError, match="needs one F and one B"):
        validate([good[0] + [Action("B", 0)], good[1]], 2)
    # rank 0 wants the gradient of micro-batch 1 before rank 1 has its forward of micro-batch 0
    deadlock = [[Action("F", 0), Action("F", 1), Action("B", 1), Action("B", 0)],
                [Action("B", 0), Action("F", 0), Action("F", 1), Action("B", 1)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(deadlock, 2)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="gpipe, 1f1b, interleaved, zb"):
        get("pipedream")


ALL = [("gpipe", pp, m, 1) for pp, m in GRID] + [("1f1b", pp, m, 1) for pp, m in GRID] + \
      [("zb", pp, m, 1) for pp, m in GRID] + \
      [("interleaved", pp, m, v) for pp in (2, 3, 4) for m in (pp, 2 * pp, 4 * pp) for v in (2, 3)]


@pytest.mark.parametrize("name, pp, m, v", ALL)
def test_both_ranks_of_a_pair_agree_on_the_order_and_can_keep_it(name, pp, m, v):
    """What NCCL needs: one order per pair, the same on both sides, in which a rank never has to
    post a receive before a send of its own that an earlier-or-same action has not made."""
    from plait.parallel.pipeline.transfers import pair_orders
    from plait.schedules import message, place, sender, stage_of

    acts = SCHEDULES[name].actions(pp, m, v)
    last = pp * v - 1
    orders = [pair_orders(acts, r) for r in range(pp)]
    for a in range(pp):
        for b, order in orders[a].items():
            assert [(not out, msg) for out, msg in orders[b][a]] == order
    for r in range(pp):
        made = {}  # message -> index of the action that sends it
        for i, act in enumerate(acts[r]):
            msg = message(act, stage_of(r, act.chunk, pp), last)
            if msg is not None:
                made[msg] = i
        for peer, order in orders[r].items():
            sends_so_far = []
            for out, msg in order:
                if out:
                    sends_so_far.append(made[msg])
                    assert sends_so_far == sorted(sends_so_far)  # our sends in our action order
                else:
                    kind, at, mb = msg
                    want = next(i for i, a in enumerate(acts[r]) if stage_of(r, a.chunk, pp) == at
                                and a.mb == mb and a.op in (("F",) if kind == 0 else ("B", "I")))
                    assert all(s < want for s in sends_so_far), (msg, sends_so_far, want)
                    # and the peer's own action list does send this message
                    peer_sends = {message(x, stage_of(peer, x.chunk, pp), last) for x in acts[peer]}
                    assert msg in peer_sends and place(sender(msg), pp)[0] == peer, (msg, peer)
