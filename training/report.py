"""Reporting: every line `python -m training.train` prints, and the end-of-run summary.

`Reporter` is the one object that writes the run's lines (start-up facts, files left out of the
data, resuming, each phase after training, the summary); workers other than the chief print only
their own last line. `summarize` gathers the summary's numbers (also written to `summary.json`):
test accuracy, time, images/s, the measured peak memory and, from `tf_revnet.memory.estimate`, a
training step's memory with reversible and with plain backprop for the same model and batch, and
their ratio (why a RevNet).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time

__all__ = ["Reporter", "heartbeat", "summarize", "memory_estimate_mb", "peak_memory_mb", "left_out_lines",
           "optimizer_text"]

MAX_REPORTED_FILES = 5
HEARTBEAT_SECONDS = 8.0  # no phase of a run is silent longer than this


@contextlib.contextmanager
def heartbeat(report, what, every=None):
    """Writes `f"  ... {what} ({n} s)"` through `report` every `every` seconds until the block ends.

    For a phase that prints nothing on its own (tracing the first training step, the export), so
    that no phase is silent for more than `every` seconds.

    Args:
        report: callable str -> None (e.g. `Reporter.line`).
        what: str. The phase, e.g. "tracing the training graph".
        every: float or None. Seconds between lines; None: `HEARTBEAT_SECONDS`.
    """
    every = HEARTBEAT_SECONDS if every is None else every
    done, start = threading.Event(), time.monotonic()

    def beat():
        while not done.wait(every):
            report(f"  ... {what} ({time.monotonic() - start:.0f} s)")

    thread = threading.Thread(target=beat, name="tf_revnet-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def left_out_lines(datasets):
    """The lines that report the image files left out of `datasets` (none if there are none)."""
    lines = []
    if datasets.skipped:
        shown = ", ".join(datasets.skipped[:MAX_REPORTED_FILES])
        more = " ..." if len(datasets.skipped) > MAX_REPORTED_FILES else ""
        lines.append(f"Skipped {len(datasets.skipped)} files that do not decode: {shown}{more} "
                     "(--strict-data stops instead)")
    if datasets.refused:
        shown = "; ".join(datasets.refused[:MAX_REPORTED_FILES])
        more = " ..." if len(datasets.refused) > MAX_REPORTED_FILES else ""
        lines.append(f"Refused {len(datasets.refused)} files before decoding: {shown}{more} "
                     "(--max-image-pixels raises the limit; --strict-data stops instead)")
    return lines


def peak_memory_mb():
    """(peak resident MB of this process, peak MB over its GPUs or 0)."""
    import tensorflow as tf

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    gpus = tf.config.list_logical_devices("GPU")
    gpu = sum(tf.config.experimental.get_memory_info(d.name)["peak"] for d in gpus) / 2**20
    return peak, gpu


def memory_estimate_mb(model, batch_size):
    """`{"estimate_reversible_mb", "estimate_plain_mb", "memory_ratio", "estimate_batch_size"}`
    of a training step of `model` at `batch_size` (per replica), from `tf_revnet.memory.estimate`;
    None when it cannot estimate the model."""
    import keras

    import tf_revnet.memory

    # The classifier wraps the zoo model (normalization first): estimate the zoo model.
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    try:
        estimate = tf_revnet.memory.estimate(nested[0] if len(nested) == 1 else model, batch_size)
    except (ValueError, TypeError, NotImplementedError):
        return None
    return {"estimate_reversible_mb": estimate.reversible / 2**20,
            "estimate_plain_mb": estimate.plain / 2**20,
            "memory_ratio": estimate.reversible / estimate.plain if estimate.plain else None,
            "estimate_batch_size": batch_size}


def summarize(config, datasets, test, history_best, seconds, images_per_second, memory):
    """The summary's numbers (see the module docstring) as a JSON-serializable dict."""
    peak_rss, peak_gpu = peak_memory_mb()
    return {
        "model": config.model, "data": datasets.source, "test_split": datasets.test_name,
        "test_accuracy": float(test["accuracy"]), "test_loss": float(test["loss"]),
        "best_test_accuracy": history_best, "top5_accuracy": test.get("top5_accuracy"),
        "train_seconds": seconds, "images_per_second": images_per_second,
        "peak_rss_mb": peak_rss, "peak_gpu_mb": peak_gpu or None,
        "use_custom_gradient": config.use_custom_gradient,
        **(memory or {"estimate_reversible_mb": None, "estimate_plain_mb": None,
                      "memory_ratio": None, "estimate_batch_size": None}),
        "model_dir": config.model_dir, "export_dir": None, "export_version": None,
    }


def optimizer_text(recipe):
    """`SGD lr 0.1 momentum 0.9` or `AdamW lr 0.001, weight decay 0.05, 5% warm-up, cosine decay`."""
    if recipe.optimizer == "adamw":
        text = f"AdamW lr {recipe.learning_rate:g}, weight decay {recipe.weight_decay:g}"
    else:
        text = f"SGD lr {recipe.learning_rate:g} momentum {recipe.momentum}"
    if recipe.schedule == "cosine":
        text += f", {100 * recipe.warmup:g}% warm-up, cosine decay"
    return text


