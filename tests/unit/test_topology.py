import itertools

import pytest

from plait.topology import Topology

SHAPES = [(1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 2), (3, 2, 4)]


@pytest.mark.parametrize("pp, dp, tp", SHAPES)
def test_coords_and_rank_are_inverse(pp, dp, tp):
    topo = Topology(pp=pp, dp=dp, tp=tp)
    seen = set()
    for rank in range(topo.world):
        c = topo.coords(rank)
        assert topo.rank_of(*c) == rank
        seen.add(c)
    assert seen == set(itertools.product(range(pp), range(dp), range(tp)))


@pytest.mark.parametrize("pp, dp, tp", SHAPES)
@pytest.mark.parametrize("dim", ["pp", "dp", "tp"])
def test_groups_partition_the_world(pp, dp, tp, dim):
    topo = Topology(pp=pp, dp=dp, tp=tp)
    groups = topo.group_ranks(dim)
    size = {"pp": pp, "dp": dp, "tp": tp}[dim]
    assert all(len(g) == size for g in groups)
    assert sorted(r for g in groups for r in g) == list(range(topo.world))
    for g in groups:  # members differ only along dim
        others = {tuple(v for k, v in topo.coords(r)._asdict().items() if k != f"{dim}_rank") for r in g}
        assert len(others) == 1


def test_tensor_parallel_neighbours_are_adjacent_ranks():
    topo = Topology(pp=2, dp=2, tp=2)
    assert topo.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.peers(5, "dp") == [5, 7]
    assert topo.prefix(5) == "[r5 pp1 dp0 tp1]"


def test_out_of_range_rank_is_rejected():
    with pytest.raises(ValueError):
        Topology(dp=2).coords(2)


def test_every_log_line_carries_the_rank_prefix(capsys):
    import logging

    from plait.topology import setup_logging

    setup_logging(Topology(pp=1, dp=2, tp=1).prefix(1))
    try:
        logging.getLogger("x").error("first\nsecond")
    finally:
        setup_logging()
    err = capsys.readouterr().err.splitlines()
    assert err == ["[r1 pp0 dp1 tp0] first", "[r1 pp0 dp1 tp0] second"]
