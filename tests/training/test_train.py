"""End-to-end tests of `python -m training.train` (training/train.py) on real CIFAR-10 images.

A tiny RevNet (`RevNet(units=[1, 1], widths=[8, 8, 16])`, registered as `tiny_revnet` through
`train.MODEL_BUILDERS`) trains for a few steps on 128 real training images; the zoo's names are
checked through the parser only. The run is the session fixture `trained` of conftest.py (shared
with the export, predict and evaluate tests). The resume test kills a run in a subprocess with
SIGKILL in the middle of epoch 2 and resumes it here.
"""

import csv
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import tf_revnet.diagnostics
from tests.training import hostile_images as hostile
from tests.training.conftest import BATCH, EPOCHS, STEPS, run_captured, small_run_args
from training import classifier, command_line, plots, report, run_dir, train
from training import data as data_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shared run (tests/training/conftest.py): `trained`, `_small_run_args`, `_run_captured`.
_small_run_args, _run_captured = small_run_args, run_captured


def _h5_arrays(path):
    arrays = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def _assert_same_weights(path_a, path_b, atol=0.0):
    a, b = _h5_arrays(path_a), _h5_arrays(path_b)
    assert sorted(a) == sorted(b) and len(a) > 10
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def test_training_runs_and_logs_every_epoch(trained):
    result, _, model_dir, _ = trained
    losses = result.history["loss"]
    assert len(losses) == EPOCHS and all(np.isfinite(losses))
    with open(model_dir / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], losses, rtol=1e-6)
    # The learning rate (of the next step) after each epoch follows the step schedule: 0.05,
    # divided by 10 after 50% and 75% of the 12 steps (steps 6 and 9).
    np.testing.assert_allclose([float(r["learning_rate"]) for r in rows], [0.05, 0.005, 0.0005],
                               rtol=1e-6)
    assert all(float(r["images_per_second"]) > 0 for r in rows)
    assert "val_accuracy" in rows[0]


def test_tensorboard_has_loss_accuracy_learning_rate_and_throughput(trained):
    import tensorflow as tf

    _, _, model_dir, _ = trained
    tags = set()
    for path in (model_dir / "logs").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate",
                "epoch_images_per_second"):
        assert tag in tags, sorted(tags)


