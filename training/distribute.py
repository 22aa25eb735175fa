"""`tf.distribute` strategies for `python -m training.train --distribution NAME`.

- `none`: the default strategy (one device).
- `mirrored`: `tf.distribute.MirroredStrategy`, all GPUs of this machine (or its CPU).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy`; each worker process is started
  with the same command and a `TF_CONFIG` environment variable naming the cluster and its own task
  (`{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker",
  "index": 0}}`). The strategy is `KerasMultiWorkerMirroredStrategy`, which makes Keras 3's
  `model.fit` run under it (see its docstring for the Keras bug it works around).
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

import keras
import tensorflow as tf

__all__ = ["STRATEGIES", "KerasMultiWorkerMirroredStrategy", "make_strategy", "tf_config",
           "is_chief", "task_id", "is_multi_worker", "check_same_step", "WorkerMismatchError"]

STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")

# Keras versions whose TensorFlow trainer makes the two `Strategy.reduce` calls that
# `KerasMultiWorkerMirroredStrategy` accepts: every Keras 3 release up to 3.15.1 (checked; the same
# code is on Keras' main branch, keras-team/keras#20585 is open). The shim only changes calls on
# which the stock strategy raises, so it stays harmless once Keras stops making them.
_KERAS_REDUCE_SHIM = int(keras.version().split(".")[0]) >= 3


class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras 3 passes it.

    With several workers, Keras 3's `model.fit`/`evaluate` (TensorFlow backend,
    `keras/src/backend/tensorflow/trainer.py` of Keras 3.15.1) fail in their first step, because
    they call `Strategy.reduce` in two ways that only `MirroredStrategy` accepts
    (keras-team/keras#20585, tensorflow/tensorflow#72388):

    1. `TensorFlowTrainer._maybe_symbolic_build` (line 731) reduces the whole first batch, an
       `(x, y)` tuple of `PerReplica` values, in one call. `MirroredExtended._reduce_to` maps over
       such structures (`nest.map_structure`, tensorflow/python/distribute/
       mirrored_strategy.py:789); `CollectiveAllReduceExtended._reduce_to`
       (collective_all_reduce_strategy.py:930) does not and hands the tuple to
       `CrossDeviceOps.reduce`, which fails in `_make_tensor_into_per_replica`: "Attempt to
       convert a value (PerReplica:{...}) with an unsupported type ... to a Tensor".
    2. `reduce_per_replica` (line 835-841) reduces each step's metric results, per-replica
       scalars, with `strategy.reduce("MEAN", v, axis=0)` when the strategy is multi-worker
       (`reduce_per_replica` uses `tf.reduce_mean` over the local replicas otherwise): a scalar
       has no axis 0 ("Invalid reduction dimension 0 for input with 0 dimensions").

    Here a nested `value` is reduced leaf by leaf (as `MirroredStrategy` does), and `axis` is
    ignored for rank-0 per-replica values, which have no batch axis: the mean over replicas that
    Keras computes on one worker. (Each replica's metric values are over its equal share of the
    global batch, so their mean is the global value; the per-epoch history is read from the
    metrics' variables, summed over all replicas.) Every other call goes to TensorFlow unchanged;
    with several workers the stock strategy raises on both kinds of call changed here. Measured
    with two worker processes: the losses equal one device's with the same global batch to 1e-5
    (tests/training/test_distribute.py).
    """

    def reduce(self, reduce_op, value, axis=None):
        """`tf.distribute.Strategy.reduce`, also for nests and for scalars with an `axis`.

        Args:
            reduce_op: `tf.distribute.ReduceOp` or `"SUM"`/`"MEAN"`.
            value: `tf.distribute.DistributedValues` or tensor, or a tuple, list or dict of them.
            axis: int or None. Batch axis within each replica's value; ignored for scalars.

        Returns:
            The reduced tensor (or the same structure of reduced tensors).
        """
        if _KERAS_REDUCE_SHIM:
            if isinstance(value, (tuple, list, dict)):
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            if axis is not None and _per_replica_rank(value) == 0:
                axis = None
        return super().reduce(reduce_op, value, axis)


class WorkerMismatchError(ValueError):
    """The workers of a multi-worker run are not in the same state; the message is one line."""


def _per_replica_rank(value):
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    shape = getattr(value, "shape", None)
    return None if shape is None else shape.rank


def tf_config():
    """The parsed `TF_CONFIG` environment variable (`{}` when it is not set).

    Raises:
        ValueError: `TF_CONFIG` is not a JSON object (one line).
    """
    raw = os.environ.get("TF_CONFIG", "") or "{}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with \"cluster\" and \"task\"")
    return config


def make_strategy(name):
    """Creates the strategy called `name`.

    Args:
        name: str. One of `STRATEGIES`.

    Returns:
        A `tf.distribute.Strategy` (`KerasMultiWorkerMirroredStrategy` for `multi_worker`).

    Raises:
        ValueError: unknown name, `multi_worker` without a valid `TF_CONFIG`, or no TPU found
            (one line).
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        config = tf_config()
        if not config.get("cluster") or not config.get("task"):
            raise ValueError("needs the TF_CONFIG environment variable describing the cluster "
                             'and this task, e.g. {"cluster": {"worker": ["host1:12345", '
                             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}')
        return KerasMultiWorkerMirroredStrategy()
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
    """`(task_type, index)` of this process from `TF_CONFIG`, or `(None, 0)`.

    Raises:
        ValueError: `TF_CONFIG` is not a JSON object (one line).
    """
    task = tf_config().get("task", {})
    return task.get("type"), int(task.get("index", 0))


def is_chief():
    """Whether this process writes the run's files (the chief, or worker 0 without a chief).

    Raises:
        ValueError: `TF_CONFIG` is not a JSON object (one line).
    """
    task_type, index = task_id()
    has_chief = "chief" in tf_config().get("cluster", {})
    return task_type in (None, "chief") or (not has_chief and task_type == "worker" and index == 0)


def is_multi_worker(strategy):
    """Whether `strategy` synchronizes several worker processes."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker")) > 1


def check_same_step(strategy, step):
    """Checks that every worker of a multi-worker run restored the same global step.

    A collective operation: every worker must call it (no-op for other strategies).

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        step: int. The global step this worker restored (0 without a backup).

    Raises:
        WorkerMismatchError: the workers restored different steps (one line, with each worker's
            step).
    """
    if not is_multi_worker(strategy):
        return
    # A tf.function: `strategy.run` of a plain Python function warns about eager overhead.
    local = strategy.run(tf.function(lambda: tf.constant([step], dtype=tf.int64)))
    steps = [int(s) for s in strategy.gather(local, axis=0).numpy()]
    if len(set(steps)) > 1:
        raise WorkerMismatchError(
            f"the workers restored different steps ({', '.join(map(str, steps))}); every worker "
            "resumes from the chief's backup in --model-dir, which must be one directory shared "
            "by all workers")
