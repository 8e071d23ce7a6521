"""The equivalence harness: every layout must compute what one process computes.

Each layout trains the same model from the same seed on the same global batches as a
one-process reference; we compare the loss at every step and every parameter at the end.
Differences are relative. Losses: ``|a - b| / |b|`` at each step. Parameters: for each tensor,
the RMS of ``a - b`` over the RMS of all the reference's parameters. (Per-tensor ``||a-b||/||b||``
would be dominated by tensors whose gradient is zero in exact arithmetic, such as the key bias,
which softmax ignores: rounding noise drives them and Adam's normalisation amplifies it. Scaled
by the model's RMS, a tensor updated wrongly, even a 128-element bias, still shows at 1e-1.)
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from . import config as C
from .errors import ConfigError
from .launch import run_local
from .train.data import load_corpus
from .train.trainer import RunOptions, TrainResult, train_worker

log = logging.getLogger(__name__)

LAYOUT_SECTIONS = ("parallel", "train")  # their keys may be given bare (dp=2); any key as section.key


def schedule_variants() -> list[str]:
    """Every schedule of the pipeline's registry, interleaved ones with two virtual stages."""
    from .schedules import SCHEDULES

    return [f"schedule={name}" + (",virtual_stages=2" if s.interleaved else "") for name, s in SCHEDULES.items()]


DILOCO_LAYOUTS = ("dp=2,diloco.inner_steps=5", "dp=2,diloco.inner_steps=8,diloco.fragments=4,diloco.quantize=fp8",
                  "dp=2,tp=2,diloco.inner_steps=5,diloco.fragments=2",
                  "dp=4,zero=1,diloco.replicas=2,diloco.inner_steps=5")
PS_LAYOUTS = ("dp=2,ps.servers=1,ps.mode=sync", "dp=2,ps.servers=2", "dp=1,pp=2,ps.servers=1")
RECOMPUTE_LAYOUTS = ("dp=2,recompute=full", "tp=2,sequence_parallel=true,recompute=selective",
                     "pp=2,schedule=zb,recompute=full")


def standard_matrix() -> str:
    """Every factorisation of 2 and 4 processes over (dp, tp, pp), crossed with zero 0-3 where
    dp > 1 and with the schedules where pp > 1, plus dp=2,tp=2,pp=2 (8 processes), plus DiLoCo
    (plain, streaming in fp8, with tp inside the replicas, with ZeRO-1 inside replicas of two ranks;
    each against its own reference),
    plus the synchronous parameter server (one and two servers, a pipeline worker), plus activation
    recomputation (full under dp, selective under tp with sequence parallel, full under zero bubble)."""
    layouts = []
    for n in (2, 4):
        for dp, tp, pp in _factorisations(n):
            zeros = range(4) if dp > 1 else [0]
            schedules = schedule_variants() if pp > 1 else [""]
            for zero in zeros:
                for sched in schedules:
                    parts = [f"dp={dp}", f"tp={tp}", f"pp={pp}"] + ([f"zero={zero}"] if zero else []) + [sched]
                    layouts.append(",".join(p for p in parts if p))
    return ";".join(layouts + ["dp=2,tp=2,pp=2", *DILOCO_LAYOUTS, *PS_LAYOUTS, *RECOMPUTE_LAYOUTS])


def _factorisations(n: int) -> list[tuple[int, int, int]]:
    return [(dp, tp, n // (dp * tp)) for dp in range(1, n + 1) for tp in range(1, n + 1)
            if n % (dp * tp) == 0]


def parse_layouts(text: str) -> list[dict[str, dict[str, str]]]:
    """``"dp=2;dp=2,micro_batch=1"`` -> one ``{section: {key: value}}`` per layout."""
    layouts = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        layout: dict[str, dict[str, str]] = {}
        for pair in filter(None, (s.strip() for s in item.split(","))):
            if "=" not in pair:
                raise ConfigError("--layouts", item, "expected comma-separated key=value, e.g. dp=2,micro_batch=1")
            key, value = (s.strip() for s in pair.split("=", 1))
            section, key = _section_of(key, item)
            layout.setdefault(section, {})[key] = value
        layouts.append(layout)
    if not layouts:
        raise ConfigError("--layouts", text, "give at least one layout, e.g. dp=2")
    return layouts


def _section_of(key: str, item: str) -> tuple[str, str]:
    """(section, key) of a layout's key: bare for parallel and train keys, else ``section.key``
    (``diloco.inner_steps``)."""
    section, dot, name = key.rpartition(".")
    if dot and section in C.OPTIONAL_SECTIONS + LAYOUT_SECTIONS and name in C.section_keys(section):
        return section, name
    for section in LAYOUT_SECTIONS:
        if key in C.section_keys(section):
            return section, key
    valid = ", ".join([k for s in LAYOUT_SECTIONS for k in C.section_keys(s)]
                      + [f"{s}.{k}" for s in C.OPTIONAL_SECTIONS for k in C.section_keys(s)])
    raise ConfigError("--layouts", item, f"unknown key {key!r}; valid keys: {valid}")


def layout_name(layout: dict) -> str:
    return ",".join(f"{s + '.' if s not in LAYOUT_SECTIONS else ''}{k}={v}"
                    for s, section in layout.items() for k, v in section.items())


def layout_config(base: C.RunConfig, layout: dict) -> tuple[C.RunConfig, int]:
    """The layout's resolved config and its process count (dp defaults to 1 here, not auto)."""
    cfg = C.from_dict(layout, replace(base, parallel=replace(base.parallel, dp=0)))
    p = cfg.parallel
    nproc = max(p.dp, 1) * p.tp * p.pp + C.servers(cfg)
    return C.resolve(cfg, nproc), nproc


def _run(cfg: C.RunConfig, nproc: int, worker=train_worker) -> TrainResult:
    opts = RunOptions(out=None, progress=False, keep_params=True)
    return run_local(worker, nproc, (cfg, opts), timeout_s=1800, collective_timeout_s=300)[0]


def compare(ref: TrainResult, got: TrainResult) -> tuple[float, float]:
    """Largest relative loss difference over steps, largest relative parameter difference."""
    loss = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got.losses, ref.losses))
    flat = torch.cat([p.flatten() for p in ref.params.values()])
    scale = float(flat.pow(2).mean().sqrt().clamp_min(1e-30))
    param = max(float((got.params[n].to(w.dtype) - w).pow(2).mean().sqrt()) / scale for n, w in ref.params.items())
    return loss, param


