"""Experiment (issue #11 item 3): a fixed-point residual stream makes mixed-precision rebuilds exact.

Standalone: it does not use or change `tf_revnet.layers`' reversible machinery; F and G are
`tf_revnet.layers.BasicResidualFunction`s, and the reversible backward pass (Algorithm 1) is written
out here, in eager mode, for a stack of N blocks `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`.

Why rebuilt inputs differ today: under `mixed_bfloat16`/`mixed_float16` the residual stream is float32
and `x1 + F(x2)` rounds to float32, so `(x1 + h) - h != x1` in general. The rebuilt inputs then differ
from the forward inputs by float32 rounding; when F or G cast them to bf16/fp16, some elements round to
the neighbouring low-precision value, and these differences grow through the recomputed stack.

The fix tested here: keep the stream on a fixed grid `2^-k` and quantize what F and G add to it,

    q(h) = round(h * 2^k) / 2^k,    y1 = x1 + q(F(x2)),    y2 = x2 + q(G(y1)),

with the stack's input quantized once on entry. Every stream value is then an integer multiple of
`2^-k`; while `|value| < 2^(24 - k)` a float32 sum of two of them is exact, so `y1 - q(F(x2)) == x1`
bit for bit, and F and G recompute on exactly the forward pass's inputs. The gradient passes
straight through `q` (dq/dh = 1), so reversible backprop equals plain backprop of the quantized
network bit for bit. What remains is the quantization itself (relative `2^-k / |h|`: small against
bf16's 2^-8 for k >= 12 and activations of order 1) and low precision inside F and G, which plain
backprop pays as well.

Rows (relative gradient error against float32 plain autodiff of the ordinary, unquantized stack on
the same weights and batch; loss `sum(w * stack(x))`, fixed random `w`; training-mode BatchNorm):

- `plain`: ordinary low-precision autodiff (activations stored): the target to match;
- `rev f32 stream`: reversible backprop as `tf_revnet` does it today (float32 stream);
- `rev fixed k`: reversible backprop with the fixed-point stream, grid `2^-k`;
- `plain fixed k`: ordinary autodiff of the same fixed-point network (straight-through q);
  `vs plain fixed` is the relative difference between the two (float32 sums in another order).

Command (about 2-4 minutes on 2 CPU cores):

    python benchmarks/fixed_point_stream.py --output benchmarks/results/fixed_point_stream.json
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=32, help="Blocks N. Default 32")
    parser.add_argument("--bits", nargs="+", type=int, default=[12, 16],
                        help="Grid exponents k (stream grid 2^-k). Default 12 16")
    parser.add_argument("--policies", nargs="+", default=["mixed_bfloat16", "mixed_float16"],
                        help="Keras dtype policies (float32 too: then plain is the reference "
                        "itself and ratios are n/a). Default mixed_bfloat16 mixed_float16")
    parser.add_argument("--seeds", type=int, default=2, help="Default 2")
    parser.add_argument("--batch-size", type=int, default=8, help="Default 8")
    parser.add_argument("--image-size", type=int, default=16, help="Default 16")
    parser.add_argument("--channels", type=int, default=16, help="Channels per half. Default 16")
    parser.add_argument("--stream-dtype", default="float32", choices=("float32", "float64"),
                        help="dtype of the fixed-point stream (the unquantized rows keep float32, "
                        "as tf_revnet today). float64 is exact while |value| < 2^(53 - k). "
                        "Default float32")
    parser.add_argument("--output", help="Write raw results and the table to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_revnet.layers import BasicResidualFunction

    def build(policy, seed):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(seed)
            layers = [BasicResidualFunction() for _ in range(2 * args.depth)]
            for layer in layers:
                layer.build((None, args.image_size, args.image_size, args.channels))
        finally:
            keras.mixed_precision.set_global_policy("float32")
        return layers

    def quantizer(bits):
        if bits is None:  # today's stream: float32, no grid
            q = lambda h: tf.cast(h, tf.float32)  # noqa: E731
            q.dtype = tf.float32
            return q
        scale = float(2.0**bits)
        dtype = tf.as_dtype(args.stream_dtype)
        q = lambda h: tf.round(tf.cast(h, dtype) * scale) / scale  # noqa: E731
        q.dtype = dtype
        return q

    def forward(layers, x, q, straight_through=False):
        """The stack; returns output and every block's inputs (for checking the rebuild)."""
        def add(stream, h):
            h32 = tf.cast(h, q.dtype)
            return stream + (h32 + tf.stop_gradient(q(h) - h32) if straight_through else q(h))

        x = tf.cast(x, q.dtype)
        x = x + tf.stop_gradient(q(x) - x) if straight_through else q(x)
        x1, x2 = tf.split(x, 2, axis=-1)
        inputs = []
        for b in range(args.depth):
            inputs.append((x1, x2))
            f, g = layers[2 * b], layers[2 * b + 1]
            x1 = add(x1, f(x2, training=True))
            x2 = add(x2, g(x1, training=True))
        return tf.concat([x1, x2], -1), inputs

    def plain_grads(layers, x, w, q):
        variables = [v for layer in layers for v in layer.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _ = forward(layers, x, q, straight_through=True)
            loss = tf.reduce_sum(tf.cast(w, y.dtype) * y)
        dx, *dws = tape.gradient(loss, [x, *variables])
        return dx, dws

    def reversible_grads(layers, x, w, q):
        """Algorithm 1 with stream quantizer q; returns (dx, dws, rebuilt bit-identical?)."""
        with keras.StatelessScope():  # the forward pass: no tape, BN statistics untouched
            y, inputs = forward(layers, x, q)
        y1, y2 = tf.split(y, 2, axis=-1)
        dy1, dy2 = tf.split(tf.cast(w, q.dtype), 2, axis=-1)
        grads = {}
        identical = True
        for b in reversed(range(args.depth)):
            f, g = layers[2 * b], layers[2 * b + 1]
            with keras.StatelessScope(), tf.GradientTape() as tape:
                tape.watch(y1)
                h = g(y1, training=True)
            x2 = y2 - q(h)
            dz1, *dg = tape.gradient(h, [y1, *g.trainable_variables],
                                     output_gradients=tf.cast(dy2, h.dtype))
            dz1 = dy1 + tf.cast(dz1, q.dtype)
            with keras.StatelessScope(), tf.GradientTape() as tape:
                tape.watch(x2)
                h = f(x2, training=True)
            x1 = y1 - q(h)
            dx2, *df = tape.gradient(h, [x2, *f.trainable_variables],
                                     output_gradients=tf.cast(dz1, h.dtype))
            dx2 = dy2 + tf.cast(dx2, q.dtype)
            for v, d in zip(f.trainable_variables + g.trainable_variables, df + dg):
                grads[id(v)] = d
            identical &= bool(tf.reduce_all(x1 == inputs[b][0]) and tf.reduce_all(x2 == inputs[b][1]))
            y1, y2, dy1, dy2 = x1, x2, dz1, dx2
        variables = [v for layer in layers for v in layer.trainable_variables]
        return tf.concat([dy1, dy2], -1), [grads[id(v)] for v in variables], identical, y

    def rel(a, b):
        a = np.concatenate([np.asarray(t, np.float64).ravel() for t in a])
        b = np.concatenate([np.asarray(t, np.float64).ravel() for t in b])
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    results = []
    t0 = time.perf_counter()
    shape = (args.batch_size, args.image_size, args.image_size, 2 * args.channels)
    for seed in range(args.seeds):
        ref_layers = build("float32", seed)
        weights = [layer.get_weights() for layer in ref_layers]
        x = tf.random.normal(shape, seed=seed)
        w = tf.random.normal(shape, seed=seed + 1)
        dx_ref, dw_ref = plain_grads(ref_layers, x, w, quantizer(None))
        for policy in args.policies:
            layers = build(policy, seed)
            for layer, wts in zip(layers, weights):
                layer.set_weights(wts)
            rows = []
            dx, dw = plain_grads(layers, x, w, quantizer(None))
            rows.append(("plain", None, dx, dw, None, None, None))
            dx, dw, same, y = reversible_grads(layers, x, w, quantizer(None))
            rows.append(("rev f32 stream", None, dx, dw, same, y, None))
            for bits in args.bits:
                dx, dw, same, y = reversible_grads(layers, x, w, quantizer(bits))
                rows.append((f"rev fixed {bits}", bits, dx, dw, same, y, None))
                pdx, pdw = plain_grads(layers, x, w, quantizer(bits))
                rows.append((f"plain fixed {bits}", bits, pdx, pdw, None, None, None))
                same_grads = rel([dx, *dw], [pdx, *pdw])  # summation order differs: ~1e-7
                rows[-2] = rows[-2][:4] + (same, y, same_grads)
            for name, bits, dx, dw, same, y, vs_plain in rows:
                r = {"seed": seed, "policy": policy, "method": name, "bits": bits,
                     "identical": same, "vs_plain_fixed": vs_plain}
                if dx is not None:
                    r.update(dx=rel([dx], [dx_ref]), dw_all=rel(dw, dw_ref))
                if y is not None:
                    r["max_abs_stream"] = float(tf.reduce_max(tf.abs(y)))
                results.append(r)
                print(f"[{time.perf_counter() - t0:5.0f} s] {json.dumps(r)}", file=sys.stderr,
                      flush=True)

    lines = [
        f"N = {args.depth} blocks, batch {args.batch_size} of {args.image_size}x{args.image_size}x"
        f"{2 * args.channels}, {args.seeds} seeds (median), fixed-point stream in "
        f"{args.stream_dtype}. Relative gradient error against float32 "
        "plain autodiff of the unquantized stack; ratio = error / plain low-precision error.",
        "",
        "| policy | method | dx | dW (all) | ratio dx | ratio dW | rebuilt inputs bit-identical "
        "| vs plain fixed |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for policy in args.policies:
        base = {}
        for name in dict.fromkeys(r["method"] for r in results if r["policy"] == policy):
            sel = [r for r in results if r["policy"] == policy and r["method"] == name]
            same = {r["identical"] for r in sel}
            same = "" if same == {None} else ("yes" if same == {True} else
                                               "no" if same == {False} else "mixed")
            vs = [r["vs_plain_fixed"] for r in sel if r["vs_plain_fixed"] is not None]
            vs = f"{max(vs):.1e}" if vs else ""
            dx = statistics.median(r["dx"] for r in sel)
            dw = statistics.median(r["dw_all"] for r in sel)
            if name == "plain":
                base = {"dx": dx, "dw": dw}
            ratio = [f"{a / b:.2f}" if b else "n/a" for a, b in ((dx, base["dx"]), (dw, base["dw"]))]
            lines.append(f"| {policy} | {name} | {dx:.2e} | {dw:.2e} | {ratio[0]} | {ratio[1]} "
                         f"| {same} | {vs} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "command": " ".join(["python"] + sys.argv),
                       "tensorflow": tf.__version__, "keras": keras.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
