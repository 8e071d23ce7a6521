"""Pictures of a run: loss curves (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_losses(rows: list[dict], path: Path) -> Path:
    """Training loss per step and validation loss where evaluated, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


COLOURS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868"}


def plot_schedules(panels: list[tuple[str, object]], path: Path) -> Path:
    """One row per rank per panel; forward, backward, input- and weight-gradient blocks in distinct
    colours, labelled with the micro-batch (and chunk). ``panels``: (title, Timeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.0 + 0.55 * sum(t.pp for _, t in panels)),
                             dpi=110, squeeze=False)
    for ax, (title, tl) in zip(axes[:, 0], panels):
        _draw_timeline(ax, tl, title)
    handles = [Patch(color=c, label={"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad"}[k])
               for k, c in COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_timeline(ax, tl, title: str) -> None:
    t0 = min(e.start for e in tl.events)
    for e in tl.events:
        y = tl.pp - 1 - e.rank
        ax.broken_barh([(e.start - t0, e.end - e.start)], (y - 0.4, 0.8), facecolors=COLOURS[e.action.op],
                       edgecolor="white", linewidth=0.5)
        label = f"{e.action.mb}" + (f".{e.action.chunk}" if e.action.chunk else "")
        ax.text(e.start - t0 + (e.end - e.start) / 2, y, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(tl.pp), [f"rank {r}" for r in reversed(range(tl.pp))])
    ax.set_xlim(0, tl.makespan)
    ax.set_title(f"{title}: makespan {tl.makespan:.3g}, bubble {tl.bubble_fraction:.1%}", fontsize=9)


def plot_strand_runs(runs: dict[str, list[dict]], global_batch: int, dp: int, path: Path) -> Path:
    """Data-parallel strands side by side, against the sequences trained on: training loss (mean
    over 20 rows), validation loss where evaluated, and the bytes rank 0 sent so far (log scale).
    ``runs``: name -> metrics.jsonl rows. An asynchronous worker's rows count the sequences the
    servers applied (``ps_version`` pushes of ``global_batch / dp``), the others a global batch a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for name, rows in runs.items():
        steps = [r for r in rows if "loss" in r]
        lock = _lockstep(rows)
        seen = [r["step"] * global_batch if lock else r["ps_version"] * global_batch // dp for r in steps]
        losses = [r["loss"] for r in steps]
        mean = [sum(losses[max(0, i - 19):i + 1]) / len(losses[max(0, i - 19):i + 1]) for i in range(len(losses))]
        line, = ax_loss.plot(seen, mean, linewidth=1.2, label=name)
        val = [(r["step"] * global_batch, r["val_loss"]) for r in rows if "val_loss" in r]
        if val and not lock:  # evaluated at the start and at the end only
            val = [(0, val[0][1]), (seen[-1], val[-1][1])]
        if val:
            ax_loss.plot(*zip(*val), "o", color=line.get_color(), markersize=4)
        sent, total = [], 0
        for r in steps:
            total += r.get("comm_bytes", 0)
            sent.append(max(total, 1))
        ax_bytes.plot(seen, sent, linewidth=1.2, color=line.get_color(), label=name)
    ax_loss.set(xlabel="sequences trained on", ylabel="loss (nats per token)",
                title="training loss (mean of 20 steps); dots: validation")
    ax_bytes.set(xlabel="sequences trained on", ylabel="bytes rank 0 sent", yscale="log", ylim=(1e5, None),
                 title="communication (DiLoCo and local SGD overlap)")
    for ax in (ax_loss, ax_bytes):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _lockstep(rows: list[dict]) -> bool:
    """Whether a run's rows are global steps (not an asynchronous worker's own steps)."""
    versions = [r["ps_version"] for r in rows if "ps_version" in r]
    steps = [r["step"] for r in rows if "ps_version" in r]
    return not versions or versions == steps