def test_prints_summary_and_writes_artifacts(trained):
    result, stdout, model_dir, export_dir = trained
    lines = [line for line in stdout.splitlines() if line.startswith("Test accuracy:")]
    assert len(lines) == 1, stdout[-2000:]
    match = re.fullmatch(r"Test accuracy: (\d\.\d{4})", lines[0])
    assert match, lines[0]
    assert abs(float(match.group(1)) - result.test_accuracy) < 1e-4
    # 32 test images: accuracy is a multiple of 1/32; it is the last epoch's validation (no
    # second evaluation pass).
    assert abs(result.test_accuracy * 32 - round(result.test_accuracy * 32)) < 1e-4
    assert result.test_accuracy == pytest.approx(result.history["val_accuracy"][-1])
    assert "Evaluating" not in stdout
    for label in ("Training time:", "images/s", "Peak memory:"):
        assert label in stdout, label
    # The summary says which version was written and how to pin it; it never prints "None".
    assert f"Exported version 1 to {export_dir}" in stdout
    assert "model_version_policy { specific { versions: 1 } }" in stdout
    assert "None" not in stdout[stdout.index("Summary:"):]
    assert result.export_dir == export_dir

    assert (export_dir / "saved_model.pb").is_file()
    assert (model_dir / "model.weights.h5").is_file()
    assert (model_dir / "model.keras").is_file()
    export_info = json.loads((export_dir / "assets.extra" / "export.json").read_text())
    assert export_info["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert export_info["class_names"][3] == "cat"
    assert export_info["run_config"]["model"] == "tiny_revnet"
    assert export_info["run_config"]["finished"] is True
    assert not (model_dir / "backup").exists(), "the backup is removed when the run is complete"
    assert not list(model_dir.glob(".tmp-*")) and not list(export_dir.parent.glob(".tmp-*"))
    png = (model_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert summary["best_test_accuracy"] >= summary["test_accuracy"]
    assert summary["peak_rss_mb"] > 100 and summary["images_per_second"] > 0

    config = json.loads((model_dir / "config.json").read_text())
    assert config["finished"] is True
    assert config["model"] == "tiny_revnet"
    assert config["recipe"]["batch_size"] == BATCH
    assert config["recipe"]["learning_rate"] == 0.05
    assert config["recipe"]["weight_decay"] == 2e-4  # from the paper's recipe
    assert config["steps_per_epoch"] == STEPS and config["total_steps"] == EPOCHS * STEPS
    assert config["num_train"] == 128 and config["num_test"] == 32
    assert config["class_names"][0] == "airplane" and config["class_names"][-1] == "truck"


def test_model_takes_raw_pixels_and_decays_kernels_only(trained):
    import keras

    result, _, _, _ = trained
    model = result.model
    assert model.inputs[0].dtype == "float32" and tuple(model.inputs[0].shape) == (None, 32, 32, 3)
    normalizer = model.get_layer("normalization")
    mean = keras.ops.convert_to_numpy(normalizer.mean).reshape(-1)
    std = np.sqrt(keras.ops.convert_to_numpy(normalizer.variance).reshape(-1))
    # Per-channel statistics of CIFAR-10 pixels (about 125/123/114 and 63/62/67 on the full set).
    assert np.all((mean > 100) & (mean < 140)), mean
    assert np.all((std > 50) & (std < 80)), std
    # Weight decay came through the builder's kernel_regularizer: every convolution and the
    # classifier kernel, no BatchNorm parameter or bias.
    decayed = [v.path for v in model.trainable_weights if v.regularizer is not None]
    kernels = [v.path for v in model.trainable_weights if v.path.endswith("/kernel")]
    assert decayed and sorted(decayed) == sorted(kernels)
    assert not any("gamma" in p or "beta" in p or "bias" in p for p in decayed)
    assert float(model.optimizer.iterations.numpy()) == EPOCHS * STEPS


@pytest.mark.slow  # the suite's SIGKILL test also compares two processes without --deterministic
def test_seed_alone_repeats_a_run_exactly(trained, cifar10_small_dir, tmp_path):
    _, _, model_dir, _ = trained
    again = tmp_path / "again"
    result, _ = _run_captured(_small_run_args(cifar10_small_dir, again, tmp_path / "e" / "1"))
    assert not isinstance(result, Exception), result
    _assert_same_weights(model_dir / "model.weights.h5", again / "model.weights.h5")
    # (Another seed gives other batches and augmentation: tests/training/test_data.py.)


def test_export_serves_the_trained_model(trained, cifar10_small_dir):
    """The run's version 1 gives the trained model's probabilities through its uint8 signature at
    two batch sizes. (That serving needs no tf_revnet is checked once, in a fresh process, in
    test_predict.py.)"""
    import tensorflow as tf

    result, _, _, export_dir = trained
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=9)
    images = np.stack([x.numpy() for x, _ in datasets.test]).astype("float32")
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    assert sorted(serve.structured_input_signature[1]) == ["images"]
    for batch in (images[:1], images[1:8]):
        want = result.model.predict(batch, verbose=0)
        got = serve(images=tf.constant(batch.astype(np.uint8)))["probabilities"].numpy()
        assert got.shape == want.shape == (len(batch), 10)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-5, f"batch of {len(batch)}: max abs diff {diff:.2e}"


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import keras
    import tf_revnet.models
    from training import classifier, train

    classifier.MODEL_BUILDERS["tiny_revnet"] = lambda **kw: tf_revnet.models.RevNet(
        units=[1, 1], widths=[8, 8, 16], name="tiny", **kw)

    class StallAt(keras.callbacks.Callback):
        # Tells the test, then waits to be killed, after global step `step`.
        def __init__(self, step):
            super().__init__()
            self.step = step

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == self.step:
                print("STALLED", flush=True)
                time.sleep(600)

    train.run(sys.argv[2:], callbacks=[StallAt(int(sys.argv[1]))])
    """
)


def _cli(script, stall_step, argv):
    return subprocess.Popen([sys.executable, str(script), str(stall_step), *argv],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_sigkill_in_epoch_two_resumes_to_the_same_weights(trained, cifar10_small_dir, tmp_path,
                                                          capsys):
    """3 epochs of 4 steps, backups every 2 steps; killed after step 7 (epoch 2, batch 3), whose
    update was not saved: the rerun (in this process) restores step 6 and ends with the weights
    of the uninterrupted run of the `trained` fixture (same options and seed).
    """
    _, _, reference_dir, _ = trained
    script = tmp_path / "cli.py"
    script.write_text(RESUME_SCRIPT)
    extra = ["--save-every-steps", "2"]
    args = _small_run_args(cifar10_small_dir, tmp_path / "run", tmp_path / "x" / "2", extra=extra)
    victim = _cli(script, 7, args)
    try:
        line = ""
        deadline = time.time() + 240
        while "STALLED" not in line and time.time() < deadline and victim.poll() is None:
            line = victim.stdout.readline()
        assert "STALLED" in line, victim.stderr.read()[-3000:]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    metadata = json.loads((tmp_path / "run" / "backup" / "training_metadata.json").read_text())
    assert metadata["step"] == 6 and metadata["epoch"] == 1
    assert not (tmp_path / "x" / "2").exists()

    # Resumed in this process (the backup on disk is all it shares with the killed one), with
    # --no-export (not part of what a resume must repeat): nothing is exported and the summary
    # says so.
    resumed, out = _run_captured(args + ["--no-export"])
    assert not isinstance(resumed, Exception), resumed
    assert "Resuming at step 6 of 12 (epoch 2, batch 2)" in out, out
    # Two fit calls (the rest of epoch 2, then epoch 3), numbered out of the run's 3 epochs.
    assert re.findall(r"^Epoch \d+/\d+$", out, flags=re.M) == ["Epoch 2/3", "Epoch 3/3"], out
    assert resumed.export_dir is None and not (tmp_path / "x" / "2").exists()
    assert (f"Export: skipped (--no-export); export later with python -m training.export "
            f"--model-dir {tmp_path / 'run'}") in out, out
    assert "Exported" not in out and "None" not in out[out.index("Summary:"):]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export_dir"] is None and summary["export_version"] is None
    _assert_same_weights(reference_dir / "model.weights.h5", tmp_path / "run" / "model.weights.h5",
                         atol=1e-6)
    with open(tmp_path / "run" / "training_log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    assert not (tmp_path / "run" / "backup").exists()
    # A new command on the finished run directory: refused in one line, nothing is written.
    # (That `python -m training.train` adds no TensorFlow start-up line to such errors:
    # test_command_line_starts_without_tensorflow_noise, slow; the suite checks the shared
    # start-up filter on `python -m training.predict` in test_predict.py.)
    capsys.readouterr()
    assert train.main(["--model-dir", str(tmp_path / "run"), "--export-dir",
                       str(tmp_path / "x" / "3")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"python -m training.train: error: --model-dir {tmp_path / 'run'}: holds a finished run "
        f"({' '.join(['python -m training.train'] + args + ['--no-export'])}); pick a new "
        "--model-dir or leave it "
        "out (a new runs/<model>/<time>)"], err
    assert not (tmp_path / "x" / "3").exists()


@pytest.mark.slow  # one TensorFlow start-up per command (the suite: predict, in test_predict.py)
@pytest.mark.parametrize("module", ["training.train", "training.export", "training.evaluate"])
def test_command_line_starts_without_tensorflow_noise(module, tmp_path):
    """`python -m training.train|export|evaluate` import TensorFlow at start-up: a one-line error
    (a directory that is not a run) is all their stderr holds: no absl, cudart, cuInit or
    CPU-instruction line."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    argv = {"training.train": ["--model-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path),
                               "--export-dir", str(tmp_path / "e")],
            "training.export": ["--model-dir", str(tmp_path / "m")],
            "training.evaluate": [str(tmp_path / "m"), "--data-dir", str(tmp_path)]}[module]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"python -m {module}: error: ") and str(tmp_path / "m") in line, line


