"""What the planner knows of the hardware: a profile (devices per node, memory per device, matmul
rate by size and dtype, memory bandwidth, the fixed cost of one kernel, and latency and bus
bandwidth of each collective inside a node and across nodes), from a preset or measured on this
machine by ``plait probe`` (``probe.py``) and saved as JSON.

Collective times follow the ring algorithms of nccl-tests (docs/planner.md): an all-reduce of S
bytes over n ranks takes ``latency + 2 (n-1)/n S / busbw``, an all-gather or reduce-scatter (S the
gathered size) ``latency + (n-1)/n S / busbw``, a send ``latency + S / busbw``.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@dataclass(frozen=True)
class Link:
    latency_s: float
    busbw: float  # bytes/s, the nccl-tests "bus bandwidth"


@dataclass(frozen=True)
class Hardware:
    """One kind of machine; the planner's only view of it."""

    name: str
    devices_per_node: int
    memory_bytes: float  # per device
    matmul: dict[str, list[tuple[float, float]]]  # dtype -> [(FLOPs of one matmul, achieved FLOP/s)], ascending
    memory_bw: float  # bytes/s one device reads plus writes
    op_latency_s: float  # the fixed cost of one operation (dispatch, kernel launch)
    intra: dict[str, dict[int, Link]]  # collective -> ranks -> link, inside a node (0: any count)
    inter: dict[str, dict[int, Link]] = field(default_factory=dict)  # the same across nodes
    peak_flops: dict[str, float] = field(default_factory=dict)  # dtype -> peak FLOP/s (for MFU)
    elementwise_s: float = 0.0  # seconds per element of a norm / activation / add, forward and backward
    attention: list[tuple[float, float]] = field(default_factory=list)  # [(FLOPs, achieved FLOP/s)] fused attention
    source: str = ""  # where the numbers come from

    def rate(self, dtype: str, flops: float) -> float:
        """Achieved FLOP/s of one matmul of ``flops`` FLOPs, interpolated in log-log between the
        sizes measured (the nearest end beyond them)."""
        return _interpolate(self.matmul.get(dtype) or self.matmul["fp32"], flops)

    def attention_rate(self, dtype: str, flops: float) -> float:
        """Achieved FLOP/s of fused attention (forward and backward) of ``flops`` FLOPs; the
        matmul rate where the profile has no attention table."""
        return _interpolate(self.attention, flops) if self.attention else self.rate(dtype, flops)

    def link(self, op: str, n: int, across_nodes: bool = False) -> Link:
        """The link of collective ``op`` over ``n`` ranks (the nearest count measured)."""
        table = (self.inter if across_nodes and self.inter else self.intra).get(op)
        if not table:
            raise ConfigError("--cluster", self.name, f"the profile has no {op} measurements (a one-device "
                              "machine): plan for one device, or use a preset")
        if 0 in table:
            return table[0]
        counts = sorted(table)
        return table[min(counts, key=lambda c: (abs(c - n), -c))]

    def collective(self, op: str, nbytes: float, n: int, across_nodes: bool = False) -> float:
        """Seconds of one ``op`` of ``nbytes`` (gathered size) over ``n`` ranks."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        link = self.link(op, n, across_nodes)
        return link.latency_s + ring_factor(op, n) * nbytes / link.busbw

    def to_json(self) -> str:
        data = asdict(self)
        for scope in ("intra", "inter"):
            data[scope] = {op: {str(n): asdict(link) for n, link in links.items()}
                           for op, links in getattr(self, scope).items()}
        return json.dumps(data, indent=1)

    @staticmethod
    def from_json(text: str) -> Hardware:
        data = json.loads(text)
        for scope in ("intra", "inter"):
            data[scope] = {op: {int(n): Link(**link) for n, link in links.items()}
                           for op, links in data.get(scope, {}).items()}
        data["matmul"] = {k: [tuple(x) for x in v] for k, v in data["matmul"].items()}
        data["attention"] = [tuple(x) for x in data.get("attention", [])]
        return Hardware(**data)


def ring_factor(op: str, n: int) -> float:
    """Bytes each of ``n`` ranks moves per byte of ``op`` (the gathered size): the ring algorithms'
    2(n-1)/n for all-reduce, (n-1)/n for all-gather and reduce-scatter, 1 for a send."""
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "send_recv": 1.0}[op]


def _interpolate(table: list[tuple[float, float]], flops: float) -> float:
    """Rate at ``flops`` from (size, rate) pairs, log-log between neighbours, flat beyond the ends."""
    sizes = [s for s, _ in table]
    i = bisect.bisect_left(sizes, flops)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1]
    (s0, r0), (s1, r1) = table[i - 1], table[i]
    w = (math.log(flops) - math.log(s0)) / (math.log(s1) - math.log(s0))
    return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))


def _links(**by_op: tuple[float, float]) -> dict[str, dict[int, Link]]:
    return {op: {0: Link(*v)} for op, v in by_op.items()}


GB = 1e9
# Presets: vendors' peak figures and typical achieved rates of public benchmarks (a large bf16
# GEMM, nccl-tests bus bandwidth on 8 GPUs of one node and across nodes). Rates not measured here.
PRESETS = {
    "dgx-a100-80gb": Hardware(
        name="dgx-a100-80gb", devices_per_node=8, memory_bytes=80 * 2**30,
        matmul={"bf16": [(1e9, 100e12), (1e11, 230e12), (1e13, 250e12)],
                "fp32": [(1e9, 60e12), (1e11, 120e12), (1e13, 130e12)]},  # TF32 tensor cores
        memory_bw=1800 * GB, op_latency_s=6e-6,
        intra=_links(all_reduce=(12e-6, 230 * GB), all_gather=(10e-6, 230 * GB), reduce_scatter=(10e-6, 230 * GB),
                     send_recv=(8e-6, 200 * GB)),  # NVLink 3, 600 GB/s per GPU (both directions)
        inter=_links(all_reduce=(25e-6, 22 * GB), all_gather=(20e-6, 22 * GB), reduce_scatter=(20e-6, 22 * GB),
                     send_recv=(12e-6, 23 * GB)),  # 8 x 200 Gb/s HDR InfiniBand per node, one per GPU
        peak_flops={"bf16": 312e12, "fp32": 156e12},
        source="NVIDIA A100 datasheet (peaks); typical GEMM and nccl-tests results (achieved)"),
    "dgx-h100-80gb": Hardware(
        name="dgx-h100-80gb", devices_per_node=8, memory_bytes=80 * 2**30,
        matmul={"bf16": [(1e9, 250e12), (1e11, 650e12), (1e13, 700e12)],
                "fp32": [(1e9, 150e12), (1e11, 350e12), (1e13, 380e12)]},
        memory_bw=3000 * GB, op_latency_s=5e-6,
        intra=_links(all_reduce=(10e-6, 360 * GB), all_gather=(9e-6, 360 * GB), reduce_scatter=(9e-6, 360 * GB),
                     send_recv=(7e-6, 300 * GB)),  # NVLink 4, 900 GB/s per GPU (both directions)
        inter=_links(all_reduce=(22e-6, 45 * GB), all_gather=(18e-6, 45 * GB), reduce_scatter=(18e-6, 45 * GB),
                     send_recv=(10e-6, 48 * GB)),  # 8 x 400 Gb/s NDR InfiniBand per node
        peak_flops={"bf16": 989e12, "fp32": 495e12},
        source="NVIDIA H100 SXM datasheet (peaks); typical GEMM and nccl-tests results (achieved)"),
}


def load(spec: str) -> Hardware:
    """A preset by name, or a profile file written by ``plait probe``."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--cluster", spec, f"neither a preset ({', '.join(PRESETS)}) nor a profile file "
                          "(write one with plait probe --out FILE)")
    try:
        hw = Hardware.from_json(path.read_text())
        if not hw.matmul.get("fp32") or hw.devices_per_node < 1 or hw.memory_bytes <= 0:
            raise ValueError("needs devices_per_node, memory_bytes and an fp32 matmul table")
        if hw.devices_per_node > 1 and set(hw.intra) != set(COLLECTIVES):
            raise ValueError(f"needs latency and bandwidth of {', '.join(COLLECTIVES)}")
        return hw
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise ConfigError("--cluster", spec,
                          f"not a profile written by plait probe ({type(e).__name__}: {e})") from None
