"""The loss curve of a run (train and validation loss against optimizer step) as a PNG."""
from __future__ import annotations

import json
from pathlib import Path

from src.plotting import new_figure, save_figure


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss (and validation loss) against optimizer step, written atomically as a PNG."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
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
