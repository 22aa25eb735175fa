"""Numerical fidelity of reversible backprop in whole RevNets: gradient angle and reconstruction error.

For RevNet-38, RevNet-110 and RevNet-164 (CIFAR-10, `tf_revnet.models`) on real CIFAR-10 images, at
initialisation and after some training steps, and under the `float32`, `mixed_bfloat16` and
`mixed_float16` policies, measures on one fixed held-out batch of test images:

- `angle`: `tf_revnet.diagnostics` gradient angle (degrees) between reversible backprop and
  stored-activation backprop (`use_custom_gradient=False`) on the same weights, batch and policy,
  with the relative error `||a - b|| / ||b||` and the relative norm difference;
- `rebuild`: the largest relative (and absolute) error of the inputs Algorithm 1 rebuilds, over all
  reversible blocks (`tf_revnet.diagnostics.reconstruction_error`);
- `vs f32`: the relative gradient error of reversible (`rev`) and of plain (`plain`) backprop under the
  policy against float32 plain backprop on the same weights, and their ratio (issue #11 item 3 asks
  for at most 1.2); `rev vs f64`, `plain vs f64`: the same against float64 plain backprop (the closest
  to the exact gradient: it shows how far float32 itself is from it).

Training: one float32 model per architecture, trained with `model.fit`-style `train_on_batch` steps
(reversible backprop, SGD momentum 0.9, cross-entropy) on real training images; at every checkpoint
its weights (BatchNorm moving statistics included) are copied into a model of the same architecture
under each policy, so all policies are measured at the same weights. In float16 the loss is scaled by
`--loss-scale` (default 1024) before differentiation, as a `LossScaleOptimizer` would.

A second part reuses `benchmarks/precision.py` on a stack of 32 reversible blocks (the setting of
benchmarks/README.md): reversible vs plain low-precision gradient error against float32 plain
autodiff, bf16 and fp16.

Outputs (in `--output-dir`): `numerics.json` (raw figures, command, machine), `numerics.md` (tables)
and `numerics.png` (angle against depth and against training step).

Commands (from the repository root, CIFAR-10 JPEG copy extracted in /tmp/cifar10):

    # Full run (RevNet-38/110/164; see benchmarks/README.md for the time it took):
    python benchmarks/numerics.py --data-dir /tmp/cifar10 --output-dir benchmarks/results

    # Quick smoke run (two tiny RevNets, a few steps; under a minute):
    python benchmarks/numerics.py --quick --data-dir /tmp/cifar10 --output-dir /tmp/numerics
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
MODELS = ("revnet38", "revnet110", "revnet164")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Tiny architectures for --quick: (name, units per stage, widths).
QUICK_MODELS = (("tiny-a", [2, 2], [8, 8, 16]), ("tiny-b", [2, 4], [8, 8, 16]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="/tmp/cifar10",
                        help="CIFAR-10 image folder (train/<class>/*.jpg, test/<class>/*.jpg). "
                        "Default: /tmp/cifar10")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS,
                        help="Default: all three (ignored with --quick)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="Training steps at which to measure. Default 0 20 60 (0 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Held-out batch of test images measured. Default 16 (4 with --quick)")
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="Training batch. Default 32 (8 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="Default 0.05")
    parser.add_argument("--loss-scale", type=float, default=1024.0,
                        help="Loss scale of the mixed_float16 gradients. Default 1024")
    parser.add_argument("--precision-depth", type=int, default=None,
                        help="Blocks of the benchmarks/precision.py stack. Default 32 (4 with --quick)")
    parser.add_argument("--precision-seeds", type=int, default=None,
                        help="Seeds of the precision part (0: skip it). Default 3 (1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Tiny models, few steps (smoke test).")
    parser.add_argument("--output-dir", default=None,
                        help="Write numerics.json/.md/.png here. Default: nothing written")
    args = parser.parse_args(argv)
    defaults = {"steps": ([0, 2], [0, 20, 60]), "batch_size": (4, 16),
                "train_batch_size": (8, 32), "precision_depth": (4, 32),
                "precision_seeds": (1, 3)}
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.models is None:
        args.models = list(MODELS)
    if sorted(set(args.steps)) != args.steps or args.steps[0] < 0:
        parser.error(f"--steps must be increasing non-negative integers. Received: {args.steps}")
    return args


def load_images(data_dir, split, count, seed, tf, np):
    """`count` images of `split`, evenly over the classes in random order: uint8 NHWC, int labels."""
    root = pathlib.Path(data_dir) / split
    if not root.is_dir():
        raise SystemExit(
            f"benchmarks/numerics.py: {root} not found. Extract the CIFAR-10 JPEG copy first: "
            "mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10"
        )
    rng = np.random.default_rng(seed)
    per_class = -(-count // len(CLASSES))
    files = []
    for label, name in enumerate(CLASSES):
        names = sorted((root / name).glob("*.jpg"))
        for i in rng.choice(len(names), size=min(per_class, len(names)), replace=False):
            files.append((names[i], label))
    order = rng.permutation(len(files))[:count]
    images = np.stack([tf.io.decode_jpeg(tf.io.read_file(str(files[i][0])), channels=3).numpy()
                       for i in order])
    labels = np.array([files[i][1] for i in order], dtype=np.int64)
    return images, labels


def build(spec, policy, keras, tf_revnet):
    """A CIFAR-10 RevNet (logits) under `policy`."""
    keras.config.set_dtype_policy(policy)
    try:
        if isinstance(spec, tuple):
            _, units, widths = spec
            return tf_revnet.models.RevNet(units=units, widths=widths, input_shape=(32, 32, 3),
                                           classes=10, classifier_activation=None)
        return tf_revnet.models.get(spec)(input_shape=(32, 32, 3), classes=10,
                                          classifier_activation=None)
    finally:
        keras.config.set_dtype_policy("float32")


def depth_of(spec, tf_revnet):
    if isinstance(spec, tuple):
        _, units, _ = spec
        return 2 + 2 * sum(units)  # stem, 2 convolutions per basic unit, classifier
    return int(spec.replace("revnet", ""))


def measure_model(spec, args, data, np, tf, keras, tf_revnet, log):
    """Trains a float32 model of `spec` and measures every policy at every checkpoint."""
    from tf_revnet import diagnostics

    name = spec[0] if isinstance(spec, tuple) else spec
    (x_train, y_train), (x_eval, y_eval) = data
    keras.utils.set_random_seed(args.seed)
    model = build(spec, "float32", keras, tf_revnet)
    models = {p: (model if p == "float32" else build(spec, p, keras, tf_revnet))
              for p in args.policies}
    model64 = build(spec, "float64", keras, tf_revnet)  # the float64 reference

    def loss(y, logits):  # in float32 (float64 for the float64 reference)
        dtype = "float64" if logits.dtype == tf.float64 else "float32"
        return keras.losses.sparse_categorical_crossentropy(y, tf.cast(logits, dtype),
                                                            from_logits=True)

    # --quick trains eagerly: tracing the step would take longer than the few steps themselves.
    model.compile(optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9), loss=loss,
                  run_eagerly=args.quick)
    names = [v.path for v in model.trainable_variables]
    rows, step, t_train = [], 0, 0.0
    n = len(x_train) // args.train_batch_size
    for checkpoint in args.steps:
        t0 = time.perf_counter()
        while step < checkpoint:
            i = step % n
            sl = slice(i * args.train_batch_size, (i + 1) * args.train_batch_size)
            train_loss = float(model.train_on_batch(x_train[sl], y_train[sl]))
            step += 1
        t_train += time.perf_counter() - t0
        if step:
            log(f"{name}: {step} steps, train loss {train_loss:.3f} ({t_train:.0f} s)")
        weights = model.get_weights()
        reference_loss, reference = diagnostics.gradients(model, x_eval, y_eval, loss, False)
        model64.set_weights([w.astype("float64") for w in weights])
        _, reference64 = diagnostics.gradients(model64, x_eval.astype("float64"), y_eval, loss,
                                               False)
        for policy in args.policies:
            t0 = time.perf_counter()
            m = models[policy]
            if m is not model:
                m.set_weights(weights)
            scale = args.loss_scale if policy == "mixed_float16" else 1.0
            loss_rev, rev = diagnostics.gradients(m, x_eval, y_eval, loss, True, scale)
            if m is model:  # float32 plain backprop is the reference itself
                loss_plain, plain = reference_loss, reference
            else:
                loss_plain, plain = diagnostics.gradients(m, x_eval, y_eval, loss, False, scale)
            angle = diagnostics.compare_gradients(rev, plain, names, loss_rev, loss_plain)
            rev_vs_f32 = diagnostics.compare_gradients(rev, reference, names)
            plain_vs_f32 = diagnostics.compare_gradients(plain, reference, names)
            rebuild = diagnostics.reconstruction_error(m, x_eval)
            worst = rebuild.worst()
            row = {
                "model": name,
                "depth": depth_of(spec, tf_revnet),
                "reversible_blocks": len(rebuild.blocks),
                "step": step,
                "policy": policy,
                "angle_deg": angle.degrees,
                "angle_relative_error": angle.relative_error,
                "angle_relative_norm_difference": angle.relative_norm_difference,
                "angle_worst_variable": angle.worst_variable,
                "angle_worst_variable_deg": angle.per_variable[angle.worst_variable],
                "rebuild_relative_error": rebuild.max_relative_error,
                "rebuild_max_abs_error": rebuild.max_abs_error,
                "rebuild_worst_block": worst.name,
                "rebuild_local_relative_error": max(b.local_relative_error for b in rebuild.blocks),
                "rev_vs_f32_relative_error": rev_vs_f32.relative_error,
                "plain_vs_f32_relative_error": plain_vs_f32.relative_error,
                "rev_vs_f64_relative_error": diagnostics.compare_gradients(
                    rev, reference64, names).relative_error,
                "plain_vs_f64_relative_error": diagnostics.compare_gradients(
                    plain, reference64, names).relative_error,
                "rev_vs_f32_deg": rev_vs_f32.degrees,
                "plain_vs_f32_deg": plain_vs_f32.degrees,
                "loss": loss_rev,
                "nonfinite": angle.nonfinite + rebuild.nonfinite,
                "loss_scale": scale,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            log(json.dumps(row))
    return rows


def precision_part(args, log):
    """benchmarks/precision.py at `--precision-depth` blocks, bf16 and fp16, reversible and plain."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import precision

    pargs = precision.parse_args([
        "--policies", "mixed_bfloat16", "mixed_float16", "--depths", str(args.precision_depth),
        "--seeds", str(args.precision_seeds),
    ] + (["--batch-size", "2", "--image-size", "8", "--channels", "4"] if args.quick else []))
    results = []
    for seed in range(args.precision_seeds):
        for r in precision.measure(args.precision_depth, seed, pargs):
            log(json.dumps(r))
            results.append(r)
    config = {k: getattr(pargs, k) for k in ("depths", "seeds", "batch_size", "image_size",
                                              "channels")}
    return {"config": config, "results": results}


