"""Why reversible backprop is slow under XLA on CPU: convolution gradients inside a `tf.while_loop`.

`ReversibleBlockStack` and `ReversibleSequence` run their blocks' backward passes (Algorithm 1) in one
`tf.while_loop`, so the weight and input gradients of every convolution are computed inside a loop body.
XLA:CPU compiles a convolution gradient inside a loop body to a much slower kernel than the same
convolution outside a loop (the open upstream report for the same compiler: jax-ml/jax#12868). This
script times that alone, without tf_revnet: four 3x3 convolutions of a (16, 32, 32, 16) float32 batch
and their weight gradients, as a `tf.while_loop` and unrolled, with `tf.function` and with XLA.

Keras' `jit_compile="auto"` (what `training.train` uses) leaves XLA off on a CPU-only machine, so CPU
users get the `tf.function` figures; on a GPU XLA calls cuDNN for every convolution.

    python benchmarks/xla_loop_conv.py            # median of 10 calls, ms
    python benchmarks/xla_loop_conv.py --quick    # smoke test (2 calls)
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

BLOCKS = 4


def weight_gradients_loop(x, w):
    """Conv and its weight gradient per iteration of a `tf.while_loop`."""

    def body(i, x, grads):
        kernel = w[i]
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        return i + 1, y, grads.write(i, tape.gradient(y, kernel))

    _, y, grads = tf.while_loop(lambda i, *_: i < BLOCKS, body,
                                (0, x, tf.TensorArray(tf.float32, BLOCKS)))
    return y, grads.stack()


def weight_gradients_unrolled(x, w):
    """The same computation unrolled in Python."""
    grads = []
    for i in range(BLOCKS):
        kernel = w[i]
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        grads.append(tape.gradient(y, kernel))
        x = y
    return x, tf.stack(grads)


def forward_loop(x, w):
    """Convolutions alone (no gradient) in a `tf.while_loop`."""
    return tf.while_loop(lambda i, x: i < BLOCKS,
                         lambda i, x: (i + 1, tf.nn.conv2d(x, w[i], 1, "SAME")), (0, x))[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    calls = 2 if args.quick else args.calls
    x = tf.random.stateless_normal((16, 32, 32, 16), seed=(0, 1))
    w = tf.random.stateless_normal((BLOCKS, 3, 3, 16, 16), seed=(0, 2)) * 0.1
    rows = ["| Computation | tf.function (ms) | XLA (ms) | XLA / tf.function |", "|---|---:|---:|---:|"]
    for fn in (forward_loop, weight_gradients_unrolled, weight_gradients_loop):
        times = []
        for jit in (False, True):
            compiled = tf.function(fn, jit_compile=jit)
            tf.nest.map_structure(lambda t: t.numpy(), compiled(x, w))
            samples = []
            for _ in range(calls):
                t0 = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy(), compiled(x, w))
                samples.append((time.perf_counter() - t0) * 1000)
            times.append(statistics.median(samples))
        rows.append(f"| {fn.__name__} | {times[0]:.1f} | {times[1]:.1f} | {times[1] / times[0]:.1f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
