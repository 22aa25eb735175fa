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
            "--export-dir", f"{out_dir}/export-{strategy}/1"])
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
