"""Whole-model training-step memory and time: RevNets (reversible, plain, recompute) and ResNets.

For each model of the zoo at CIFAR size (or 224x224 for the ImageNet models) and each method

- `reversible`: the RevNet as built (`use_custom_gradient=True`: one memory-saving backward pass for
  stem, transitions and blocks; each stage's identical blocks a `ReversibleBlockStack`);
- `plain`: the same architecture with ordinary autodiff (`use_custom_gradient=False`), one layer per
  block (`stack_blocks=False`), as an ordinary Keras network is built;
- `recompute`: the same, with `tf.recompute_grad` around each residual unit (and the stem);
- `baseline`: a ResNet of the zoo (ResNet-32/110/164/101), ordinary autodiff;

it runs `model.fit` on random images in its own process (TensorFlow does not return freed memory to
the OS) and records, with the meters of `measure.py`:

- `step_peak_mb`: the peak of one training step above the RSS before it (median over the measured
  steps, after a warm-up step);
- `graph_mb`: what stays resident after the first (tracing) step, above the built model (traced graph,
  optimizer slots, XLA compilation);
- `process_mb`: the whole process' peak RSS above the built model;
- `first_step_s`: the warm-up step (tracing and, with `--jit-compile`, compilation);
- `step_s`: the median measured step time;
- `estimate_mb`: `tf_revnet.memory.estimate(model, batch_size)` for each method (from the traced
  layers, no measurement); a second table compares it with `step_peak_mb`.

On a GPU the child reads `tf.config.experimental.get_memory_info("GPU:0")` instead of the RSS.

Commands (from the repository root, package installed):

    # The CIFAR table (RevNet-38/110/164 x methods, ResNet-32/110/164; batch 128):
    python benchmarks/models.py --output benchmarks/results/models_cifar.json

    # ImageNet size: RevNet-104 against ResNet-101 (batch 8, 224x224):
    python benchmarks/models.py --models revnet104 resnet101 --methods reversible baseline \
        --batch-sizes 8 --output benchmarks/results/models_imagenet.json

    # Memory against batch size (for the plot and max_batch.py):
    python benchmarks/models.py --models revnet110 --batch-sizes 32 64 128 \
        --output benchmarks/results/models_batch.json

    # More than 1,000 layers: the generic RevNet with 166 basic units per stage (1,994 layers):
    python benchmarks/models.py --models revnet38 deep --methods reversible --batch-sizes 32 \
        --output benchmarks/results/models_deep.json

    # Smoke test (a tiny RevNet, reversible and plain, batch 4; used by the test suite):
    python benchmarks/models.py --quick

    # The estimate against the measured peak: the zoo and the custom models (`build_custom`):
    python benchmarks/models.py --models convbnrelu attention nested revnet38 revnet110 revnet164 \
        --methods reversible plain --batch-sizes 32 --output benchmarks/results/estimate_b32.json

    # A 3-level feature model (heads on P0, P1, P2) against the classifier (issue 19, item 1):
    python benchmarks/models.py --models revnet38 features --methods reversible plain \
        --batch-sizes 64 --output benchmarks/results/features_b64.json

    # Tables and plots again from saved runs:
    python benchmarks/models.py --from-json benchmarks/results/models_cifar.json

`--child` is internal: one configuration, one JSON line.
"""

import argparse
import functools
import json
import os
import statistics
import sys

from measure import MIB, measure_fit, run_child

REVNETS = {"revnet38": "resnet32", "revnet110": "resnet110", "revnet164": "resnet164",
           "revnet104": "resnet101", "revnet56": None, "deep": None,
           # Custom models for the estimate (issue 17, item 6): see `build_custom`.
           "convbnrelu": None, "attention": None, "nested": None, "features": None}
CUSTOM = ("convbnrelu", "attention", "nested", "features")
METHODS = ("reversible", "plain", "recompute", "baseline")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------------
# Child process.
# --------------------------------------------------------------------------------------------------


