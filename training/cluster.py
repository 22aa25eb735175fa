"""The cluster of a multi-worker run: `TF_CONFIG` read by TensorFlow's resolver, then checked.

`tf.distribute.cluster_resolver.TFConfigClusterResolver` parses `TF_CONFIG` (the cluster's jobs and
this process' task); `cluster_task()` adds the checks that MultiWorkerMirroredStrategy needs and
TensorFlow leaves to a hang or a traceback later: only "worker" (and "chief") jobs, addresses of
the form "host:port", each listed once, and a task that is one of its cluster's. Every refusal is a
one-line `ClusterError`.

Example, with `TF_CONFIG='{"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type":
"worker", "index": 1}}'`:

```python
task = cluster_task()   # ClusterTask(type="worker", index=1, address="h2:2222", peers=["h1:2222"],
                        #             num_workers=2)
is_chief()              # False: worker 0 writes the run's files
```
"""

from __future__ import annotations

import dataclasses
import json
import re

from training.errors import ClusterError

__all__ = ["ClusterTask", "cluster_task", "is_chief"]

# "host:port" or "[ipv6]:port".
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d{1,5}$")
_EXAMPLE = ('e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": '
            '"worker", "index": 0}}')


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process' task in `TF_CONFIG`.

    Attributes:
        type: str. `"worker"` or `"chief"`.
        index: int. Index of the task within its job.
        address: str. Its `host:port`.
        peers: tuple of str. The `host:port` of every other chief or worker task.
        num_workers: int. Number of chief and worker tasks of the cluster.
    """

    type: str
    index: int
    address: str
    peers: tuple
    num_workers: int


def _error(reason):
    return ClusterError("distribution", "multi_worker", reason)


def _read():
    """(jobs, task type, task index) from TensorFlow's resolver, its errors in one line."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        jobs = resolver.cluster_spec().as_dict()
        task_type = resolver.task_type
    except json.JSONDecodeError as e:
        raise _error(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    except TypeError as e:  # ClusterSpec: a job that is not a list of "host:port" strings
        job = re.search(r"job '([^']+)'", str(e))
        raise _error(f'TF_CONFIG cluster "{job.group(1) if job else "worker"}" must be a list of '
                     '"host:port" strings') from None
    except (AttributeError, KeyError):  # TF_CONFIG, "cluster" or "task" not JSON objects
        raise _error('TF_CONFIG must be a JSON object with "cluster" and "task" objects, '
                     f"{_EXAMPLE}") from None
    try:
        index = resolver.task_id
    except (ValueError, TypeError) as e:
        raise _error(f"TF_CONFIG task index must be an integer ({e})") from None
    return jobs, task_type, index


def _check_jobs(jobs):
    others = sorted(set(jobs) - {"chief", "worker"})
    if others:
        raise _error(f'TF_CONFIG cluster job "{others[0]}" is not supported: '
                     'MultiWorkerMirroredStrategy runs "worker" (and "chief") tasks only')
    everyone = [(job, i, a) for job in ("chief", "worker") for i, a in enumerate(jobs.get(job, []))]
    for job, _, address in everyone:
        if not _ADDRESS.match(address):
            raise _error(f'TF_CONFIG cluster "{job}" address "{address}" is not "host:port" (e.g. '
                         '"10.0.0.2:2222")')
    addresses = [a for _, _, a in everyone]
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise _error(f"TF_CONFIG cluster lists {repeated[0]} more than once; every task needs its "
                     "own host:port")
    return everyone


def cluster_task():
    """Checks `TF_CONFIG` for a multi-worker run and returns this process' `ClusterTask`.

    Raises:
        ClusterError: `TF_CONFIG` is missing or not JSON, has jobs other than "chief" and
            "worker", an address that is not "host:port" or listed twice, or a task without
            type or index or that is not one of its cluster's tasks (one line).
    """
    jobs, task_type, index = _read()
    if not jobs or task_type is None and index is None:
        raise _error("needs the TF_CONFIG environment variable describing the cluster and this "
                     f"task, {_EXAMPLE}")
    everyone = _check_jobs(jobs)
    if task_type is None or index is None:
        raise _error(f'TF_CONFIG task has no "{"type" if task_type is None else "index"}", e.g. '
                     '{"type": "worker", "index": 0}')
    if not jobs.get(task_type):
        have = ", ".join(f'"{job}"' for job, a in jobs.items() if a) or "none"
        raise _error(f'TF_CONFIG task type "{task_type}" is not a job of its cluster (jobs: '
                     f'{have}); use "worker" (or "chief")')
    if not 0 <= index < len(jobs[task_type]):
        raise _error(f"TF_CONFIG task index {index!r} is out of range: the cluster has "
                     f'{len(jobs[task_type])} "{task_type}" address(es), index 0 to '
                     f"{len(jobs[task_type]) - 1}")
    peers = tuple(a for job, i, a in everyone if (job, i) != (task_type, index))
    return ClusterTask(task_type, index, jobs[task_type][index], peers, len(everyone))


def is_chief():
    """Whether this process writes the run's files: the chief, or worker 0 of a cluster without
    a chief, or a process without `TF_CONFIG`.

    Raises:
        ClusterError: `TF_CONFIG` is not valid (see `cluster_task`).
    """
    jobs, task_type, index = _read()
    if task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in jobs)
