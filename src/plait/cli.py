"""The ``plait`` command: parse -> RunConfig -> library call. Nothing else lives here.

Every user error ends as one line on stderr and exit code 2; a crashed or killed worker as one
line and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import config as C
from .errors import ConfigError, PlaitError
from .finetune.commands import add_parser as add_finetune_parser
from .finetune.commands import cmd_finetune
from .generate import add_generate_parser, cmd_generate
from .launch import WorkerFailed
from .plan.commands import add_parsers as add_plan_parsers
from .plan.commands import cmd_plan, cmd_probe

SHORT_FLAGS = {  # --flag -> config key
    "dp": "parallel.dp", "tp": "parallel.tp", "pp": "parallel.pp", "zero": "parallel.zero",
    "steps": "train.steps", "data": "data.path", "dtype": "train.dtype",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"plait: error: {message} (see {self.prog} --help)\n")


def _config_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", help="TOML file with [model], [parallel], [train], [data], [checkpoint]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key, e.g. --set parallel.dp=2 (repeatable)")
    p.add_argument("--nproc", type=int, help="local processes (default: CPU cores, or visible GPUs)")
    for flag, key in SHORT_FLAGS.items():
        if data or flag != "data":  # finetune's --data is its task's folder
            p.add_argument(f"--{flag}", help=f"same as --set {key}=VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plait", description="Train transformer language models on many processes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # command name -> its parser
    train = sub.add_parser("train", help="train a model (default: a small GPT on the embedded corpus)")
    _config_args(train)
    train.add_argument("--out", help="output folder (default: runs/<date-time>); must not hold a run")
    train.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    train.add_argument("--sample", type=int, default=300, help="bytes of text to generate at the end")
    train.add_argument("--dry-run", action="store_true",
                       help="build the layout on the meta device and print per-rank model-state bytes; no training")
    train.add_argument("--timeline", type=int, default=0, metavar="STEP",
                       help="record pipeline step STEP: timeline.png/.json, measured beside simulated")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest good checkpoint, with its saved config "
                            "(the layout, train.steps, checkpoint.* and logging keys may be changed)")
    train.add_argument("--layout", metavar="auto", help="auto: let the planner choose the layout for the local "
                       "processes (this machine's profile, made by plait probe on first use) and log its reasons")
    train.add_argument("--max-restarts", type=int, default=0, metavar="R",
                       help="when a process dies, stop all and restart from the newest good checkpoint, "
                            "up to R times (under torchrun: torchrun's own --max-restarts)")
    export = sub.add_parser("export", help="write a checkpoint's model as one safetensors file and its JSON config")
    export.add_argument("--ckpt", required=True,
                        help="a run folder (its newest good checkpoint) or a checkpoint folder")
    export.add_argument("--out", required=True, help="the .safetensors file to write (the config goes beside it, "
                        ".json); with --hf a folder")
    export.add_argument("--hf", action="store_true", help="write a Hugging Face folder (config.json, "
                        "model.safetensors) that transformers loads: gpt2 and llama models")
    verify = sub.add_parser("verify", help="check that layouts compute what one process computes")
    _config_args(verify)
    verify.add_argument("--layouts", help='";"-separated layouts of comma-separated key=value (parallel/train '
                        'keys); default: the standard matrix (every factorisation of 2 and 4 processes, '
                        'x zero, x schedules, and dp=2,tp=2,pp=2)')
    verify.add_argument("--tol", type=float, help="tolerance (default: 1e-9 in float64, 1e-4 otherwise)")
    verify.add_argument("--json", action="store_true", help="print a JSON list")
    sched = sub.add_parser("schedule", help="draw a pipeline schedule and its bubble (simulated)")
    sched.add_argument("--schedule", default="1f1b", help=f"one of {', '.join(C.SCHEDULES)}")
    sched.add_argument("--pp", type=int, default=4, help="pipeline stages (ranks)")
    sched.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    sched.add_argument("--virtual", type=int, default=1, help="chunks per rank (interleaved)")
    sched.add_argument("--tf", type=float, default=1.0, help="forward time of a whole stage")
    sched.add_argument("--tb", type=float, default=2.0, help="backward time of a whole stage")
    sched.add_argument("--tw", type=float, default=1.0, help="of which weight gradient (zb splits it off)")
    sched.add_argument("--comm", type=float, default=0.0, help="time of one transfer between stages")
    sched.add_argument("--png", help="write the timeline picture here")
    sched.add_argument("--json", action="store_true", help="print a JSON object")
    bench = sub.add_parser("bench", help="side-by-side speed against PyTorch's own counterpart")
    bench.add_argument("what", choices=["dp", "tp", "pp", "zero", "generate", "ckpt", "diloco"],
                       help="dp: data parallel vs torch DDP; tp: tensor parallel vs DTensor; "
                            "pp: a schedule vs torch.distributed.pipelining's; zero: ZeRO-3 vs fully_shard, "
                            "--zero 1/2 vs ZeroRedundancyOptimizer; generate: KV cache vs uncached sampler; "
                            "ckpt: plait's sync and async saves beside dcp.async_save; "
                            "diloco: DiLoCo and streaming DiLoCo vs torchft's (pip install plait[bench])")
    _config_args(bench)
    bench.add_argument("--iters", type=int, help="measured steps (median reported; default 8, generate: 3 runs; "
                                                     "diloco: steps a side, rounded up to whole H, default 48)")
    bench.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    bench.add_argument("--json", action="store_true", help="print a JSON object")
    add_generate_parser(sub)
    add_plan_parsers(sub)
    add_finetune_parser(sub, _config_args)
    return parser


def load_config(args: argparse.Namespace, defaults: dict | None = None) -> C.RunConfig:
    """The command's own defaults, then --config, then --set, then the short flags."""
    base = C.from_dict(C.parse_overrides([f"{k}={v}" for k, v in (defaults or {}).items()]))
    sets = list(args.set)
    sets += [f"{key}={getattr(args, flag)}" for flag, key in SHORT_FLAGS.items()
             if getattr(args, flag, None) is not None]  # finetune has no --data flag of data.path
    return C.load(args.config, sets, base)


