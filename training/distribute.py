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

Multi-worker start-up and failures (used by `training.train`): `make_strategy` checks
`TF_CONFIG` (`cluster_task`) and bounds the wait for the other workers (`worker_timeout`);
`check_same_values` compares the workers' options and `check_all_ready` stops every worker when
one fails its own start-up checks, both with one-line errors; `reporting_lost_workers` turns the
collective error of a worker lost during training into a one-line `WorkerLostError`.
`AverageReplicaStatistics` averages BatchNorm's moving statistics over all replicas before every
validation and save (each replica updates them from its own share of the batch).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import keras
import tensorflow as tf

__all__ = ["STRATEGIES", "KerasMultiWorkerMirroredStrategy", "make_strategy", "tf_config",
           "is_chief", "task_id", "cluster_task", "ClusterTask", "is_multi_worker",
           "check_same_step", "check_same_values", "check_all_ready", "WorkerMismatchError",
           "DEFAULT_WORKER_TIMEOUT", "average_over_replicas", "AverageReplicaStatistics",
           "WorkerLostError", "reporting_lost_workers"]

# Seconds a multi-worker process waits for the other workers of TF_CONFIG to start.
DEFAULT_WORKER_TIMEOUT = 600.0

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


class WorkerLostError(RuntimeError):
    """A worker of a multi-worker run stopped or became unreachable; the message is one line."""


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


# "host:port" or "[ipv6]:port".
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d{1,5}$")

ClusterTask = collections.namedtuple("ClusterTask", "type index address peers num_workers")
ClusterTask.__doc__ = """This process' task in `TF_CONFIG`.

Attributes:
    type: str. `"worker"` or `"chief"`.
    index: int. Index of the task within its job.
    address: str. Its `host:port`.
    peers: list of str. The `host:port` of every other chief or worker task.
    num_workers: int. Number of chief and worker tasks of the cluster.
"""


def cluster_task():
    """Checks `TF_CONFIG` for a multi-worker run and returns this process' `ClusterTask`.

    Raises:
        ValueError: `TF_CONFIG` is missing or not JSON, has jobs other than "chief" and
            "worker", an address that is not "host:port" or listed twice, or a task without
            type or index or that is not one of its cluster's tasks (one line).
    """
    config = tf_config()
    cluster, task = config.get("cluster"), config.get("task")
    if not cluster or not task:
        raise ValueError("needs the TF_CONFIG environment variable describing the cluster "
                         'and this task, e.g. {"cluster": {"worker": ["host1:12345", '
                         '"host2:12345"]}, "task": {"type": "worker", "index": 0}}')
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ValueError('TF_CONFIG "cluster" and "task" must be JSON objects')
    others = sorted(set(cluster) - {"chief", "worker"})
    if others:
        raise ValueError(f'TF_CONFIG cluster job "{others[0]}" is not supported: '
                         'MultiWorkerMirroredStrategy runs "worker" (and "chief") tasks only')
    jobs = {job: cluster.get(job) or [] for job in ("chief", "worker")}
    for job, addresses in jobs.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f'TF_CONFIG cluster "{job}" must be a list of "host:port" strings')
        for address in addresses:
            if not _ADDRESS.match(address):
                raise ValueError(f'TF_CONFIG cluster "{job}" address "{address}" is not '
                                 '"host:port" (e.g. "10.0.0.2:2222")')
    everyone = [(job, i, a) for job in ("chief", "worker") for i, a in enumerate(jobs[job])]
    addresses = [a for _, _, a in everyone]
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(f"TF_CONFIG cluster lists {repeated[0]} more than once; every task "
                         "needs its own host:port")
    if "type" not in task or "index" not in task:
        raise ValueError(f'TF_CONFIG task has no "{"type" if "type" not in task else "index"}"'
                         ', e.g. {"type": "worker", "index": 0}')
    task_type, index = task["type"], task["index"]
    if task_type not in jobs or not jobs[task_type]:
        have = ", ".join(f'"{job}"' for job, a in jobs.items() if a) or "none"
        raise ValueError(f'TF_CONFIG task type "{task_type}" is not a job of its cluster '
                         f"(jobs: {have}); use \"worker\" (or \"chief\")")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"TF_CONFIG task index must be an integer. Received: {index!r}")
    if not 0 <= index < len(jobs[task_type]):
        raise ValueError(f'TF_CONFIG task index {index!r} is out of range: the cluster has '
                         f'{len(jobs[task_type])} "{task_type}" address(es), index 0 to '
                         f"{len(jobs[task_type]) - 1}")
    address = jobs[task_type][index]
    peers = [a for job, i, a in everyone if (job, i) != (task_type, index)]
    return ClusterTask(task_type, index, address, peers, len(everyone))