def _fmt(value, spec=".1e"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return format(value, spec)


def tables(rows, prec):
    import statistics

    lines = [
        "| model | depth | step | policy | angle (deg) | rel. error | norm diff | rebuild rel. (max abs) "
        "| rev vs f32 | plain vs f32 | ratio | rev vs f64 | plain vs f64 | inf/NaN |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = (r["rev_vs_f32_relative_error"] / r["plain_vs_f32_relative_error"]
                 if r["plain_vs_f32_relative_error"] else math.nan)
        lines.append(
            f"| {r['model']} | {r['depth']} | {r['step']} | {r['policy']} | {_fmt(r['angle_deg'], '.2e')} "
            f"| {_fmt(r['angle_relative_error'])} | {_fmt(r['angle_relative_norm_difference'])} "
            f"| {_fmt(r['rebuild_relative_error'])} ({_fmt(r['rebuild_max_abs_error'])}) "
            f"| {_fmt(r['rev_vs_f32_relative_error'])} | {_fmt(r['plain_vs_f32_relative_error'])} "
            f"| {_fmt(ratio, '.2f')} | {_fmt(r['rev_vs_f64_relative_error'])} "
            f"| {_fmt(r['plain_vs_f64_relative_error'])} | {r['nonfinite']} |"
        )
    out = "\n".join(lines)
    if prec and prec["results"]:
        depth = prec["config"]["depths"][0]
        plines = [
            "",
            f"Stack of {depth} reversible blocks (benchmarks/precision.py setup), relative gradient "
            "error against float32 plain autodiff, median over seeds:",
            "",
            "| policy | dx reversible | dx plain | ratio | dW reversible | dW plain | ratio "
            "| rebuild |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for policy in ("mixed_bfloat16", "mixed_float16"):
            med = {}
            for method in ("reversible", "plain"):
                sel = [r for r in prec["results"] if r["policy"] == policy
                       and r["method"] == method and "dx" in r]
                if not sel:
                    break
                med[method] = {k: statistics.median(r[k] for r in sel)
                               for k in ("dx", "dw_all", "rebuild")}
            if len(med) < 2:
                continue
            rv, pl = med["reversible"], med["plain"]
            plines.append(
                f"| {policy} | {_fmt(rv['dx'])} | {_fmt(pl['dx'])} | {rv['dx'] / pl['dx']:.2f} "
                f"| {_fmt(rv['dw_all'])} | {_fmt(pl['dw_all'])} | {rv['dw_all'] / pl['dw_all']:.2f} "
                f"| {_fmt(rv['rebuild'])} |"
            )
        out += "\n".join([""] + plines)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = sorted({r["policy"] for r in rows}, key=POLICIES.index)
    steps = sorted({r["step"] for r in rows})
    colors = dict(zip(POLICIES, ("tab:blue", "tab:orange", "tab:green")))
    floor = 1e-9  # an angle of exactly 0 is drawn at this floor of the log axis

    def y(r):
        return max(r["angle_deg"], floor) if not math.isnan(r["angle_deg"]) else math.nan

    for policy in policies:
        for step, style in ((steps[0], "o--"), (steps[-1], "s-")):
            sel = sorted((r for r in rows if r["policy"] == policy and r["step"] == step),
                         key=lambda r: r["depth"])
            ax1.plot([r["depth"] for r in sel], [y(r) for r in sel], style, color=colors[policy],
                     label=f"{policy}, step {step}")
    ax1.set(xlabel="depth (layers)", ylabel="gradient angle (degrees)", yscale="log",
            title="Reversible vs stored-activation gradient")
    ax1.axhline(0.01, color="gray", lw=0.8, ls=":")
    ax1.legend(fontsize=7)
    models = sorted({(r["depth"], r["model"]) for r in rows})
    markers = "o^sDv"
    for (depth, model), marker in zip(models, markers):
        for policy in policies:
            sel = sorted((r for r in rows if r["model"] == model and r["policy"] == policy),
                         key=lambda r: r["step"])
            ax2.plot([r["step"] for r in sel], [y(r) for r in sel], marker + "-",
                     color=colors[policy], label=f"{model}, {policy}", alpha=0.85)
    ax2.set(xlabel="training step", ylabel="gradient angle (degrees)", yscale="log",
            title="During training (float32-trained weights)")
    ax2.axhline(0.01, color="gray", lw=0.8, ls=":")
    ax2.legend(fontsize=6, ncol=2)
    for ax in (ax1, ax2):
        ax.text(0.01, 0.01, f"an angle of exactly 0 is drawn at {floor:g}", fontsize=6,
                transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_revnet

    t_start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {message}", file=sys.stderr, flush=True)

    n_train = args.train_batch_size * max(1, min(args.steps[-1], 50))
    x_train, y_train = load_images(args.data_dir, "train", n_train, args.seed, tf, np)
    x_eval, y_eval = load_images(args.data_dir, "test", args.batch_size, args.seed + 1, tf, np)
    mean = x_train.reshape(-1, 3).mean(0)
    std = x_train.reshape(-1, 3).std(0)
    data = (((x_train - mean) / std).astype("float32"), y_train), (
        ((x_eval - mean) / std).astype("float32"), y_eval)
    specs = list(QUICK_MODELS) if args.quick else args.models
    rows = []
    for spec in specs:
        rows.extend(measure_model(spec, args, data, np, tf, keras, tf_revnet, log))
    prec = precision_part(args, log) if args.precision_seeds > 0 else None
    table = tables(rows, prec)
    print(table)
    if args.output_dir:
        out = pathlib.Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "output_dir"}
        machine = {"tensorflow": tf.__version__, "keras": keras.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "cores": os.cpu_count(), "seconds": round(time.perf_counter() - t_start)}
        (out / "numerics.json").write_text(json.dumps(
            {"config": config, "command": " ".join(["python"] + sys.argv), "machine": machine,
             "rows": rows, "precision": prec, "table": table}, indent=1))
        (out / "numerics.md").write_text(table + "\n")
        plot(rows, out / "numerics.png")
    return rows, prec


if __name__ == "__main__":
    main()
