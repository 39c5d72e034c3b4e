"""The figures of `fastcaps evaluate`: reconstructions, the perturbation grid, training curves, MultiMNIST pairs.

They need matplotlib (`pip install 'fastcaps[viz]'`); figure_class() says so with a ConfigError.
No pyplot: no GUI backend and no global state. Every PNG is written atomically.
"""
import io

import numpy as np

from .errors import ConfigError
from .runs import write_atomic

__all__ = ["figure_class", "have_matplotlib", "save_png", "save_reconstructions", "save_perturbations",
           "save_training_curves"]


def figure_class():
    """matplotlib's Figure class, or a ConfigError naming the install command."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError as err:
        raise ConfigError("the figures need matplotlib: pip install 'fastcaps[viz]' "
                          "(or pip install matplotlib)") from err
    return Figure


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_png(fig, path):
    """The figure as a PNG file, written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


def save_reconstructions(path, images, reconstructions, labels, predictions):
    Figure = figure_class()
    n = len(images)
    fig = Figure(figsize=(1.1 * n, 2.6))
    axes = fig.subplots(2, n, squeeze=False)
    for k in range(n):
        for row, picture in enumerate((images[k], reconstructions[k])):
            axes[row, k].imshow(picture.squeeze(0).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
        axes[0, k].set_title(f"label {int(labels[k])}", fontsize=8)
        axes[1, k].set_title(f"pred {int(predictions[k])}", fontsize=8)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    save_png(fig, path)


def save_perturbations(path, grids, titles, perturbations):
    """One panel per image: rows = the 16 capsule dimensions, columns = the perturbations
    ([steps] tensor, the paper's -0.25 .. +0.25) that made the grids' columns."""
    Figure = figure_class()
    fig = Figure(figsize=(4.2 * len(grids), 6.6))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, grid, title in zip(axes, grids, titles):
        dims, steps = grid.shape[:2]
        # tile with a 2-pixel gap so the digits stay apart
        canvas = np.ones((dims * 30, steps * 30), dtype=np.float32)
        for d in range(dims):
            for s in range(steps):
                canvas[d * 30:d * 30 + 28, s * 30:s * 30 + 28] = grid[d, s].numpy()
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([s * 30 + 14 for s in range(steps)], [f"{v:+.2f}" for v in perturbations.tolist()],
                      fontsize=6, rotation=90)
        ax.set_yticks([d * 30 + 14 for d in range(dims)], [str(d) for d in range(dims)], fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("perturbation")
        ax.set_ylabel("capsule dimension")
    save_png(fig, path)


def save_training_curves(path, records):
    """Training loss and error (lines) and test ones after every epoch (dots) against epochs."""
    Figure = figure_class()
    epochs = [r for r in records if r["kind"] == "epoch"]
    train = [r for r in records if r["kind"] == "progress"] or epochs  # per --log-every steps if logged
    x_train, x_test = [r["epochs_done"] for r in train], [r["epochs_done"] for r in epochs]
    fig = Figure(figsize=(10, 3.8))
    loss_ax, error_ax = fig.subplots(1, 2)
    loss_ax.plot(x_train, [r["train_loss"] for r in train], label="train (shifted inputs)")
    loss_ax.plot(x_test, [r["test_loss"] for r in epochs], "o-", label="test")
    loss_ax.set(ylabel="margin + 0.0005 SSE", title="loss")
    error_ax.plot(x_train, [100 - r["train_acc"] for r in train], label="train (shifted inputs)")
    error_ax.plot(x_test, [r["test_error"] for r in epochs], "o-", label="test")
    error_ax.set(ylabel="error %", title="classification error")
    for ax in (loss_ax, error_ax):
        ax.set(xlabel="epoch", yscale="log")
        ax.legend()
    save_png(fig, path)
