"""Keeping the replicas and workers of a distributed run in step.

- `check_same_values`, `check_all_ready`, `check_same_step`: collectives that every worker of a
  multi-worker run calls at start-up, so that workers started with different options or data, a
  worker that failed its own start-up checks, or workers that restored different steps stop
  together with one line each (`WorkerMismatchError`) instead of hanging or failing in a
  collective with a shape-mismatch traceback. Only 64-bit fingerprints travel between workers.
- `average_over_replicas` and the `AverageReplicaStatistics` callback: BatchNorm's moving
  statistics, which each replica updates from its own share of the batch, averaged over all
  replicas of all workers before every validation, backup and the export.
- `reporting_lost_workers`: the collective error of a worker lost during training as a one-line
  `WorkerLostError`.

Every function is a no-op for strategies that do not synchronize several workers (or replicas).
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import keras
import tensorflow as tf

from training.errors import WorkerLostError, WorkerMismatchError

__all__ = ["is_multi_worker", "check_same_values", "check_all_ready", "check_same_step",
           "average_over_replicas", "AverageReplicaStatistics", "reporting_lost_workers"]


def _num_workers(strategy):
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker"))


def is_multi_worker(strategy):
    """Whether `strategy` synchronizes several worker processes."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return _num_workers(strategy) > 1


# One tf.function for every `strategy.run` here: `strategy.run` of a plain Python function warns
# about eager overhead, and a new tf.function per call is traced again each time.
@tf.function
def _as_row(x):
    return x[None]


def _gather_per_worker(strategy, values):
    """Every worker's int64 vector `values`, as a list indexed by worker (a collective)."""
    local = strategy.run(_as_row, args=(tf.constant(values, dtype=tf.int64),))
    rows = strategy.gather(local, axis=0).numpy()
    per_worker = strategy.num_replicas_in_sync // _num_workers(strategy)
    return [[int(v) for v in row] for row in rows[::per_worker]]


def _fingerprint(value):
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _mismatch(reason):
    return WorkerMismatchError("distribution", "multi_worker", reason)


def check_same_values(strategy, values, verb="were started with",
                      fix="start every worker with the same command"):
    """Checks that every worker of a multi-worker run has the same `values` (a collective).

    Args:
        strategy: the run's `tf.distribute.Strategy`.
        values: dict of str to JSON-serializable values, e.g. `{"--batch-size": 128}`; every
            worker passes the same keys.
        verb: str. The message's verb ("the workers {verb} different {keys}").
        fix: str. The message's advice.

    Raises:
        WorkerMismatchError: some values differ (one line naming the keys and the workers that
            differ from worker 0).
    """
    if not is_multi_worker(strategy):
        return
    keys = sorted(values)
    rows = _gather_per_worker(strategy, [_fingerprint(values[k]) for k in keys])
    differing = [k for i, k in enumerate(keys) if len({row[i] for row in rows}) > 1]
    if differing:
        workers = [str(w) for w, row in enumerate(rows) if row != rows[0]]
        raise _mismatch(f"the workers {verb} different {', '.join(differing)} (worker "
                        f"{', '.join(workers)} differ{'s' if len(workers) == 1 else ''} from "
                        f"worker 0); {fix}")


def check_all_ready(strategy, ready):
    """Waits until every worker has finished its own start-up checks; stops all if one failed.

    A collective: every worker calls it, also the one whose checks failed (it raises its own
    error after the call), so that the others stop instead of waiting for it.

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
        raise _mismatch(f"worker {', '.join(failed)} stopped with an error at start-up (see its "
                        "output); fix it and start every worker again")


def check_same_step(strategy, step):
    """Checks that every worker restored the same global step (a collective).

    Raises:
        WorkerMismatchError: the workers restored different steps (one line, with each step).
    """
    if not is_multi_worker(strategy):
        return
    steps = [row[0] for row in _gather_per_worker(strategy, [step])]
    if len(set(steps)) > 1:
        raise _mismatch(f"the workers restored different steps ({', '.join(map(str, steps))}); "
                        "every worker resumes from the chief's backup in --model-dir, which must "
                        "be one directory shared by all workers")


def average_over_replicas(strategy, variables):
    """Sets each variable, on every replica, to the mean of its replicas' values.

    For the non-trainable state that each replica updates from its own share of the batch:
    BatchNormalization's moving mean and variance (`synchronized=True` fails for RevNets, whose
    backward pass calls BatchNorm inside nested `tf.function`s and loops, where TensorFlow
    refuses its `merge_call`). With several workers this is a collective. The mean of the moving
    variances leaves out the spread between the replicas' moving means, small with shuffled data
    and replica batches of 32 or more.

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
        rows = strategy.gather(strategy.run(_as_row, args=(flat,)), axis=0)
        flat = tf.reduce_mean(rows, axis=0)
        sizes = [int(tf.size(m)) for m in means]
        means = [tf.reshape(part, m.shape) for part, m in zip(tf.split(flat, sizes), means)]
    for v, mean in zip(variables, means):
        v.assign(tf.cast(mean, v.dtype))


class AverageReplicaStatistics(keras.callbacks.Callback):
    """Averages the model's non-trainable float variables over replicas before they are used.

    Calls `average_over_replicas` before every validation (`on_test_begin`), after every global
    step divisible by `every_n_steps` (put it before the backup callback), at the end of every
    epoch and of training, so that all workers validate with, save and export the same statistics.

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
        self._average()

    def on_train_end(self, logs=None):
        self._average()


# The errors a collective raises when another worker stops (TensorFlow 2.21: UnavailableError
# "The following tasks are unhealthy (stopped sending heartbeats)").
_LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                       tf.errors.DeadlineExceededError, tf.errors.CancelledError)


def _lost_task(message):
    """The line of a collective's error message that names the lost task(s). TensorFlow gives
    them only in the text: "The following tasks are unhealthy (stopped sending heartbeats):"
    followed by the task names on the next line, or "... aborted by: <task>"."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if "unhealthy" in line:
            return f"{line[line.find('The following'):]} {lines[i + 1]}"
    reason = next((line for line in lines if "aborted by" in line), lines[0] if lines else "")
    return reason.split("aborted by: ")[-1]


@contextlib.contextmanager
def reporting_lost_workers(strategy):
    """Turns the collective errors of a lost worker into a one-line `WorkerLostError`.

    Other errors and other strategies pass through unchanged.
    """
    try:
        yield
    except _LOST_WORKER_ERRORS as e:
        if not is_multi_worker(strategy):
            raise
        reason = _lost_task(e.message) or type(e).__name__
        raise WorkerLostError(f"a worker stopped or is unreachable ({reason[:200]})") from None
