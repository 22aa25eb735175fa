"""Smoke tests of the benchmark scripts (`--quick`): they run and write their outputs.

The real figures come from full runs recorded in benchmarks/README.md, never from tests. Each
script's parent part runs in this process (the child processes that measure are real);
`graph.py`'s child, which only traces a tiny model, runs in this process too, from the very
command line its parent builds (its own process: `pytest -m slow`).
"""

import contextlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name):
    """benchmarks/<name>.py as a module (`benchmark_<name>`; its sibling imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_models_quick(tmp_path, capsys):
    """`models.py --quick`: the parent here, the measuring child in its own process."""
    output = tmp_path / "models.json"
    models = _benchmark("models")
    code = models.main(["--quick", "--methods", "reversible", "--output", str(output)])
    assert code == 0, capsys.readouterr().out[-2000:]
    results = json.loads(output.read_text())["results"]
    assert len(results) == 1 and "error" not in results[0]
    r = results[0]
    assert r["step_peak_mb"] > 0 and r["first_step_s"] > 0 and r["params"] > 0
    assert (tmp_path / "models.md").read_text().startswith("| Model")
    assert (tmp_path / "models.png").stat().st_size > 1000


def test_revvit_quick(tmp_path, capsys):
    """`revvit.py --quick`: a tiny reversible RevViT at depth 2 and 4, each in its own process."""
    output = tmp_path / "revvit.json"
    revvit = _benchmark("revvit")
    code = revvit.main(["--quick", "--methods", "reversible", "--output", str(output)])
    assert code == 0, capsys.readouterr().out[-2000:]
    results = json.loads(output.read_text())["results"]
    assert [(r["method"], r["depth"]) for r in results] == [("reversible", 2), ("reversible", 4)]
    assert all(r["step_peak_mb"] >= 0 and r["step_s"] > 0 and r["params"] > 0 for r in results)
    assert (tmp_path / "revvit.md").read_text().startswith("| Method")


@pytest.mark.parametrize("budget", [0.001, 1.0])
def test_max_batch_fit(budget):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import max_batch
    finally:
        sys.path.pop(0)
    fixed, slope = max_batch.fit_line([(32, 300.0), (64, 364.0), (128, 492.0)])
    assert fixed == pytest.approx(236.0) and slope == pytest.approx(2.0)
    expected = max(0, int((budget * 1024 - 236.0) // 2.0))
    assert max_batch.max_batch(fixed, slope, budget * 1024) == expected


def _check_graph_output(output):
    (result,) = json.loads(output.read_text())["results"]
    assert "error" not in result, result
    assert result["graph_nodes"] > 100 and result["trace_s"] > 0
    assert result["variables"] > 10 and result["params"] > 0
    assert (output.parent / "graph.md").read_text().startswith("| Model")


def test_graph_quick(tmp_path, monkeypatch):
    """`graph.py --quick`, its child run in this process from the command line the parent built."""
    graph = _benchmark("graph")
    real_run = subprocess.run

    def run_child_here(command, env=None, capture_output=False, text=False, **kwargs):
        if command[:2] != [sys.executable, graph.__file__]:
            return real_run(command, env=env, capture_output=capture_output, text=text, **kwargs)
        assert "--child" in command
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = graph.main(command[2:])
        return subprocess.CompletedProcess(command, code, out.getvalue(), "")

    monkeypatch.setattr(graph.subprocess, "run", run_child_here)
    output = tmp_path / "graph.json"
    assert graph.main(["--quick", "--output", str(output)]) == 0
    _check_graph_output(output)


@pytest.mark.slow  # test_graph_quick runs the same child command in the test process
def test_graph_quick_in_its_own_process(tmp_path):
    output = tmp_path / "graph.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "graph.py"), "--quick", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_graph_output(output)


def test_xla_loop_conv_quick(capsys):
    """`xla_loop_conv.py --quick`: one row per computation, both timings positive."""
    assert _benchmark("xla_loop_conv").main(["--quick"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")][1:]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["forward_loop", "weight_gradients_unrolled", "weight_gradients_loop"]
    for row in rows:
        fn_ms, xla_ms = (float(c) for c in row.split("|")[2:4])
        assert fn_ms > 0 and xla_ms > 0


def test_memory_quick_one_configuration(tmp_path, capsys):
    """`memory.py --quick` restricted to one child process: it measures and writes its JSON."""
    memory = _benchmark("memory")
    output = tmp_path / "memory.json"
    assert memory.main(["--quick", "--methods", "reversible", "--depths", "2",
                        "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert len(results) == 1
    assert "| function | reversible |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["convbnrelu", "attention", "nested"])
def test_custom_models_build_and_estimate(name):
    """The custom models of the estimate's table (`models.py --models convbnrelu ...`), tiny."""
    import tf_revnet

    models = _benchmark("models")
    for method in ("reversible", "plain"):
        model = models.build_custom(name, method, 16, quick=True)
        e = tf_revnet.memory.estimate(model, 2)
        assert 0 < e.reversible and 0 < e.plain and not e.warnings


