"""`import tf_revnet` under KERAS_BACKEND=jax on a machine without TensorFlow."""

import os
import subprocess
import sys

_SCRIPT = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError, as if not installed
import tf_revnet
model = tf_revnet.models.RevNet(units=[1, 1], widths=[8, 8, 16], input_shape=(8, 8, 3), classes=3)
print(tf_revnet.layers.backend.BACKEND, model.count_params())
"""


def test_import_and_build_a_model_without_tensorflow():
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "jax"


def test_training_cli_says_in_one_line_that_it_needs_tensorflow():
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-m", "training.train", "--recipe", "quick"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "python -m training: error: the training/ entry points need KERAS_BACKEND=tensorflow")
