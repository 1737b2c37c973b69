"""The loss curve of a run (train and validation loss against optimizer step) as a PNG."""
from __future__ import annotations

from pathlib import Path

from src.plotting import moving_average, new_figure, save_figure
from src.run_files import read_loss_curves

SMOOTH_FROM = 40  # with more train points than this, a moving average is drawn over the faint raw curve
LOG_FROM = 4.0  # a loss range wider than this factor (a from-scratch run starts near ln V) is drawn on a log axis


def plot_metrics(proj_dir: Path, png_path: Path, title: str = "") -> None:
    """Loss (and validation loss) against optimizer step from the run's metrics, written atomically as a PNG.
    Long runs get a moving average over the faint raw curve; a range wider than `LOG_FROM`x gets a log axis, so
    the first steps of a from-scratch run do not flatten the rest; the last values are in the legend."""
    train, val = read_loss_curves(proj_dir)
    fig, ax = new_figure()
    steps, losses = list(train), list(train.values())
    if losses:
        if len(losses) > SMOOTH_FROM:
            window = max(5, len(losses) // 25)
            ax.plot(steps, losses, lw=0.6, alpha=0.35, color="C0")
            smooth = moving_average(losses, window)
            ax.plot(steps, smooth, lw=1.6, color="C0",
                    label=f"train loss ({window}-step mean; last {smooth[-1]:.3f})")
        else:
            ax.plot(steps, losses, lw=1.2, color="C0", label=f"train loss (last {losses[-1]:.3f})")
    if val:
        ax.plot(list(val), list(val.values()), "o-", color="C1", label=f"val loss (last {list(val.values())[-1]:.3f})")
    every = losses + list(val.values())
    if every and min(every) > 0 and max(every) / min(every) > LOG_FROM:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, png_path)
