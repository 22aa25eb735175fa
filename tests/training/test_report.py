"""Tests of training/report.py's heartbeat and of the first step's heartbeat in training/fitting.py."""

import time

from training import fitting, report


def test_heartbeat_writes_a_line_per_interval_and_stops_with_the_block():
    lines = []
    with report.heartbeat(lines.append, "exporting", every=0.05):
        time.sleep(0.32)
    count = len(lines)
    assert 4 <= count <= 7, lines
    assert lines[0].startswith("  ... exporting (") and lines[0].endswith(" s)")
    time.sleep(0.2)
    assert len(lines) == count  # nothing after the block


def test_first_training_step_has_a_heartbeat_and_later_steps_none(monkeypatch):
    monkeypatch.setattr(report, "HEARTBEAT_SECONDS", 0.05)
    lines = []
    progress = fitting.EpochProgress(total_epochs=1, validation_steps=1, validation_name="x",
                                     report=lines.append)
    progress.set_params({"verbose": 2, "epochs": 1, "steps": 3})
    progress.on_train_begin()
    progress.on_epoch_begin(0)
    progress.on_train_batch_begin(0)
    time.sleep(0.3)
    progress.on_train_batch_end(0)
    traced = [line for line in lines if "tracing the training graph" in line]
    assert len(traced) >= 3, lines
    for batch in (1, 2):
        progress.on_train_batch_begin(batch)
        time.sleep(0.15)
        progress.on_train_batch_end(batch)
    assert len([line for line in lines if "tracing" in line and "..." in line]) == len(traced)


def test_a_run_stopped_in_its_first_step_stops_the_heartbeat(monkeypatch):
    monkeypatch.setattr(report, "HEARTBEAT_SECONDS", 0.05)
    lines = []
    progress = fitting.EpochProgress(1, 1, "x", report=lines.append)
    progress.set_params({"verbose": 2, "epochs": 1, "steps": 3})
    progress.on_epoch_begin(0)
    progress.on_train_batch_begin(0)
    time.sleep(0.12)
    progress.end_tracing()  # what `fitting.fit` does when the step raises (e.g. Ctrl-C)
    count = len(lines)
    time.sleep(0.2)
    assert len(lines) == count
