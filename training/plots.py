"""Training-curve plots (matplotlib): loss, accuracy and learning rate per epoch from the CSV log.

Example:

```python
plots.plot_training_curves("runs/revnet38/20261130-120000/training_log.csv", "curves.png")
```
"""

from __future__ import annotations

import csv
import pathlib

__all__ = ["read_log", "plot_training_curves", "plot_confusion_matrix"]


def read_log(csv_path):
    """Reads a `keras.callbacks.CSVLogger` file into a dict of column -> list of floats.

    Rows repeated for the same epoch (a run resumed in the middle of that epoch) keep the last.

    Args:
        csv_path: path-like.

    Returns:
        dict. `{"epoch": [...], "loss": [...], ...}`, sorted by epoch; empty if there is no file.
    """
    path = pathlib.Path(csv_path)
    if not path.is_file():
        return {}
    with open(path) as f:
        rows = {}
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = row
    columns = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def plot_training_curves(csv_path, png_path, title=None):
    """Writes a PNG with loss, accuracy (train and test) and learning rate against epoch.

    Args:
        csv_path: path-like. The run's `training_log.csv`.
        png_path: path-like. Output PNG.
        title: str or None. Figure title.

    Returns:
        `pathlib.Path` of the PNG, or None if the log has no rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(csv_path)
    if not log.get("epoch"):
        return None
    epochs = [e + 1 for e in log["epoch"]]
    panels = [("loss", "loss (with weight decay)"), ("accuracy", "top-1 accuracy")]
    if "top5_accuracy" in log:
        panels.append(("top5_accuracy", "top-5 accuracy"))
    if "learning_rate" in log:
        panels.append(("learning_rate", "learning rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        if key in log:
            ax.plot(epochs, log[key], marker="o", label="train")
        if f"val_{key}" in log:
            ax.plot(epochs, log[f"val_{key}"], marker="o", label="test")
        if key == "learning_rate" and min(log[key]) > 0:  # a schedule may end at 0
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key != "learning_rate":
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plot_confusion_matrix(matrix, class_names, png_path, title=None):
    """Writes a PNG of a confusion matrix (rows: true class, columns: predicted class).

    Args:
        matrix: int array `(K, K)`.
        class_names: list of K str.
        png_path: path-like.
        title: str or None.

    Returns:
        `pathlib.Path` of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(matrix)
    k = len(class_names)
    size = min(2 + 0.45 * k, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if k <= 50:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
