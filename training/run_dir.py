"""The run directory: one lock, one way to write files atomically, the training fingerprint.

A run of `python -m training.train` owns one directory (`--model-dir`). `RunDirectory` is the
context manager around the whole run: on entry it checks that the directory is new or holds an
unfinished run of the same training configuration (its fingerprint), that it can be written
(probed before anything is trained), creates it and locks it (`.lock`, holding the pid, released
on exit); a start that fails (an error, Ctrl-C) before the run saved anything it could resume
from removes the directories it created, so nothing but a resumable run is left behind.

`atomic_write(path)` is how every file of the run, its backup and its weights is written: into a
temporary file of the same folder (`.tmp-<pid>-<name>`), renamed over `path` when complete, so a
process killed at any moment (SIGKILL included) leaves the previous file intact.
`probe_writable` checks a folder that may not exist yet without creating it.

Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import tempfile

from training import recipes
from training.errors import Mention, RunDirError

__all__ = ["RunDirectory", "atomic_write", "write_json", "probe_writable", "new_run_dir",
           "TRAINING_FIELDS", "changed_fields", "RESUMABLE_FILES"]

# Fields of the resolved configuration that change what is trained: a backup may only be resumed
# when they are equal. `deterministic` is one: op determinism selects other CPU kernels
# (measured: BatchNorm scales 3e-4 apart after 12 steps of the tiny test model).
TRAINING_FIELDS = ("model", "dataset", "data_dir", "validation_split", "follow_links", "recipe",
                   "mixed_precision", "use_custom_gradient", "coupling", "seed", "deterministic")
# What a run saves that a rerun resumes from (their absence after a failed start: nothing to keep).
RESUMABLE_FILES = ("backup", "model.weights.h5")
LOCK_FILE = ".lock"
# Recipe fields added since runs were first written, with the value those runs trained with (the
# field's default): an older config.json without them still resumes.
ADDED_RECIPE_FIELDS = {f.name: f.default for f in dataclasses.fields(recipes.Recipe)
                       if f.name in ("optimizer", "schedule", "warmup")}


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path`; renames it over `path` if the block succeeds.

    Args:
        path: str or path-like of the file to write (its folder must exist).

    Yields:
        `pathlib.Path` of the temporary file (`.tmp-<pid>-<name>`) to write.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    """Writes `obj` as indented JSON to `path`, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def probe_writable(path, parameter):
    """Checks that files can be created in folder `path`, or in the folder that would hold it.

    Creates nothing that stays: the nearest existing folder on the way to `path` gets a temporary
    file, removed at once.

    Args:
        path: str or path-like. A folder, existing or not.
        parameter: str. The parameter named in the error (`"model_dir"`, `"export_dir"`).

    Raises:
        RunDirError: `path` or a folder on the way is a file, or the nearest existing folder
            cannot be written (read-only, no permission, full).
    """
    path = pathlib.Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(parameter, path, f"{existing} is a file, not a folder; pick another "
                          "folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=existing)
    except OSError as e:
        raise RunDirError(parameter, path, [
            f"cannot write in {existing} ({e.strerror}); pick a writable folder for ",
            Mention(parameter)]) from None
    os.close(fd)
    os.unlink(name)


def new_run_dir(root):
    """A path `root/<date-time>` (with `-2`, `-3`, ... if taken) that does not exist yet."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = pathlib.Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = pathlib.Path(root) / f"{stamp}-{n}"
    return path


def changed_fields(old, new):
    """The names of the training fields (recipe fields one by one) that differ."""
    changed = [k for k in new if k != "recipe" and old.get(k) != new[k]]
    old_recipe = old.get("recipe", {})
    return changed + [k for k, v in new.get("recipe", {}).items() if old_recipe.get(k) != v]


def _is_empty_for_a_run(path):
    # worker-<i>/ and .lock: other workers' state and the lock, not another run's files.
    return not any(p for p in path.iterdir()
                   if not p.name.startswith("worker-") and p.name != LOCK_FILE)


class RunDirectory:
    """The lock, checks and clean-up of a run directory, as a context manager.

    Args:
        path: str or path-like. The run directory.
        fingerprint: dict. The run's training fields (see `TRAINING_FIELDS`); an unfinished run in
            `path` is resumed only if its `config.json` holds the same.
        new_dir_advice: str. How to pick another directory, ending the refusal messages.
        shown_as: `(value, prefix)` or None. Name the directory in errors as `value` (the user's
            `--model-dir`) with `prefix` before the reason (a worker's own state folder).
        canonical_model: callable str -> str. Spells a model name as the zoo does, so that an old
            config's `RevNet-38` equals `revnet38`. Defaults to the identity.

    Attributes:
        path: `pathlib.Path`.
        resuming: bool (after entering). The directory holds a run to resume.

    Raises (on entering):
        RunDirError: the directory holds another or a finished run, or other files, cannot be
            written, or is locked by another process.
    """

    def __init__(self, path, fingerprint, new_dir_advice="pick another --model-dir",
                 shown_as=None, canonical_model=lambda name: name):
        self.path = pathlib.Path(path)
        self.fingerprint, self.advice = fingerprint, new_dir_advice
        self.shown_as, self.canonical_model = shown_as, canonical_model
        self.resuming, self._fd, self._created = False, None, []

    def _error(self, reason):
        value, prefix = self.shown_as or (self.path, "")
        return RunDirError("model_dir", value, prefix + reason)

    def _check(self):
        """Whether the directory holds a run to resume; raises `RunDirError` if it may not be used."""
        if not self.path.exists() or (self.path.is_dir() and _is_empty_for_a_run(self.path)):
            return False
        previous = self.path / "config.json"
        if not previous.is_file():
            raise self._error(f"exists and is not a run directory (no config.json); {self.advice}")
        old = json.loads(previous.read_text())
        if old.get("finished"):
            raise self._error(f"holds a finished run ({old.get('command')}); {self.advice}")
        old_fingerprint = dict(old.get("fingerprint", {}))
        old_fingerprint.setdefault("follow_links", False)  # runs of versions before the flag
        old_fingerprint.setdefault("coupling", "additive")  # runs before --coupling
        if isinstance(old_fingerprint.get("recipe"), dict):  # runs before the AdamW fields
            old_fingerprint["recipe"] = {**ADDED_RECIPE_FIELDS, **old_fingerprint["recipe"]}
        if "model" in old_fingerprint:  # runs of earlier versions kept the name as typed
            old_fingerprint["model"] = self.canonical_model(old_fingerprint["model"])
        changed = changed_fields(old_fingerprint, self.fingerprint)
        if changed:
            raise self._error(f"holds an unfinished run with different {', '.join(changed)}; "
                              f"resume it with its own command ({old.get('command')}), or pick "
                              "another --model-dir")
        return True

    def _lock(self):
        import fcntl

        missing = self.path
        while not missing.exists():
            self._created.insert(0, missing)
            missing = missing.parent
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise self._error(f"in use by another training process (pid {pid}); wait for it to "
                              "end, or pick another --model-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        # With the lock held no other process writes here: temporary files are a killed run's.
        for stale in [*self.path.glob(".tmp-*"), *self.path.glob("backup/.tmp-*")]:
            stale.unlink(missing_ok=True)

    def __enter__(self):
        probe_writable(self.path, "model_dir")
        self.resuming = self._check()
        try:
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def has_resumable_state(self):
        """Whether the run saved something a rerun resumes from (a backup or weights)."""
        return any((self.path / name).exists() for name in RESUMABLE_FILES)

    def _remove_created(self):
        if self._created and not self.has_resumable_state():
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in reversed(self._created[:-1]):  # only if empty (another run may be there)
                with contextlib.suppress(OSError):
                    parent.rmdir()
        self._created = []

    def __exit__(self, exc_type, exc, tb):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if exc_type is not None:  # a failed start leaves nothing that cannot be resumed
            self._remove_created()
        return False
