"""The data-parallel strands side by side on the default task: synchronous data parallel, DiLoCo,
streaming DiLoCo, and the parameter server (sync, async, with and without a straggler).

    .venv/bin/python benchmarks/strands.py [--steps 200] [--out runs/strands] [--png docs/img/strands.png]

Each configuration is one `plait train` run (dp=2 workers) on the same seed and batches. Prints a
markdown table (validation loss at the end, bytes rank 0 sent, tokens/s) and draws the curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIT = [sys.executable, "-m", "plait"]
RUNS = {
    "sync dp=2": [],
    "DiLoCo H=10": ["diloco.inner_steps=10"],
    "DiLoCo H=10, constant momentum": ["diloco.inner_steps=10", "diloco.momentum_ramp=none"],
    "local SGD H=10": ["diloco.inner_steps=10", "diloco.outer_lr=1", "diloco.outer_momentum=0"],
    "streaming DiLoCo H=32 F=4 fp8": ["diloco.inner_steps=32", "diloco.fragments=4", "diloco.quantize=fp8"],
    "PS sync": ["ps.mode=sync"],
    "PS async": ["ps.mode=async"],
    "PS async, no look-ahead": ["ps.mode=async", "ps.lookahead=false"],
    "PS sync, worker 1 3x slower": ["ps.mode=sync", "ps.slow_worker=1:3.0"],
    "PS async, worker 1 3x slower": ["ps.mode=async", "ps.slow_worker=1:3.0"],
}


def run(name: str, sets: list[str], steps: int, out: Path) -> list[dict]:
    folder = out / name.replace(" ", "_").replace(",", "").replace("=", "")
    if not (folder / "metrics.jsonl").exists():
        args = [*PLAIT, "train", "--dp", "2", "--steps", str(steps), "--set", "train.eval_every=50",
                "--out", str(folder), "--no-progress"] + [a for s in sets for a in ("--set", s)]
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def row(name: str, rows: list[dict]) -> dict:
    steps = [r for r in rows if "loss" in r]
    return {"run": name, "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1],
            "bytes": sum(r.get("comm_bytes", 0) for r in steps),
            "peak_step_bytes": max(r.get("comm_peak_bytes", 0) for r in steps),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[3:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "runs" / "strands"))
    p.add_argument("--png", default=str(ROOT / "docs" / "img" / "strands.png"))
    args = p.parse_args()
    out = Path(args.out)
    runs = {name: run(name, sets, args.steps, out) for name, sets in RUNS.items()}
    table = [row(name, rows) for name, rows in runs.items()]
    sync = table[0]
    print("| run | validation loss | vs sync | bytes rank 0 sent | fewer than sync | largest step | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['run']} | {r['val_loss']:.3f} | {r['val_loss'] / sync['val_loss'] - 1:+.1%} | "
              f"{r['bytes'] / 1e6:.1f} MB | {sync['bytes'] / max(r['bytes'], 1):.0f}x | "
              f"{r['peak_step_bytes'] / 1e6:.2f} MB | {r['tokens_per_s']:.0f} |")
    sys.path.insert(0, str(ROOT / "src"))
    from plait.viz import plot_strand_runs

    plot_strand_runs(runs, global_batch=16, dp=2, path=Path(args.png))
    print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
