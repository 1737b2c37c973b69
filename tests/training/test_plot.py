"""The run's loss curve (src/training/plot.py): a log axis when a from-scratch run's first steps would flatten the
rest, a moving average over long runs, the last values in the legend, a PNG on disk."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from src.plotting import moving_average
from src.run_files import metrics_path
from src.training import plot


def write_metrics(proj: Path, losses: list[float], val: dict[int, float]) -> None:
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    rows += [{"step": s, "val_loss": v} for s, v in val.items()]
    metrics_path(proj).write_text("".join(json.dumps(r) + "\n" for r in rows))


def drawn(proj: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The axes plot_metrics draws (and the PNG it writes)."""
    seen: list[Any] = []
    real = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: (seen.append(fig.axes[0]), real(fig, path)))
    plot.plot_metrics(proj, proj / "loss.png", title="bone: runs/x")
    assert (proj / "loss.png").stat().st_size > 1000
    return seen[0]


def test_from_scratch_curve_is_on_a_log_axis_with_a_moving_average(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    losses = [1.0 + 10.0 * math.exp(-i / 10) + 0.05 * (-1) ** i for i in range(150)]
    write_metrics(tmp_path, losses, {50: 1.4, 100: 1.1, 150: 1.0})
    ax = drawn(tmp_path, monkeypatch)
    assert ax.get_yscale() == "log" and ax.get_title() == "bone: runs/x"
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("6-step mean" in s for s in labels) and any("val loss (last 1.000)" in s for s in labels)


def test_short_fine_tune_curve_stays_linear_and_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path, [3.5, 2.0, 1.6, 1.4, 1.3], {5: 1.28})
    ax = drawn(tmp_path, monkeypatch)
    assert ax.get_yscale() == "linear"
    assert [line.get_label() for line in ax.get_lines()] == ["train loss (last 1.300)", "val loss (last 1.280)"]


def test_moving_average() -> None:
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
