"""`--distribution mirrored` and `multi_worker` train like one device with the same global batch.

`mirrored` runs on two logical CPU devices in a subprocess (logical devices must be configured
before TensorFlow initializes); `multi_worker` runs two worker processes on 127.0.0.1 with their
`TF_CONFIG`, one CPU replica each. The model has no BatchNorm (a small CNN registered through
`classifier.MODEL_BUILDERS`): under a `tf.distribute` strategy BatchNorm normalizes each replica's part
of the batch (Keras' default, `synchronized=False`), which by design differs from one device;
everything else (data sharding, global-batch loss averaging, gradient all-reduce, the schedule)
must give the same losses.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tests.training.test_distribute import small_cnn
    from training import classifier, command_line, train

    classifier.MODEL_BUILDERS["small_cnn"] = small_cnn
    data_dir, out_dir = sys.argv[1:3]
    # BatchNorm statistics that differ per replica become their mean on every replica (first:
    # collectives of a second MirroredStrategy in one process collide with the first's).
    from training import replica_sync
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        bn = keras.layers.BatchNormalization()
        bn.build((None, 2))
    for k, component in enumerate(bn.moving_mean.value.values):
        component.assign([1.0 + k, -4.0 * k])
    replica_sync.average_over_replicas(strategy, bn.non_trainable_variables)
    averaged = [c.numpy().tolist() for c in bn.moving_mean.value.values]
    losses = {"averaged": averaged}
    for strategy in ("none", "mirrored"):
        result = train.run([
            "--model", "small_cnn", "--data-dir", data_dir, "--train-examples", "128",
            "--test-examples", "32", "--epochs", "2", "--steps-per-epoch", "4",
            "--batch-size", "32", "--learning-rate", "0.05", "--verbose", "0",
            "--distribution", strategy, "--model-dir", f"{out_dir}/{strategy}",
            "--no-export"])
        losses[strategy] = {**result.history, "replicas": result.config["num_replicas"]}
    try:  # a global batch that the two replicas do not divide
        train.run(["--model", "small_cnn", "--data-dir", data_dir, "--batch-size", "33",
                   "--distribution", "mirrored", "--model-dir", f"{out_dir}/odd", "--no-export"])
    except command_line.ConfigError as e:
        losses["odd_batch_error"] = command_line.error_line(e)
    print("RESULT " + json.dumps(losses))
    """
)


