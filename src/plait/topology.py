"""Rank arithmetic for the (pp, dp, tp) grid, and the one place that creates process groups.

Ranks are laid out row-major over ``(pp, dp, tp)``: tp varies fastest, so the ranks of one
tensor-parallel group are neighbours (on one node, where the traffic is heaviest), as in
Megatron-LM. ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``.

Everything above :func:`build_groups` is pure and unit-tested without processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

DIMS = ("pp", "dp", "tp")


class Coord(NamedTuple):
    pp_rank: int
    dp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class Topology:
    pp: int = 1
    dp: int = 1
    tp: int = 1

    @classmethod
    def of(cls, parallel) -> Topology:
        """The grid of a layout (anything with ``pp``, ``dp`` and ``tp``, such as ``parallel``)."""
        return cls(pp=parallel.pp, dp=parallel.dp, tp=parallel.tp)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    def coords(self, rank: int) -> Coord:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside a world of {self.world}")
        rest, tp_rank = divmod(rank, self.tp)
        pp_rank, dp_rank = divmod(rest, self.dp)
        return Coord(pp_rank, dp_rank, tp_rank)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def group_ranks(self, dim: str) -> list[list[int]]:
        """All groups along ``dim``: the ranks that differ only in that coordinate."""
        if dim not in DIMS:
            raise ValueError(f"dim must be one of {DIMS}, not {dim!r}")
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = self.coords(rank)._asdict()
            key = tuple(v for k, v in c.items() if k != f"{dim}_rank")
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def peers(self, rank: int, dim: str) -> list[int]:
        """The ranks in ``rank``'s group along ``dim``, itself included."""
        return next(g for g in self.group_ranks(dim) if rank in g)

    def prefix(self, rank: int) -> str:
        c = self.coords(rank)
        return f"[r{rank} pp{c.pp_rank} dp{c.dp_rank} tp{c.tp_rank}]"


@dataclass(frozen=True)
class Groups:
    """Process groups of one rank, passed explicitly to whatever communicates (no globals).

    With a parameter server, ``servers`` ranks follow the ``topology.world`` workers: ``world`` is
    then the workers' group (what "every rank" means to training), ``ps`` the group the workers
    and servers exchange gradients and parameters over (gloo), ``server_group`` the servers' own.
    Without one, ``world`` and ``ps`` are None: the default group."""

    topology: Topology
    rank: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh (of the workers)
    pp: object
    dp: object
    tp: object
    embed: object = None  # first and last pipeline stage of this (dp, tp): tied embeddings (pp > 1)
    servers: int = 0
    world: object = None
    ps: object = None
    server_group: object = None
    shard: object = None  # DiLoCo with replicas of several dp ranks: this replica's dp ranks
    replica: object = None  # ... and the ranks at this rank's place in every replica (None: no such split)

    @property
    def is_server(self) -> bool:
        return self.rank >= self.topology.world

    @property
    def coord(self) -> Coord:
        return self.topology.coords(self.rank)

    @property
    def prefix(self) -> str:
        """This rank's log prefix, e.g. ``[r3 pp1 dp0 tp1]`` (a server: ``[r4 server0]``)."""
        if self.is_server:
            return f"[r{self.rank} server{self.rank - self.topology.world}]"
        return self.topology.prefix(self.rank)


def build_groups(topology: Topology, device_type: str, servers: int = 0, shards: int = 1) -> Groups:
    """Create the DeviceMesh ``(pp, dp, tp)`` of the workers and its per-dimension groups, and with
    ``servers`` server ranks after them the groups a parameter server needs (collective call:
    servers take part in creating every group). ``shards`` > 1 splits each dp group into replicas
    of ``shards`` consecutive dp ranks (``Groups.shard``) and the ranks at one place in every
    replica (``Groups.replica``), for DiLoCo with data parallel inside its replicas."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if dist.get_world_size() != topology.world + servers:
        raise ValueError(f"world size {dist.get_world_size()} != pp*dp*tp + servers = {topology.world} + {servers}")
    shape = (topology.pp, topology.dp, topology.tp)
    if not servers:
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS)
        groups = {d: mesh.get_group(d) for d in DIMS}
        return Groups(topology=topology, rank=dist.get_rank(), mesh=mesh, embed=_embed_group(topology), **groups,
                      **_replica_groups(topology, shards))
    rank = dist.get_rank()
    mesh = DeviceMesh(device_type, torch.arange(topology.world).view(shape), mesh_dim_names=DIMS)
    groups = {d: mesh.get_group(d) if rank < topology.world else None for d in DIMS}
    embed = _embed_group(topology)
    world = dist.new_group(list(range(topology.world)))
    server_group = dist.new_group(list(range(topology.world, topology.world + servers)))
    ps = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Groups(topology=topology, rank=rank, mesh=mesh, embed=embed, servers=servers, world=world, ps=ps,
                  server_group=server_group, **groups)


def _replica_groups(topology: Topology, shards: int) -> dict:
    """``shard`` and ``replica`` groups of this rank when each dp group is cut into replicas of
    ``shards`` consecutive dp ranks (every rank creates every group, in the same order)."""
    if shards <= 1:
        return {}
    import torch.distributed as dist

    mine, rank = {}, dist.get_rank()
    for ranks in topology.group_ranks("dp"):
        parts = {"shard": [ranks[i:i + shards] for i in range(0, len(ranks), shards)],
                 "replica": [ranks[i::shards] for i in range(shards)]}
        for kind, lists in parts.items():
            for members in lists:
                group = dist.new_group(members)
                if rank in members:
                    mine[kind] = group
    return mine


def _embed_group(topology: Topology):
    """The group of each pipeline's first and last stage (every rank creates every group)."""
    if topology.pp == 1:
        return None
    import torch.distributed as dist

    mine = None
    for pipeline in topology.group_ranks("pp"):
        group = dist.new_group([pipeline[0], pipeline[-1]])
        if dist.get_rank() in (pipeline[0], pipeline[-1]):
            mine = group
    return mine


def side_group(timeout_s: float = 600.0):
    """A gloo group over every rank for collectives that run beside training's, in another thread
    (an async checkpoint's writes): a group of their own, so the two streams of collectives never
    interleave on one group. Collective call; ``timeout_s`` bounds each of its collectives (the
    launcher's default for the main group)."""
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class _RankFormatter(logging.Formatter):
    """Puts the rank prefix before every line of a record (tracebacks included)."""

    def __init__(self, prefix: str):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(f"{self.prefix} {line}" for line in text.splitlines()) if self.prefix else text


def setup_logging(prefix: str = "", level: int = logging.INFO) -> None:
    """Root logging with a rank prefix such as ``[r3 pp1 dp0 tp1]`` on every line."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(_RankFormatter(prefix))
    root.addHandler(handler)
    root.setLevel(level)
