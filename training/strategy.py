"""`tf.distribute` strategies for `python -m training.train --distribution NAME`.

- `none`: the default strategy (one device).
- `mirrored`: `tf.distribute.MirroredStrategy`, all GPUs of this machine (or its CPU).
- `multi_worker`: `KerasMultiWorkerMirroredStrategy` (below); each worker process is started with
  the same command and a `TF_CONFIG` naming the cluster and its own task (`training.cluster`).
- `tpu`: `tf.distribute.TPUStrategy` on the TPU named by `TPU_NAME` (or the local TPU VM).

`--batch-size` is the global batch: Keras splits each batch into `num_replicas_in_sync` equal
parts; with `multi_worker` every worker's pipeline yields the same global batches (a pure function
of seed and step, `training.data.train_dataset`) and `tf.data` auto-sharding by data gives each
worker its part. Keeping the workers in step is `training.replica_sync`'s.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import tensorflow as tf

from training import cluster

__all__ = ["KerasMultiWorkerMirroredStrategy", "make_strategy"]

_WATCHDOG = pathlib.Path(__file__).with_name("watchdog.py")


class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras 3 passes it.

    With several workers, Keras 3's `model.fit`/`evaluate` (TensorFlow backend,
    `keras/src/backend/tensorflow/trainer.py`, every release up to 3.15.1 and its main branch;
    keras-team/keras#20585, tensorflow/tensorflow#72388) fail in their first step, because they
    call `Strategy.reduce` in two ways that only `MirroredStrategy` accepts:

    1. `TensorFlowTrainer._maybe_symbolic_build` reduces the whole first batch, an `(x, y)` tuple
       of `PerReplica` values, in one call; `CollectiveAllReduceExtended._reduce_to` hands the
       tuple to `CrossDeviceOps.reduce`, which fails ("Attempt to convert a value (PerReplica:
       {...}) with an unsupported type ... to a Tensor").
    2. `reduce_per_replica` reduces each step's metric results, per-replica scalars, with
       `strategy.reduce("MEAN", v, axis=0)`: a scalar has no axis 0.

    Here a nested `value` is reduced leaf by leaf (as `MirroredStrategy` does), and `axis` is
    ignored for rank-0 per-replica values: the mean over replicas that Keras computes on one
    worker. Both calls raise in the stock strategy, so the change is harmless once Keras stops
    making them. Measured with two worker processes: the losses equal one device's with the same
    global batch to 1e-5 (tests/training/test_distribute.py).
    """

    def reduce(self, reduce_op, value, axis=None):
        """`tf.distribute.Strategy.reduce`, also for nests and for scalars with an `axis`."""
        if isinstance(value, (tuple, list, dict)):
            return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
        if axis is not None and _per_replica_rank(value) == 0:
            axis = None
        return super().reduce(reduce_op, value, axis)


def _per_replica_rank(value):
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    shape = getattr(value, "shape", None)
    return None if shape is None else shape.rank


def _tpu():
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


def _multi_worker(worker_timeout, format_stop, report):
    task = cluster.cluster_task()
    name = "Chief" if task.type == "chief" else f"Worker {task.index}"
    others = f"waiting for {', '.join(task.peers)}" if task.peers else "the only task"
    report(f"{name} of {task.num_workers} ({task.address}): {others} (up to "
           f"{worker_timeout:g} s)")
    with _Watchdog(task, worker_timeout, format_stop):
        try:
            return KerasMultiWorkerMirroredStrategy()
        except tf.errors.OpError as e:  # "Could not start gRPC server": the port is taken
            raise ValueError(f"{task.type} {task.index} cannot serve on {task.address} "
                             f"({e.message.splitlines()[0][:120]}); is another process using "
                             "that port?") from None


def make_strategy(name, worker_timeout=600.0, format_stop=None, report=print):
    """Creates the strategy called `name`.

    With `multi_worker`, creating the strategy connects to every other task of `TF_CONFIG` and
    blocks inside TensorFlow until all have started (TensorFlow has no timeout for this). Here
    the wait is reported in one line, and the watchdog process (`training/watchdog.py`) prints a
    one-line message and ends this process (SIGKILL, exit status 137) after `worker_timeout`
    seconds, or on SIGINT (Ctrl-C). (SIGTERM does not stop the wait: once connecting, TensorFlow
    takes SIGTERM as a preemption notice.)

    Args:
        name: str. `"none"`, `"mirrored"`, `"multi_worker"` or `"tpu"`.
        worker_timeout: float. Seconds to wait for the other workers (`multi_worker` only).
        format_stop: callable `format_stop(message, signum)` returning the line printed when the
            wait ends the process (signum None for the timeout). Default: the message itself.
        report: callable str -> None, for the line about the wait.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: unknown name, a port in use, or no TPU found (one line).
        training.errors.ClusterError: `multi_worker` without a valid `TF_CONFIG`.
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return _multi_worker(worker_timeout, format_stop, report)
    if name == "tpu":
        return _tpu()
    raise ValueError("unknown strategy; choose none, mirrored, multi_worker or tpu")


class _Watchdog:
    """Kills this process if the block still runs after `timeout` s, or on SIGINT.

    While TensorFlow waits for the other workers, Python's C signal handler still writes each
    signal's number to the `signal.set_wakeup_fd` pipe, which the watchdog process reads.
    """

    def __init__(self, task, timeout, format_stop):
        self.task, self.timeout = task, timeout
        self.format_stop = format_stop or (lambda message, signum: message)

    def _messages(self):
        others = ", ".join(self.task.peers)
        messages = [self.format_stop(
            f"{self.task.type} {self.task.index} ({self.task.address}) waited {self.timeout:g} s "
            f"for the other workers of TF_CONFIG ({others}) without reaching all of them; start "
            "the same command on each with its own task index", None)]
        for signum in (signal.SIGINT, signal.SIGTERM):
            messages.append(self.format_stop(
                f"stopped by {signum.name} while waiting for the other workers ({others})",
                signum))
        return messages

    def __enter__(self):
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_w, False)
        self._handlers = {signum: signal.signal(signum, lambda *_: None)
                          for signum in (signal.SIGINT, signal.SIGTERM)}
        self._old_wakeup_fd = signal.set_wakeup_fd(self._signal_w)
        self._process = subprocess.Popen(
            [sys.executable, str(_WATCHDOG), str(os.getpid()), str(self.timeout),
             str(self._signal_r), *self._messages()],
            stdin=subprocess.PIPE, pass_fds=(self._signal_r,))
        return self

    def __exit__(self, *exc):
        self._process.stdin.close()
        self._process.wait()
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        os.close(self._signal_r)
        os.close(self._signal_w)
        return False