def make_strategy(name, worker_timeout=DEFAULT_WORKER_TIMEOUT, format_stop=None):
    """Creates the strategy called `name`.

    With `multi_worker`, creating the strategy connects to every other task of `TF_CONFIG` and
    blocks inside TensorFlow until all have started (TensorFlow has no timeout for this, and the
    blocked process acts on no signal but SIGKILL). Here the wait prints one line, and a watchdog
    process prints a one-line message to stderr and ends this process (SIGKILL, exit status 137)
    after `worker_timeout` seconds, or on SIGINT (Ctrl-C). (SIGTERM does not stop the wait: once
    connecting, TensorFlow takes SIGTERM as a preemption notice for the coordination service.)

    Args:
        name: str. One of `STRATEGIES`.
        worker_timeout: float. Seconds to wait for the other workers (`multi_worker` only).
        format_stop: callable `format_stop(message, signum)` returning the line printed when
            the wait ends the process, from the watchdog's message and the signal (None for the
            timeout). Default: the message itself.

    Returns:
        A `tf.distribute.Strategy` (`KerasMultiWorkerMirroredStrategy` for `multi_worker`).

    Raises:
        ValueError: unknown name, `multi_worker` without a valid `TF_CONFIG` or with a port in
            use, or no TPU found (one line).
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        task = cluster_task()
        name = "Chief" if task.type == "chief" else f"Worker {task.index}"
        others = f"waiting for {', '.join(task.peers)}" if task.peers else "the only task"
        print(f"{name} of {task.num_workers} ({task.address}): {others} (up to "
              f"{worker_timeout:g} s)", flush=True)
        with _watchdog(task, worker_timeout, format_stop):
            try:
                return KerasMultiWorkerMirroredStrategy()
            except tf.errors.OpError as e:  # "Could not start gRPC server": the port is taken
                raise ValueError(f"{task.type} {task.index} cannot serve on {task.address} "
                                 f"({e.message.splitlines()[0][:120]}); is another process using "
                                 "that port?") from None
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


# The watchdog of `make_strategy`: a separate process, because the waiting process holds Python's
# global interpreter lock inside TensorFlow (no Python thread or signal handler of it runs).
# argv: parent pid, timeout (s), signal-pipe fd, timeout message, SIGINT message, SIGTERM message.
_WATCHDOG = """
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
parent, timeout, signals = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
messages = {None: sys.argv[4], signal.SIGINT: sys.argv[5], signal.SIGTERM: sys.argv[6]}
readable, _, _ = select.select([sys.stdin, signals], [], [], timeout)
if sys.stdin in readable:  # closed by the parent: the wait is over
    sys.exit(0)
