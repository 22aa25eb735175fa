"""End-to-end tests of `python -m training.train` (training/train.py) on real CIFAR-10 images.

RevNet-38 trains for a few steps on 256 real training images, then the export is reloaded in a fresh
Python process that never imports `tf_revnet`. Runs are kept tiny (batch 32, 3 epochs of 8 steps,
64 test images) so the module stays around two minutes on 2 CPU cores.
"""

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from training import data as data_lib
from training import train

EPOCHS = 3
STEPS = 8
BATCH = 32


def _run_captured(argv, callbacks=()):
    """Runs `train.run(argv)` and returns (result or exception, captured stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            result = train.run(argv, callbacks=callbacks)
        except Exception as e:  # returned to the caller, which asserts on it
            result = e
    return result, out.getvalue()


def _small_run_args(data_dir, model_dir, export_dir, epochs=EPOCHS, steps=STEPS):
    return [
        "--model", "revnet38",
        "--data-dir", str(data_dir),
        "--train-examples", "256",  # each epoch is one pass over the same real images
        "--epochs", str(epochs),
        "--batch-size", str(BATCH),
        "--steps-per-epoch", str(steps),
        "--test-examples", "64",
        "--learning-rate", "0.05",
        "--model-dir", str(model_dir),
        "--export-dir", str(export_dir),
        "--verbose", "2",
    ]


@pytest.fixture(scope="module")
def trained(cifar10_small_dir, tmp_path_factory):
    """One real CLI run of RevNet-38 on the CIFAR-10 subset: (TrainResult, stdout, paths)."""
    root = tmp_path_factory.mktemp("train_run")
    model_dir, base_path = root / "model_dir", root / "export" / "revnet38"
    result, stdout = _run_captured(_small_run_args(cifar10_small_dir, model_dir, base_path))
    if isinstance(result, Exception):
        raise result
    return result, stdout, model_dir, base_path / "1"  # the first version of the base path


def test_training_loss_goes_down(trained):
    result, _, model_dir, _ = trained
    losses = result.history.history["loss"]
    assert result.history.epoch == list(range(EPOCHS))
    assert len(losses) == EPOCHS and all(np.isfinite(losses))
    assert losses[-1] < losses[0], f"training loss did not go down: {losses}"
    # The CSV log holds the same per-epoch losses.
    with open(model_dir / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], losses, rtol=1e-6)
    assert "val_accuracy" in rows[0]


def test_prints_test_accuracy_and_writes_artifacts(trained):
    result, stdout, model_dir, export_dir = trained
    lines = [line for line in stdout.splitlines() if line.startswith("Test accuracy:")]
    assert len(lines) == 1, stdout[-2000:]
    match = re.fullmatch(r"Test accuracy: (\d\.\d{4})", lines[0])
    assert match, lines[0]
    printed = float(match.group(1))
    assert 0.0 <= printed <= 1.0
    assert abs(printed - result.test_accuracy) < 1e-4
    # 64 test images: accuracy is a multiple of 1/64.
    assert abs(result.test_accuracy * 64 - round(result.test_accuracy * 64)) < 1e-4
    assert f"Exported version 1 to {export_dir}" in stdout
    assert "model_version_policy { specific { versions: 1 } }" in stdout

    assert (export_dir / "saved_model.pb").is_file()
    assert (export_dir / "variables").is_dir()
    assert result.export_dir == export_dir
    assert (model_dir / "model.weights.h5").is_file()
    assert (model_dir / "model.keras").is_file()
    export_info = json.loads((export_dir / "assets.extra" / "export.json").read_text())
    assert export_info["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert export_info["class_names"][3] == "cat" and export_info["run_config"]["model"] == "revnet38"
    assert not (model_dir / "backup").exists(), "BackupAndRestore keeps its backup only mid-run"
    assert not list(model_dir.glob(".tmp-*")) and not list(export_dir.parent.glob(".tmp-*"))

    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == "revnet38"
    assert config["recipe"]["batch_size"] == BATCH
    assert config["recipe"]["learning_rate"] == 0.05
    assert config["recipe"]["weight_decay"] == 2e-4  # from the paper's recipe
    assert config["recipe"]["momentum"] == 0.9
    assert config["steps_per_epoch"] == STEPS and config["total_steps"] == EPOCHS * STEPS
    assert config["num_train"] == 256 and config["num_test"] == 64
    assert config["class_names"][0] == "airplane" and config["class_names"][-1] == "truck"
    assert config["test_accuracy"] == pytest.approx(result.test_accuracy)


def test_model_takes_raw_pixels(trained):
    result, _, _, _ = trained
    model = result.model
    assert model.inputs[0].dtype == "float32" and tuple(model.inputs[0].shape) == (None, 32, 32, 3)
    normalizer = model.get_layer("normalization")
    mean = keras.ops.convert_to_numpy(normalizer.mean).reshape(-1)
    std = np.sqrt(keras.ops.convert_to_numpy(normalizer.variance).reshape(-1))
    # Per-channel statistics of CIFAR-10 pixels (about 125/123/114 and 63/62/67 on the full set).
    assert np.all((mean > 100) & (mean < 140)), mean
    assert np.all((std > 50) & (std < 80)), std
    # Weight decay went onto kernels only (SGD momentum 0.9, L2 penalty in the loss).
    decayed = [v.path for v in model.trainable_weights if v.regularizer is not None]
    assert decayed and all(p.endswith("/kernel") for p in decayed)
    assert float(model.optimizer.iterations.numpy()) == EPOCHS * STEPS


SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    export_dir, inputs_path, outputs_path = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_default"]
    inputs = np.load(inputs_path)
    outputs = {}
    for key in sorted(inputs.files):
        result = serve(images=tf.constant(inputs[key].astype(np.uint8)))
        outputs[key] = result["probabilities"].numpy()
    np.savez(outputs_path, **outputs)
    assert "tf_revnet" not in sys.modules, sorted(m for m in sys.modules if "revnet" in m)
    assert "training" not in sys.modules
    print("signature inputs:", sorted(serve.structured_input_signature[1]))
    print("OK")
    """
)