def default_nproc(cfg: C.RunConfig) -> int:
    """Visible GPUs on CUDA, else CPU cores; at least tp*pp (and dp*tp*pp when dp is given)."""
    from .launch import local_slots

    s, p = C.servers(cfg), cfg.parallel
    if p.dp:
        return p.dp * p.tp * p.pp + s
    n = local_slots() - s
    return max(n - n % (p.tp * p.pp), p.tp * p.pp) + s


def nproc_for(args: argparse.Namespace, cfg: C.RunConfig) -> int:
    if "WORLD_SIZE" in os.environ and _torchrun():
        return int(os.environ["WORLD_SIZE"])
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError("--nproc", args.nproc, "must be at least 1")
        return args.nproc
    return default_nproc(cfg)


def _torchrun() -> bool:
    from .launch import under_torchrun

    return under_torchrun()


def out_dir(arg: str | None, check: bool = True) -> Path:
    """The output folder: new, or empty; an existing run is never overwritten.

    Under torchrun every rank computes the same path (from the run id); only rank 0 checks it.
    """
    if arg:
        out = Path(arg).expanduser()
    elif os.environ.get("TORCHELASTIC_RUN_ID"):
        out = Path("runs") / os.environ["TORCHELASTIC_RUN_ID"]
    else:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if check and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", str(out), "already exists and is not empty; give a new folder")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .launch import run_in_process
    from .train.data import load_corpus
    from .train.trainer import RunOptions, train_worker, write_config

    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, "must be 0 or more")
    if args.max_restarts and _torchrun():
        raise ConfigError("--max-restarts", args.max_restarts, "under torchrun, give torchrun's own --max-restarts "
                          "(a restarted worker group resumes from its checkpoints by itself)")
    resume = args.resume or _torchrun_restart()
    start = _newest_checkpoint(_resume_out(args), required=args.resume) if resume else None
    cfg = _resume_config(args, start) if start else load_config(args)
    nproc = nproc_for(args, cfg)
    extra = {}
    if args.layout is not None:
        cfg, extra = _auto_layout(args, cfg, nproc, start)
    cfg = C.resolve(cfg, nproc)
    _check_timeline(args.timeline, cfg)
    if cfg.ps is not None and (start or args.max_restarts or args.dry_run):
        flag = "--resume" if start else "--max-restarts" if args.max_restarts else "--dry-run"
        raise ConfigError(flag, "ps.*", "not with a parameter server yet: its optimizer states live on the servers, "
                          "which checkpoints and the dry run do not cover")
    if args.dry_run:
        return _dry_run(cfg, nproc)
    rank = int(os.environ.get("RANK", "0")) if _torchrun() else 0
    out = out_dir(args.out, check=rank == 0 and not resume)
    load_corpus(cfg.data, cfg.model.seq_len, progress=rank == 0)  # tokenise once, fail early
    opts = RunOptions(out=out, progress=not args.no_progress, sample_tokens=args.sample,
                      timeline_step=args.timeline, resume=start, row_extra=extra)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out)
    if _torchrun():
        result = run_in_process(train_worker, (cfg, opts))
    else:
        result = _run_with_restarts(train_worker, nproc, cfg, opts, args.max_restarts)
    if result is not None:
        _report(result)
    return 0