@pytest.mark.parametrize("part", ["angle", "train"])
def test_exact_stream_quick(part, cifar10_small_dir, tmp_path):
    """`exact_stream.py --quick` on real CIFAR-10 images: tiny models, a few steps."""
    exact_stream = _benchmark("exact_stream")
    output = tmp_path / f"{part}.json"
    rows, table = exact_stream.main([part, "--quick", "--data-dir", str(cifar10_small_dir),
                                     "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == rows
    assert {r["coupling"] for r in rows} == {"additive", "fixed_point"}
    if part == "angle":
        fixed = [r for r in rows if r["coupling"] == "fixed_point"]
        assert all(r["bit_identical"] and r["angle_deg"] < 0.01 for r in fixed)
        assert all(r["out_of_range_blocks"] == 0 for r in fixed)
        assert "| tiny-a | 18 | fixed_point |" in table
    else:
        assert all(0 <= r["test_accuracy"] <= 1 and r["out_of_range_steps"] == 0 for r in rows)


def test_graph_blocks_counts_nodes_per_block():
    """`graph_blocks.py` on 2 and 3 blocks: the nodes added per block are a few per variable."""
    rows, summary = _benchmark("graph_blocks").main(["--depths", "2", "3", "--channels", "8"])
    assert [r["blocks"] for r in rows] == [2, 3]
    assert 0 < summary["nodes_per_variable"] <= 3


def test_gpu_check_quick(tmp_path):
    """`benchmarks/gpu/run.py --quick` (the GPU check's three sections, tiny, on CPU JAX): every section
    has positive, finite figures, and a reversible block adds less memory than a plain one."""
    pytest.importorskip("jax")
    import math
    import os

    from tests.conftest import CIFAR10_ARCHIVE

    output = tmp_path / "gpu_check.json"
    command = [sys.executable, str(BENCHMARKS / "gpu" / "run.py"), "--quick", "--output", str(output)]
    if CIFAR10_ARCHIVE.is_file():
        command += ["--data", str(CIFAR10_ARCHIVE)]
    result = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND="jax"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    check = json.loads(output.read_text())
    assert check["errors"] == [] and check["machine"]["platform"] == "cpu"

    def positive(*values):
        return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)

    blocks = check["per_block"]
    assert len(blocks["runs"]) == 4
    assert all(positive(r["step_peak_mb"], r["xla_temp_mb"]) for r in blocks["runs"])
    assert positive(blocks["plain_mb_per_block"], blocks["plain_xla_temp_mb_per_block"])
    assert blocks["reversible_mb_per_block"] < blocks["plain_mb_per_block"]
    assert blocks["reversible_xla_temp_mb_per_block"] < blocks["plain_xla_temp_mb_per_block"]
    model = check["model"]
    assert [r["method"] for r in model["runs"]] == ["reversible", "plain"]
    assert all(positive(r["step_peak_mb"], r["step_s"], r["compile_s"]) for r in model["runs"])
    assert positive(model["step_peak_mb_ratio"], model["step_s_ratio"])
    cifar = check["cifar10"]
    assert [r["model"] for r in cifar["runs"]] == ["tiny_revnet", "tiny_resnet"]
    for r in cifar["runs"]:
        assert r["epochs_done"] == r["epochs_planned"] == len(r["test_accuracy"]) == 1
        assert positive(r["epoch_s"], r["train_loss"][0]) and 0 <= r["test_accuracy"][0] <= 1
    assert "per block" in result.stdout and "CIFAR-10" in result.stdout