def test_export_serves_same_predictions_in_fresh_process(trained, cifar10_small_dir, tmp_path):
    result, _, _, export_dir = trained
    datasets = data_lib.load_image_folder(cifar10_small_dir, test_examples=9)
    images = np.stack([x.numpy() for x, _ in datasets.test]).astype("float32")
    batches = {"b1": images[:1], "b7": images[1:8]}
    expected = {k: result.model.predict(v, verbose=0) for k, v in batches.items()}
    np.savez(tmp_path / "inputs.npz", **batches)
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(export_dir), str(tmp_path / "inputs.npz"),
         str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and "['images']" in proc.stdout, proc.stdout
    served = np.load(tmp_path / "outputs.npz")
    for key, want in expected.items():
        got = served[key]
        assert got.shape == want.shape == (len(batches[key]), 10)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-5, f"batch {key}: max abs diff {diff:.2e}"


class _Interrupt(keras.callbacks.Callback):
    """Simulates a killed job: raises after the backup of epoch `after_epoch` was written."""

    def __init__(self, after_epoch):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")


def test_resumes_after_interruption(cifar10_small_dir, tmp_path):
    model_dir = tmp_path / "model_dir"
    args = _small_run_args(cifar10_small_dir, model_dir, tmp_path / "export", epochs=2,
                           steps=2) + ["--no-export"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(KeyboardInterrupt):
        train.run(args, callbacks=[_Interrupt(after_epoch=0)])
    assert (model_dir / "backup" / "training_metadata.json").is_file()
    assert json.loads((model_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    assert not (tmp_path / "export").exists()

    result, stdout = _run_captured(args)
    if isinstance(result, Exception):
        raise result
    assert "Resuming from the backup" in stdout
    # Only the missing epoch ran, and the optimizer state (step counter) came from the backup.
    assert result.history.epoch == [1]
    assert float(result.model.optimizer.iterations.numpy()) == 2 * 2
    with open(model_dir / "training_log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    assert result.export_dir is None and not (tmp_path / "export").exists()  # --no-export
    assert "Exported" not in stdout
    assert not (model_dir / "backup").exists()


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
    assert "DIR/train/<class>" in err and "tar xzf" in err


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
        train.run(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size",
                   "--steps-per-epoch", "--test-examples", "--model-dir", "--export-dir",
                   "--mixed-precision", "--learning-rate", "--recipe", "--no-export"):
        assert option in out
    assert "python -m training.train --data-dir" in out


def test_refuses_to_resume_a_different_model(cifar10_small_dir, tmp_path, capsys):
    model_dir = tmp_path / "model_dir"
    (model_dir / "backup").mkdir(parents=True)
    (model_dir / "backup" / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    (model_dir / "config.json").write_text(json.dumps(
        {"model": "resnet32", "command": "python -m training.train --model resnet32"}
    ))
    err, _ = _main_error(["--model", "revnet38", "--data-dir", str(cifar10_small_dir),
                          "--model-dir", str(model_dir), "--export-dir", str(tmp_path / "e")],
                         capsys)
    assert f"--model-dir {model_dir}: holds an unfinished run with different model" in err
    assert "--model resnet32" in err
