"""`tf.distribute` strategies for `python -m training.train --distribution NAME`.

- `none`: the default strategy (one device).
- `mirrored`: `tf.distribute.MirroredStrategy`, all GPUs of this machine (or its CPU).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy` (refused for now: Keras 3.15's
  `model.fit` fails under it, keras-team/keras#20585; `TF_REVNET_ALLOW_MULTI_WORKER=1` tries anyway);
  each worker process is started
  with the same command and a `TF_CONFIG` environment variable naming the cluster and its own task
  (`{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker",
  "index": 0}}`).
- `tpu`: `tf.distribute.TPUStrategy` on the TPU named by `TPU_NAME` (or the local TPU VM).

Global batch and sharding: `--batch-size` is the global batch. Keras splits each batch of the
input pipeline into `num_replicas_in_sync` equal parts (it must divide the batch); with
`multi_worker`, the pipeline of every worker produces the same global batches (it is a pure
function of the seed and the step, see `training.data.train_dataset`) and `tf.data` auto-sharding
by data gives each worker its part of each batch. The learning rate is not changed by the
number of devices (the loss is the mean over the global batch); `--scale-learning-rate` applies
the linear scaling rule when the global batch differs from the recipe's.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

__all__ = ["STRATEGIES", "make_strategy", "is_chief", "task_id"]

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")


def make_strategy(name):
    """Creates the strategy called `name`.

    Args:
        name: str. One of `STRATEGIES`.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: unknown name, `multi_worker` without `TF_CONFIG`, or no TPU found (one line).
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if os.environ.get("TF_REVNET_ALLOW_MULTI_WORKER") != "1":
            # Measured with TF 2.21 / Keras 3.15: model.fit under MultiWorkerMirroredStrategy
            # fails in its first step ("Attempt to convert a value (PerReplica...) ... to a
            # Tensor"), the open upstream issue keras-team/keras#20585 (tensorflow#72388).
            # Refuse in one line instead of a traceback after the data are loaded.
            raise ValueError(
                "Keras 3's model.fit does not run under MultiWorkerMirroredStrategy yet "
                "(keras-team/keras#20585); use mirrored on one machine, or set "
                "TF_REVNET_ALLOW_MULTI_WORKER=1 to try anyway"
            )
        if "TF_CONFIG" not in os.environ:
            raise ValueError("needs the TF_CONFIG environment variable describing the cluster "
                             'and this task, e.g. {"cluster": {"worker": ["host1:12345", '
                             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}')
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
                tpu=os.environ.get("TPU_NAME", "local"))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"no TPU found ({reason[:120]}); set TPU_NAME or run on a TPU VM") \
                from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy; choose from {', '.join(STRATEGIES)}")


def task_id():
    """`(task_type, index)` of this process from `TF_CONFIG`, or `(None, 0)`."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    return task.get("type"), int(task.get("index", 0))


def is_chief():
    """Whether this process writes the run's files (the chief, or worker 0 without a chief)."""
    task_type, index = task_id()
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    has_chief = "chief" in config.get("cluster", {})
    return task_type in (None, "chief") or (not has_chief and task_type == "worker" and index == 0)