def build_model(name, method, image_size, quick=False, deep_units=166):
    """The model of `name` (a RevNet of the zoo) for `method`; `quick` builds tiny generic ones."""
    import tensorflow as tf

    import tf_revnet

    if name in CUSTOM:
        return build_custom(name, method, image_size, quick)
    if quick:
        depth_units = {"revnet38": (1, 1), "revnet110": (3, 3)}[name]
        if method == "baseline":
            model = tf_revnet.models.ResNet(units=[2 * u for u in depth_units], widths=(8, 8, 16))
        else:
            model = tf_revnet.models.RevNet(
                units=depth_units, widths=(8, 8, 16),
                use_custom_gradient=method == "reversible", stack_blocks=method == "reversible",
            )
    elif name == "deep":  # the generic RevNet with `deep_units` basic units per stage (RevNet-110's widths)
        model = tf_revnet.models.RevNet(
            units=(deep_units,) * 3, widths=(32, 32, 64, 128), input_shape=(image_size, image_size, 3),
            # Plain backprop keeps the stacks too: with ~10,000 per-block variables its first step
            # alone would take most of an hour here (what is compared is the activations' memory).
            use_custom_gradient=method == "reversible", stack_blocks=method != "recompute",
            name=f"revnet{2 + 12 * deep_units}",
        )
    elif method == "baseline":
        model = tf_revnet.models.get(REVNETS[name])(input_shape=(image_size, image_size, 3))
    else:
        model = tf_revnet.models.get(name)(
            input_shape=(image_size, image_size, 3), use_custom_gradient=method == "reversible",
            stack_blocks=method == "reversible",
        )
    if method == "recompute":
        for layer in model.layers:
            if isinstance(layer, tf_revnet.layers.ReversibleSequence):
                _wrap_units_in_recompute_grad(layer, tf)
    return model