def runnable(base: C.RunConfig, layouts: list[dict]) -> list[dict]:
    """The layouts that this model and batch allow; each one left out is logged with the reason."""
    keep = []
    for layout in layouts:
        try:
            layout_config(base, layout)
            keep.append(layout)
        except ConfigError as e:
            log.warning("skipping %s: %s", layout_name(layout), e)
    return keep


def reference_config(base: C.RunConfig) -> C.RunConfig:
    """The one-process layout that every layout of ``base`` is compared with."""
    return layout_config(base, {"parallel": {"dp": "1", "tp": "1", "pp": "1", "zero": "0"}})[0]


def run_reference(base: C.RunConfig) -> TrainResult:
    return _run(reference_config(base), 1)


def check_layout(base: C.RunConfig, layout: dict, ref: TrainResult, tol: float) -> dict:
    """Train ``layout`` and compare it with the reference run ``ref``: one result row."""
    cfg, nproc = layout_config(base, layout)
    loss, param = compare(ref, _run(cfg, nproc))
    return {"layout": layout_name(layout), "nproc": nproc, "steps": cfg.train.steps, "dtype": cfg.train.dtype,
            "max_loss_rel_diff": loss, "max_param_rel_diff": param, "ok": bool(loss <= tol and param <= tol)}


def own_reference(cfg: C.RunConfig) -> tuple | None:
    """What a layout whose result is not plain training's is compared with instead: the key of
    its one-process reference (DiLoCo: the replicas and the diloco keys), or None."""
    if cfg.ps is not None and cfg.ps.mode != "sync":
        raise ConfigError("--layouts", f"ps.mode={cfg.ps.mode}", "an asynchronous server's result depends on "
                          "timing: verify takes ps.mode=sync, which equals one process")
    if cfg.diloco is None:
        return None
    if cfg.diloco.quantize != "none" and C.diloco_shards(cfg.diloco, cfg.parallel) > 1:
        raise ConfigError("--layouts", f"diloco.quantize={cfg.diloco.quantize}", "replicas of several ranks "
                          "round each rank's slices on their own, which the one-process reference cannot: verify "
                          "them unquantized")
    return ("diloco", cfg.parallel.dp, cfg.diloco)


def run_own_reference(cfg: C.RunConfig) -> TrainResult:
    """The one-process reference of a DiLoCo layout (``reference.diloco_worker``)."""
    from .reference import diloco_worker

    return _run(cfg, 1, diloco_worker)


def run_verify(base: C.RunConfig, layouts: list[dict], tol: float, progress: bool = True) -> list[dict]:
    """Run each reference once (the plain one, and one per DiLoCo setting) and every layout; one
    result row per layout."""
    cfgs = [layout_config(base, layout)[0] for layout in layouts]  # all validated before any run
    for cfg in cfgs:
        own_reference(cfg)
    load_corpus(base.data, base.model.seq_len, progress=progress)
    refs: dict = {}
    rows = []
    for layout, cfg in zip(layouts, cfgs):
        key = own_reference(cfg)
        if key not in refs:
            refs[key] = run_reference(base) if key is None else run_own_reference(cfg)
        ref = refs[key]
        rows.append(check_layout(base, layout, ref, tol))
        if progress:
            log.info("%-28s loss %.2e  params %.2e  %s", rows[-1]["layout"], rows[-1]["max_loss_rel_diff"],
                     rows[-1]["max_param_rel_diff"], "ok" if rows[-1]["ok"] else "FAIL")
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'layout':<32} {'nproc':>5} {'steps':>5} {'dtype':>8} {'loss diff':>10} {'param diff':>10}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layout']:<32} {r['nproc']:>5} {r['steps']:>5} {r['dtype']:>8} "
                     f"{r['max_loss_rel_diff']:>10.2e} {r['max_param_rel_diff']:>10.2e}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)