def _auto_layout(args: argparse.Namespace, cfg: C.RunConfig, nproc: int, start) -> tuple[C.RunConfig, dict]:
    """``--layout auto``: the planner's layout for ``nproc`` processes, and the predictions that
    go into every metrics row beside what is measured."""
    from .plan.commands import auto_layout

    if args.layout != "auto":
        raise ConfigError("--layout", args.layout, "train takes --layout auto (give a layout with --set parallel.*)")
    if start is not None:
        raise ConfigError("--layout", "auto", "a resumed run keeps its layout (or give one with --set parallel.*)")
    if _torchrun():
        raise ConfigError("--layout", "auto", "under torchrun every rank would plan on its own: plan with plait "
                          "plan --cluster FILE and give the layout with --set parallel.*")
    if args.dry_run:
        raise ConfigError("--layout", "auto", "not with --dry-run: plait plan prints what --layout auto would run")
    cfg, _, predicted = auto_layout(cfg, nproc)
    return cfg, predicted


RESUMABLE = ("parallel.", "train.steps", "train.log_every", "train.eval_every", "checkpoint.")


def _resume_out(args: argparse.Namespace) -> Path:
    """The run folder to resume: --out (required with --resume; under a torchrun restart the
    default folder of the run id, as the first attempt chose it)."""
    if args.resume and not args.out:
        raise ConfigError("--out", None, "--resume continues the run in --out DIR: give --out")
    out = out_dir(args.out, check=False)
    if args.resume and not out.is_dir():
        raise ConfigError("--out", args.out, "holds no run to --resume: give the --out folder of a run")
    return out


def _resume_config(args: argparse.Namespace, start: Path) -> C.RunConfig:
    """The config saved with the checkpoint ``start``, with the overrides a resumed run may make
    (the layout, the step count, checkpoints, logging); any other key given with another value is
    refused."""
    from .checkpoint.export import config_of

    saved_file = start / "plait.json"
    saved = config_of(start)
    sets = list(args.set) + [f"{key}={getattr(args, flag)}" for flag, key in SHORT_FLAGS.items()
                             if getattr(args, flag) is not None]
    keys = {item.split("=", 1)[0].strip() for item in sets}
    layout = {"parallel.tp", "parallel.pp"} & keys or args.nproc is not None or args.config
    if layout and "parallel.dp" not in keys:  # dp follows from the processes
        saved = dataclasses.replace(saved, parallel=dataclasses.replace(saved.parallel, dp=0))
    cfg = C.load(args.config, sets, saved)
    wanted, had = C.to_dict(cfg), C.to_dict(saved)
    for section, values in wanted.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            before = had.get(section, {}).get(key)
            if value != before and not name.startswith(RESUMABLE):
                raise ConfigError(name, value, f"a resumed run keeps its saved config ({before!r} in "
                                  f"{saved_file}); only the layout (parallel.*), train.steps, checkpoint.* and "
                                  "logging keys may change")
    return cfg


def _newest_checkpoint(out: Path, required: bool) -> Path | None:
    """The newest good checkpoint of the run in ``out`` (damaged newer ones are reported and skipped)."""
    from .checkpoint import newest_good

    found = newest_good(out / "checkpoints", say=lambda text: print(f"plait: {text}", file=sys.stderr))
    if found is None and required:
        raise ConfigError("--resume", str(out), "holds no complete checkpoint (checkpoints/step_*): nothing to "
                          "resume; start the run without --resume")
    return found


def _torchrun_restart() -> bool:
    """Under torchrun, a restarted worker group (torchrun's --max-restarts) resumes by itself."""
    return _torchrun() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _run_with_restarts(worker, nproc: int, cfg: C.RunConfig, opts, max_restarts: int):
    """Run the local processes; when one dies, all are stopped and the run restarts from the newest
    good checkpoint, up to ``max_restarts`` times. Returns rank 0's result."""
    from .launch import run_local, threads_per_process

    for attempt in range(max_restarts + 1):
        try:  # each process its share of the cores
            return run_local(worker, nproc, (cfg, opts), threads=threads_per_process(nproc),
                             tolerate=_may_be_lost(cfg))[0]
        except WorkerFailed as e:
            if attempt == max_restarts:
                raise
            died = _last_step(opts.out)
            start = _newest_checkpoint(opts.out, required=False)
            opts = dataclasses.replace(opts, resume=start)
            where = f"step {_manifest_step(start)}" if start else "the start (no checkpoint yet)"
            print(f"plait: {e} after step {died}; restart {attempt + 1} of {max_restarts}, resuming from {where}",
                  file=sys.stderr)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _may_be_lost(cfg: C.RunConfig) -> frozenset[int]:
    """The ranks whose death the run survives: an asynchronous parameter server's workers but
    rank 0 (which writes the run's outputs); the servers go on without them."""
    if cfg.ps is None or cfg.ps.mode == "sync":
        return frozenset()
    return frozenset(range(1, cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp))


