"""Smoke tests of the benchmark scripts (`--quick`): they run and write their outputs.

The real figures come from full runs recorded in benchmarks/README.md, never from tests.
"""

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def test_models_quick(tmp_path):
    output = tmp_path / "models.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "models.py"), "--quick", "--methods", "reversible",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(output.read_text())["results"]
    assert len(results) == 1 and "error" not in results[0]
    r = results[0]
    assert r["step_peak_mb"] > 0 and r["first_step_s"] > 0 and r["params"] > 0
    assert (tmp_path / "models.md").read_text().startswith("| Model")
    assert (tmp_path / "models.png").stat().st_size > 1000


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


def test_graph_quick(tmp_path):
    output = tmp_path / "graph.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "graph.py"), "--quick", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(output.read_text())["results"]
    assert result["graph_nodes"] > 100 and result["trace_s"] > 0
