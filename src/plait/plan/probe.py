"""``plait probe``: measure this machine into a hardware profile (``hardware.py``).

Measured with every local process busy at once (the way a run uses them), one process per device
(a GPU, or a CPU core with one thread):

- matmul: achieved FLOP/s of square matmuls of several sizes, per dtype (fp32, fp64, and bf16 on
  CUDA; on this CPU bf16 matmul is ~100x slower and plait trains in fp32);
- fused attention (fp32): achieved FLOP/s of causal ``scaled_dot_product_attention`` forward and
  backward at several sequence lengths; element-wise work: seconds per element of norms, GELU,
  SiLU and adds, forward and backward;
- memory bandwidth: a large copy (bytes read plus written per second);
- the fixed cost of one operation: a tiny in-place add, averaged;
- collectives over 2 and 4 processes (on CUDA, no more than the GPUs; on a CPU more processes
  than cores share them): all-reduce, all-gather, reduce-scatter and send/recv at 4 kB-8 MB, each
  between pieces of compute; latency and bus bandwidth by least squares.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .hardware import COLLECTIVES, Hardware, Link, ring_factor

log = logging.getLogger(__name__)

SIZES = (64, 128, 256, 512, 1024)  # square matmul sizes
SIZES_COMM = (4096, 65536, 2**20, 8 * 2**20)  # bytes of the collectives measured


def default_path() -> Path:
    """Where ``plait train --layout auto`` keeps this machine's profile."""
    from ..train.data import cache_dir

    return cache_dir() / "probe.json"


