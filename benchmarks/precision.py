"""Gradient and reconstruction error of reversible backprop under mixed precision.

For a stack of N `tf_revnet.layers.ReversibleBlock`s (F and G: `BasicResidualFunction`), compares the
gradients of one training-mode forward/backward pass under a dtype policy with the gradients of
float32 plain autodiff (`ReversibleSequence(blocks, use_custom_gradient=False)` under `"float32"`)
on the same weights and the same batch:

- `reversible`: `ReversibleSequence(blocks)` under the policy (Algorithm 1: inputs rebuilt from
  outputs, F and G recomputed in the policy's compute dtype, residual stream in float32);
- `plain`: the same blocks with `use_custom_gradient=False` under the same policy (ordinary
  autodiff: the error that low precision costs anyway).

Policies: `float32` (sanity row: reversible should match plain float32 to ~1e-7), `mixed_bfloat16`
and `mixed_float16`. The loss is `sum(w * stack(x))` with a fixed random `w`, so the output gradient
is `w` exactly in every run (no loss scaling is needed to keep float16 gradients from underflowing;
`model.fit` applies Keras' `LossScaleOptimizer` under `mixed_float16` in training).

Reported per (policy, method, N), as medians over `--seeds` random models and batches:

- `dx`: relative error of the gradient with respect to the input, `||g - g_ref|| / ||g_ref||`;
- `dW (all)`: the same over all trainable variables together;
- `dW (worst)`: the largest relative error of a single variable's gradient;
- `rebuild`: reconstruction error `||inverse(stack(x)) - x|| / ||x||` in training mode (the error
  of the inputs Algorithm 1 rebuilds from the outputs, block by block, in the policy).

Commands (from the repository root, with the package installed, e.g. `pip install -e .`):

    # Full table (N = 8, 32; 3 seeds; about 3 minutes on 2 CPU cores):
    python benchmarks/precision.py --output benchmarks/results/precision.json

    # Quick check (N = 8, 1 seed):
    python benchmarks/precision.py --quick
"""

import argparse
import json
import os
import statistics
import sys
import time

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
METHODS = ("reversible", "plain")


def _build(policy, depth, use_custom_gradient, input_shape):
    """A `ReversibleSequence` of `depth` basic blocks under `policy`, built on `input_shape`."""
    import keras

    from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence

    keras.mixed_precision.set_global_policy(policy)
    try:
        blocks = [
            ReversibleBlock(BasicResidualFunction(), BasicResidualFunction()) for _ in range(depth)
        ]
        stack = ReversibleSequence(blocks, use_custom_gradient=use_custom_gradient)
        stack.build(input_shape)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return stack


def _gradients(stack, x, w, tf):
    """Gradients of `sum(w * stack(x))` with respect to `x` and the trainable variables."""
    variables = stack.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = stack(x, training=True)
        loss = tf.reduce_sum(w * tf.cast(y, tf.float32))
    dx, *dws = tape.gradient(loss, [x, *variables])
    return tf.cast(dx, tf.float64), [tf.cast(g, tf.float64) for g in dws]


def _rel(a, b, tf):
    """`||a - b|| / ||b||` in float64."""
    return float(tf.norm(a - b) / tf.norm(b))


def measure(policy, method, depth, seed, args):
    """Errors of one (policy, method, depth, seed) against float32 plain autodiff."""
    import keras
    import tensorflow as tf

    shape = (args.batch_size, args.image_size, args.image_size, 2 * args.channels)
    keras.utils.set_random_seed(seed)
    reference = _build("float32", depth, False, shape)
    x = tf.random.normal(shape, seed=seed)
    w = tf.random.normal(shape, seed=seed + 1)
    model = _build(policy, depth, method == "reversible", shape)
    # The same weights (and BatchNorm statistics) in both: variables are float32 in every policy.
    model.set_weights(reference.get_weights())
    dx_ref, dw_ref = _gradients(reference, x, w, tf)
    dx, dw = _gradients(model, x, w, tf)
    num = sum(float(tf.reduce_sum(tf.square(a - b))) for a, b in zip(dw, dw_ref))
    den = sum(float(tf.reduce_sum(tf.square(b))) for b in dw_ref)
    worst = max(_rel(a, b, tf) for a, b in zip(dw, dw_ref) if float(tf.norm(b)) > 0)
    # Reconstruction in training mode (batch statistics), as Algorithm 1 rebuilds the inputs.
    y = model(x, training=True)
    x_rebuilt = model.inverse(y, training=True)
    rebuild = _rel(tf.cast(x_rebuilt, tf.float64), tf.cast(x, tf.float64), tf)
    return {
        "policy": policy,
        "method": method,
        "depth": depth,
        "seed": seed,
        "dx": _rel(dx, dx_ref, tf),
        "dw_all": (num / den) ** 0.5,
        "dw_worst": worst,
        "rebuild": rebuild,
    }


def summarize(results, policies, methods, depths):
    """Markdown table of median errors over seeds."""
    lines = [
        "Relative error against float32 plain autodiff on the same weights (median over seeds):",
        "",
        "| policy | method | N | dx | dW (all) | dW (worst) | rebuild |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy in policies:
        for depth in depths:
            for method in methods:
                rows = [
                    r for r in results
                    if (r["policy"], r["method"], r["depth"]) == (policy, method, depth)
                ]
                if not rows:
                    continue
                if any("error" in r for r in rows):
                    lines.append(f"| {policy} | {method} | {depth} | error | | | |")
                    continue
                cells = [
                    f"{statistics.median(r[k] for r in rows):.1e}"
                    for k in ("dx", "dw_all", "dw_worst", "rebuild")
                ]
                lines.append(f"| {policy} | {method} | {depth} | {' | '.join(cells)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--depths", nargs="+", type=int, default=None,
                        help="Numbers of blocks N. Default 8 32 (8 with --quick).")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Random models and batches per row. Default 3 (1 with --quick).")
    parser.add_argument("--batch-size", type=int, default=8, help="Default 8.")
    parser.add_argument("--image-size", type=int, default=32, help="Height and width. Default 32.")
    parser.add_argument("--channels", type=int, default=16,
                        help="Channels per half (the input has twice as many). Default 16.")
    parser.add_argument("--quick", action="store_true", help="Smaller and faster run.")
    parser.add_argument("--output", help="Write the raw results and the table to this JSON file.")
    args = parser.parse_args(argv)
    if args.depths is None:
        args.depths = [8] if args.quick else [8, 32]
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    results = []
    t0 = time.perf_counter()
    for policy in args.policies:
        for depth in args.depths:
            for method in args.methods:
                for seed in range(args.seeds):
                    try:
                        r = measure(policy, method, depth, seed, args)
                    except Exception as error:  # Report and go on: one failure is a finding.
                        r = {"policy": policy, "method": method, "depth": depth, "seed": seed,
                             "error": f"{type(error).__name__}: {error}"[:500]}
                    results.append(r)
                    print(f"[{time.perf_counter() - t0:5.0f} s] {json.dumps(r)}", file=sys.stderr,
                          flush=True)
    table = summarize(results, args.policies, args.methods, args.depths)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        config = {k: getattr(args, k) for k in (
            "policies", "methods", "depths", "seeds", "batch_size", "image_size", "channels",
            "quick")}
        machine = {"tensorflow": tf.__version__, "keras": keras.__version__,
                   "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
        with open(args.output, "w") as f:
            json.dump({**config, "machine": machine, "command": " ".join(sys.argv),
                       "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
