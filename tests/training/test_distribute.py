"""`--distribution mirrored` on two logical CPU devices trains like one device (same global batch).

Runs in a subprocess: logical devices must be configured before TensorFlow initializes. The model
has no BatchNorm (a small CNN registered through `train.MODEL_BUILDERS`): under a `tf.distribute`
strategy BatchNorm normalizes each replica's part of the batch (Keras' default,
`synchronized=False`), which by design differs from one device; everything else (data sharding,
global-batch loss averaging, gradient all-reduce, the schedule) must give the same losses.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from training import train

    def small_cnn(input_shape, classes, classifier_activation, kernel_regularizer, **kwargs):
        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                                kernel_regularizer=kernel_regularizer)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(classes, activation=classifier_activation,
                                     kernel_regularizer=kernel_regularizer)(x)
        return keras.Model(inputs, outputs)

    train.MODEL_BUILDERS["small_cnn"] = small_cnn
    data_dir, out_dir = sys.argv[1:3]
    losses = {}
    for strategy in ("none", "mirrored"):
        result = train.run([
            "--model", "small_cnn", "--data-dir", data_dir, "--train-examples", "128",
            "--test-examples", "32", "--epochs", "2", "--steps-per-epoch", "4",
            "--batch-size", "32", "--learning-rate", "0.05", "--verbose", "0",
            "--distribution", strategy, "--model-dir", f"{out_dir}/{strategy}",
            "--no-export"])
        losses[strategy] = {"loss": result.history["loss"], "val_loss": result.history["val_loss"],
                            "replicas": result.config["num_replicas"]}
    print("RESULT " + json.dumps(losses))
    """
)


def test_mirrored_on_two_cpus_matches_one_device(cifar10_small_dir, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(cifar10_small_dir), str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["none"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(result["mirrored"][key], result["none"][key], rtol=1e-5)
    # The losses moved (a real run, not a constant).
    assert result["none"]["loss"][0] != result["none"]["loss"][1]


WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    from training import train

    def small_cnn(input_shape, classes, classifier_activation, kernel_regularizer, **kwargs):
        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                                kernel_regularizer=kernel_regularizer)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(classes, activation=classifier_activation,
                                     kernel_regularizer=kernel_regularizer)(x)
        return keras.Model(inputs, outputs)

    train.MODEL_BUILDERS["small_cnn"] = small_cnn
    data_dir, model_dir, strategy = sys.argv[1:4]
    result = train.run([
        "--model", "small_cnn", "--data-dir", data_dir, "--train-examples", "128",
        "--test-examples", "32", "--epochs", "2", "--steps-per-epoch", "4",
        "--batch-size", "32", "--learning-rate", "0.05", "--verbose", "0",
        "--distribution", strategy, "--model-dir", model_dir,
        "--no-export"])
    print("RESULT " + json.dumps({"loss": result.history["loss"],
                                  "replicas": result.config["num_replicas"]}))
    """
)


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_is_refused_in_one_line(tmp_path, capsys):
    from training import train

    code = train.main(["--distribution", "multi_worker", "--model-dir", str(tmp_path / "m"),
                       "--data-dir", str(tmp_path), "--export-dir", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--distribution multi_worker:" in err and "keras-team/keras#20585" in err


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Keras 3.15 model.fit fails under "
                   "MultiWorkerMirroredStrategy (keras-team/keras#20585); passes once fixed")
def test_multi_worker_on_two_local_processes_matches_one_device(cifar10_small_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_REVNET_ALLOW_MULTI_WORKER": "1"}
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(cifar10_small_dir), str(tmp_path / "mw"),
             "multi_worker"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**env, "TF_CONFIG": json.dumps(tf_config)}))
    single = subprocess.run([sys.executable, str(script), str(cifar10_small_dir),
                             str(tmp_path / "one"), "none"], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=env, timeout=600)
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    def result(stdout):
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])

    reference = result(single.stdout)
    for stdout, _ in outputs:
        got = result(stdout)
        assert got["replicas"] == 2
        np.testing.assert_allclose(got["loss"], reference["loss"], rtol=1e-5)
    assert (tmp_path / "mw" / "summary.json").is_file()  # the chief's run directory
