"""`training/run_dir.py`: atomic writes, the writability probe, the lock and a failed start."""

import json
import os

import pytest

from training import run_dir
from training.errors import RunDirError


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "a.json"
    run_dir.write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with run_dir.atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


@pytest.mark.parametrize("where", ["read_only_fs", "under_a_file"])
def test_probe_names_the_folder_that_cannot_be_written(where, tmp_path):
    if where == "read_only_fs":  # sysfs refuses new files, even to root
        path, existing = "/sys/kernel/revnet_run/x", "/sys/kernel"
    else:
        (tmp_path / "file").write_text("x")
        path, existing = tmp_path / "file" / "run", tmp_path / "file"
    with pytest.raises(RunDirError) as error:
        run_dir.probe_writable(path, "model_dir")
    assert error.value.parameter == "model_dir" and str(existing) in error.value.reason
    run_dir.probe_writable(tmp_path / "new" / "run", "model_dir")  # nothing created
    assert not (tmp_path / "new").exists()


def test_failed_start_removes_only_what_it_created(tmp_path):
    path = tmp_path / "runs" / "a" / "run"
    with pytest.raises(ValueError):
        with run_dir.RunDirectory(path, {"seed": 0}):
            assert (path / ".lock").read_text() == str(os.getpid())
            raise ValueError("bad data")
    assert not (tmp_path / "runs").exists()
    # A run that saved a backup is kept (it resumes); so is a folder that existed before.
    with pytest.raises(KeyboardInterrupt):
        with run_dir.RunDirectory(path, {"seed": 0}):
            (path / "backup").mkdir()
            raise KeyboardInterrupt
    assert (path / "backup").is_dir()
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(ValueError):
        with run_dir.RunDirectory(other, {"seed": 0}):
            raise ValueError("bad data")
    assert other.is_dir()


def test_lock_refuses_a_second_process_and_is_released(tmp_path):
    path = tmp_path / "run"
    with run_dir.RunDirectory(path, {"seed": 0}) as first:
        assert first.resuming is False
        with pytest.raises(RunDirError, match=f"in use by another training process \\(pid "
                                              f"{os.getpid()}\\)"):
            with run_dir.RunDirectory(path, {"seed": 0}):
                pass
    with run_dir.RunDirectory(path, {"seed": 0}):  # released: a new process may take it
        pass


def test_refusals_name_the_directory_and_the_advice(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"finished": True, "command": "c"}))
    with pytest.raises(RunDirError) as error:
        with run_dir.RunDirectory(path, {}, new_dir_advice="pick a new --model-dir"):
            pass
    assert error.value.reason == "holds a finished run (c); pick a new --model-dir"
    (path / "config.json").write_text(json.dumps(
        {"command": "c", "fingerprint": {"seed": 1, "recipe": {"epochs": 2}}}))
    with pytest.raises(RunDirError, match="with different seed, epochs; resume it with its own "
                                          "command \\(c\\)"):
        with run_dir.RunDirectory(path, {"seed": 0, "recipe": {"epochs": 3}}):
            pass
