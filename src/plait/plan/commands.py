"""``plait plan``, ``plait probe`` and ``plait train --layout auto``: parse, call the planner, print.

    plait plan --model M.toml --cluster dgx-a100-80gb --devices 4096 --global-batch 1536 [--top K] [--json]
    plait plan --layout "tp=2,pp=2"      # one layout: keys left out are chosen by the planner
    plait probe [--out FILE]             # measure this machine into a profile that --cluster takes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .. import config as C
from ..errors import ConfigError
from . import hardware
from .cost import Estimate, Job, Layout, memory
from .search import complete, explain, name, search

log = logging.getLogger(__name__)

LAYOUT_KEYS = {f.name: f.type for f in dataclasses.fields(Layout)}


def add_parsers(sub) -> None:
    plan = sub.add_parser("plan", help="predict memory and step time of every layout and recommend one")
    plan.add_argument("--model", help="a TOML file with a [model] section (default: the default model)")
    plan.add_argument("--cluster", help=f"a preset ({', '.join(hardware.PRESETS)}) or a profile file from plait "
                      "probe (default: this machine, probed on first use)")
    plan.add_argument("--devices", type=int, help="devices to plan for (default: one node's)")
    plan.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: the model file's "
                      "train.global_batch)")
    plan.add_argument("--layout", help='evaluate one layout in the verify syntax, e.g. "tp=2,pp=2,zero=1"; keys '
                      "left out are chosen by the planner")
    plan.add_argument("--dtype", choices=("fp32", "bf16", "fp64"),
                      help="compute dtype (default: bf16 where the cluster has it, else fp32)")
    plan.add_argument("--top", type=int, default=5, help="layouts to list (default 5)")
    plan.add_argument("--allow-tp-across-nodes", action="store_true", help="let tp span nodes")
    plan.add_argument("--json", action="store_true", help="print a JSON list")
    probe = sub.add_parser("probe", help="measure this machine (matmul, memory, collectives) into a profile")
    probe.add_argument("--out", help=f"profile file to write (default: {_default_path_text()})")
    probe.add_argument("--quick", action="store_true", help="fewer sizes, collectives over 2 processes only")
    probe.add_argument("--json", action="store_true", help="print the profile as JSON")


def _default_path_text() -> str:
    return "$PLAIT_CACHE/probe.json, else ~/.cache/plait/probe.json"


def local_profile(progress: bool = True) -> hardware.Hardware:
    """This machine's profile: the saved one, or measured now and saved."""
    from .probe import default_path, probe

    path = default_path()
    if path.is_file():
        return hardware.load(str(path))
    if progress:
        log.info("plait: measuring this machine first (plait probe; saved to %s)", path)
    hw = probe(progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hw.to_json())
    return hw


def parse_layout(text: str) -> dict:
    """``"tp=2,pp=2,zero=1"`` -> the Layout keys it names (``parallel.`` / ``train.`` prefixes allowed)."""
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = pair.partition("=")
        key = key.strip().rpartition(".")[2]
        if not eq or key not in LAYOUT_KEYS:
            raise ConfigError("--layout", text, f"expected comma-separated key=value with keys from "
                              f"{', '.join(LAYOUT_KEYS)}")
        kind = LAYOUT_KEYS[key]
        try:
            out[key] = (value.strip().lower() in ("1", "true", "yes")) if kind in (bool, "bool") else (
                int(value) if kind in (int, "int") else value.strip())
        except ValueError:
            raise ConfigError("--layout", pair, f"{key} takes an integer") from None
    return out


def job_of(model: C.ModelConfig, global_batch: int, dtype: str) -> Job:
    return Job(model, global_batch, precision="fp64" if dtype == "fp64" else "fp32", act=dtype, matmul=dtype)


def planned_model(cfg: C.RunConfig, field: str) -> C.ModelConfig:
    """The model section of ``cfg`` with its defaults filled in (kv_heads, ffn_hidden), validated on
    its own: the planner chooses the layout, so the config's own is left out. plait's gpt2 and
    llama only: a user's builder model has no formulas here."""
    if cfg.model.builder:
        raise ConfigError(field, cfg.model.builder, "the planner models plait's gpt2 and llama blocks; a "
                          "model.builder model has no formulas here (give its layout with --set parallel.*)")
    alone = C.RunConfig(model=cfg.model, train=dataclasses.replace(cfg.train, micro_batch=1))
    return C.resolve(alone, 1).model


def dtype_of(train_dtype: str, hw: hardware.Hardware) -> str:
    """The planner's dtype for ``train.dtype``: auto is bf16 where the hardware has it (CUDA)."""
    named = {"float64": "fp64", "bfloat16": "bf16", "float32": "fp32"}
    return named.get(train_dtype) or ("bf16" if "bf16" in hw.matmul else "fp32")


