"""The exact float32 stream (issue #19 item 4): gradient angle against depth, and a short training run.

`coupling="fixed_point"` (`tf_revnet.AdditiveCoupling.fixed_point("float32")`: grid 2^-14, exact
while |stream| < 1024) against the default floating point stream (`"additive"`), in float32, on a
real CIFAR-10 batch, at initialisation:

- `angle`: for each model, `tf_revnet.diagnostics.gradient_angle` (degrees) between reversible
  backprop and stored-activation backprop of the same model (same weights, same batch), the
  largest rebuild error of any block (`reconstruction_error`: 0 means bit-identical), the largest
  stream magnitude and the blocks out of the grid's range, and, for the fixed-point model, the angle
  between its plain gradient and the floating point model's (what the grid itself changes);
- `train`: a small RevNet trained for a few hundred steps with `model.fit` (reversible backprop,
  SGD momentum 0.9, cosine decay, random flips) with and without the fixed-point stream, for some
  seeds; test accuracy on held-out test images, and the out-of-range counts.

Commands (from the repository root; CIFAR-10 JPEG copy extracted in /tmp/cifar10):

    python benchmarks/exact_stream.py angle --models revnet38 revnet110 revnet164 deep \
        --output benchmarks/results/exact_stream_angle.json
    python benchmarks/exact_stream.py train --steps 400 --seeds 0 1 \
        --output benchmarks/results/exact_stream_train.json
    python benchmarks/exact_stream.py angle --quick     # smoke run, tiny models (seconds)
"""

import argparse
import json
import os
import sys
import time

COUPLINGS = ("additive", "fixed_point")
# name: (units per stage, widths, residual function); "deep" is the 1,994-layer RevNet.
MODELS = {
    "revnet38": ((3, 3, 3), (32, 32, 64, 112), "basic"),
    "revnet110": ((9, 9, 9), (32, 32, 64, 128), "basic"),
    "revnet164": ((9, 9, 9), (32, 32, 64, 128), "bottleneck"),
    "deep": ((166, 166, 166), (32, 32, 64, 128), "basic"),
}
QUICK_MODELS = {"tiny-a": ((2, 2), (8, 8, 16), "basic"), "tiny-b": ((2, 4), (8, 8, 16), "basic")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("angle", "train"))
    parser.add_argument("--data-dir", default="/tmp/cifar10")
    parser.add_argument("--models", nargs="+", default=["revnet38", "revnet110", "revnet164"],
                        choices=sorted(MODELS), help="angle: models. Default revnet38/110/164")
    parser.add_argument("--couplings", nargs="+", default=list(COUPLINGS), choices=COUPLINGS)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="angle: 8; train: 64 (--quick: 4 and 8)")
    parser.add_argument("--steps", type=int, default=400, help="train: steps. Default 400")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="Default 0")
    parser.add_argument("--test-examples", type=int, default=2000, help="train: Default 2000")
    parser.add_argument("--quick", action="store_true", help="Tiny models, few steps.")
    parser.add_argument("--output", help="Write the rows, command and machine to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = (4 if args.part == "angle" else 8) if args.quick else (
            8 if args.part == "angle" else 64)
    if args.quick:
        args.steps, args.test_examples = min(args.steps, 6), min(args.test_examples, 40)
    return args


def depth(units, kind):
    return 2 + (2 if kind == "basic" else 3) * 2 * sum(units)


def build(spec, coupling, seed, keras, tf_revnet, mean, std):
    units, widths, kind = spec
    keras.utils.set_random_seed(seed)
    return tf_revnet.models.RevNet(
        units=units, widths=widths, residual_function=kind, input_shape=(32, 32, 3), classes=10,
        classifier_activation=None, coupling=coupling, include_preprocessing=True,
        preprocessing_mean=mean, preprocessing_std=std)


