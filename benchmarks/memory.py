"""Peak memory and time of one training step: reversible vs plain backprop vs `tf.recompute_grad`.

Measures ONE training step (forward, backward and SGD-momentum update, after a warm-up step) of a
stack of N `tf_revnet.layers.ReversibleBlock`s (F and G: `BasicResidualFunction`, BN-ReLU-Conv3x3
twice) with three ways of back-propagating through the same blocks:

- `reversible`: `ReversibleSequence(blocks)` (Algorithm 1 under one custom gradient);
- `stacked`: `ReversibleSequence([ReversibleBlockStack(block, N)])`, the same N blocks with their
  weights stored stacked (one variable per weight of the block);
- `plain`: `ReversibleSequence(blocks, use_custom_gradient=False)` (ordinary autodiff);
- `recompute`: `tf.recompute_grad` around each block (keeps each block's input, recomputes the rest);

in four execution modes:

- `eager`: `tf.GradientTape` and `optimizer.apply` eagerly;
- `function`: the same step in `tf.function`;
- `fit`: `model.fit` on a functional model holding the stack (`jit_compile="auto"`: off on CPU);
- `xla`: the same step in `tf.function(jit_compile=True)`.

Each (mode, method, N) runs in its own subprocess, because TensorFlow does not return freed memory
to the operating system. On CPU the child runs with `MALLOC_MMAP_THRESHOLD_=131072` (large buffers
are `mmap`ed and unmapped when freed, so the resident set shrinks back after a step) and with
`TF_ENABLE_ONEDNN_OPTS=0` (the oneDNN CPU allocator pools large buffers and never releases them).
Before each measured step it calls `malloc_trim(0)` (so that memory freed by the warm-up but still
resident cannot be reused unseen), resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), records the RSS, runs the step to completion and reads `VmHWM`:
the step's memory is peak RSS minus the RSS before the step, so the model, the optimizer slots, the
traced graph and the XLA compilation (all made in the warm-up step) are not counted; the JSON output
also records them (`warmup_peak_rss_mb`: the warm-up's peak, `warmup_kept_rss_mb`: what stays
resident after it, both above the RSS of the built model). On a GPU (selected automatically when
one is visible) it uses `tf.config.experimental.get_memory_info("GPU:0")["peak"]` after
`reset_memory_stats`, minus `"current"`; `--meter allocator` does the same with the oneDNN CPU
allocator's statistics.

The first table reports the median over the measured steps, the MB added per block (least-squares
slope over N) and that slope as a percentage of plain backprop's slope (target: <= 2% in eager,
`function` and `fit`). The second reports the median step time and its ratio to plain backprop
(timings are sensitive to other load on the machine; memory is not).

Commands (from the repository root, with the package installed, e.g. `pip install -e .`):

    # Full table (N = 2, 8, 32, 64; batch 16 of 32x32x32; about 35 minutes on 2 busy CPU cores):
    python benchmarks/memory.py --output benchmarks/results/memory.json

    # Smoke run (tf.function, reversible and plain, N = 2 and 4, batch 8; about a minute):
    python benchmarks/memory.py --quick

    # A subset:
    python benchmarks/memory.py --modes eager function --methods reversible plain --depths 2 32

    # Re-print the tables of saved runs without measuring (merged; later files win):
    python benchmarks/memory.py --from-json benchmarks/results/memory_run1.json \
        benchmarks/results/memory_run2.json

`--child` is internal: it measures one configuration and prints one JSON line.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

from measure import AllocatorMeter as _AllocatorMeter
from measure import CpuMeter as _CpuMeter
from measure import malloc_trim as _malloc_trim
from measure import proc_status_bytes as _proc_status_bytes
from measure import run_child as _run_child

MODES = ("eager", "function", "fit", "xla")
METHODS = ("reversible", "stacked", "plain", "recompute")
DEPTHS = (2, 8, 32, 64)
QUICK_DEPTHS = (2, 4)
QUICK_MODES = ("function",)
QUICK_METHODS = ("reversible", "plain")
MIB = 2.0**20


# --------------------------------------------------------------------------------------------------
# Child process: one configuration.
# --------------------------------------------------------------------------------------------------


def _build_stack(method, depth, channels, keras, tf):
    """The N-block stack for `method`; every method uses the same kind of blocks."""
    from tf_revnet.layers import (
        BasicResidualFunction,
        ReversibleBlock,
        ReversibleBlockStack,
        ReversibleSequence,
    )

    if method == "stacked":
        block = ReversibleBlock(BasicResidualFunction(), BasicResidualFunction(), name="block")
        return ReversibleSequence([ReversibleBlockStack(block, depth, name="blocks")], name="stack")
    blocks = [
        ReversibleBlock(BasicResidualFunction(), BasicResidualFunction(), name=f"block{i}")
        for i in range(depth)
    ]
    if method == "reversible":
        return ReversibleSequence(blocks, use_custom_gradient=True, name="stack")
    if method == "plain":
        return ReversibleSequence(blocks, use_custom_gradient=False, name="stack")

    class RecomputeSequence(keras.layers.Layer):
        """The same blocks, each wrapped in `tf.recompute_grad` when training.

        `tf.recompute_grad` keeps each block's input and recomputes its inside in the backward pass
        (its recompute also updates BatchNorm moving statistics a second time; irrelevant here).
        """

        def __init__(self, blocks, **kwargs):
            super().__init__(**kwargs)
            self.blocks = blocks

        def build(self, input_shape):
            for block in self.blocks:
                block.build(input_shape)
            self.built = True

        def call(self, inputs, training=None):
            x = inputs
            for block in self.blocks:
                if training:
                    x = tf.recompute_grad(lambda t, block=block: block(t, training=True))(x)
                else:
                    x = block(x, training=training)
            return x

        def compute_output_shape(self, input_shape):
            return tuple(input_shape)

    return RecomputeSequence(blocks, name="stack")


def run_child(args):
    """Measures one (mode, method, depth) and prints a JSON line with the results."""
    import gc
    import resource

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    if tf.config.list_physical_devices("GPU"):
        meter = _AllocatorMeter(tf, "GPU:0")
    elif args.meter == "allocator":
        meter = _AllocatorMeter(tf, "CPU:0")
    else:
        meter = _CpuMeter()

    shape = (args.image_size, args.image_size, 2 * args.channels)
    inputs = keras.Input(shape, batch_size=args.batch_size)
    stack = _build_stack(args.method, args.depth, args.channels, keras, tf)
    model = keras.Model(inputs, stack(inputs))
    optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, *shape)).astype("float32")
    y = rng.standard_normal((args.batch_size, *shape)).astype("float32")

    rss_built = _proc_status_bytes("VmRSS")
    warmup_peak = []  # Lifetime peak RSS after the warm-up above the RSS after building the model.
    warmup_kept = []  # RSS after the warm-up above the RSS after building the model.
    peaks, growth, times = [], [], []
    if args.mode == "fit":
        model.compile(optimizer=optimizer, loss="mse")
        steps = args.warmup + args.steps
        xs = np.concatenate([x] * steps)
        ys = np.concatenate([y] * steps)

        class Measure(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                gc.collect()
                meter.start()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                float(logs["loss"])  # The step has finished.
                elapsed = time.perf_counter() - self.t0
                peak, now = meter.stop()
                if batch == args.warmup - 1:
                    warmup_peak.append(_proc_status_bytes("VmHWM") - rss_built)
                    _malloc_trim()
                    warmup_kept.append(_proc_status_bytes("VmRSS") - rss_built)
                if batch >= args.warmup:
                    times.append(elapsed)
                    peaks.append(peak)
                    growth.append(now)

        model.fit(
            xs, ys, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0,
            callbacks=[Measure()],
        )
    else:
        x = tf.constant(x)
        y = tf.constant(y)
        variables = model.trainable_variables

        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return loss

        if args.mode == "function":
            train_step = tf.function(train_step)
        elif args.mode == "xla":
            train_step = tf.function(train_step, jit_compile=True)
        for _ in range(args.warmup):
            float(train_step(x, y))
        warmup_peak.append(_proc_status_bytes("VmHWM") - rss_built)
        gc.collect()
        _malloc_trim()
        warmup_kept.append(_proc_status_bytes("VmRSS") - rss_built)
        for _ in range(args.steps):
            gc.collect()
            meter.start()
            t0 = time.perf_counter()
            float(train_step(x, y))
            elapsed = time.perf_counter() - t0
            peak, now = meter.stop()
            times.append(elapsed)
            peaks.append(peak)
            growth.append(now)

    result = {
        "mode": args.mode,
        "method": args.method,
        "depth": args.depth,
        "meter": meter.name,
        "meter_resettable": meter.resettable,
        "peak_mb": [p / MIB for p in peaks],
        "after_step_mb": [g / MIB for g in growth],
        "process_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_built) / MIB,
        "warmup_peak_rss_mb": warmup_peak[0] / MIB if warmup_peak else None,
        "warmup_kept_rss_mb": warmup_kept[0] / MIB if warmup_kept else None,
        "step_s": times,
        "params": int(model.count_params()),
    }
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent process: run every configuration, fit, print tables.
# --------------------------------------------------------------------------------------------------


def _child_command(args, mode, method, depth):
    return [
        sys.executable, os.path.abspath(__file__), "--child",
        "--modes", mode, "--methods", method, "--depths", str(depth),
        "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
        "--channels", str(args.channels), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--meter", args.meter,
    ]


def _run_one(args, mode, method, depth):
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.allocator == "env":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    elif args.allocator == "glibc":  # glibc's adaptive default: no setting anywhere
        env["TF_REVNET_MALLOC_MMAP_THRESHOLD"] = "0"
    else:  # "library": nothing set by the user; `import tf_revnet` calls mallopt
        env.pop("TF_REVNET_MALLOC_MMAP_THRESHOLD", None)
    if args.allocator != "env":  # no malloc_trim: the RSS a user's process has
        env["TF_REVNET_BENCH_NO_TRIM"] = "1"
    if args.meter == "rss":
        # The oneDNN CPU allocator pools large buffers and never gives them back to the OS, which
        # would hide every step's peak behind the warm-up's; TF's plain CPU allocator uses malloc.
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    else:
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return _run_child(_child_command(args, mode, method, depth), env, args.timeout,
                      {"mode": mode, "method": method, "depth": depth})


def _slope(depths, values):
    """Least-squares slope of `values` over `depths`."""
    n = len(depths)
    if n < 2:
        return float("nan")
    mean_d = sum(depths) / n
    mean_v = sum(values) / n
    var = sum((d - mean_d) ** 2 for d in depths)
    return sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values)) / var


def _median(values):
    return statistics.median(values) if values else float("nan")


def summarize(results, depths, modes, methods):
    """Markdown tables of peak memory and step time from the children's results."""
    by_key = {(r["mode"], r["method"], r["depth"]): r for r in results}
    slopes = {}
    for mode in modes:
        for method in methods:
            points = [
                (d, _median(by_key[(mode, method, d)]["peak_mb"]))
                for d in depths
                if "error" not in by_key.get((mode, method, d), {"error": 1})
            ]
            slopes[(mode, method)] = _slope([p[0] for p in points], [p[1] for p in points])

    head = " | ".join(f"N={d}" for d in depths)
    sep = "|".join(["---"] * (len(depths) + 4))
    lines = [
        "Peak memory of one training step above the memory before the step (MB):",
        "",
        f"| mode | method | {head} | MB per block | per block vs plain |",
        f"|{sep}|",
    ]
    for mode in modes:
        for method in methods:
            cells = []
            for d in depths:
                r = by_key.get((mode, method, d))
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append("error")
                else:
                    cells.append(f"{_median(r['peak_mb']):.1f}")
            slope = slopes[(mode, method)]
            plain = slopes.get((mode, "plain"), float("nan"))
            ratio = f"{100 * slope / plain:.2f}%" if plain == plain and plain > 0 else ""
            lines.append(f"| {mode} | {method} | {' | '.join(cells)} | {slope:.3f} | {ratio} |")

    big = max(depths)
    lines += [
        "",
        "Median step time (s) and, at the largest N, the ratio to plain backprop:",
        "",
        f"| mode | method | {head} | time / plain at N={big} |",
        f"|{'|'.join(['---'] * (len(depths) + 3))}|",
    ]
    for mode in modes:
        for method in methods:
            cells = []
            for d in depths:
                r = by_key.get((mode, method, d))
                cells.append(
                    "" if r is None else "error" if "error" in r else f"{_median(r['step_s']):.3f}"
                )
            r = by_key.get((mode, method, big), {"error": 1})
            p = by_key.get((mode, "plain", big), {"error": 1})
            ratio = (
                f"{_median(r['step_s']) / _median(p['step_s']):.2f}"
                if "error" not in r and "error" not in p
                else ""
            )
            lines.append(f"| {mode} | {method} | {' | '.join(cells)} | {ratio} |")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", "Errors:"] + [
            f"- {r['mode']}/{r['method']}/N={r['depth']}: {r['error']}" for r in errors
        ]
    return "\n".join(lines)


