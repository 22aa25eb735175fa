"""Memory meters shared by the benchmarks: peak RSS of a region on CPU, allocator peak on GPU.

Linux/glibc facts they rely on (see benchmarks/README.md): TensorFlow does not return freed memory to
the OS, so each configuration runs in its own process; `MALLOC_MMAP_THRESHOLD_=131072` and
`TF_ENABLE_ONEDNN_OPTS=0` in the child's environment make freed buffers leave the resident set;
`malloc_trim(0)` before a region, and `echo 5 > /proc/self/clear_refs` resets the peak (VmHWM).
"""

import os
import re

MIB = 2.0**20


def proc_status_bytes(field):
    """`field` (e.g. "VmRSS", "VmHWM") of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def malloc_trim():
    """`malloc_trim(0)`, unless `TF_REVNET_BENCH_NO_TRIM=1` (measure what a user's process does)."""
    if os.environ.get("TF_REVNET_BENCH_NO_TRIM") == "1":  # measure what a user's process does
        return
    _malloc_trim()


def _malloc_trim():
    """Returns the free pages of every glibc heap to the OS (no-op elsewhere).

    glibc serves a large request from a free chunk of an existing heap before it considers `mmap`,
    so without this, memory freed by the warm-up (tracing, XLA compilation) and still resident
    would be reused by the measured step without raising the RSS.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuMeter:
    """Peak resident set size of a region, above the RSS at its start (Linux)."""

    name = "cpu_rss"

    def __init__(self):
        self._base = 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def start(self):
        malloc_trim()
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Resets VmHWM to the current RSS.
        self._base = proc_status_bytes("VmRSS")

    def stop(self):
        """Returns `(peak above start, RSS now above start)` in bytes."""
        if self.resettable:
            peak = proc_status_bytes("VmHWM")
        else:  # Fallback: the lifetime peak (includes the warm-up step; an upper bound).
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self._base, proc_status_bytes("VmRSS") - self._base


class AllocatorMeter:
    """Peak bytes held by TensorFlow's allocator for `device` above the bytes held at the start.

    Used on a GPU ("GPU:0"), and on CPU with `--meter allocator` ("CPU:0"; only the oneDNN CPU
    allocator keeps these statistics; it pools allocations above 256 KB, smaller ones go to
    `malloc` and are not counted).
    """

    resettable = True

    def __init__(self, tf, device):
        self._tf = tf
        self._device = device
        self._base = 0
        self.name = f"allocator_peak:{device}"

    def start(self):
        self._tf.config.experimental.reset_memory_stats(self._device)
        self._base = self._tf.config.experimental.get_memory_info(self._device)["current"]

    def stop(self):
        info = self._tf.config.experimental.get_memory_info(self._device)
        return info["peak"] - self._base, info["current"] - self._base


def run_child(command, env, timeout, key):
    """Runs one measuring child process and returns its `RESULT {json}` line as a dict.

    `key` (a dict naming the configuration) is returned with an `"error"` (the last lines of the
    child's output, or "timeout") when the child prints no result.
    """
    import json
    import subprocess
    import time

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**key, "error": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**key, "error": " | ".join(tail)}


def measure_fit(model, x, y, batch_size, warmup, steps):
    """`model.fit` on `warmup + steps` copies of the batch `(x, y)`, measuring each step after the
    warm-up with the meter of this machine (`AllocatorMeter` on a GPU, else `CpuMeter`).

    Returns:
        dict: `meter` (its name), `peaks_mb` and `times_s` (one per measured step), `first_step_s`
        (the warm-up, tracing included), `graph_mb` (what stays resident after the warm-up above
        the built model) and `process_mb` (the process' peak RSS above the built model).
    """
    import gc
    import resource
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    meter = AllocatorMeter(tf, "GPU:0") if tf.config.list_physical_devices("GPU") else CpuMeter()
    total = warmup + steps
    xs, ys = np.concatenate([x] * total), np.concatenate([y] * total)
    gc.collect()
    malloc_trim()
    rss_built = proc_status_bytes("VmRSS")
    record = {"meter": meter.name, "peaks_mb": [], "times_s": []}

    class Measure(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t_begin = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            if batch >= warmup:
                gc.collect()
                meter.start()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            now = time.perf_counter()
            if batch == warmup - 1:
                record["first_step_s"] = now - self.t_begin
                gc.collect()
                malloc_trim()
                record["graph_mb"] = (proc_status_bytes("VmRSS") - rss_built) / MIB
            if batch >= warmup:
                peak, _ = meter.stop()
                record["peaks_mb"].append(peak / MIB)
                record["times_s"].append(now - self.t0)

    model.fit(xs, ys, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[Measure()])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["process_mb"] = (peak_rss - rss_built) / MIB
    return record
