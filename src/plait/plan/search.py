"""Search: every layout plait can run for a model on N devices, estimated (``cost.py``), the ones
that fit ranked by predicted step time, and the winner explained.

Enumerated: dp x tp x pp = N (tp within a node unless allowed across), ZeRO 0-3 (with dp > 1),
the micro-batch (the divisors of the batch per dp rank, up to 64), every schedule (interleaved with
2 and 4 virtual stages), sequence parallel (with tp > 1), and recomputation none / selective /
full. A layout that cannot run (a split the model does not allow, a batch that does not divide,
tp across nodes) is never ranked; asked for by name (``evaluate``), it comes back with its reason.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ..config import RECOMPUTE
from ..schedules import SCHEDULES
from .cost import Estimate, Job, Layout, estimate

MAX_MICRO_BATCH = 64


def invalid(job: Job, layout: Layout, hw, allow_tp_across_nodes: bool = False, devices: int = 0) -> str:
    """Why ``layout`` cannot run ``job`` on ``hw`` (one line), or "" when it can; ``devices``: how
    many the run has (0: do not check how tp falls on nodes)."""
    m, l = job.model, layout
    for key in ("dp", "tp", "pp", "micro_batch", "virtual_stages"):
        if getattr(l, key) < 1:
            return f"{key} must be at least 1, not {getattr(l, key)}"
    node = hw.devices_per_node
    checks = [
        (l.zero > 0 and l.dp == 1, f"zero={l.zero} shards over data parallel: it needs dp > 1"),
        (devices > node and node % l.tp and l.tp < node,
         f"tp={l.tp} does not divide the {node} devices of a node: some tp groups would straddle two nodes"),
        (l.tp > hw.devices_per_node and not allow_tp_across_nodes,
         f"tp={l.tp} spans nodes of {hw.devices_per_node} devices (allow it with --allow-tp-across-nodes)"),
        (any(x % l.tp for x in (m.heads, m.kv_heads, m.ffn_hidden)),
         f"tp={l.tp} must divide heads={m.heads}, kv_heads={m.kv_heads} and ffn_hidden={m.ffn_hidden}"),
        (l.sequence_parallel and m.seq_len % l.tp, f"sequence parallel needs tp={l.tp} to divide seq_len={m.seq_len}"),
        (l.pp * l.virtual_stages > m.layers,
         f"pp x virtual_stages = {l.pp * l.virtual_stages} stages need as many layers (the model has {m.layers})"),
        (job.global_batch % (l.dp * l.micro_batch),
         f"global batch {job.global_batch} is not a multiple of dp x micro_batch = {l.dp} x {l.micro_batch}"),
        (l.schedule not in SCHEDULES, f"unknown schedule {l.schedule!r}; valid: {', '.join(SCHEDULES)}"),
        (l.recompute not in RECOMPUTE, f"recompute must be one of {', '.join(RECOMPUTE)}"),
        (l.zero not in (0, 1, 2, 3), f"zero must be 0-3, not {l.zero}"),
    ]
    for bad, why in checks:
        if bad:
            return why
    interleaved = SCHEDULES[l.schedule].interleaved
    micro = job.global_batch // (l.dp * l.micro_batch)
    if interleaved and l.pp > 1 and micro % l.pp:
        return f"the interleaved schedule needs a multiple of pp={l.pp} micro-batches per step (has {micro})"
    if l.virtual_stages > 1 and not interleaved:
        return f"only the interleaved schedule uses virtual stages (schedule is {l.schedule})"
    return ""


def candidates(job: Job, devices: int, hw, allow_tp_across_nodes: bool = False):
    """Every valid layout of ``job`` over ``devices`` devices."""
    m = job.model
    for tp in _divisors(devices):
        for pp in _divisors(devices // tp):
            dp = devices // (tp * pp)
            if job.global_batch % dp or pp > m.layers:
                continue
            per_rank = job.global_batch // dp
            micros = [b for b in _divisors(per_rank) if b <= MAX_MICRO_BATCH]
            for b, zero, (sched, v), sp, rc in itertools.product(
                    micros, range(4) if dp > 1 else [0], _schedules(pp), [False, True] if tp > 1 else [False],
                    RECOMPUTE):
                layout = Layout(dp, tp, pp, zero, b, sched, v, sp, rc)
                if not invalid(job, layout, hw, allow_tp_across_nodes, devices):
                    yield layout


def _schedules(pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = []
    for name, s in SCHEDULES.items():
        out += [(name, v) for v in (2, 4)] if s.interleaved else [(name, 1)]
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(job: Job, devices: int, hw, allow_tp_across_nodes: bool = False) -> list[Estimate]:
    """Every valid layout that fits, fastest first (ties: less memory)."""
    fits = [e for e in (estimate(job, layout, hw) for layout in candidates(job, devices, hw, allow_tp_across_nodes))
            if e.fits]
    return sorted(fits, key=lambda e: (e.step_time_s, e.mem_bytes))


def evaluate(job: Job, layout: Layout, devices: int, hw, allow_tp_across_nodes: bool = False) -> Estimate:
    """One named layout: its estimate, or (``fits`` False) the reason it cannot run."""
    if layout.dp * layout.tp * layout.pp != devices:
        return _refused(job, layout, f"dp x tp x pp = {layout.dp * layout.tp * layout.pp}, not the {devices} devices")
    why = invalid(job, layout, hw, allow_tp_across_nodes, devices)
    return _refused(job, layout, why) if why else estimate(job, layout, hw)


def _refused(job: Job, layout: Layout, why: str) -> Estimate:
    return Estimate(layout, 0, {}, 0.0, False, {}, 0.0, 0.0, 0.0, "", why)


def complete(partial: dict, job: Job, devices: int, hw, allow_tp_across_nodes: bool = False) -> Estimate:
    """The best layout with the values of ``partial`` (the other keys chosen by the planner among
    every valid layout of the same dp x tp x pp); if none of those fits, the one needing the
    least memory, with its reason; if none can run at all, the named layout with why not."""
    shape = {k: v for k, v in partial.items() if k in ("dp", "tp", "pp")}
    pool = {replace(c, **partial) for c in candidates(job, devices, hw, allow_tp_across_nodes=True)
            if all(getattr(c, k) == v for k, v in shape.items())}
    runs = [estimate(job, c, hw) for c in pool if not invalid(job, c, hw, allow_tp_across_nodes, devices)]
    fits = sorted((e for e in runs if e.fits), key=lambda e: (e.step_time_s, e.mem_bytes))
    if fits:
        return fits[0]
    if runs:
        return min(runs, key=lambda e: e.mem_bytes)
    tp, pp = partial.get("tp", 1), partial.get("pp", 1)
    base = Layout(dp=max(devices // max(tp * pp, 1), 1))
    return evaluate(job, replace(base, **partial), devices, hw, allow_tp_across_nodes)


def explain(ranked: list[Estimate], top: int = 5) -> list[str]:
    """One line for the winner (its bottleneck) and one for each runner-up (why it loses)."""
    if not ranked:
        return ["no layout fits: add devices, or a larger ZeRO stage, recomputation or a smaller micro-batch"]
    best = ranked[0]
    share = best.times[best.bottleneck] / best.step_time_s if best.step_time_s else 0
    lines = [f"winner {name(best.layout)}: {best.step_time_s * 1e3:.1f} ms a step, "
             f"{best.mem_bytes / 2**30:.2f} GiB a device; bound by {best.bottleneck} ({share:.0%} of the step)"]
    for e in ranked[1:top]:
        worse = {k: e.times.get(k, 0) - best.times.get(k, 0) for k in e.times}
        term = max(worse, key=worse.get)
        lines.append(f"{name(e.layout)}: {e.step_time_s / best.step_time_s - 1:+.1%} slower, "
                     f"mostly {term} (+{worse[term] * 1e3:.1f} ms)")
    return lines


def name(layout: Layout) -> str:
    """The verify syntax of a layout: only what differs from the defaults (dp always)."""
    default = Layout()
    parts = [f"dp={layout.dp}"]
    for key, value in layout.as_dict().items():
        if key != "dp" and value != getattr(default, key):
            parts.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return ",".join(parts)