def _inputs(args: argparse.Namespace) -> tuple[Job, hardware.Hardware, int]:
    if args.model and not Path(args.model).is_file():
        raise ConfigError("--model", args.model, "no such file (a TOML file with a [model] section)")
    cfg = C.load(args.model, [])
    model = planned_model(cfg, "--model")
    batch = args.global_batch if args.global_batch is not None else cfg.train.global_batch
    if batch < 1:
        raise ConfigError("--global-batch", batch, "must be a positive number of sequences")
    if args.top < 1:
        raise ConfigError("--top", args.top, "must be at least 1")
    hw = hardware.load(args.cluster) if args.cluster else local_profile()
    devices = args.devices if args.devices is not None else hw.devices_per_node
    if devices < 1:
        raise ConfigError("--devices", devices, "must be at least 1")
    dtype = args.dtype or dtype_of("auto", hw)
    return job_of(model, batch, dtype), hw, devices


def cmd_plan(args: argparse.Namespace) -> int:
    job, hw, devices = _inputs(args)
    if args.layout:
        one = complete(parse_layout(args.layout), job, devices, hw, args.allow_tp_across_nodes)
        rows, lines = [one], [_why_not(one) if one.reason else explain([one])[0]]
    else:
        ranked = search(job, devices, hw, args.allow_tp_across_nodes)
        rows, lines = ranked[:args.top], explain(ranked, args.top)
        if not ranked:
            print(f"plait: {lines[0]}", file=sys.stderr)
    if args.json:
        print(json.dumps([{**e.row(), "layout": name(e.layout), "why": line} for e, line in
                          zip(rows, lines + [""] * len(rows))], indent=1))
        return 0
    print(f"{job.model.flavour}, {job.model.layers} layers x {job.model.hidden}, batch {job.global_batch} x "
          f"{job.model.seq_len} on {devices} x {hw.name} ({job.matmul})")
    print(format_table(rows))
    for line in lines:
        print(line)
    return 0


def _why_not(e: Estimate) -> str:
    return f"{name(e.layout)} cannot run: {e.reason}"


def format_table(rows: list[Estimate]) -> str:
    head = (f"{'#':>2} {'layout':<58} {'fits':>4} {'GiB/dev':>8} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>5} "
            f" bottleneck")
    lines = [head, "-" * len(head)]
    for i, e in enumerate(rows, 1):
        lines.append(f"{i:>2} {name(e.layout):<58} {'yes' if e.fits else 'no':>4} {e.mem_bytes / 2**30:>8.2f} "
                     f"{e.step_time_s * 1e3:>9.1f} {e.tflops_per_device:>8.3f} {e.mfu:>5.1%}  {e.bottleneck}")
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import default_path, format_profile, probe

    out = Path(args.out).expanduser() if args.out else default_path()
    _writable(out)
    hw = probe(quick=args.quick)
    out.write_text(hw.to_json())
    print(hw.to_json() if args.json else format_profile(hw))
    if not args.json:
        print(f"profile: {out} (plait plan --cluster {out})")
    return 0


def _writable(out: Path) -> None:
    """Fail now, not after the measurements, if the profile cannot be written to ``out``."""
    if out.is_dir():
        raise ConfigError("--out", str(out), "is a folder; give a file name for the profile")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):
            pass
        if not existed:
            out.unlink()
    except OSError as e:
        raise ConfigError("--out", str(out), f"cannot be written ({e.strerror or e})") from None


def auto_layout(cfg: C.RunConfig, nproc: int) -> tuple[C.RunConfig, Estimate, dict]:
    """``plait train --layout auto``: the planner's best layout for this config's model and batch on
    ``nproc`` local processes (this machine's profile), applied to the config; and the predictions
    to write beside the measured values (rank 0's memory: metrics.jsonl is rank 0's)."""
    if cfg.ps is not None or cfg.diloco is not None:
        raise ConfigError("--layout", "auto", "plans synchronous layouts; leave out ps.* and diloco.*")
    default = C.RunConfig()
    chosen = (cfg.parallel, cfg.train.micro_batch, cfg.train.recompute)
    if chosen != (default.parallel, default.train.micro_batch, default.train.recompute):
        raise ConfigError("--layout", "auto", "chooses parallel.*, train.micro_batch and train.recompute itself; "
                          "leave them out (or leave out --layout auto)")
    model = planned_model(cfg, "--layout")
    hw = local_profile()
    job = job_of(model, cfg.train.global_batch, dtype_of(cfg.train.dtype, hw))
    ranked = search(job, nproc, dataclasses.replace(hw, devices_per_node=max(hw.devices_per_node, nproc)))
    if not ranked:
        raise ConfigError("--layout", "auto", f"no layout of {nproc} processes fits this model and batch; "
                          "give more processes or a smaller model")
    best = ranked[0]
    for line in explain(ranked, 3):
        log.info("plait: plan: %s", line)
    l = best.layout
    parallel = dataclasses.replace(cfg.parallel, dp=l.dp, tp=l.tp, pp=l.pp, zero=l.zero, schedule=l.schedule,
                                   virtual_stages=l.virtual_stages, sequence_parallel=l.sequence_parallel,
                                   microbatches=0)
    train = dataclasses.replace(cfg.train, micro_batch=l.micro_batch, recompute=l.recompute)
    rank0 = sum(memory(job, l, 0).values())
    return (dataclasses.replace(cfg, parallel=parallel, train=train), best,
            {"predicted_step_time_s": best.step_time_s, "predicted_mem_peak_bytes": rank0})