def build_custom(name, method, image_size, quick=False):
    """The custom models of the estimate's benchmark, `reversible` or `plain` (ordinary autodiff).

    - `convbnrelu`: a `ReversibleSequence` of a stem and 4 blocks whose F and G are a Conv-BN-ReLU
      layer defined here (unknown to `tf_revnet.memory`), then pooling and a classifier;
    - `attention`: `(N, T, C)` tokens (T = 256, C = 128; `quick`: 16, 16) through 4 reversible blocks,
      F = LayerNorm + `keras.layers.MultiHeadAttention` (4 heads), G = LayerNorm + MLP (4x);
    - `nested`: RevNet-38 (`tf_revnet.models.RevNet38`; `quick`: a tiny RevNet) used as a layer
      inside another `keras.Model`;
    - `features`: RevNet-38 `include_top=False` as a 3-level backbone (issue 19, item 1): a head on
      each of `pyramid_outputs` P0, P1, P2 (1x1 convolution to 10 classes, global average pooling),
      the three heads' softmaxes averaged, so the loss reaches every level.
    """
    import keras

    import tf_revnet
    from tf_revnet.layers import ReversibleBlock, ReversibleSequence, Stem

    reversible = method == "reversible"
    ConvBNReLU, SelfAttention, MLP = _custom_layers()  # noqa: N806 - classes
    if name == "nested":
        build = (functools.partial(tf_revnet.models.RevNet, units=(1, 1), widths=(8, 8, 16))
                 if quick else tf_revnet.models.RevNet38)
        inner = build(input_shape=(image_size, image_size, 3), use_custom_gradient=reversible,
                      stack_blocks=reversible)
        images = keras.Input((image_size, image_size, 3))
        return keras.Model(images, inner(images), name="nested_revnet38")
    if name == "features":
        build = (functools.partial(tf_revnet.models.RevNet, units=(1, 1), widths=(8, 8, 16))
                 if quick else tf_revnet.models.RevNet38)
        backbone = build(include_top=False, input_shape=(image_size, image_size, 3),
                         use_custom_gradient=reversible, stack_blocks=reversible)
        heads = [keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(10, 1)(level))
                 for level in backbone.pyramid_outputs.values()]
        probabilities = keras.layers.Average()([keras.layers.Softmax()(h) for h in heads])
        return keras.Model(backbone.input, probabilities, name="revnet38_features")
    if name == "convbnrelu":
        width, blocks = (8, 1) if quick else (32, 4)
        units = [Stem(width)] + [ReversibleBlock(ConvBNReLU(width // 2), ConvBNReLU(width // 2))
                                 for _ in range(blocks)]
        inputs = keras.Input((image_size, image_size, 3))
        x = ReversibleSequence(units, use_custom_gradient=reversible)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        tokens, channels = (16, 16) if quick else (256, 128)
        units = [ReversibleBlock(SelfAttention(4, channels // 8), MLP(4 * channels, channels // 2))
                 for _ in range(1 if quick else 4)]
        inputs = keras.Input((tokens, channels))
        x = ReversibleSequence(units, use_custom_gradient=reversible)(inputs)
        x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=name)


def _custom_layers():
    """The F and G layers of the custom models (defined lazily: keras is imported in the child)."""
    import keras

    class ConvBNReLU(keras.layers.Layer):
        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters
            self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            return keras.ops.relu(self.bn(self.conv(x), training=training))

        def get_config(self):
            return {**super().get_config(), "filters": self.filters}

    class SelfAttention(keras.layers.Layer):
        def __init__(self, heads, key_dim, **kwargs):
            super().__init__(**kwargs)
            self.heads, self.key_dim = heads, key_dim
            self.norm = keras.layers.LayerNormalization()
            self.attention = keras.layers.MultiHeadAttention(heads, key_dim)

        def call(self, x, training=None):
            h = self.norm(x)
            return self.attention(h, h, training=training)

        def get_config(self):
            return {**super().get_config(), "heads": self.heads, "key_dim": self.key_dim}

    class MLP(keras.layers.Layer):
        def __init__(self, hidden, channels, **kwargs):
            super().__init__(**kwargs)
            self.hidden, self.channels = hidden, channels
            self.norm = keras.layers.LayerNormalization()
            self.up = keras.layers.Dense(hidden, activation="gelu")
            self.down = keras.layers.Dense(channels)

        def call(self, x, training=None):
            return self.down(self.up(self.norm(x)))

        def get_config(self):
            return {**super().get_config(), "hidden": self.hidden, "channels": self.channels}

    return ConvBNReLU, SelfAttention, MLP


def _wrap_units_in_recompute_grad(sequence, tf):
    """Makes `sequence` run each unit under `tf.recompute_grad` when training (keeps unit inputs)."""

    def call(inputs, training=None):
        x = inputs
        for unit in sequence.units:
            if training:
                x = tf.recompute_grad(lambda t, unit=unit: unit(t, training=True))(x)
            else:
                x = unit(x, training=training)
        return x

    sequence.call = call


def measure_child(args):
    import keras
    import numpy as np

    import tf_revnet

    keras.utils.set_random_seed(0)
    model = build_model(args.model, args.method, args.image_size, quick=args.quick,
                        deep_units=args.deep_units)
    classes = model.output_shape[-1]
    estimate = tf_revnet.memory.estimate(model, args.batch_size)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        jit_compile=args.jit_compile,
    )
    rng = np.random.default_rng(0)
    shape = tuple(model.input_shape[1:])
    x = rng.uniform(0, 1, (args.batch_size, *shape)).astype("float32")
    y = rng.integers(0, classes, (args.batch_size,))
    record = measure_fit(model, x, y, args.batch_size, args.warmup, args.steps)
    result = {
        "model": args.model,
        "method": args.method,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "jit_compile": args.jit_compile,
        "meter": record["meter"],
        "params": int(model.count_params()),
        "layers_deep": _depth(model, tf_revnet),
        "step_peak_mb": statistics.median(record["peaks_mb"]),
        "step_peaks_mb": record["peaks_mb"],
        "graph_mb": record.get("graph_mb"),
        "process_mb": record["process_mb"],
        "first_step_s": record.get("first_step_s"),
        "step_s": statistics.median(record["times_s"]),
        "estimate_mb": {k: v / MIB for k, v in estimate.as_dict().items()},
    }
    print("RESULT " + json.dumps(result), flush=True)


def _depth(model, tf_revnet):
    """Weighted layers (convolutions and dense) of the model, nested ones included."""
    import keras

    def count(layer):
        weighted = 0
        for sub in layer._flatten_layers(include_self=False, recursive=True):
            weighted += isinstance(sub, (keras.layers.Conv2D, keras.layers.Dense))
            if isinstance(sub, tf_revnet.layers.ReversibleBlockStack):  # its template, depth times
                weighted += sub.depth * count(sub.block)
        return weighted

    return count(model)


# --------------------------------------------------------------------------------------------------
# Parent process.
# --------------------------------------------------------------------------------------------------


def run_one(args, model, method, batch_size):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable, os.path.abspath(__file__), "--child", "--models", model, "--methods",
        method, "--batch-sizes", str(batch_size), "--image-size", str(args.image_size or
                                                                        _image_size(model)),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--deep-units",
        str(args.deep_units),
    ] + (["--jit-compile"] if args.jit_compile else []) + (["--quick"] if args.quick else [])
    return run_child(command, env, args.timeout,
                     {"model": model, "method": method, "batch_size": batch_size})


def _re_estimate(results, args):
    import tf_revnet

    for r in results:
        if "error" in r or r.get("quick"):
            continue
        model = build_model(r["model"], r["method"], r["image_size"], deep_units=args.deep_units)
        estimate = tf_revnet.memory.estimate(model, r["batch_size"])
        r["estimate_mb"] = {k: v / MIB for k, v in estimate.as_dict().items()}
        r["layers_deep"] = _depth(model, tf_revnet)  # metadata; older counters missed stacked blocks


def _image_size(model):
    return 224 if model in ("revnet104", "revnet56") else 32


def _label(result):
    if result["model"] == "deep":
        return f"RevNet-{result['layers_deep']} (generic)"
    if result["method"] == "baseline":
        return REVNETS[result["model"]] if not result.get("quick") else "resnet (tiny)"
    return result["model"]


def markdown(results):
    """The results as a Markdown table, with ratios to plain backprop on the same model and batch."""
    plain = {(r["model"], r["batch_size"]): r for r in results
             if r.get("method") == "plain" and "error" not in r}
    rows = [
        "| Model | Method | Batch | Step peak (MB) | vs plain | Estimate (MB) | Graph (MB) | "
        "Process (MB) | vs plain | First step (s) | Step (s) | vs plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['method']} | {r['batch_size']} | error: "
                        f"{r['error'][:60]} | | | | | | | | |")
            continue
        p = plain.get((r["model"], r["batch_size"]))

        def ratio(key, r=r, p=p):
            return f"{r[key] / p[key]:.2f}" if p and p[key] else "-"

        est = r["estimate_mb"].get(r["method"] if r["method"] != "baseline" else "plain")
        rows.append(
            f"| {_label(r)} | {r['method']} | {r['batch_size']} | {r['step_peak_mb']:.0f} | "
            f"{ratio('step_peak_mb')} | {est:.0f} | {r['graph_mb']:.0f} | {r['process_mb']:.0f} | "
            f"{ratio('process_mb')} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
            f"{ratio('step_s')} |"
        )
    return "\n".join(rows) + "\n"


def estimate_markdown(results):
    """Estimate against measured per-step peak, per model and method (the estimate's 20% target)."""
    rows = ["| Model | Method | Batch | Step peak (MB) | Estimate (MB) | Estimate / peak | within 20% |",
            "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            continue
        est = r["estimate_mb"][r["method"] if r["method"] != "baseline" else "plain"]
        ratio = est / r["step_peak_mb"]
        rows.append(f"| {_label(r)} | {r['method']} | {r['batch_size']} | {r['step_peak_mb']:.1f} | "
                    f"{est:.1f} | {ratio:.2f} | {'yes' if abs(ratio - 1) <= 0.2 else 'no'} |")
    return "\n".join(rows) + "\n"


def plot(results, path):
    """PNG: step peak against depth (per method) and against batch size (per model and method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    series = {}
    for r in ok:
        series.setdefault((r["model"], r["method"]), []).append((r["batch_size"], r["step_peak_mb"]))
    series = {key: sorted(points) for key, points in sorted(series.items()) if len(points) > 1}
    if series:  # memory against batch size only where a run measured several batch sizes
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    else:
        fig, left = plt.subplots(1, 1, figsize=(6, 4.2))
    for method in METHODS:
        points = sorted(
            (r["layers_deep"], r["step_peak_mb"]) for r in ok
            if r["method"] == method and r["image_size"] == 32
            and r["batch_size"] == max(q["batch_size"] for q in ok)
        )
        if points:
            left.plot(*zip(*points), marker="o", label=method)
    left.set(xlabel="weighted layers (projection shortcuts included)", ylabel="training-step peak (MB)",
             title="Memory against depth (CIFAR size, largest batch)")
    left.legend()
    for key, points in series.items():
        right.plot(*zip(*points), marker="o", label=f"{key[0]} {key[1]}")
    if series:
        right.set(xlabel="batch size", ylabel="training-step peak (MB)",
                  title="Memory against batch size")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["revnet38", "revnet110", "revnet164"],
                        choices=sorted(REVNETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--image-size", type=int, default=None,
                        help="Height and width (default: 32 for CIFAR models, 224 for ImageNet).")
    parser.add_argument("--deep-units", type=int, default=166,
                        help="Units per stage of the model `deep` (default 166: 1,994 layers).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--jit-compile", action="store_true", help="model.compile(jit_compile=True)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true",
                        help="Tiny generic models, batch 4, one measured step (a smoke test).")
    parser.add_argument("--output", help="JSON file for the results (a .md and .png are written "
                        "beside it).")
    parser.add_argument("--from-json", nargs="+", help="Re-print tables and plots of saved runs.")
    parser.add_argument("--re-estimate", action="store_true",
                        help="With --from-json: recompute `estimate_mb` with the current "
                        "tf_revnet.memory.estimate and the depth label (the measurements are kept).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # one tiny model: a generic RevNet, or the first custom model asked for
        args.models = [m for m in args.models if m in CUSTOM][:1] or ["revnet38"]
        args.methods = [m for m in args.methods if m in ("reversible", "plain")] or ["reversible"]
        args.batch_sizes = [int(os.environ.get("TF_REVNET_QUICK_BATCH", 4))]
        args.steps = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        args.model, args.method, args.batch_size = args.models[0], args.methods[0], \
            args.batch_sizes[0]
        args.image_size = args.image_size or _image_size(args.model)
        measure_child(args)
        return 0
    if args.from_json:
        results = []
        for path in args.from_json:
            with open(path) as f:
                results += json.load(f)["results"]
        if args.re_estimate:
            _re_estimate(results, args)
    else:
        results = []
        for model in args.models:
            for method in args.methods:
                if method == "baseline" and not REVNETS.get(model):
                    continue
                for batch_size in args.batch_sizes:
                    result = run_one(args, model, method, batch_size)
                    result["quick"] = args.quick
                    results.append(result)
                    print(json.dumps(result), flush=True)
    table = markdown(results) + "\n" + estimate_markdown(results)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
        stem = os.path.splitext(args.output)[0]
        with open(stem + ".md", "w") as f:
            f.write(table)
        plot(results, stem + ".png")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