def _machine():
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": [g.name for g in gpus],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help=f"Default {MODES} ({QUICK_MODES} with --quick).")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help=f"Default {METHODS} ({QUICK_METHODS} with --quick).")
    parser.add_argument("--depths", nargs="+", type=int, default=None,
                        help=f"Numbers of blocks N. Default {DEPTHS} ({QUICK_DEPTHS} with --quick).")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Default 16 (8 with --quick).")
    parser.add_argument("--image-size", type=int, default=32, help="Height and width. Default 32.")
    parser.add_argument("--channels", type=int, default=16,
                        help="Channels per half (the input has twice as many). Default 16.")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up steps. Default 1.")
    parser.add_argument("--steps", type=int, default=3, help="Measured steps. Default 3.")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="Seconds before a configuration is abandoned. Default 900.")
    parser.add_argument(
        "--allocator", choices=("env", "library", "glibc"), default="env",
        help="glibc malloc settings of the child: 'env' (MALLOC_MMAP_THRESHOLD_=131072 in its "
        "environment), 'library' (nothing set: what `import tf_revnet` sets, as for a user), "
        "'glibc' (glibc's adaptive default: TF_REVNET_MALLOC_MMAP_THRESHOLD=0). Default 'env'.")
    parser.add_argument(
        "--meter", choices=("rss", "allocator"), default="rss",
        help="CPU memory meter: 'rss' (peak RSS, oneDNN off so freed memory leaves the process) "
        "or 'allocator' (TensorFlow's CPU allocator statistics, oneDNN on). A GPU, if visible, is "
        "always measured with its allocator statistics. Default 'rss'.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: tf.function only, reversible and plain, N = 2 and 4, batch 8, "
                        "one measured step (4 child processes, about a minute).")
    parser.add_argument("--output", help="Write the raw results and the tables to this JSON file.")
    parser.add_argument("--from-json", nargs="+",
                        help="Print the tables of saved runs (merged; later files win) and exit.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = list(QUICK_MODES if args.quick else MODES)
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else METHODS)
    if args.depths is None:
        args.depths = list(QUICK_DEPTHS if args.quick else DEPTHS)
    if args.quick:
        args.steps = min(args.steps, 1)
    if args.batch_size is None:
        args.batch_size = 8 if args.quick else 16
    if args.child:
        args.mode, args.method, args.depth = args.modes[0], args.methods[0], args.depths[0]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    if args.from_json:
        merged, order = {}, {"modes": [], "methods": [], "depths": []}
        for path in args.from_json:
            with open(path) as f:
                saved = json.load(f)
            for r in saved["results"]:
                merged[(r["mode"], r["method"], r["depth"])] = r
            for key, values in order.items():
                values.extend(v for v in saved[key] if v not in values)
        print(summarize(list(merged.values()), sorted(order["depths"]),
                        [m for m in MODES if m in order["modes"]],
                        [m for m in METHODS if m in order["methods"]]))
        return 0
    results = []
    t0 = time.perf_counter()
    for mode in args.modes:
        for method in args.methods:
            for depth in args.depths:
                result = _run_one(args, mode, method, depth)
                results.append(result)
                status = result.get("error") or (
                    f"peak {_median(result['peak_mb']):.1f} MB, "
                    f"step {_median(result['step_s']):.3f} s, wall {result['wall_s']:.0f} s"
                )
                print(f"[{time.perf_counter() - t0:6.0f} s] {mode:8s} {method:10s} N={depth:<3d} "
                      f"{status}", file=sys.stderr, flush=True)
    table = summarize(results, args.depths, args.modes, args.methods)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        config = {k: getattr(args, k) for k in (
            "modes", "methods", "depths", "batch_size", "image_size", "channels", "warmup", "steps",
            "meter", "quick")}
        with open(args.output, "w") as f:
            json.dump({**config, "machine": _machine(), "command": " ".join(sys.argv),
                       "results": results, "table": table}, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