def angle_part(args, data, log, np, tf, keras, tf_revnet):
    from tf_revnet import diagnostics

    (x_train, _), (x, y) = data
    x, y = x[:args.batch_size], y[:args.batch_size]
    mean, std = x_train.reshape(-1, 3).mean(0).tolist(), x_train.reshape(-1, 3).std(0).tolist()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    models = QUICK_MODELS if args.quick else {m: MODELS[m] for m in args.models}
    rows = []
    for name, spec in models.items():
        plain = {}
        for coupling in args.couplings:
            t0 = time.perf_counter()
            model = build(spec, coupling, args.seeds[0], keras, tf_revnet, mean, std)
            t_build = time.perf_counter() - t0
            angle = diagnostics.gradient_angle(model, x, y, loss)
            t_angle = time.perf_counter() - t0 - t_build
            rebuild = diagnostics.reconstruction_error(model, x)
            _, plain[coupling] = diagnostics.gradients(model, x, y, loss, False)
            names = [v.path for v in model.trainable_variables]
            row = {
                "model": name, "depth": depth(spec[0], spec[2]), "coupling": coupling,
                "angle_deg": angle.degrees, "relative_error": angle.relative_error,
                "rebuild_max_abs_error": rebuild.max_abs_error,
                "rebuild_relative_error": rebuild.max_relative_error,
                "bit_identical": rebuild.max_abs_error == 0.0,
                "max_abs_stream": rebuild.max_abs_stream,
                "out_of_range_blocks": len(rebuild.out_of_range),
                "blocks": len(rebuild.blocks), "nonfinite": angle.nonfinite + rebuild.nonfinite,
                "build_s": round(t_build, 1), "angle_s": round(t_angle, 1),
                "total_s": round(time.perf_counter() - t0, 1),
            }
            if coupling != "additive" and "additive" in plain:
                grid = diagnostics.compare_gradients(plain[coupling], plain["additive"], names)
                row["plain_vs_float_stream_deg"] = grid.degrees
                row["plain_vs_float_stream_relative_error"] = grid.relative_error
            rows.append(row)
            log(json.dumps(row))
            del model
            keras.backend.clear_session()
    lines = [
        f"Batch of {args.batch_size} real CIFAR-10 test images, float32, initialisation (seed "
        f"{args.seeds[0]}), training mode.", "",
        "| model | depth | stream | angle (deg) | relative error | rebuild max abs error | "
        "bit-identical | max abs stream | blocks out of range | grid vs float stream, plain (deg) "
        "| time (s) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        grid = r.get("plain_vs_float_stream_deg")
        lines.append(
            f"| {r['model']} | {r['depth']} | {r['coupling']} | {r['angle_deg']:.2e} | "
            f"{r['relative_error']:.1e} | {r['rebuild_max_abs_error']:.1e} | "
            f"{'yes' if r['bit_identical'] else 'no'} | {r['max_abs_stream']:.1f} | "
            f"{r['out_of_range_blocks']} / {r['blocks']} | "
            f"{'' if grid is None else f'{grid:.3f}'} | {r['total_s']:.0f} |")
    return rows, "\n".join(lines)


def train_part(args, data, log, np, tf, keras, tf_revnet):
    from tf_revnet import diagnostics
    from tf_revnet.callbacks import StreamRangeMonitor

    (x_train, y_train), (x_test, y_test) = data
    mean, std = x_train.reshape(-1, 3).mean(0).tolist(), x_train.reshape(-1, 3).std(0).tolist()
    spec = QUICK_MODELS["tiny-a"] if args.quick else ((3, 3, 3), (16, 16, 32, 64), "basic")
    rows = []
    for seed in args.seeds:
        for coupling in args.couplings:
            t0 = time.perf_counter()
            model = build(spec, coupling, seed, keras, tf_revnet, mean, std)
            schedule = keras.optimizers.schedules.CosineDecay(0.05, args.steps, warmup_target=None)
            model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"], run_eagerly=args.quick)
            rng = np.random.default_rng(seed)

            def batches():
                while True:
                    order = rng.permutation(len(x_train))
                    for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                        idx = order[i:i + args.batch_size]
                        xb = x_train[idx].copy()
                        flip = rng.random(len(idx)) < 0.5
                        xb[flip] = xb[flip, :, ::-1]
                        yield xb, y_train[idx]

            monitor = StreamRangeMonitor(every_n_steps=50)
            history = model.fit(batches(), steps_per_epoch=args.steps, epochs=1, verbose=0,
                                callbacks=[monitor])
            _, accuracy = model.evaluate(x_test, y_test, batch_size=200, verbose=0)
            counts = diagnostics.stream_out_of_range(model)
            row = {"seed": seed, "coupling": coupling, "steps": args.steps,
                   "batch_size": args.batch_size, "test_accuracy": float(accuracy),
                   "test_examples": len(x_test), "final_train_loss": history.history["loss"][-1],
                   "out_of_range_steps": float(sum(counts.values())),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            log(json.dumps(row))
            del model
            keras.backend.clear_session()
    units, widths, _ = spec
    lines = [
        f"RevNet units {list(units)}, widths {list(widths)} (depth {depth(units, 'basic')}), "
        f"float32, {args.steps} steps of batch {args.batch_size} (SGD momentum 0.9, lr 0.05 "
        f"cosine decay, flips), test accuracy on {len(x_test)} CIFAR-10 test images.", "",
        "| seed | stream | test accuracy | final train loss | steps out of range | time (s) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['coupling']} | {r['test_accuracy']:.4f} | "
                     f"{r['final_train_loss']:.3f} | {r['out_of_range_steps']:g} | "
                     f"{r['seconds']:.0f} |")
    return rows, "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_revnet

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from numerics import load_images

    t_start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {message}", file=sys.stderr, flush=True)

    n_train = (args.steps * args.batch_size if args.part == "train" else 512)
    n_train = min(n_train, 25_600) if not args.quick else 64
    x_train, y_train = load_images(args.data_dir, "train", n_train, 0, tf, np)
    n_test = args.batch_size if args.part == "angle" else args.test_examples
    x_test, y_test = load_images(args.data_dir, "test", n_test, 1, tf, np)
    data = (x_train.astype("float32"), y_train), (x_test.astype("float32"), y_test)
    part = angle_part if args.part == "angle" else train_part
    rows, table = part(args, data, log, np, tf, keras, tf_revnet)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "command": " ".join(["python"] + sys.argv),
                       "tensorflow": tf.__version__, "keras": keras.__version__,
                       "cores": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "seconds": round(time.perf_counter() - t_start), "rows": rows,
                       "table": table}, f, indent=1)
    return rows, table


if __name__ == "__main__":
    main()