def _main_error(argv, capsys):
    start = time.time()
    code = train.main(argv)
    elapsed = time.time() - start
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err, elapsed


def test_unknown_model_gives_one_line_error(tmp_path, capsys):
    err, _ = _main_error(["--model", "revnet39", "--model-dir", str(tmp_path)], capsys)
    assert "--model revnet39" in err and "revnet38" in err and "resnet32" in err


@pytest.mark.parametrize("model", ["resnet32", "revvit_cifar"])
def test_coupling_of_a_model_without_one_gives_one_line_error(model, tmp_path, capsys):
    err, _ = _main_error(["--model", model, "--coupling", "fixed_point",
                          "--model-dir", str(tmp_path)], capsys)
    assert "--coupling fixed_point" in err and model in err and "revnet38" in err


def test_unknown_coupling_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--coupling", "affine", "--model-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--coupling" in capsys.readouterr().err


def test_fixed_point_coupling_trains_logs_stream_range_and_reloads(cifar10_small_dir, tmp_path):
    """`--coupling fixed_point`: every block of the run's model has the exact float32 stream, the
    StreamRangeMonitor's count is in the epoch logs, and the run reloads with the same coupling
    (predictions equal the trained model's)."""
    args = small_run_args(cifar10_small_dir, tmp_path / "run", tmp_path / "export", epochs=1,
                          steps=2, extra=["--coupling", "fixed_point", "--no-export"])
    result, out = run_captured(args)
    assert not isinstance(result, Exception), out
    log = (tmp_path / "run" / "training_log.csv").read_text().splitlines()
    assert "revnet_stream_out_of_range" in log[0].split(",")
    model, config = classifier.load_run(tmp_path / "run")
    assert config["coupling"] == "fixed_point"
    # One range-checked block: the tiny RevNet's stage-1 block (stage 2 opens with a transition).
    assert list(tf_revnet.diagnostics.stream_out_of_range(model)) == ["tiny_stage1_block1"]
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0),
                               result.model.predict(images, verbose=0), atol=1e-6)


