"""The JAX pass of the suite: `tests/jax/` in a second pytest process with `KERAS_BACKEND=jax`.

Keras fixes its backend when it is first imported, so the JAX tests cannot run in this (TensorFlow)
process; this test runs them in a child and fails with the child's output if any fails. It skips
where JAX is not installed (it is in the `test` extra).
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_jax_pass():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/jax", "-q", "-p", "no:cacheprovider", "-n", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (
        f"KERAS_BACKEND=jax pytest tests/jax failed (rc {result.returncode}):\n"
        + result.stdout[-12000:] + result.stderr[-4000:]
    )