def _timed(fn, min_time: float = 0.05, reps: int = 3) -> float:
    """Seconds of one call of ``fn``: the best of ``reps`` timings of enough calls to last
    ``min_time``."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_time:
            break
        n *= 2
    best = dt / n
    for _ in range(reps - 1):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def device_worker(quick: bool = False) -> dict:
    """This process's matmul rates, memory bandwidth and operation cost (every process at once)."""
    from .. import comm

    device = comm.pick_device()
    sync = _sync(device)
    dtypes = {"fp32": torch.float32, "fp64": torch.float64}
    if device.type == "cuda":
        dtypes["bf16"] = torch.bfloat16
    rates: dict[str, list] = {}
    for name, dtype in dtypes.items():
        rates[name] = []
        for n in SIZES[:3] if quick else SIZES:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            dist.barrier()
            dt = _timed(functools.partial(_matmul, a, b, sync))
            rates[name].append((2.0 * n**3, 2.0 * n**3 / dt))
    x = torch.empty(64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    dist.barrier()
    bw = 2 * x.nbytes / _timed(lambda: (y.copy_(x), sync()))
    tiny = torch.zeros(16, device=device)
    dist.barrier()
    op = _timed(lambda: (tiny.add_(1), sync()))
    return {"matmul": rates, "memory_bw": bw, "op_latency_s": op, "elementwise_s": _elementwise(device, sync),
            "attention": _attention(device, sync, quick)}


def _elementwise(device: torch.device, sync) -> float:
    """Seconds per element of the operations between a block's matmuls (norms, GELU / SiLU, adds,
    products), forward and backward, averaged over those operations."""
    import torch.nn.functional as F

    x = torch.randn(512, 768, device=device, requires_grad=True)
    w = torch.ones(768, device=device, requires_grad=True)
    ops = [lambda: F.layer_norm(x, (768,), w), lambda: F.gelu(x, approximate="tanh"), lambda: F.silu(x) * x,
           lambda: x + x, lambda: F.rms_norm(x, (768,), w)]
    dist.barrier()
    total = sum(_timed(lambda op=op: (op().sum().backward(), sync()), min_time=0.03) for op in ops)
    return total / len(ops) / x.numel()


def _attention(device: torch.device, sync, quick: bool) -> list[tuple[float, float]]:
    """Achieved FLOP/s of causal fused attention forward and backward, counted as 4 s h FLOPs a
    token forward (QK^T and the sum over V, full s) and twice that backward."""

    out = []
    for s in (64, 256) if quick else (64, 128, 256, 512):
        q, k, v = (torch.randn(2, 8, s, 32, device=device, requires_grad=True) for _ in range(3))
        dist.barrier()
        dt = _timed(functools.partial(_sdpa, q, k, v, sync), min_time=0.03)
        flops = 3 * 4 * s * (8 * 32) * 2 * s
        out.append((flops, flops / dt))
    return out


def collective_worker(quick: bool = False) -> dict:
    """Seconds of each collective at several sizes, as a step meets it: between two pieces of
    compute, so that the time includes waiting for the peer and waking up (on a CPU these
    dominate small messages: a 4 kB all-reduce between matmuls costs ~1 ms where back to back
    it costs ~0.2, more the longer the processes computed in between)."""
    from .. import comm

    device = comm.pick_device()
    sync = _sync(device)
    n, rank = dist.get_world_size(), dist.get_rank()
    out = {}
    a, big = torch.randn(512, 512, device=device), torch.zeros(4 * 2**20, device=device)
    work = functools.partial(_work, a, big, sync)  # a few ms on a CPU core, as between a layer's collectives
    base = _agreed(work, sync, 20)
    for op in COLLECTIVES:
        times = []
        for size in SIZES_COMM[::2] if quick else SIZES_COMM:
            full = torch.ones(max(size // 4 // n * n, n), device=device)
            part = torch.empty(full.numel() // n, device=device)
            calls = 20 if size < 2**20 else 5
            step = functools.partial(_collective, op, full, part, rank, work)
            times.append((full.nbytes, _agreed(step, sync, calls) - base))
        out[op] = times
    return out


def _agreed(run, sync, calls: int, reps: int = 3) -> float:
    """Seconds of one collective: the best of ``reps`` timings of ``calls`` calls, the same number on
    every rank (a count each rank chose by its own clock would leave some waiting forever)."""
    run()
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def _matmul(a: torch.Tensor, b: torch.Tensor, sync) -> None:
    a @ b
    sync()


def _work(a: torch.Tensor, big: torch.Tensor, sync) -> None:
    """What a step does between two collectives: a matmul, and a pass over more memory than the
    caches hold (activations)."""
    a @ a
    big.add_(1.0)
    sync()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sync) -> None:
    import torch.nn.functional as F

    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    sync()


def _collective(op: str, full: torch.Tensor, part: torch.Tensor, rank: int, work) -> None:
    """One collective, then the piece of compute that follows it in the probe."""
    if op == "all_reduce":
        dist.all_reduce(full)
    elif op == "all_gather":
        dist.all_gather_single(full, part)
    elif op == "reduce_scatter":
        dist.reduce_scatter_single(part, full)
    else:
        _pingpong(full, rank)
    work()


def _pingpong(t: torch.Tensor, rank: int) -> None:
    """Rank 0 sends to 1 and 1 sends back; ranks beyond 1 wait. Half of it is one send."""
    if rank == 0:
        dist.send(t, 1)
        dist.recv(t, 1)
    elif rank == 1:
        dist.recv(t, 0)
        dist.send(t, 0)


def _link(op: str, n: int, times: list[tuple[int, float]]) -> Link:
    """Latency and bus bandwidth by least squares over the sizes (time = latency + factor x
    bytes / busbw, the ring factor of ``op``); a ping-pong is two sends."""
    xs = [ring_factor(op, n) * b for b, _ in times]
    ys = [t / 2 if op == "send_recv" else t for _, t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-12)
    return Link(latency_s=max(my - slope * mx, 1e-6), busbw=1 / slope)


def probe(counts: tuple[int, ...] = (2, 4), quick: bool = False, progress: bool = True) -> Hardware:
    """Measure this machine (starts local processes); the profile of one of its devices."""
    from ..launch import local_slots, run_local

    slots = max(local_slots(), 1)
    say = log.info if progress else log.debug
    say("probe: matmul, memory bandwidth and operation cost on %d processes at once", slots)
    dev = run_local(device_worker, slots, (quick,), timeout_s=600)
    matmul = {k: [(s, min(d["matmul"][k][i][1] for d in dev)) for i, (s, _) in enumerate(dev[0]["matmul"][k])]
              for k in dev[0]["matmul"]}
    if torch.cuda.is_available():  # one rank a GPU
        counts = tuple(n for n in counts if n <= torch.cuda.device_count())
    intra: dict[str, dict[int, Link]] = {op: {} for op in COLLECTIVES} if counts else {}
    for n in counts[:1] if quick else counts:
        say("probe: collectives over %d processes", n)
        times = run_local(collective_worker, n, (quick,), timeout_s=600)[0]
        for op in COLLECTIVES:
            intra[op][n] = _link(op, n, times[op])
    kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    attention = [(s, min(d["attention"][i][1] for d in dev)) for i, (s, _) in enumerate(dev[0]["attention"])]
    return Hardware(name=f"probe:{kind}", devices_per_node=slots, memory_bytes=_memory_per_device(slots),
                    matmul=matmul, memory_bw=min(d["memory_bw"] for d in dev),
                    op_latency_s=max(d["op_latency_s"] for d in dev), intra=intra,
                    elementwise_s=max(d["elementwise_s"] for d in dev), attention=attention,
                    peak_flops={k: max(r for _, r in v) for k, v in matmul.items()},
                    source=f"plait probe on this machine, {time.strftime('%Y-%m-%d %H:%M')}")


def _memory_per_device(slots: int) -> float:
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    import os

    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages / slots


def format_profile(hw: Hardware) -> str:
    lines = [f"{hw.name}: {hw.devices_per_node} devices, {hw.memory_bytes / 2**30:.1f} GiB each "
             f"({hw.source})"]
    for dtype, table in hw.matmul.items():
        lines.append(f"  matmul {dtype:5} " + "  ".join(f"{s:.0e} FLOP: {r / 1e9:.1f} GFLOP/s" for s, r in table))
    lines.append(f"  memory {hw.memory_bw / 1e9:.1f} GB/s, one operation {hw.op_latency_s * 1e6:.1f} us")
    for op, links in hw.intra.items():
        lines.append(f"  {op:14} " + "  ".join(f"n={n}: {ln.latency_s * 1e6:.0f} us, {ln.busbw / 1e9:.2f} GB/s"
                                                for n, ln in sorted(links.items())))
    return "\n".join(lines)