def _memory_lines(summary):
    gpu = f", {summary['peak_gpu_mb']:.0f} MB GPU" if summary["peak_gpu_mb"] else ""
    lines = [f"Peak memory: {summary['peak_rss_mb']:.0f} MB resident (whole process, while training){gpu}"]
    if summary["estimate_plain_mb"]:
        used = "reversible" if summary["use_custom_gradient"] else "plain backprop"
        lines.append(
            f"  a training step at batch {summary['estimate_batch_size']} needs "
            f"{summary['estimate_reversible_mb']:.0f} MB with reversible backprop against "
            f"{summary['estimate_plain_mb']:.0f} MB with plain backprop: "
            f"{summary['memory_ratio']:.2f}x (tf_revnet.memory.estimate; this run: {used})")
    return lines


class Reporter:
    """Writes the run's lines to `stream` (standard output), flushed at once.

    Args:
        stream: file-like or None (`sys.stdout` at each write, so redirections are followed).
        enabled: bool. False for workers other than the chief (their `always` lines only).
    """

    def __init__(self, stream=None, enabled=True):
        self.stream, self.enabled = stream, enabled
        self._bars = {}

    def decoding(self, split, done, total):
        """A progress bar of the files of `split` decoded (`training.data.load`'s `progress`)."""
        if not self.enabled:
            return
        import keras

        if split not in self._bars:
            self.line(f"Decoding the {total} {split} images")
            self._bars[split] = keras.utils.Progbar(total, unit_name="image")
        self._bars[split].update(done, finalize=done >= total)

    def line(self, text, always=False):
        """Writes one line (or several, joined by newlines)."""
        if self.enabled or always:
            stream = self.stream or sys.stdout
            stream.write(f"{text}\n")
            stream.flush()

    __call__ = line

    def start(self, config, model, datasets, plan, replicas):
        """The lines after the model is built: model, data, recipe, run directory."""
        import keras

        from training import recipes

        recipe = config.recipe
        image_shape = (recipe.image_size, recipe.image_size, 3)
        decay = (f"{len(recipes.decayed_kernels(model))} kernels with weight decay "
                 f"{recipe.weight_decay}" if recipe.optimizer == "sgd"
                 else "decoupled weight decay in AdamW")
        self.line(
            f"Model {config.model}: {model.count_params():,} parameters ({decay}); "
            f"dtype policy {keras.config.dtype_policy().name}; "
            f"{replicas} replica(s) ({config.distribution})\n"
            f"Data {datasets.source}: {datasets.num_train} train / {datasets.num_test} "
            f"{datasets.test_name} images, {datasets.num_classes} classes, model input "
            f"{image_shape}\n"
            f"Recipe {recipe.name}: {recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''} x "
            f"{plan.steps_per_epoch} steps of "
            f"batch {recipe.batch_size} = {plan.total_steps} steps; {optimizer_text(recipe)}\n"
            f"Run dir {config.model_dir}")

    def resume(self, step, plan, directory):
        """Where a resumed run goes on (nothing for a new run)."""
        if step >= plan.total_steps:
            self.line(f"Resuming after the last step ({step} of {plan.total_steps}): training is "
                      f"done, evaluating and saving (backup in {directory})")
        elif step:
            self.line(f"Resuming at step {step} of {plan.total_steps} (epoch "
                      f"{step // plan.steps_per_epoch + 1}, batch {step % plan.steps_per_epoch}) "
                      f"from {directory}")

    def summary(self, summary, pin_hint):
        """The end-of-run summary (`summarize`'s dict, with the export filled in)."""
        top5 = summary["top5_accuracy"]
        ips = summary["images_per_second"]
        lines = [
            "",
            f"Summary: {summary['model']} on {summary['data']} ({summary['test_split']} split)",
            f"Test accuracy: {summary['test_accuracy']:.4f}",
            f"  best epoch {summary['best_test_accuracy']:.4f}"
            + (f"; top-5 {top5:.4f}" if top5 is not None else ""),
            f"Test loss: {summary['test_loss']:.4f}",
            f"Training time: {summary['train_seconds']:.0f} s in this process, "
            f"{'-' if ips is None else format(ips, '.1f')} images/s",
            *_memory_lines(summary),
            f"Run dir: {summary['model_dir']} (curves.png, training_log.csv, logs/)",
        ]
        if summary["export_version"] is None:
            lines.append("Export: skipped (--no-export); export later with python -m "
                         f"training.export --model-dir {summary['model_dir']}")
        else:
            lines += [f"Exported version {summary['export_version']} to {summary['export_dir']}",
                      pin_hint(summary["model"], summary["export_version"])]
        self.line("\n".join(lines))
