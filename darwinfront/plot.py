"""`darwinfront front JOB --plot front.png`: the front as a picture, with matplotlib and no display.

matplotlib is an optional extra (`pip install darwinfront[plot]`); the figure is built on the Agg canvas
directly (no pyplot), so it works in a server, a thread or a notebook alike.
"""

from __future__ import annotations

from pathlib import Path

from darwinfront.core.errors import DarwinfrontError
from service.schemas import Front


def front_figure(front: Front, *, dense_params: int | None = None, title: str | None = None):
    """A matplotlib Figure of the front: its first objective (the quality, KL) against its second (the cost:
    parameters, bits, memory), one colour per target, the front as a step line (a third objective, a joint job's
    latency, is left to the table: the points are then drawn without the line).

    Args:
        front: The job's front.
        dense_params: The dense model's size; when given and the cost is in parameters, a top axis shows the
            fraction of it kept.
        title: Defaults to the job id and generation.

    Raises:
        DarwinfrontError: matplotlib is missing, or the front has fewer than two objectives.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DarwinfrontError("plotting needs matplotlib: pip install 'darwinfront[plot]'") from exc
    if len(front.objectives) < 2:
        raise DarwinfrontError(f"a front plot needs two objectives, this front has {len(front.objectives)}")
    quality, cost, *others = front.objectives  # a third (a joint job's latency) is in the table, not the plot
    figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    points = sorted(front.points, key=lambda p: p.objectives[cost.name])
    if points and not others:  # with more objectives the projection is no staircase
        ax.step([p.objectives[cost.name] for p in points], [p.objectives[quality.name] for p in points],
                where="post", color="0.75", linewidth=1, zorder=1)
    for target in dict.fromkeys(p.target for p in points):
        group = [p for p in points if p.target == target]
        label = "front" if target is None else f"target {target:g}"
        ax.scatter([p.objectives[cost.name] for p in group], [p.objectives[quality.name] for p in group],
                   label=label, s=36, zorder=2, edgecolors="white", linewidths=0.8)
    ax.set_xlabel(f"{cost.name} ({cost.unit})")
    ax.set_ylabel(f"{quality.name} ({quality.unit})")
    ax.grid(True, color="0.92")
    if dense_params and cost.unit == "parameters":
        top = ax.secondary_xaxis("top", functions=(lambda x: x / dense_params, lambda f: f * dense_params))
        top.set_xlabel("fraction of the dense model")
    if len({p.target for p in points}) > 1:
        ax.legend(frameon=False)
    generation = "final" if front.generation is None else f"generation {front.generation}"
    ax.set_title(title or f"job {front.job_id}: {len(points)} points ({generation})", fontsize=10)
    return figure


def plot_front(front: Front, path: Path, *, dense_params: int | None = None) -> Path:
    """Render the front to an image file (the format follows the suffix: .png, .svg, .pdf)."""
    path = Path(path)
    front_figure(front, dense_params=dense_params).savefig(path)
    return path
