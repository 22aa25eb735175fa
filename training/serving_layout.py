"""The TF Serving directory layout: a model base path holding integer versions, written atomically.

TF Serving watches a *model base path* (e.g. `saved_models/revnet38/`) and serves the highest
integer sub-directory (`1/`, `2/`, ...) unless its `model_version_policy` pins others. A version
appears here in one step:

1. **Reserve** the next number `n` by creating `.pending-<n>/` with `os.mkdir`, which is atomic: of
   two processes that try the same `n`, exactly one succeeds and the other moves on to `n + 1`. A
   number whose final directory `<n>/` already exists is skipped, so a version is never reused.
2. **Write** the SavedModel into `.pending-<n>/` (TF Serving ignores names that are not integers).
3. **Publish** it with `os.rename(".pending-<n>", "<n>")`, atomic on one filesystem: a server never
   sees a half-written version. If writing fails, `.pending-<n>/` is removed and nothing remains.

A process killed between steps 1 and 3 leaves a hidden `.pending-<n>/` (never served; later exports
skip `n`); delete it by hand.

This module uses only the standard library (no TensorFlow).

Example:

```python
version, path = serving_layout.write_new_version(
    "saved_models/revnet38", lambda tmp, version: tf.saved_model.save(module, str(tmp)))
```
"""

from __future__ import annotations

import os
import pathlib
import shutil

from training.errors import RunDirError

__all__ = ["PENDING_PREFIX", "list_versions", "reserve_version", "write_new_version",
           "check_base_path"]

PENDING_PREFIX = ".pending-"


def list_versions(base_path):
    """Returns the sorted integer versions under `base_path` (`[]` if it does not exist).

    Args:
        base_path: str or path-like. The model base path, e.g. `saved_models/revnet38`.

    Returns:
        list of int. Names of the sub-directories that are non-negative integers, as TF Serving
        reads them (`.pending-*` and other names are ignored).
    """
    root = pathlib.Path(base_path)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def check_base_path(base_path):
    """Raises `RunDirError` (a `ValueError`) if `base_path` cannot be a model base path.

    It may be missing (it is created) or a directory of versions; it must not be a file or a
    SavedModel itself (a common mistake: passing `saved_models/revnet38/1` instead of its parent).

    Args:
        base_path: str or path-like.

    Raises:
        training.errors.RunDirError: one line (parameter `export_dir`) with the fix.
    """
    root = pathlib.Path(base_path)
    if root.exists() and not root.is_dir():
        raise RunDirError("export_dir", root, "is a file; give the model base path, a directory "
                          "that holds (or will hold) the numbered versions")
    if (root / "saved_model.pb").exists():
        raise RunDirError("export_dir", root, "is itself a SavedModel; give the model base path "
                          f"(e.g. its parent {root.parent}): each export adds a new numbered "
                          "version")


def reserve_version(base_path):
    """Atomically reserves the next free version number under `base_path`.

    Args:
        base_path: str or path-like. Created (with parents) if missing.

    Returns:
        `(version, pending_dir)`: int `n` (one more than the highest existing or reserved version)
        and the `pathlib.Path` of the reserved, empty `base_path/.pending-<n>/`.

    Raises:
        ValueError: if `base_path` is not usable (see `check_base_path`).
    """
    root = pathlib.Path(base_path)
    check_base_path(root)
    root.mkdir(parents=True, exist_ok=True)
    pending = [int(p.name[len(PENDING_PREFIX):]) for p in root.iterdir()
               if p.name.startswith(PENDING_PREFIX) and p.name[len(PENDING_PREFIX):].isdigit()]
    version = max(list_versions(root) + pending, default=0) + 1
    while True:
        pending_dir = root / f"{PENDING_PREFIX}{version}"
        try:
            os.mkdir(pending_dir)
        except FileExistsError:  # another export holds this number
            version += 1
            continue
        if (root / str(version)).exists():
            # Another export published `version` between our listing and our mkdir.
            os.rmdir(pending_dir)
            version += 1
            continue
        return version, pending_dir


def write_new_version(base_path, write_fn):
    """Reserves a new version, lets `write_fn` fill it, and publishes it atomically.

    Args:
        base_path: str or path-like. The model base path.
        write_fn: callable `write_fn(directory, version)`: `directory` is the `pathlib.Path` of
            the existing, empty directory to write into, `version` the reserved int. Its return
            value is ignored.

    Returns:
        `(version, path)`: int and the `pathlib.Path` of the published `base_path/<version>/`.

    Raises:
        ValueError: if `base_path` is not usable.
        Exception: whatever `write_fn` raises, after removing the partial directory.
    """
    root = pathlib.Path(base_path)
    version, pending_dir = reserve_version(root)
    final = root / str(version)
    try:
        write_fn(pending_dir, version)
        os.rename(pending_dir, final)  # atomic; nobody else can create `final` (we hold `version`)
    except BaseException:
        shutil.rmtree(pending_dir, ignore_errors=True)
        raise
    return version, final
