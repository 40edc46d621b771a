"""Loss curves (train and validation) of several runs on one figure, from their metrics.jsonl."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from retrolm.errors import InputError
from retrolm.io import atomic_path, read_json
from retrolm.runs import CONFIG_FILE, MODEL_DIR, read_metrics

log = logging.getLogger(__name__)


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    x: str = "tokens",
    smooth: int | None = None,
    title: str | None = None,
) -> Path:
    """Draw train loss (solid) and validation loss (dashed, markers) of each run.

    A small batch's loss jumps by nats from step to step, so the train loss is drawn twice: the
    raw values faintly, and their moving average on top. A run RETRO-fitted from another run of
    the figure (its `train_config.json` names that run as `retrofit`) continues that run's
    decoder, so its curves start where that run's end (a dotted line marks the place).

    Args:
        runs: run folders (each with a metrics.jsonl).
        out: image file to write (format from the suffix, e.g. .png, .svg, .pdf).
        labels: legend names (default: the run folders' names).
        x: "tokens" or "step" on the horizontal axis.
        smooth: moving-average window (records) for the train loss; None: about 1/40 of the
            longest run (1 draws the raw curve only).
        title: figure title.

    Returns:
        The written file.

    Raises:
        InputError: no runs, a run without metrics, or bad labels.
    """
    if not runs:
        raise InputError("give at least one run folder to plot")
    if labels is not None and len(labels) != len(runs):
        raise InputError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    if x not in ("tokens", "step"):
        raise InputError(f"x must be 'tokens' or 'step', got {x!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    all_records = [read_metrics(run) for run in runs]
    for run, records in zip(runs, all_records):
        if not records:
            raise InputError(f"{run}/metrics.jsonl holds no records yet")
    if smooth is None:
        smooth = max(1, max(len(r) for r in all_records) // 40)
    starts = run_starts(runs, all_records, x)
    for i, (run, records) in enumerate(zip(runs, all_records)):
        label = labels[i] if labels is not None else Path(run).resolve().name
        color = f"C{i}"
        start = starts[i]
        if start:
            ax.axvline(start, color=color, ls=":", lw=1)
        train = [r for r in records if "loss" in r]
        xs = [start + r.get(x, r["step"]) for r in train]
        raw = [r["loss"] for r in train]
        if smooth > 1:
            ax.plot(xs, raw, color=color, lw=0.5, alpha=0.25)
        ys = _moving_average(raw, smooth)
        name = f"{label} train" + (f" (mean of {smooth})" if smooth > 1 else "")
        ax.plot(xs, ys, color=color, lw=1.5, label=name)
        valid = [r for r in records if r.get("valid_loss") is not None]
        if valid:
            ax.plot(
                [start + r.get(x, r["step"]) for r in valid],
                [r["valid_loss"] for r in valid],
                color=color,
                ls="--",
                marker="o",
                ms=3,
                label=f"{label} valid",
            )
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "RETRO training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    suffix = out.suffix.lstrip(".") or "png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def run_starts(
    runs: Sequence[str | Path], all_records: Sequence[list[dict]], x: str
) -> list[float]:
    """Where each run's curves start on the `x` axis: 0, or, for a run RETRO-fitted from
    another of `runs` (given as that run's folder or its model folder), where that run's last
    record is (itself shifted the same way)."""
    folders = [Path(run).resolve() for run in runs]
    ends = [max((r.get(x, r["step"]) for r in records), default=0) for records in all_records]
    parent: list[int | None] = []
    for folder in folders:
        try:
            source = read_json(folder / CONFIG_FILE).get("retrofit")
        except (OSError, ValueError, AttributeError):  # no config, or not one: drawn from 0
            source = None
        found = None
        if isinstance(source, str):
            source_folder = Path(source).resolve()
            for j, other in enumerate(folders):
                if other != folder and source_folder in (other, other / MODEL_DIR):
                    found = j
        parent.append(found)
    starts: list[float] = []
    for i in range(len(runs)):
        start, j, seen = 0.0, parent[i], {i}
        while j is not None and j not in seen:  # a chain of retrofits, never a loop
            start += ends[j]
            seen.add(j)
            j = parent[j]
        starts.append(start)
    return starts


def _moving_average(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
