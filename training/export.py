"""Export a trained classifier as a TF SavedModel in the TF Serving layout.

TF Serving watches `<base>/<model>/` and serves the highest integer sub-directory (`1/`, `2/`, ...).
`next_version_dir` picks the next integer, and `export_saved_model` writes into a hidden sibling
directory first and renames it into place, so TF Serving never sees a half-written version.

The exported signature `serving_default` takes `pixels`: float32 `(batch, H, W, C)` raw pixel values
in [0, 255] (normalization is inside the model) and returns `output_0`: float32 `(batch, classes)`
class probabilities.

Example:

```python
path = export.export_saved_model(model, export.next_version_dir("saved_models/revnet38"))
reloaded = tf.saved_model.load(path)
probs = reloaded.signatures["serving_default"](pixels=images)["output_0"]
```
"""

from __future__ import annotations

import os
import pathlib
import shutil

__all__ = ["next_version_dir", "check_export_dir", "export_saved_model"]


def next_version_dir(model_root):
    """Returns `model_root/<n>` with `n` one more than the largest integer sub-directory (or 1).

    Args:
        model_root: str or path-like, e.g. `saved_models/revnet38`.

    Returns:
        `pathlib.Path`.
    """
    root = pathlib.Path(model_root)
    versions = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if (
        root.is_dir()
    ) else []
    return root / str(max(versions, default=0) + 1)


def check_export_dir(export_dir):
    """Raises `ValueError` if `export_dir` exists and is not an empty directory.

    Called before training so a run does not fail only at the very end.
    """
    path = pathlib.Path(export_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"--export-dir {path}: already exists and is not empty; pick a new directory (the "
            "default is the next free saved_models/<model>/<version>/)"
        )


def export_saved_model(model, export_dir, verbose=False):
    """Writes `model` as a TF SavedModel (`model.export(..., format="tf_saved_model")`), atomically.

    Args:
        model: a built `keras.Model`.
        export_dir: str or path-like. Final directory; must not exist or be empty.
        verbose: bool. Let Keras print the exported endpoints.

    Returns:
        `pathlib.Path` of the export.

    Raises:
        ValueError: if `export_dir` exists and is not empty.
    """
    final = pathlib.Path(export_dir)
    check_export_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=verbose)
        if final.exists():  # an empty directory: os.replace cannot replace it on every platform
            final.rmdir()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
