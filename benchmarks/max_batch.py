"""The largest batch whose training step fits a memory budget, per model and backprop method.

A training step's peak memory is linear in the batch size: the weights, optimizer state and traced
graph do not depend on it, the activations do. From `benchmarks/models.py` runs of one model and method
at two or more batch sizes this script fits

    process memory(batch) = fixed + per_example * batch

(least squares over the measured whole-process peaks, `process_mb`, which include the built model) and
reports, for each budget, `floor((budget - fixed) / per_example)`. Beside it, the same from the analytic
`tf_revnet.memory.estimate` (its per-example bytes, with the measured fixed part).

Commands (from the repository root):

    # Measure (each configuration in its own process), then fit:
    python benchmarks/models.py --models revnet38 revnet110 revnet164 --methods reversible plain \
        recompute --batch-sizes 32 64 --output benchmarks/results/models_batch.json
    python benchmarks/max_batch.py --from-json benchmarks/results/models_batch.json \
        --budgets 2 4 8 --output benchmarks/results/max_batch.md

    # Smoke test (tiny models; runs models.py --quick at two batch sizes):
    python benchmarks/max_batch.py --quick
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

GIB_IN_MB = 1024.0


def fit_line(points):
    """Least-squares `(fixed, slope)` of `y = fixed + slope * x` for `[(x, y), ...]` (two or more x)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        raise ValueError("Need runs at two or more batch sizes to fit memory against batch size.")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - slope * mean_x, slope


def max_batch(fixed_mb, per_example_mb, budget_mb):
    """The largest batch with `fixed + per_example * batch <= budget` (0 if none fits)."""
    if per_example_mb <= 0:
        return None
    # The tiny tolerance keeps a fit's rounding (e.g. 393.9999999) from losing a whole example.
    return max(0, int((budget_mb - fixed_mb) / per_example_mb + 1e-9))


def table(results, budgets_gib):
    groups = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["model"], r["method"]), []).append(r)
    header = " | ".join(f"{b:g} GiB measured | {b:g} GiB estimate" for b in budgets_gib)
    rows = [
        f"| Model | Method | Fixed (MB) | MB per example | Estimate MB per example | {header} |",
        "|---|---|---:|---:|---:|" + "---:|---:|" * len(budgets_gib),
    ]
    for (model, method), runs in sorted(groups.items()):
        if len({r["batch_size"] for r in runs}) < 2:
            continue
        fixed, slope = fit_line([(r["batch_size"], r["process_mb"]) for r in runs])
        key = method if method != "baseline" else "plain"
        est_slope = fit_line([(r["batch_size"], r["estimate_mb"][key]) for r in runs])[1]
        cells = []
        for b in budgets_gib:
            cells.append(str(max_batch(fixed, slope, b * GIB_IN_MB)))
            cells.append(str(max_batch(fixed, est_slope, b * GIB_IN_MB)))
        name = model if method != "baseline" else f"{model} baseline"
        rows.append(f"| {name} | {method} | {fixed:.0f} | {slope:.2f} | {est_slope:.2f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-json", nargs="+", help="models.py result files.")
    parser.add_argument("--budgets", nargs="+", type=float, default=[2, 4, 8], help="GiB.")
    parser.add_argument("--quick", action="store_true", help="Measure tiny models, then fit.")
    parser.add_argument("--output", help="Markdown file for the table.")
    args = parser.parse_args(argv)
    paths = list(args.from_json or [])
    if args.quick:
        tmp = os.path.join(tempfile.mkdtemp(), "quick.json")
        models_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.py")
        results = []
        for batch in (2, 4):
            subprocess.run([sys.executable, models_py, "--quick", "--methods", "reversible",
                            "--output", tmp], check=True, capture_output=True, text=True,
                           env=dict(os.environ, TF_REVNET_QUICK_BATCH=str(batch)))
            with open(tmp) as f:
                results += json.load(f)["results"]
    else:
        if not paths:
            parser.error("give --from-json FILES or --quick")
        results = []
        for path in paths:
            with open(path) as f:
                results += json.load(f)["results"]
    text = table(results, args.budgets)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