def test_unknown_dataset_gives_one_line_error(tmp_path, capsys):
    err, _ = _main_error(["--dataset", "no_such_dataset", "--model-dir", str(tmp_path),
                          "--export-dir", str(tmp_path / "export")], capsys)
    assert "--dataset no_such_dataset" in err and "--data-dir" in err


@pytest.mark.parametrize("layout", ["missing", "no_test_split", "no_images", "file"])
def test_bad_data_dir_gives_one_line_error(layout, tmp_path, capsys):
    root = tmp_path / "data"
    if layout == "no_test_split":
        (root / "train" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "0.jpg").write_bytes(b"")
    elif layout == "no_images":
        for split in ("train", "test"):
            (root / split / "cat").mkdir(parents=True)
            (root / split / "cat" / "notes.txt").write_text("no images here")
    elif layout == "file":
        root.write_text("not a directory")
    err, _ = _main_error(["--data-dir", str(root), "--model-dir", str(tmp_path / "m"),
                          "--export-dir", str(tmp_path / "export")], capsys)
    assert err.startswith(f"python -m training.train: error: --data-dir {root}")
    if layout == "no_images":
        assert f"class folder without images in {root / 'train'}: cat" in err
    else:
        assert "DIR/train/<class>" in err and "tar xzf" in err


def test_refused_image_and_bad_max_image_pixels_give_one_line_errors(tmp_path, cifar10_small_dir,
                                                                    capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            good = sorted((cifar10_small_dir / split / label).glob("*.jpg"))[0].read_bytes()
            (root / split / label / "0.jpg").write_bytes(good)
    bomb = root / "train" / "cat" / "bomb.png"
    bomb.write_bytes(hostile.png_of_zeros(20000, 20000))
    common = ["--data-dir", str(root), "--model-dir", str(tmp_path / "m"), "--export-dir",
              str(tmp_path / "e")]
    err, _ = _main_error([*common, "--strict-data", "--max-image-pixels", "50000000"], capsys)
    assert err == (f"python -m training.train: error: --data-dir {root}: refused {bomb}: 20000 x "
                   "20000 pixels x 1 frame = 400000000 pixels, over the limit of 50000000 pixels "
                   "(max_image_pixels); refused before decoding; remove it, raise the limit "
                   "`--max-image-pixels 50000000`, or skip bad files without --strict-data")
    err, _ = _main_error([*common, "--max-image-pixels", "0"], capsys)
    assert err == "python -m training.train: error: --max-image-pixels 0: must be > 0"
    # Above the int64 range (TF's limit tensor): one line too, before any run directory exists.
    unused = tmp_path / "never_made"
    err, _ = _main_error([*common[:2], "--model-dir", str(unused), *common[4:],
                          "--max-image-pixels", "99999999999999999999999"], capsys)
    assert err == ("python -m training.train: error: --max-image-pixels 99999999999999999999999: "
                   "must be at most 9223372036854775807")
    assert not unused.exists()
    # Without --strict-data the run reports the file it left out, with the reason.
    datasets = data_lib.load_image_folder(root, max_image_pixels=50_000_000)
    assert datasets.num_train == 2
    assert report.left_out_lines(datasets) == [
        f"Refused 1 files before decoding: {bomb}: 20000 x 20000 pixels x 1 frame = 400000000 "
        "pixels, over the limit of 50000000 pixels (max_image_pixels); refused before decoding "
        "(--max-image-pixels raises the limit; --strict-data stops instead)"]


def test_offline_without_data_dir_fails_fast(tmp_path, capsys, monkeypatch):
    # No network (forced, so the test does not download on a connected machine) and nothing
    # prepared in an empty TFDS directory: a one-line hint instead of minutes of retries.
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: False)
    err, elapsed = _main_error(["--dataset", "cifar10", "--tfds-data-dir", str(tmp_path / "tfds"),
                                "--model-dir", str(tmp_path / "m"),
                                "--export-dir", str(tmp_path / "export")], capsys)
    assert "--dataset cifar10" in err and "--data-dir" in err
    assert "tar xzf ../shared/data/cifar10-jpeg.tar.gz" in err
    assert elapsed < 30


