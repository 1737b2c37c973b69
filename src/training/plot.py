"""The loss curve of a run (train and validation loss against optimizer step) as a PNG."""
from __future__ import annotations

from pathlib import Path

from src.plotting import new_figure, save_figure
from src.run_files import read_loss_curves


def plot_metrics(proj_dir: Path, png_path: Path) -> None:
    """Loss (and validation loss) against optimizer step from the run's metrics, written atomically as a PNG."""
    train, val = read_loss_curves(proj_dir)
    fig, ax = new_figure()
    if train:
        ax.plot(list(train), list(train.values()), label="train loss", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)
