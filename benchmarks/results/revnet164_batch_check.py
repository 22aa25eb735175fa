"""Ad-hoc check (2026-11-30): RevNet-164 float32 gradient angle at initialisation, batch 8 vs 32.

Run from the repository root (CIFAR-10 JPEG copy in /tmp/cifar10):
    PYTHONPATH=. python benchmarks/results/revnet164_batch_check.py
Output (one JSON line per batch size): benchmarks/results/revnet164_batch_check.jsonl
"""

import json
import pathlib
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import tf_revnet
from tf_revnet import diagnostics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numerics  # noqa: E402  (benchmarks/numerics.py: the same image loading)

keras.utils.set_random_seed(0)
x_train, _ = numerics.load_images("/tmp/cifar10", "train", 320, 0, tf, np)
mean, std = x_train.reshape(-1, 3).mean(0), x_train.reshape(-1, 3).std(0)
for batch in (8, 32):
    x, y = numerics.load_images("/tmp/cifar10", "test", batch, 1, tf, np)
    x = ((x - mean) / std).astype("float32")
    keras.utils.set_random_seed(0)
    model = tf_revnet.models.get("revnet164")(input_shape=(32, 32, 3), classes=10,
                                              classifier_activation=None)
    start = time.time()
    angle = diagnostics.gradient_angle(
        model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(json.dumps({"batch": batch, "degrees": angle.degrees,
                      "relative_error": angle.relative_error, "worst": angle.worst_variable,
                      "worst_deg": angle.per_variable[angle.worst_variable],
                      "s": time.time() - start}), flush=True)
