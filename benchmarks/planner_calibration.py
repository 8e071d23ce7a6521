"""The planner's predictions against what `plait train` measures on this machine, for layouts of
every strand (dp, tp, sequence parallel, pp with each schedule, ZeRO 1-3, recomputation).

    .venv/bin/python benchmarks/planner_calibration.py [--steps 12] [--profile FILE] [--png docs/img/planner.png]

Uses this machine's profile (`plait probe`; made first if the file is missing). Each layout is one
`plait train` run of the default model on the embedded corpus; its step time is the median
`step_time_s` after the first two steps, its memory rank 0's `mem_peak_bytes` (the tensors it
holds: parameters, gradients, optimizer states, peak activations). Prints a markdown table
(docs/planner.md holds it) and draws predicted against measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIT = [sys.executable, "-m", "plait"]
LAYOUTS = [  # (processes, keys)
    (1, "micro_batch=4"), (1, "micro_batch=4,recompute=selective"), (1, "micro_batch=4,recompute=full"),
    (2, "dp=2"), (2, "dp=2,zero=1"), (2, "dp=2,zero=2"), (2, "dp=2,zero=3"),
    (2, "tp=2"), (2, "tp=2,sequence_parallel=true"), (2, "tp=2,recompute=full"),
    (2, "pp=2,micro_batch=2"), (2, "pp=2,micro_batch=2,schedule=gpipe"), (2, "pp=2,micro_batch=2,schedule=zb"),
    (2, "pp=2,micro_batch=1,schedule=interleaved,virtual_stages=2"),
]


def measure(nproc: int, keys: str, steps: int, out: Path) -> dict:
    sets = [a for k in filter(None, keys.split(",")) for a in ("--set", _key(k))]
    args = [*PLAIT, "train", "--nproc", str(nproc), "--steps", str(steps), "--set", "train.eval_every=0",
            "--sample", "0", "--no-progress", "--out", str(out), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core a process: the probe's device
    subprocess.run(args, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in rows[2:]),
            "mem_bytes": rows[-1]["mem_peak_bytes"]}


def _key(k: str) -> str:
    from plait import config as C

    name = k.split("=")[0]
    section = "train" if name in C.section_keys("train") else "parallel"
    return f"{section}.{k}"


def predict(nproc: int, keys: str, hw) -> dict:
    from plait import config as C
    from plait.plan import cost

    cfg = C.resolve(C.load(None, [_key(k) for k in filter(None, keys.split(","))]), nproc)
    p, t = cfg.parallel, cfg.train
    layout = cost.Layout(p.dp, p.tp, p.pp, p.zero, t.micro_batch, p.schedule, p.virtual_stages,
                         p.sequence_parallel, t.recompute)
    job = cost.Job(cfg.model, t.global_batch)
    est = cost.estimate(job, layout, hw)
    rank0 = sum(cost.memory(job, layout, 0).values())  # metrics.jsonl is rank 0's
    return {"step_time_s": est.step_time_s, "mem_bytes": rank0, "bottleneck": est.bottleneck}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", help="a profile from plait probe (default: this machine's, probed if missing)")
    ap.add_argument("--png", default=str(ROOT / "docs/img/planner.png"))
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from plait.plan import hardware, probe

    path = Path(args.profile) if args.profile else probe.default_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(probe.probe().to_json())
    hw = hardware.load(str(path))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, keys) in enumerate(LAYOUTS):
            got = measure(nproc, keys, args.steps, Path(tmp) / str(i))
            want = predict(nproc, keys, hw)
            rows.append({"layout": keys or "one process", "nproc": nproc, "measured": got, "predicted": want})
            print(_line(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    draw(rows, args.png)


def _err(row: dict, key: str) -> float:
    return row["predicted"][key] / row["measured"][key] - 1


def _line(r: dict) -> str:
    return (f"| {r['layout']} | {r['nproc']} | {r['measured']['step_time_s'] * 1e3:.1f} | "
            f"{r['predicted']['step_time_s'] * 1e3:.1f} | {_err(r, 'step_time_s'):+.1%} | "
            f"{r['measured']['mem_bytes'] / 2**20:.1f} | {r['predicted']['mem_bytes'] / 2**20:.1f} | "
            f"{_err(r, 'mem_bytes'):+.1%} | {r['predicted']['bottleneck']} |")


def table(rows: list[dict]) -> str:
    head = ("| layout | processes | step ms measured | predicted | error | memory MiB measured | predicted | error "
            "| predicted bottleneck |\n|---|---|---|---|---|---|---|---|---|")
    time_ok = sum(abs(_err(r, "step_time_s")) <= 0.25 for r in rows)
    mem_ok = sum(abs(_err(r, "mem_bytes")) <= 0.15 for r in rows)
    return (head + "\n" + "\n".join(_line(r) for r in rows)
            + f"\n\nstep time within 25%: {time_ok}/{len(rows)}; memory within 15%: {mem_ok}/{len(rows)}")


def draw(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, unit, scale, band in ((axes[0], "step_time_s", "step time (ms)", 1e3, 0.25),
                                       (axes[1], "mem_bytes", "memory per device (MiB)", 2**-20, 0.15)):
        xs = [r["measured"][key] * scale for r in rows]
        ys = [r["predicted"][key] * scale for r in rows]
        top = max(xs + ys) * 1.1
        ax.plot([0, top], [0, top], color="grey", lw=1)
        ax.fill_between([0, top], [0, top * (1 - band)], [0, top * (1 + band)], color="grey", alpha=0.15,
                        label=f"within {band:.0%}")
        ax.scatter(xs, ys, s=18)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["layout"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(xlabel=f"measured {unit}", ylabel=f"predicted {unit}", xlim=(0, top), ylim=(0, top))
        ax.legend(loc="upper left")
    fig.suptitle("plait plan: predicted against measured on this machine")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
