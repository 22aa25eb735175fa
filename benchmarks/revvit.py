"""RevViT training-step memory and time against depth and batch: reversible, plain, recompute.

The generic `tf_revnet.models.RevViT` (patch 4 on 32x32 images: 64 tokens; a small width, so that
depth 48 fits a 2-core CPU), for each method on the same architecture:

- `reversible`: as built (`use_custom_gradient=True`: the blocks are one `ReversibleBlockStack` in
  one `ReversibleSequence`, backpropagated by Algorithm 1, storing no activation of the blocks);
- `plain`: the same model with `use_custom_gradient=False` (ordinary autodiff of the same loop,
  storing every block's activations);
- `recompute`: one `ReversibleBlock` layer per block (`stack_blocks=False`), each run under
  `tf.recompute_grad` (each block keeps its input, the rest is recomputed).

Each configuration runs `model.fit` (SGD with momentum, random images) in its own process, one
warm-up step and `--steps` measured steps, with the meters of `measure.py` (`MALLOC_MMAP_THRESHOLD_`,
`TF_ENABLE_ONEDNN_OPTS=0`, `malloc_trim` and a reset of the peak RSS before each step), and
records `step_peak_mb` (peak RSS of a step above the RSS before it, median), `graph_mb` (resident
after the first step, above the built model), `process_mb` (peak RSS of the process above the
built model), `first_step_s` and `step_s` (median).

Commands (from the repository root):

    # The published table: depth 12/24/48 at batch 128, and batch 32/64 at depth 24:
    python benchmarks/revvit.py --output benchmarks/results/revvit.json
    # Smoke test (depth 2 and 4, tiny width, batch 4; used by the test suite):
    python benchmarks/revvit.py --quick
    # Table again from a saved run:
    python benchmarks/revvit.py --from-json benchmarks/results/revvit.json

`--child` is internal: one configuration, one `RESULT {json}` line.
"""

import argparse
import json
import os
import statistics
import sys

from measure import measure_fit, run_child
from models import _wrap_units_in_recompute_grad

METHODS = ("reversible", "plain", "recompute")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(args, method, depth):
    """The RevViT of `args` at `depth` for `method` (see the module docstring)."""
    import tensorflow as tf

    import tf_revnet

    model = tf_revnet.models.RevViT(
        patch_size=args.patch_size, embed_dim=args.embed_dim, depth=depth,
        num_heads=args.num_heads, input_shape=(args.image_size, args.image_size, 3), classes=10,
        use_custom_gradient=method == "reversible", stack_blocks=method != "recompute",
    )
    if method == "recompute":
        _wrap_units_in_recompute_grad(model.get_layer("revvit_body"), tf)
    return model


def measure_child(args):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = build_model(args, args.method, args.depth)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, (args.batch_size,))
    record = measure_fit(model, x, y, args.batch_size, warmup=1, steps=args.steps)
    result = {
        "method": args.method, "depth": args.depth, "batch_size": args.batch_size,
        "embed_dim": args.embed_dim, "num_heads": args.num_heads, "patch_size": args.patch_size,
        "image_size": args.image_size, "meter": record["meter"],
        "params": int(model.count_params()),
        "step_peak_mb": statistics.median(record["peaks_mb"]), "step_peaks_mb": record["peaks_mb"],
        "graph_mb": record["graph_mb"], "process_mb": record["process_mb"],
        "first_step_s": record["first_step_s"], "step_s": statistics.median(record["times_s"]),
        "step_times_s": record["times_s"],
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_one(args, method, depth, batch_size):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TF_ENABLE_ONEDNN_OPTS="0")
    # The child imports tf_revnet from this checkout (not another installed copy).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, os.path.abspath(__file__), "--child", "--methods", method,
               "--depths", str(depth), "--batch-sizes", str(batch_size), "--steps", str(args.steps),
               "--embed-dim", str(args.embed_dim), "--num-heads", str(args.num_heads),
               "--patch-size", str(args.patch_size), "--image-size", str(args.image_size)]
    return run_child(command, env, args.timeout,
                     {"method": method, "depth": depth, "batch_size": batch_size})


def configurations(args):
    """`(method, depth, batch)`: every depth at the first batch size, then the other batch sizes at
    `--batch-sweep-depth` (reversible and plain)."""
    first, *others = args.batch_sizes
    configs = [(m, d, first) for d in args.depths for m in args.methods]
    configs += [(m, args.batch_sweep_depth, b) for b in others for m in args.methods
                if m != "recompute"]
    return configs


def markdown(results):
    """The results as a Markdown table: ratios to plain at the same depth and batch, and to the
    same method's shallowest depth at the same batch."""
    ok = [r for r in results if "error" not in r]
    plain = {(r["depth"], r["batch_size"]): r for r in ok if r["method"] == "plain"}
    shallow = {}
    for r in sorted(ok, key=lambda r: r["depth"]):
        shallow.setdefault((r["method"], r["batch_size"]), r)
    rows = ["| Method | Depth | Batch | Params | Step peak (MB) | vs plain | vs shallowest | "
            "Graph (MB) | Process (MB) | First step (s) | Step (s) | vs plain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | {r['depth']} | {r['batch_size']} | error: "
                        f"{r['error'][:60]} | | | | | | | | |")
            continue
        p, s = plain.get((r["depth"], r["batch_size"])), shallow[(r["method"], r["batch_size"])]

        def ratio(key, base, r=r):
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        rows.append(
            f"| {r['method']} | {r['depth']} | {r['batch_size']} | {r['params']:,} | "
            f"{r['step_peak_mb']:.0f} | {ratio('step_peak_mb', p)} | "
            f"{ratio('step_peak_mb', s)} (d{s['depth']}) | {r['graph_mb']:.0f} | "
            f"{r['process_mb']:.0f} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
            f"{ratio('step_s', p)} |")
    return "\n".join(rows) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--depths", nargs="+", type=int, default=[12, 24, 48])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 32, 64],
                        help="The first for the depth sweep, the others at --batch-sweep-depth.")
    parser.add_argument("--batch-sweep-depth", type=int, default=24)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="Measured steps after the warm-up.")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--quick", action="store_true",
                        help="Depth 2 and 4, width 8, batch 4, one measured step (a smoke test).")
    parser.add_argument("--output", help="JSON file for the results (a .md is written beside it).")
    parser.add_argument("--from-json", help="Re-print the table of a saved run.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.batch_sizes, args.batch_sweep_depth = [2, 4], [4], 2
        args.embed_dim, args.num_heads, args.image_size, args.steps = 8, 2, 8, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        args.method, args.depth, args.batch_size = args.methods[0], args.depths[0], \
            args.batch_sizes[0]
        measure_child(args)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)["results"]
    else:
        results = []
        for method, depth, batch_size in configurations(args):
            result = run_one(args, method, depth, batch_size)
            result["quick"] = args.quick
            results.append(result)
            print(json.dumps(result), flush=True)
    table = markdown(results)
    print(table)
    if args.output and not args.from_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"command": " ".join(["python benchmarks/revvit.py"] + sys.argv[1:]),
                       "machine": _machine(), "results": results}, f, indent=1)
        with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write(table)
    return 1 if any("error" in r for r in results) else 0


def _machine():
    """CPU model, core count and the load average when the run ended (shared machines)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": list(os.getloadavg())}


if __name__ == "__main__":
    sys.exit(main())