def _manifest_step(path: Path) -> int:
    from .checkpoint.store import manifest

    return int(manifest(path)["step"])


def _last_step(out: Path) -> int:
    """The last step metrics.jsonl records (0 if none)."""
    try:
        rows = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for row in rows:
        with contextlib.suppress(ValueError):  # a line cut short by the kill
            steps.append(int(json.loads(row).get("step", 0)))
    return max(steps, default=0)


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint.export import export, export_hf

    out = (export_hf if args.hf else export)(Path(args.ckpt).expanduser(), Path(args.out).expanduser())
    print(f"exported {out['tensors']} tensors ({out['values']:,} values) of step {out['step']} to {args.out} "
          f"(config: {out['config']})")
    return 0


def _dry_run(cfg: C.RunConfig, nproc: int) -> int:
    from .dryrun import dry_run_worker, format_rows
    from .launch import run_local
    from .train.trainer import param_dtype

    p, dtype = cfg.parallel, str(param_dtype(cfg)).removeprefix("torch.")
    print(f"layout dp={p.dp} tp={p.tp} pp={p.pp} zero={p.zero}: model-state bytes per rank ({dtype} AdamW)")
    print(format_rows(run_local(dry_run_worker, nproc, (cfg,), timeout_s=600)))
    return 0


def _check_timeline(step: int, cfg: C.RunConfig) -> None:
    if step and cfg.parallel.pp == 1:
        raise ConfigError("--timeline", step, "records pipeline actions: needs parallel.pp > 1")
    if not 0 <= step <= cfg.train.steps:
        raise ConfigError("--timeline", step, f"must be a step from 1 to train.steps={cfg.train.steps}")


def _report(result) -> None:
    if result.sample:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    if result.val_losses:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(f"validation loss {first:.3f} -> {last:.3f}")
    if result.timeline:
        m, s, e, p = (result.timeline[k]["bubble_fraction"] for k in ("measured", "simulated", "expected", "predicted"))
        print(f"pipeline step: measured bubble {m:.3f}; simulator: {s:.3f} replaying each action's time, "
              f"{e:.3f} expected from the spread of times per stage ({p:.3f} at mean times); "
              "timeline.png, timeline.json")
    print(f"outputs: {Path(result.out).resolve()} (metrics.jsonl, config.toml, loss.png, tb/, checkpoints/)")


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import format_table, parse_layouts, run_verify, runnable, standard_matrix

    defaults = {"train.dtype": "float64", "train.steps": "20", "train.eval_every": "0"}
    if not args.layouts:  # 2 sequences a micro-batch: every layout of the matrix divides the batch
        defaults["train.micro_batch"] = "2"
    base = load_config(args, defaults)
    if args.layouts:
        layouts = parse_layouts(args.layouts)
    else:  # the standard matrix, less what this model or batch cannot run (each logged)
        layouts = runnable(base, parse_layouts(standard_matrix()))
    tol = args.tol if args.tol is not None else (1e-9 if base.train.dtype == "float64" else 1e-4)
    rows = run_verify(base, layouts, tol, progress=not args.json)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BENCHES, format_result, run_bench

    cfg = load_config(args, BENCHES[args.what][0])
    nproc = nproc_for(args, cfg)
    cfg = C.resolve(cfg, nproc)
    result = run_bench(args.what, cfg, nproc, iters=args.iters, warmup=args.warmup)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from .parallel.pipeline.report import build, grid
    from .parallel.pipeline.simulate import Costs

    tl = build(args.schedule, args.pp, args.microbatches, args.virtual, Costs(args.tf, args.tb, args.tw, args.comm))
    summary = {"schedule": args.schedule, "pp": args.pp, "microbatches": args.microbatches,
               "virtual": args.virtual, **tl.summary()}
    if args.png:
        from .viz import plot_schedules

        plot_schedules([(f"{args.schedule}, pp={args.pp}, m={args.microbatches}, v={args.virtual}", tl)],
                       Path(args.png))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(grid(tl))
    print(f"makespan {tl.makespan:g}  bubble {tl.bubble_fraction:.4f} of the step  "
          f"peak in-flight micro-batches per rank {summary['peak_inflight']}")
    if args.png:
        print(f"timeline: {args.png}")
    return 0


COMMANDS = {"train": cmd_train, "export": cmd_export, "verify": cmd_verify, "bench": cmd_bench,
            "schedule": cmd_schedule, "generate": cmd_generate, "plan": cmd_plan, "probe": cmd_probe,
            "finetune": lambda args: cmd_finetune(args, load_config, nproc_for, out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, so the hint names the command
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except PlaitError as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return 2
    except WorkerFailed as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
