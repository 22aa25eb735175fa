"""Size of the traced training step, tracing time and XLA compile time against depth.

For each model (RevNet-38/110/164 at CIFAR size) and method, in its own process: `reversible` (the
default RevNet: one `ReversibleBlockStack` per stage), `per-block` (reversible, one layer per block,
`stack_blocks=False`) and `plain` (`stack_blocks=False, use_custom_gradient=False`, ordinary autodiff),
it traces one gradient step (`tf.GradientTape` through the model, gradients of every weight) with
`tf.function` and reports the GraphDef's nodes (the function library included: while-loop bodies,
gradient functions) and bytes, and the tracing time; then, with `--xla`, runs the same step once with
`jit_compile=True` and reports the time of that first call (tracing + XLA compilation + one step) and the
RSS it left resident.

    python benchmarks/graph.py --output benchmarks/results/graph.json          # tf.function
    python benchmarks/graph.py --xla --output benchmarks/results/graph_xla.json  # and XLA
    python benchmarks/graph.py --quick                                          # smoke test
"""

import argparse
import json
import os
import subprocess
import sys
import time

from measure import MIB, malloc_trim, proc_status_bytes


def run_child(args):
    import gc

    import keras
    import tensorflow as tf

    import tf_revnet

    keras.utils.set_random_seed(0)
    kwargs = {"use_custom_gradient": args.method != "plain", "stack_blocks": args.method == "reversible"}
    if args.quick:
        model = tf_revnet.models.RevNet(units=(1, 2), widths=(8, 8, 16), **kwargs)
    else:
        model = tf_revnet.models.get(args.model)(**kwargs)
    x = tf.random.uniform((args.batch_size, 32, 32, 3))
    y = tf.zeros((args.batch_size,), "int64")

    def step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probabilities))
        return tape.gradient(loss, model.trainable_variables)

    t0 = time.perf_counter()
    graph_def = tf.function(step).get_concrete_function(x, y).graph.as_graph_def()
    trace_s = time.perf_counter() - t0
    library_nodes = sum(len(f.node_def) for f in graph_def.library.function)
    result = {
        "model": args.model, "method": args.method, "params": int(model.count_params()),
        "graph_nodes": len(graph_def.node) + library_nodes, "graph_mb": graph_def.ByteSize() / MIB,
        "trace_s": trace_s, "variables": len(model.trainable_variables),
    }
    if args.xla:
        gc.collect()
        malloc_trim()
        before = proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        grads = tf.function(step, jit_compile=True)(x, y)
        float(tf.reduce_sum(grads[0]))
        result["xla_first_call_s"] = time.perf_counter() - t0
        gc.collect()
        malloc_trim()
        result["xla_resident_mb"] = (proc_status_bytes("VmRSS") - before) / MIB
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["revnet38", "revnet110", "revnet164"])
    parser.add_argument("--methods", nargs="+", choices=["reversible", "per-block", "plain"],
                        default=["reversible", "per-block", "plain"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--xla", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.model, args.method = args.models[0], args.methods[0]
        run_child(args)
        return 0
    if args.quick:
        args.models, args.methods = ["tiny"], ["reversible"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TF_ENABLE_ONEDNN_OPTS="0",
               TF_CPP_MIN_LOG_LEVEL="2")
    results = []
    for model in args.models:
        for method in args.methods:
            command = [sys.executable, os.path.abspath(__file__), "--child", "--models", model,
                       "--methods", method, "--batch-size", str(args.batch_size)]
            command += ["--xla"] * args.xla + ["--quick"] * args.quick
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            result = json.loads(lines[0][7:]) if lines else {
                "model": model, "method": method, "error": proc.stderr.strip()[-300:]}
            results.append(result)
            print(json.dumps(result), flush=True)
    rows = ["| Model | Method | Variables | Graph nodes | GraphDef (MB) | Trace (s) | XLA first call (s) "
            "| XLA resident (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['method']} | error | | | | | |")
            continue
        xla = (f"{r['xla_first_call_s']:.1f} | {r['xla_resident_mb']:.0f}" if "xla_first_call_s" in r
               else "- | -")
        rows.append(f"| {r['model']} | {r['method']} | {r['variables']} | {r['graph_nodes']} | "
                    f"{r['graph_mb']:.2f} | {r['trace_s']:.1f} | {xla} |")
    table = "\n".join(rows) + "\n"
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
        with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write(table)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
