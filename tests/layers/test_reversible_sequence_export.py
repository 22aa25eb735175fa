"""SavedModel export of a model with a ReversibleSequence, reloaded in a fresh process.

The fresh process never imports tf_revnet: it must serve (inference endpoint) and fine-tune (gradients
through a training-mode endpoint, i.e. through the saved custom gradient) with the original's values.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_saved_model_serves_and_fine_tunes_in_fresh_process(tmp_path):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    blocks = [ReversibleBlock(BasicResidualFunction(4), BasicResidualFunction(4)) for _ in range(3)]
    h = ReversibleSequence(blocks)(h)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).standard_normal((5, 6, 6, 3)).astype("float32")
    model(x, training=True)  # non-trivial BatchNorm statistics

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, 6, 6, 3), tf.float32)
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
    archive.add_endpoint("forward_train", lambda x: model(x, training=True), input_signature=[spec])
    export_dir = str(tmp_path / "export")
    archive.write_out(export_dir, verbose=False)

    predictions = model.predict(x, verbose=0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    np.savez(tmp_path / "reference.npz", x=x, predictions=predictions,
             **{f"grad_{i}": g.numpy() for i, g in enumerate(grads)})

    script = textwrap.dedent(
        f"""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({export_dir!r})
        ref = np.load({str(tmp_path / "reference.npz")!r})
        x = ref["x"]
        serve_error = float(np.max(np.abs(loaded.serve(x).numpy() - ref["predictions"])))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loaded.forward_train(x) ** 2)
        grads = tape.gradient(loss, loaded.trainable_variables)
        errors = [float(np.max(np.abs(g.numpy() - ref[f"grad_{{i}}"])) / np.max(np.abs(ref[f"grad_{{i}}"])))
                  for i, g in enumerate(grads)]
        print("RESULT", "tf_revnet" in sys.modules, len(grads), serve_error, max(errors))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
        timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT")][-1]
    _, imported, n_grads, serve_error, grad_error = line.split()
    assert imported == "False"
    assert int(n_grads) == len(model.trainable_variables)
    assert float(serve_error) <= 1e-5
    assert float(grad_error) <= 1e-5