def test_mirrored_on_two_cpus_matches_one_device(cifar10_small_dir, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(cifar10_small_dir), str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["none"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(result["mirrored"][key], result["none"][key], rtol=1e-5,
                                   err_msg=key)
    # The losses moved (a real run, not a constant).
    assert result["none"]["loss"][0] != result["none"]["loss"][1]
    assert result["averaged"] == [[1.5, -2.0], [1.5, -2.0]]
    assert result["odd_batch_error"] == (
        "--batch-size 33: the global batch is split into 2 equal replica batches (mirrored); use "
        "a multiple of 2")


def small_cnn(input_shape, classes, classifier_activation, kernel_regularizer, batch_norm=False,
              **kwargs):
    """A CNN without BatchNorm (the test model of the multi-worker tests), or with one."""
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu",
                            kernel_regularizer=kernel_regularizer)(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(momentum=0.5)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation=classifier_activation,
                                 kernel_regularizer=kernel_regularizer)(x)
    return keras.Model(inputs, outputs)


# One worker of a multi-worker run: `worker.py STALL_STEP ARGS...` runs `train.run(ARGS)`; with
# STALL_STEP > 0 it prints STALLED after that global step and waits to be killed.
# `worker.py main ARGS...` runs `train.main(ARGS)` (exit status 2 and one line on bad input).
WORKER_SCRIPT = textwrap.dedent(
    """
    import functools, json, os, sys, time
    import keras
    from tests.training.test_distribute import small_cnn
    from training import classifier, data, train

    class StallAt(keras.callbacks.Callback):
        def __init__(self, step):
            super().__init__()
            self.step = step

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == self.step:
                print("STALLED", flush=True)
                time.sleep(600)

    classifier.MODEL_BUILDERS["small_cnn"] = small_cnn
    classifier.MODEL_BUILDERS["small_bn_cnn"] = functools.partial(small_cnn, batch_norm=True)
    if os.environ.get("WORKER_DATA"):  # this host's --data-dir holds other images
        load = data.load
        data.load = lambda **kw: load(**{**kw, "data_dir": os.environ["WORKER_DATA"]})
    if sys.argv[1] == "main":  # the command line's exit status and one-line errors
        sys.exit(train.main(sys.argv[2:]))
    stall = int(sys.argv[1])
    result = train.run(sys.argv[2:], callbacks=[StallAt(stall)] if stall else [])
    print("RESULT " + json.dumps({**result.history,
                                  "test_loss": result.test_loss,
                                  "replicas": result.config["num_replicas"]}))
    """
)


@pytest.fixture
def script(tmp_path):
    """`WORKER_SCRIPT` as a file."""
    path = tmp_path / "worker.py"
    path.write_text(WORKER_SCRIPT)
    return path


def _run_args(data_dir, model_dir, strategy, extra=()):
    return ["--model", "small_cnn", "--data-dir", str(data_dir), "--train-examples", "128",
            "--test-examples", "32", "--epochs", "2", "--steps-per-epoch", "4",
            "--batch-size", "32", "--learning-rate", "0.05", "--verbose", "0",
            "--distribution", strategy, "--model-dir", str(model_dir), "--no-export", *extra]


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _local_addresses(n):
    """`n` free `127.0.0.1:port` addresses for a TF_CONFIG cluster."""
    return [f"127.0.0.1:{port}" for port in _free_ports(n)]


def _error_lines(stderr):
    """The CLI's error lines; a traceback fails the test."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("python -m training.train")]


def _assert_all_stop_with(procs, message):
    """Every process exits with status 2 and prints the one-line error `message`."""
    for proc, (_, err) in zip(procs, _finish(procs, timeout=120)):
        assert proc.returncode == 2, err[-3000:]
        assert _error_lines(err) == [
            f"python -m training.train: error: --distribution multi_worker: {message}"]


def _start_workers(script, argv, workers, stall_step=0, indexes=None, envs=None):
    """Starts one process per address of `workers` (or per index of `indexes`), each with its
    `TF_CONFIG`; `argv` (a list of lists) and `stall_step` (a list) may differ per process, and
    `envs` (a list of dicts) adds environment variables per process."""
    procs = []
    indexes = range(len(workers)) if indexes is None else indexes
    for n, index in enumerate(indexes):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        args = argv[n] if isinstance(argv[0], list) else argv
        stall = stall_step[n] if isinstance(stall_step, list) else stall_step
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(stall), *args], cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CONFIG": json.dumps(tf_config),
                 **(envs[n] if envs else {})}))
    return procs


def _finish(procs, timeout=300):
    """(stdout, stderr) of every process; all are killed if one is not done in time."""
    deadline = time.time() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.time())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _result(stdout):
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_multi_worker_on_two_local_processes_matches_one_device(cifar10_small_dir, script,
                                                                tmp_path, monkeypatch):
    """Two worker processes on 127.0.0.1 (one CPU replica each, global batch 32) give the losses
    of one device with the same global batch; the chief (worker 0) writes the run directory and
    worker 1 keeps its state under `worker-1/`."""
    from training import classifier, train

    workers = _local_addresses(2)
    procs = _start_workers(script, _run_args(cifar10_small_dir, tmp_path / "mw", "multi_worker"),
                           workers)
    try:  # the one-device reference, in this process while the workers run
        monkeypatch.setitem(classifier.MODEL_BUILDERS, "small_cnn", small_cnn)
        reference = train.run(_run_args(cifar10_small_dir, tmp_path / "one", "none"))
    finally:
        outputs = _finish(procs)
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert reference.config["num_replicas"] == 1
    for stdout, _ in outputs:
        got = _result(stdout)
        assert got["replicas"] == 2
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            np.testing.assert_allclose(got[key], reference.history[key], rtol=1e-5, err_msg=key)
    # The losses moved (a real run, not a constant).
    assert reference.history["loss"][0] != reference.history["loss"][1]
    mw = tmp_path / "mw"
    (chief_out, _), (other_out, _) = outputs
    assert "Summary: small_cnn" in chief_out and "Summary:" not in other_out
    assert (f"Worker 1 done: test accuracy {reference.test_accuracy:.4f} (the same on every "
            f"worker); the run's files are the chief's, in {mw}") in other_out, other_out
    chief_files = ("config.json", "summary.json", "training_log.csv", "model.weights.h5",
                   "model.keras")
    for name in chief_files:
        assert (mw / name).is_file(), name
        assert (mw / "worker-1" / name).is_file(), name
    assert sorted(p.name for p in mw.iterdir() if p.name.startswith("worker-")) == ["worker-1"]
    assert json.loads((mw / "summary.json").read_text())["model_dir"] == str(mw)
    assert json.loads((mw / "config.json").read_text())["num_replicas"] == 2


def test_lost_worker_stops_the_others_with_one_line(cifar10_small_dir, script, tmp_path):
    """Worker 1 is killed (SIGKILL) in epoch 1: worker 0's next collective fails, and it stops
    with one line naming the lost task (not TensorFlow's 60-line traceback), exit status 1."""
    workers = _local_addresses(2)
    procs = _start_workers(script, _run_args(cifar10_small_dir, tmp_path / "mw", "multi_worker"),
                           workers, stall_step=["main", 2])
    try:
        line, deadline = "", time.time() + 120
        while "STALLED" not in line and time.time() < deadline and procs[1].poll() is None:
            line = procs[1].stdout.readline()
        assert "STALLED" in line, procs[1].stderr.read()[-3000:]
        procs[1].send_signal(signal.SIGKILL)
    finally:
        (_, err), _ = _finish(procs, timeout=120)
    assert procs[0].returncode == 1, err[-3000:]
    assert _error_lines(err) == [
        "python -m training.train: error: --distribution multi_worker: a worker stopped or is "
        "unreachable (The following tasks are unhealthy (stopped sending heartbeats): "
        "/job:worker/replica:0/task:1); start every worker again with the same command: they "
        "resume from the last backup"]


def test_multi_worker_batch_norm_statistics_are_the_same_on_every_worker(cifar10_small_dir,
                                                                        script, tmp_path):
    """Each worker updates BatchNorm's moving statistics from its half of the batch; they are
    averaged before validation and saves, so both workers save the same weights (and the
    statistics moved from their initial values)."""
    workers = _local_addresses(2)
    argv = [*_run_args(cifar10_small_dir, tmp_path / "mw", "multi_worker"), "--model",
            "small_bn_cnn", "--epochs", "1", "--steps-per-epoch", "2"]
    procs = _start_workers(script, argv, workers)
    for proc, (_, err) in zip(procs, _finish(procs)):
        assert proc.returncode == 0, err[-3000:]
    chief = _h5_arrays(tmp_path / "mw" / "model.weights.h5")
    other = _h5_arrays(tmp_path / "mw" / "worker-1" / "model.weights.h5")
    assert sorted(chief) == sorted(other)
    moving = [name for name in chief if "batch_normalization" in name and chief[name].size == 8]
    assert len(moving) == 4, sorted(chief)  # gamma, beta, moving mean and variance
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    stats = [chief[name] for name in moving]
    assert sum(np.abs(s - 1).max() > 1e-3 and np.abs(s).max() > 1e-3 for s in stats) >= 2


@pytest.mark.slow
def test_multi_worker_killed_and_restarted_resumes(cifar10_small_dir, script, tmp_path,
                                                   monkeypatch):
    """Both workers are killed (SIGKILL) after global step 3 (epoch 1, batch 3), with backups every
    2 steps; the same two commands started again resume at step 2 and end with the weights and
    test loss of an uninterrupted one-device run; workers that restore different steps stop with
    a one-line error. (Killed early: steps 2 and 3 use the full
    learning rate, 100 times that of the last two steps, so a wrong resume shows.)"""
    from training import classifier, train

    workers = _local_addresses(2)
    argv = _run_args(cifar10_small_dir, tmp_path / "mw", "multi_worker",
                     extra=["--save-every-steps", "2"])
    victims = _start_workers(script, argv, workers, stall_step=3)
    try:
        deadline = time.time() + 300
        for victim in victims:
            line = ""
            while "STALLED" not in line and time.time() < deadline and victim.poll() is None:
                line = victim.stdout.readline()
            assert "STALLED" in line, victim.stderr.read()[-3000:]
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
    finally:
        _finish(victims, timeout=30)
    mw = tmp_path / "mw"
    for directory in (mw, mw / "worker-1"):
        metadata = json.loads((directory / "backup" / "training_metadata.json").read_text())
        assert metadata["step"] == 2 and metadata["epoch"] == 0, directory
        assert not (directory / "summary.json").exists()

    # Workers that do not see the same backup (here the chief's is gone, as on hosts without a
    # shared run directory) stop, naming the steps, instead of training out of step.
    shutil.copytree(mw, tmp_path / "unshared")
    shutil.rmtree(tmp_path / "unshared" / "backup")
    unshared = _local_addresses(2)
    procs = _start_workers(script, _run_args(cifar10_small_dir, tmp_path / "unshared",
                                             "multi_worker", extra=["--save-every-steps", "2"]),
                           unshared)
    for proc, (_, err) in zip(procs, _finish(procs)):
        assert proc.returncode != 0
        assert ("WorkerMismatchError: distribution=multi_worker: the workers restored different "
                "steps (0, 2); every worker resumes from the chief's backup in --model-dir") in err, \
            err[-3000:]

    procs = _start_workers(script, argv, workers)  # the same commands
    try:
        monkeypatch.setitem(classifier.MODEL_BUILDERS, "small_cnn", small_cnn)
        reference = train.run(_run_args(cifar10_small_dir, tmp_path / "one", "none"))
    finally:
        outputs = _finish(procs)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "Resuming at step 2 of 8 (epoch 1, batch 2)" in out, out
        np.testing.assert_allclose(_result(out)["test_loss"], reference.test_loss, rtol=1e-5)
    for directory in (mw, mw / "worker-1"):
        weights = _h5_arrays(directory / "model.weights.h5")
        want = _h5_arrays(tmp_path / "one" / "model.weights.h5")
        assert sorted(weights) == sorted(want) and len(want) >= 4
        for name in want:
            np.testing.assert_allclose(weights[name], want[name], rtol=0, atol=1e-5,
                                       err_msg=name)
        assert not (directory / "backup").exists()
        with open(directory / "training_log.csv") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]


def _h5_arrays(path):
    import h5py

    arrays = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


@pytest.mark.parametrize("tf_config, message", [
    (None, 'needs the TF_CONFIG environment variable describing the cluster and this task, e.g. '
           '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
           '"index": 0}}'),
    ("{'cluster': ", "TF_CONFIG is not valid JSON (Expecting property name enclosed in double "
                     "quotes at character 1)"),
    ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker",
                                                                      "index": 2}},
     'TF_CONFIG task index 2 is out of range: the cluster has 2 "worker" address(es), index 0 '
     "to 1"),
    ({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}},
     'TF_CONFIG task type "ps" is not a job of its cluster (jobs: "worker"); use "worker" (or '
     '"chief")'),
    ({"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}},
     'TF_CONFIG cluster "worker" must be a list of "host:port" strings'),
    ({"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
      "task": {"type": "worker", "index": 0}},
     'TF_CONFIG cluster job "ps" is not supported: MultiWorkerMirroredStrategy runs "worker" '
     '(and "chief") tasks only'),
    ({"cluster": {"worker": ["127.0.0.1:1", "badhost:x"]}, "task": {"type": "worker",
                                                                    "index": 0}},
     'TF_CONFIG cluster "worker" address "badhost:x" is not "host:port" (e.g. "10.0.0.2:2222")'),
    ({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}},
     'TF_CONFIG cluster "worker" address "localhost" is not "host:port" (e.g. "10.0.0.2:2222")'),
    ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:1"]}, "task": {"type": "worker",
                                                                      "index": 0}},
     "TF_CONFIG cluster lists 127.0.0.1:1 more than once; every task needs its own host:port"),
    ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker"}},
     'TF_CONFIG task has no "index", e.g. {"type": "worker", "index": 0}'),
    ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker",
                                                                      "index": "x"}},
     "TF_CONFIG task index must be an integer (invalid literal for int() with base 10: 'x')"),
])
def test_multi_worker_bad_tf_config_one_line(tf_config, message, tmp_path, capsys, monkeypatch):
    from training import train

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config if isinstance(tf_config, str)
                           else json.dumps(tf_config))
    argv = ["--distribution", "multi_worker", "--model-dir", str(tmp_path / "m"),
            "--data-dir", str(tmp_path), "--export-dir", str(tmp_path / "e")]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m training.train: error: --distribution multi_worker: {message}"]
    assert not (tmp_path / "m").exists()