def test_network_check_is_quick_for_unreachable_host():
    start = time.time()
    assert data_lib.network_available("http://nonexistent.invalid/", timeout=2) is False
    assert time.time() - start < 10


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size",
                   "--steps-per-epoch", "--test-examples", "--model-dir", "--export-dir",
                   "--mixed-precision", "--learning-rate", "--recipe", "--no-export"):
        assert option in out
    assert "python -m training.train --data-dir" in out


def _config(argv):
    return command_line.resolve_config(command_line.build_parser().parse_args(argv), argv)


def _unfinished_run(tmp_path, argv):
    """A run directory as a killed run of `argv` leaves it: config.json and a backup."""
    config = _config(argv)
    model_dir = pathlib.Path(config.model_dir)
    (model_dir / "backup").mkdir(parents=True)
    (model_dir / "backup" / "latest.weights.h5").write_bytes(b"")
    (model_dir / "config.json").write_text(json.dumps(
        {**config.to_dict(), "fingerprint": train._fingerprint(config)}))
    return model_dir


@pytest.mark.parametrize("change, named", [
    (["--model", "resnet32"], "model"),
    (["--learning-rate", "0.2"], "learning_rate"),
    (["--recipe", "quick"], "steps_per_epoch"),
    (["--seed", "3"], "seed"),
    (["--mixed-precision", "mixed_bfloat16"], "mixed_precision"),
    (["--deterministic"], "deterministic"),
    (["--coupling", "fixed_point"], "coupling"),
])
def test_refuses_to_resume_a_different_configuration(change, named, cifar10_small_dir, tmp_path,
                                                     capsys):
    base = ["--data-dir", str(cifar10_small_dir), "--model-dir", str(tmp_path / "model_dir"),
            "--export-dir", str(tmp_path / "e"), "--epochs", "3", "--batch-size", "100"]
    model_dir = _unfinished_run(tmp_path, base)
    err, elapsed = _main_error(base + change, capsys)
    assert f"--model-dir {model_dir}: holds an unfinished run with different" in err
    assert named in err.split("different")[1].split(";")[0], err
    assert "python -m training.train --data-dir" in err  # the command that resumes it
    assert elapsed < 30


