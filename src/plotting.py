"""Figures: a headless matplotlib figure, and saving one atomically as a PNG. Every plot of the project goes
through here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from src.atomic import atomic_path


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (7, 4)) -> tuple[Any, Any]:
    """(figure, axes) from the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write `fig` as a PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def moving_average(values: list[float], window: int) -> list[float]:
    """The trailing mean of each value and the (up to) `window - 1` before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