signum = os.read(signals, 1)[0] if readable else None
sys.stderr.write(messages.get(signum, messages[signal.SIGTERM]) + "\\n")
sys.stderr.flush()
os.kill(parent, signal.SIGKILL)
"""


class _watchdog:
    """Kills this process if the block still runs after `timeout` s, or on SIGINT.

    While TensorFlow waits for the other workers, this process runs no Python code: Python's C
    signal handler still writes each signal's number to the `signal.set_wakeup_fd` pipe, which
    a small watchdog process reads; after printing the message it ends this process with SIGKILL
    (exit status 137), the only signal that a process blocked in TensorFlow obeys.
    """

    def __init__(self, task, timeout, format_stop):
        self.task, self.timeout = task, timeout
        self.format_stop = format_stop or (lambda message, signum: message)

    def __enter__(self):
        others = ", ".join(self.task.peers)
        messages = [self.format_stop(
            f"{self.task.type} {self.task.index} ({self.task.address}) waited {self.timeout:g} s "
            f"for the other workers of TF_CONFIG ({others}) without reaching all of them; start "
            "the same command on each with its own task index", None)]
        for signum in (signal.SIGINT, signal.SIGTERM):
            messages.append(self.format_stop(
                f"stopped by {signum.name} while waiting for the other workers ({others})",
                signum))
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_w, False)
        self._handlers = {signum: signal.signal(signum, lambda *_: None)
                          for signum in (signal.SIGINT, signal.SIGTERM)}
        self._old_wakeup_fd = signal.set_wakeup_fd(self._signal_w)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.timeout),
             str(self._signal_r), *messages],
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
    return _num_workers(strategy) > 1


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
    steps = [row[0] for row in _gather_per_worker(strategy, [step])]
    if len(set(steps)) > 1:
        raise WorkerMismatchError(
            f"the workers restored different steps ({', '.join(map(str, steps))}); every worker "
            "resumes from the chief's backup in --model-dir, which must be one directory shared "
            "by all workers")


# One tf.function for every `strategy.run` here: `strategy.run` of a plain Python function warns
# about eager overhead, and a new tf.function per call is traced again each time (TensorFlow
# warns about retracing after five).
@tf.function
def _as_row(x):
    return x[None]


def _gather_per_worker(strategy, values):
    """Every worker's int64 vector `values`, as a list indexed by worker (a collective)."""
    local = strategy.run(_as_row, args=(tf.constant(values, dtype=tf.int64),))
    rows = strategy.gather(local, axis=0).numpy()
    per_worker = strategy.num_replicas_in_sync // _num_workers(strategy)
    return [[int(v) for v in row] for row in rows[::per_worker]]


def _num_workers(strategy):
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker"))


def _fingerprint(value):
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def check_same_values(strategy, values, verb="were started with",
                      fix="start every worker with the same command"):
    """Checks that every worker of a multi-worker run was started with the same `values`.

    A collective operation: every worker must call it, with the same keys (no-op for other
    strategies). Only fingerprints (SHA-256, 64 bits) of the values travel between workers.

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        values: dict of str to JSON-serializable values, e.g. `{"batch_size": 128}`.
        verb: str. The message's verb ("the workers {verb} different {keys}").
        fix: str. The message's advice.

    Raises:
        WorkerMismatchError: some values differ between workers (one line naming the keys and
            the workers that differ from worker 0).
    """
    if not is_multi_worker(strategy):
        return
    keys = sorted(values)
    rows = _gather_per_worker(strategy, [_fingerprint(values[k]) for k in keys])
    differing = [k for i, k in enumerate(keys) if len({row[i] for row in rows}) > 1]
    if differing:
        workers = [str(w) for w, row in enumerate(rows) if row != rows[0]]
        raise WorkerMismatchError(
            f"the workers {verb} different {', '.join(differing)} (worker "
            f"{', '.join(workers)} differ{'s' if len(workers) == 1 else ''} from worker 0); "
            f"{fix}")


def check_all_ready(strategy, ready):
    """Waits until every worker has finished its own start-up checks; stops all if one failed.

    A collective operation: every worker must call it, also the one whose checks failed (it
    raises its own error after the call), so that the others stop instead of waiting for it in
    their first training step. No-op for other strategies.

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        ready: bool. Whether this worker's checks passed.

    Raises:
        WorkerMismatchError: this worker is ready but another one is not (one line naming it).
    """
    if not is_multi_worker(strategy):
        return
    rows = _gather_per_worker(strategy, [int(bool(ready))])
    failed = [str(w) for w, row in enumerate(rows) if not row[0]]
    if ready and failed:
        raise WorkerMismatchError(
            f"worker {', '.join(failed)} stopped with an error at start-up (see its output); fix "
            "it and start every worker again")