def test_run_directory_in_use_is_refused(cifar10_small_dir, tmp_path, capsys):
    """A second process started on the run directory of a run that is still going (it looks
    resumable) stops with one line naming the other process, and writes nothing."""
    import fcntl

    argv = _small_run_args(cifar10_small_dir, tmp_path / "model_dir", tmp_path / "e", epochs=1)
    model_dir = _unfinished_run(tmp_path, argv)
    before = sorted(p.name for p in model_dir.rglob("*"))
    with open(model_dir / ".lock", "w") as lock:  # what a running process holds
        lock.write("4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err, _ = _main_error(argv, capsys)
        assert err == (f"python -m training.train: error: --model-dir {model_dir}: in use by "
                       "another training process (pid 4242); wait for it to end, or pick another "
                       "--model-dir")
    assert sorted(p.name for p in model_dir.rglob("*")) == sorted({*before, ".lock"})
    # Once that process is gone, the lock is free: the same command goes on to restore the
    # backup (an empty file here, refused as truncated), and the temporary files of saves the
    # killed process did not finish are removed.
    (model_dir / ".tmp-4242-model.weights.h5").write_bytes(b"partial")
    (model_dir / "backup" / ".tmp-4242-latest.weights.h5").write_bytes(b"partial")
    err, _ = _main_error(argv, capsys)
    assert f"--model-dir {model_dir}: cannot restore the backup" in err, err
    assert not list(model_dir.rglob(".tmp-*"))


def test_run_stopped_after_its_last_step_evaluates_and_exports_when_restarted(cifar10_small_dir,
                                                                              tmp_path):
    """A run that stops after its last training step (here a callback raises at the end of
    training, before the evaluation and export) says so when restarted, evaluates once (with the
    progress output of its --verbose) and finishes."""
    import keras

    class Crash(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            raise RuntimeError("stopped after the last step")

    argv = _small_run_args(cifar10_small_dir, tmp_path / "run", tmp_path / "e", epochs=1,
                           extra=["--no-export"])
    crashed, _ = _run_captured(argv, callbacks=[Crash()])
    assert isinstance(crashed, RuntimeError), crashed
    finished, out = _run_captured(argv)
    assert not isinstance(finished, Exception), finished
    assert (f"Resuming after the last step ({STEPS} of {STEPS}): training is done, evaluating "
            f"and saving (backup in {tmp_path / 'run' / 'backup'})") in out, out
    assert "Evaluating on the 32 test images\n2/2 - " in out, out  # one line: --verbose 2
    assert finished.history == {} and np.isfinite(finished.test_loss)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finished"]


def test_truncated_checkpoint_gives_one_line_error(cifar10_small_dir, tmp_path, capsys):
    argv = _small_run_args(cifar10_small_dir, tmp_path / "model_dir", tmp_path / "e", epochs=1)
    model_dir = _unfinished_run(tmp_path, argv)
    (model_dir / "backup" / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    err, _ = _main_error(argv, capsys)
    assert f"--model-dir {model_dir}: cannot restore the backup" in err
    assert "truncated or was written by another model" in err


@pytest.mark.parametrize("name", ["RevNet-38", "revnet_38", "REVNET38", "resnet-32", "ResNet_101"])
def test_model_names_as_the_registry_takes_them(name, tmp_path):
    assert _config(["--model", name, "--export-dir", str(tmp_path / "e")]).model == name


@pytest.mark.parametrize("name, recipe", [("revvit_cifar", "vit_cifar"),
                                          ("RevViT-Base", "vit_imagenet"), ("revnet38", "cifar")])
def test_default_recipe_is_the_models(name, recipe, tmp_path):
    assert _config(["--model", name, "--export-dir", str(tmp_path / "e")]).recipe.name == recipe
    assert _config(["--model", name, "--recipe", "quick", "--export-dir",
                    str(tmp_path / "e")]).recipe.name == "quick"


def test_resume_of_a_run_written_before_the_optimizer_fields(cifar10_small_dir, tmp_path):
    """A config.json without `optimizer`, `schedule`, `warmup` (older runs) still resumes; one
    that names another optimizer does not."""
    argv = ["--data-dir", str(cifar10_small_dir), "--model-dir", str(tmp_path / "run"),
            "--export-dir", str(tmp_path / "e")]
    model_dir = _unfinished_run(tmp_path, argv)
    config = json.loads((model_dir / "config.json").read_text())
    for field in ("optimizer", "schedule", "warmup"):
        del config["fingerprint"]["recipe"][field]
    (model_dir / "config.json").write_text(json.dumps(config))
    fingerprint = train._fingerprint(_config(argv))
    with run_dir.RunDirectory(model_dir, fingerprint,
                              canonical_model=classifier.canonical_model_name) as run:
        assert run.resuming is True
    config["fingerprint"]["recipe"]["optimizer"] = "adamw"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(run_dir.RunDirError, match="holds an unfinished run with different optimizer"):
        with run_dir.RunDirectory(model_dir, fingerprint,
                                  canonical_model=classifier.canonical_model_name):
            pass


def test_resume_accepts_another_spelling_of_the_model(tmp_path):
    """`RevNet-38` resumes a run started as `revnet38` (the same model), also from a config.json
    of an earlier version that kept the name as typed; `resnet32` does not."""
    def fingerprint(name):
        return train._fingerprint(_config(["--model", name, "--model-dir", str(tmp_path / "m"),
                                           "--export-dir", str(tmp_path / "e")]))

    def open_run(name):
        with run_dir.RunDirectory(tmp_path / "m", fingerprint(name),
                                  canonical_model=classifier.canonical_model_name) as run:
            return run.resuming

    (tmp_path / "m").mkdir()
    assert fingerprint("revnet38")["model"] == "RevNet38"
    for stored in ("RevNet38", "revnet38"):
        (tmp_path / "m" / "config.json").write_text(json.dumps(
            {"command": "python -m training.train",
             "fingerprint": {**fingerprint("revnet38"), "model": stored}}))
        assert open_run("RevNet-38") is True
        with pytest.raises(run_dir.RunDirError, match="holds an unfinished run with different model"):
            open_run("resnet32")


def test_default_run_dir_is_new_for_each_run(tmp_path):
    dirs = []
    try:
        for _ in range(3):
            path = pathlib.Path(_config(["--export-dir", str(tmp_path / "e")]).model_dir)
            assert path.parent == command_line.REPO_ROOT / "runs" / "revnet38"
            path.mkdir(parents=True)
            dirs.append(path)
        assert len(set(dirs)) == 3
    finally:
        for path in dirs:
            path.rmdir()


def test_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    err, _ = _main_error(["--model-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path),
                          "--export-dir", str(tmp_path / "e")], capsys)
    assert "is not a run directory" in err


def test_curves_plot_reads_a_resumed_log(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,accuracy,loss,val_accuracy,val_loss,learning_rate\n"
                   "0,0.1,2.3,0.1,2.3,0.1\n1,0.2,2.0,0.15,2.1,0.1\n1,0.25,1.9,0.2,2.0,0.1\n")
    columns = plots.read_log(log)
    assert columns["epoch"] == [0, 1] and columns["loss"] == [2.3, 1.9]
    png = plots.plot_training_curves(log, tmp_path / "c.png")
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # the suite keeps the data-level ImageNet tests (tests/training/test_data.py)
def test_imagenet_recipe_on_mixed_size_jpegs(mixed_size_jpegs, tmp_path):
    """The ImageNet recipe end to end on real photos of several sizes (tiny model, 24x24 crops)."""
    result, stdout = _run_captured([
        "--recipe", "imagenet", "--model", "tiny_revnet", "--data-dir", str(mixed_size_jpegs),
        "--image-size", "24", "--batch-size", "4", "--epochs", "2", "--verbose", "0",
        "--model-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "e" / "1")])
    assert not isinstance(result, Exception), result
    assert "Recipe imagenet: 2 epochs x 2 steps of batch 4" in stdout
    assert result.config["image_shape"] == [24, 24, 3] and result.config["total_steps"] == 4
    assert "val_top5_accuracy" in result.history  # top-5 reported (2 classes: always 1.0)
    assert result.summary["top5_accuracy"] == 1.0
    assert tuple(result.model.input_shape) == (None, 24, 24, 3)


def test_strict_data_error_names_the_file_and_the_flag(tmp_path, cifar10_small_dir, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            good = sorted((cifar10_small_dir / split / label).glob("*.jpg"))[0].read_bytes()
            (root / split / label / "0.jpg").write_bytes(good)
    (root / "train" / "cat" / "bad.jpg").write_bytes(good[:200])
    err, _ = _main_error(["--data-dir", str(root), "--strict-data", "--model-dir",
                          str(tmp_path / "m"), "--export-dir", str(tmp_path / "e")], capsys)
    assert err == (f"python -m training.train: error: --data-dir {root}: cannot decode "
                   f"{root / 'train' / 'cat' / 'bad.jpg'} (truncated or not an image); remove it, "
                   "or skip bad files without --strict-data")


def test_ctrl_c_saves_says_how_to_resume_and_the_rerun_is_exact(trained, cifar10_small_dir,
                                                                tmp_path):
    """SIGINT after step 7 (epoch 2, batch 3; backups only every epoch): one line, exit status
    130; the backup holds step 7, and the same command ends with the uninterrupted weights."""
    _, _, reference_dir, _ = trained
    script = tmp_path / "cli.py"
    script.write_text(RESUME_SCRIPT.replace(
        "import sys, time\n",
        "import sys, time\nfrom training import startup\nstartup.import_tensorflow_quietly()\n"
    ).replace("train.run(sys.argv[2:], callbacks=[StallAt(int(sys.argv[1]))])",
              "run = train.run\n"
              "train.run = lambda argv: run(argv, callbacks=[StallAt(int(sys.argv[1]))])\n"
              "sys.exit(train.main(sys.argv[2:]))"))
    args = _small_run_args(cifar10_small_dir, tmp_path / "run", tmp_path / "x", extra=["--no-export"])
    victim = _cli(script, 7, args)
    try:
        line, deadline = "", time.time() + 240
        while "STALLED" not in line and time.time() < deadline and victim.poll() is None:
            line = victim.stdout.readline()
        assert "STALLED" in line, victim.stderr.read()[-3000:]
        victim.send_signal(signal.SIGINT)
        _, err = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "python -m training.train: interrupted at step 7; run the same command to resume")
    assert json.loads((tmp_path / "run" / "backup" / "training_metadata.json").read_text())[
        "step"] == 7
    resumed, out = _run_captured(args)
    assert not isinstance(resumed, Exception), resumed
    assert "Resuming at step 7 of 12 (epoch 2, batch 3)" in out, out
    _assert_same_weights(reference_dir / "model.weights.h5", tmp_path / "run" / "model.weights.h5",
                         atol=1e-6)


def test_interrupted_line_names_the_run_dir_when_the_command_did_not():
    from training import fitting

    error = fitting.Interrupted(57, 50, "/x/runs/revnet38/1")
    assert train._interrupted_line(error, ["--epochs", "2"]) == (
        "interrupted at step 57; run the same command with --model-dir /x/runs/revnet38/1 to "
        "resume (from the backup of step 50)")
    assert train._interrupted_line(None, []).startswith("interrupted before training started")


@pytest.mark.parametrize("flag", ["--model-dir", "--export-dir"])
def test_unwritable_directories_are_one_line_before_anything_runs(flag, tmp_path, capsys):
    """sysfs refuses new files (even to root): the probe at start-up says so in one line, within
    seconds, and no run directory is left."""
    argv = ["--data-dir", str(tmp_path / "data"), "--model-dir", str(tmp_path / "m"),
            "--export-dir", str(tmp_path / "e"), flag, "/sys/kernel/revnet_test"]
    err, elapsed = _main_error(argv, capsys)
    assert err == (f"python -m training.train: error: {flag} /sys/kernel/revnet_test: cannot "
                   f"write in /sys/kernel (Permission denied); pick a writable folder for {flag}")
    assert elapsed < 30 and not (tmp_path / "m").exists()


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    err, _ = _main_error(["--data-dir", str(tmp_path / "nothing"), "--model-dir",
                          str(tmp_path / "runs" / "new"), "--export-dir", str(tmp_path / "e")],
                         capsys)
    assert f"--data-dir {tmp_path / 'nothing'}: no such directory" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "e").exists()


def test_help_of_every_command_line_answers_without_tensorflow():
    for module in ("training.train", "training.evaluate", "training.export", "training.predict"):
        start = time.time()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: python -m" in proc.stdout, proc.stderr[-2000:]
        assert " tensorflow" not in proc.stderr and " keras" not in proc.stderr, module
        assert time.time() - start < 3, module


def test_first_step_epoch_header_and_validation_progress(cifar10_small_dir, tmp_path):
    """One epoch: an `Epoch 1/1` header, the training bar, then a validation bar; the summary
    gives the measured peak and the estimated reversible and plain-backprop step memory."""
    argv = _small_run_args(cifar10_small_dir, tmp_path / "run", tmp_path / "e", epochs=1,
                           extra=["--no-export", "--verbose", "1"])
    result, out = _run_captured(argv)
    assert not isinstance(result, Exception), result
    assert "\nEpoch 1/1\n" in out and "Validating on the 32 test images" in out, out
    assert re.search(r"^Decoding the 128 train images", out, flags=re.M), out
    summary = result.summary
    assert summary["estimate_plain_mb"] > summary["estimate_reversible_mb"] > 0
    assert summary["memory_ratio"] == pytest.approx(
        summary["estimate_reversible_mb"] / summary["estimate_plain_mb"])
    assert (f"needs {summary['estimate_reversible_mb']:.0f} MB with reversible backprop against "
            f"{summary['estimate_plain_mb']:.0f} MB with plain backprop: "
            f"{summary['memory_ratio']:.2f}x") in out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["memory_ratio"] == pytest.approx(summary["memory_ratio"])
