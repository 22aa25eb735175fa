"""Gradient and reconstruction error of reversible backprop under mixed precision.

For a stack of N `tf_revnet.layers.ReversibleBlock`s (F and G: `BasicResidualFunction`), compares the
gradients of one training-mode forward/backward pass under a dtype policy with the gradients of
float32 plain autodiff (`ReversibleSequence(blocks, use_custom_gradient=False)` under `"float32"`)
on the same weights and the same batch:

- `reversible`: `ReversibleSequence(blocks)` under the policy (Algorithm 1: inputs rebuilt from
  outputs, F and G recomputed in the policy's compute dtype, residual stream in float32);
- `plain`: the same blocks with `use_custom_gradient=False` under the same policy (ordinary
  autodiff: the error that low precision costs anyway).

Policies: `float64` and `float32` (sanity rows), `mixed_bfloat16` and `mixed_float16`. The loss is
`sum(w * stack(x))` with a fixed random `w`, so the output gradient is `w` exactly in every run (no
loss scaling is needed to keep float16 gradients from underflowing; `model.fit` applies Keras'
`LossScaleOptimizer` under `mixed_float16` in training).

Reported per (policy, method, N), as medians over `--seeds` random models and batches:

- `dx`: relative error of the gradient with respect to the input, `||g - g_ref|| / ||g_ref||`,
  against float32 plain autodiff;
- `dW (all)`: the same over all trainable variables together;
- `dW (worst)`: the largest relative error of a single variable's gradient;
- `rebuild`: reconstruction error `||inverse(stack(x)) - x|| / ||x||` in training mode (the error
  of the inputs Algorithm 1 rebuilds from the outputs, block by block, in the policy);
- `dx vs f64`, `dW (all) vs f64`: `dx` and `dW (all)` against float64 plain autodiff instead. Deep
  stacks at initialisation are ill-conditioned: float32 plain autodiff is itself about 2e-3 away
  from float64 at N = 8, so below that level a difference from the float32 reference says nothing
  about the reversible algorithm (compare the float32 rows against float64 instead).

Commands (from the repository root, with the package installed, e.g. `pip install -e .`):

    # Full table (N = 2, 8, 32; 3 seeds; about 10 minutes on 2 CPU cores):
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

POLICIES = ("float64", "float32", "mixed_bfloat16", "mixed_float16")
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


def _run(policy, method, depth, weights, x, w, tf):
    """Gradients of `sum(w * stack(x))` and the reconstruction of `x`, all cast to float64.

    Returns `(dx, [dL/dv for each trainable variable], x rebuilt from stack(x))`.
    """
    stack = _build(policy, depth, method == "reversible", x.shape)
    stream = tf.as_dtype(stack.dtype_policy.variable_dtype)  # float32 except under "float64".
    stack.set_weights([v.astype(stream.as_numpy_dtype) for v in weights])
    x = tf.cast(x, stream)
    w = tf.cast(w, stream)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = stack(x, training=True)
        loss = tf.reduce_sum(w * tf.cast(y, stream))
    dx, *dws = tape.gradient(loss, [x, *stack.trainable_variables])
    # Reconstruction in training mode (batch statistics), as Algorithm 1 rebuilds the inputs.
    x_rebuilt = stack.inverse(stack(x, training=True), training=True)
    f64 = [tf.cast(t, tf.float64) for t in (dx, x_rebuilt, *dws)]
    return f64[0], f64[2:], f64[1]


def _rel(a, b, tf):
    """`||a - b|| / ||b||` in float64."""
    return float(tf.norm(a - b) / tf.norm(b))


def _rel_all(grads, refs, tf):
    """The relative error of all variables' gradients together."""
    num = sum(float(tf.reduce_sum(tf.square(a - b))) for a, b in zip(grads, refs))
    den = sum(float(tf.reduce_sum(tf.square(b))) for b in refs)
    return (num / den) ** 0.5


def measure(depth, seed, args):
    """Errors of every (policy, method) for one depth and seed, against plain autodiff.

    The references are plain autodiff on the same weights and batch in float32 (the comparison the
    project reports) and in float64 (closer to the exact gradient: it shows how far float32 itself
    is from it).
    """
    import keras
    import tensorflow as tf

    shape = (args.batch_size, args.image_size, args.image_size, 2 * args.channels)
    keras.utils.set_random_seed(seed)
    weights = _build("float32", depth, False, shape).get_weights()
    x = tf.random.normal(shape, seed=seed)
    w = tf.random.normal(shape, seed=seed + 1)
    dx32, dw32, _ = _run("float32", "plain", depth, weights, x, w, tf)
    dx64, dw64, _ = _run("float64", "plain", depth, weights, x, w, tf)
    x64 = tf.cast(x, tf.float64)
    results = []
    for policy in args.policies:
        for method in args.methods:
            try:
                dx, dw, x_rebuilt = _run(policy, method, depth, weights, x, w, tf)
            except Exception as error:  # Report and go on: one failure is a finding.
                results.append({"policy": policy, "method": method, "depth": depth, "seed": seed,
                                "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            results.append({
                "policy": policy,
                "method": method,
                "depth": depth,
                "seed": seed,
                "dx": _rel(dx, dx32, tf),
                "dw_all": _rel_all(dw, dw32, tf),
                "dw_worst": max(_rel(a, b, tf) for a, b in zip(dw, dw32) if float(tf.norm(b))),
                "rebuild": _rel(x_rebuilt, x64, tf),
                "dx_vs_f64": _rel(dx, dx64, tf),
                "dw_all_vs_f64": _rel_all(dw, dw64, tf),
            })
    return results


def summarize(results, policies, methods, depths):
    """Markdown table of median errors over seeds."""
    lines = [
        "Relative error against float32 plain autodiff on the same weights (last two columns: "
        "against float64 plain autodiff); median over seeds:",
        "",
        "| policy | method | N | dx | dW (all) | dW (worst) | rebuild | dx vs f64 | dW (all) vs f64 |",
        "|---|---|---|---|---|---|---|---|---|",
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
                    lines.append(f"| {policy} | {method} | {depth} | error | | | | | |")
                    continue
                cells = [
                    f"{statistics.median(r[k] for r in rows):.1e}"
                    for k in ("dx", "dw_all", "dw_worst", "rebuild", "dx_vs_f64", "dw_all_vs_f64")
                ]
                lines.append(f"| {policy} | {method} | {depth} | {' | '.join(cells)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--depths", nargs="+", type=int, default=None,
                        help="Numbers of blocks N. Default 2 8 32 (8 with --quick).")
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
        args.depths = [8] if args.quick else [2, 8, 32]
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
    for depth in args.depths:
        for seed in range(args.seeds):
            for r in measure(depth, seed, args):
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