def test_multi_worker_needs_model_dir_one_line(tmp_path, capsys):
    from training import train

    assert train.main(["--distribution", "multi_worker", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m training.train: error: --distribution multi_worker: needs --model-dir: one run "
        "directory that every worker sees (e.g. on a network file system), the same in each "
        "worker's command"]


def test_worker_without_partner_stops_after_timeout_or_ctrl_c(cifar10_small_dir, script,
                                                              tmp_path):
    """TensorFlow waits for a missing worker forever and ignores Ctrl-C meanwhile: the CLI says
    what it waits for, and stops with one line after --worker-timeout or on SIGINT."""
    argv = _run_args(cifar10_small_dir, tmp_path / "mw", "multi_worker")
    lonely = _local_addresses(2)
    timed = _start_workers(script, [*argv, "--worker-timeout", "3"], lonely, stall_step="main",
                           indexes=[0])[0]
    others = _local_addresses(2)
    interrupted = _start_workers(script, argv, others, stall_step="main", indexes=[1])[0]
    try:
        line = interrupted.stdout.readline()  # printed just before TensorFlow blocks
        assert line.strip() == (f"Worker 1 of 2 ({others[1]}): waiting for {others[0]} "
                                "(up to 600 s)")
        time.sleep(1)
        interrupted.send_signal(signal.SIGINT)
        outputs = _finish([timed, interrupted], timeout=120)
    finally:
        _finish([timed, interrupted], timeout=1)
    assert timed.returncode == interrupted.returncode == -signal.SIGKILL  # the shell says 137
    (timed_out, timed_err), (_, interrupted_err) = outputs
    assert f"Worker 0 of 2 ({lonely[0]}): waiting for {lonely[1]} (up to 3 s)" in timed_out
    assert _error_lines(timed_err) == [
        f"python -m training.train: error: --distribution multi_worker: worker 0 ({lonely[0]}) "
        f"waited 3 s for the other workers of TF_CONFIG ({lonely[1]}) without reaching all of "
        "them; start the same command on each with its own task index (or raise "
        "--worker-timeout 3)"]
    assert _error_lines(interrupted_err) == [
        "python -m training.train: error: --distribution multi_worker: stopped by SIGINT while "
        f"waiting for the other workers ({others[0]})"]
    assert not (tmp_path / "mw").exists()


def test_workers_that_disagree_stop_together_with_one_line(cifar10_small_dir, script, tmp_path):
    """Workers started with different options, or one whose own state folder holds another run,
    all stop at start-up with one line (not a collective's shape-mismatch traceback, not a hang
    of the others)."""
    # Different --batch-size and --model-dir.
    workers = _local_addresses(2)
    argvs = [_run_args(cifar10_small_dir, tmp_path / "a", "multi_worker"),
             _run_args(cifar10_small_dir, tmp_path / "b", "multi_worker",
                       extra=["--batch-size", "64"])]
    procs = _start_workers(script, argvs, workers, stall_step="main")
    _assert_all_stop_with(procs, "the workers were started with different --batch-size, "
                                 "--model-dir (worker 1 differs from worker 0); start every "
                                 "worker with the same command")
    # The same --data-dir path holds other images on worker 1's host (one class fewer).
    other_copy = tmp_path / "other_copy"
    shutil.copytree(cifar10_small_dir, other_copy)
    for split in ("train", "test"):
        shutil.rmtree(other_copy / split / "truck")
    workers = _local_addresses(2)
    procs = _start_workers(script, _run_args(cifar10_small_dir, tmp_path / "c", "multi_worker"),
                           workers, stall_step="main", envs=[{}, {"WORKER_DATA": str(other_copy)}])
    _assert_all_stop_with(procs, "the workers loaded data with different class names (worker 1 "
                                 "differs from worker 0); every worker's data (the --data-dir or "
                                 "--dataset of its host) must be the same")
    # Worker 1's state folder holds an unfinished run of another seed: it says so, naming the
    # --model-dir the user gave, and worker 0 stops too instead of waiting for it.
    mw = tmp_path / "mw"
    (mw / "worker-1").mkdir(parents=True)
    (mw / "worker-1" / "config.json").write_text(json.dumps(
        {"command": "python -m training.train --seed 1", "fingerprint": {"seed": 1}}))
    workers = _local_addresses(2)
    procs = _start_workers(script, _run_args(cifar10_small_dir, mw, "multi_worker"), workers,
                           stall_step="main")
    (_, err0), (_, err1) = _finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert _error_lines(err0) == [
        "python -m training.train: error: --distribution multi_worker: worker 1 stopped with an "
        "error at start-up (see its output); fix it and start every worker again"]
    [line] = _error_lines(err1)
    assert line.startswith(f"python -m training.train: error: --model-dir {mw}: this worker's "
                           "state folder worker-1/ holds an unfinished run with different "), line
    assert "seed" in line and "python -m training.train --seed 1" in line
    # The chief wrote nothing (it holds the run's lock only while it runs).
    assert sorted(p.name for p in mw.iterdir()) == [".lock", "worker-1"]