def average_over_replicas(strategy, variables):
    """Sets each variable, on every replica, to the mean of its replicas' values.

    For the non-trainable state that each replica updates from its own share of the batch:
    BatchNormalization's moving mean and variance (Keras' BatchNorm is not synchronized across
    replicas; `synchronized=True` fails for RevNets, whose backward pass calls BatchNorm inside
    nested `tf.function`s and loops, where TensorFlow refuses its `merge_call`). With several
    workers this is a collective: every worker must call it at the same point.

    The mean of the moving variances leaves out the spread between replicas' moving means (the
    variance of the global batch is larger by that spread); with shuffled data and a per-replica
    batch of 32 or more that spread is small.

    Args:
        strategy: the run's `tf.distribute.Strategy` (no-op with one replica).
        variables: list of float `keras.Variable`s created under `strategy.scope()`.
    """
    variables = [v for v in variables if keras.backend.is_float_dtype(v.dtype)]
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    # The mean over this process' replicas (no collective: a second MirroredStrategy in one
    # process would reuse the first one's collective keys), then over the workers.
    means = [tf.reduce_mean(tf.stack([tf.cast(c, tf.float32) for c in
                                      strategy.experimental_local_results(v.value)]), axis=0)
             for v in variables]
    if is_multi_worker(strategy):
        flat = tf.concat([tf.reshape(m, [-1]) for m in means], axis=0)
        # Every replica contributes its worker's mean.
        rows = strategy.gather(strategy.run(_as_row, args=(flat,)), axis=0)
        flat = tf.reduce_mean(rows, axis=0)
        sizes = [int(tf.size(m)) for m in means]
        means = [tf.reshape(part, m.shape) for part, m in zip(tf.split(flat, sizes), means)]
    for v, mean in zip(variables, means):
        v.assign(tf.cast(mean, v.dtype))


class AverageReplicaStatistics(keras.callbacks.Callback):
    """Averages the model's non-trainable float variables over replicas before they are used.

    Each replica (each worker) updates BatchNorm's moving statistics from its own share of the
    global batch, so without this every worker validates and saves its own statistics. This
    callback calls `average_over_replicas` before every validation and evaluation
    (`on_test_begin`), before the backups of `every_n_steps` (put it before the backup callback)
    and at the end of training, so that all workers validate with, save and export the same
    statistics. The same calls happen at the same steps in a resumed run.

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        every_n_steps: int or None. Also average after every global step divisible by it.
    """

    def __init__(self, strategy, every_n_steps=None):
        super().__init__()
        self.strategy, self.every_n_steps = strategy, every_n_steps

    def _average(self):
        average_over_replicas(self.strategy, self.model.non_trainable_variables)

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step % self.every_n_steps == 0:
                self._average()

    def on_test_begin(self, logs=None):
        self._average()

    def on_epoch_end(self, epoch, logs=None):
        self._average()  # the steps after the validation (none in fit) and before the save

    def on_train_end(self, logs=None):
        self._average()


# The errors a collective raises when another worker stops (TensorFlow 2.21: UnavailableError
# "The following tasks are unhealthy (stopped sending heartbeats)").
_LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                       tf.errors.DeadlineExceededError, tf.errors.CancelledError)


@contextlib.contextmanager
def reporting_lost_workers(strategy):
    """Turns the collective errors of a lost worker into a one-line `WorkerLostError`.

    TensorFlow reports a worker that stopped (killed, crashed, preempted) with a 60-line graph
    execution traceback from the first collective that misses it; the reason is one of its
    lines. Other errors and other strategies pass through unchanged.

    Args:
        strategy: the run's `tf.distribute.Strategy`.

    Raises:
        WorkerLostError: a collective failed because a worker is gone (names the task(s)).
    """
    try:
        yield
    except _LOST_WORKER_ERRORS as e:
        if not is_multi_worker(strategy):
            raise
        lines = [line.strip() for line in (e.message or "").splitlines() if line.strip()]
        reason = next((f"{line[line.find('The following'):]} {lines[i + 1]}"
                       for i, line in enumerate(lines[:-1]) if "unhealthy" in line), None)
        if reason is None:
            reason = next((line for line in lines if "aborted by" in line), lines[0] if lines
                          else type(e).__name__)
            reason = reason.split("aborted by: ")[-1]
        raise WorkerLostError(f"a worker stopped or is unreachable ({reason[:200]})") from None
