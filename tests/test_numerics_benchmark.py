"""Smoke test of `benchmarks/numerics.py --quick` on real CIFAR-10 images (a tiny model, 1 step)."""

import importlib.util
import json
import math

import pytest

from tests.conftest import REPO_ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("numerics_benchmark",
                                                  REPO_ROOT / "benchmarks" / "numerics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_table_and_plot(cifar10_small_dir, tmp_path, monkeypatch):
    numerics = _load_benchmark()
    monkeypatch.setattr(numerics, "QUICK_MODELS", (("tiny", [1, 2], [8, 8, 8]),))
    numerics.main([
        "--quick", "--data-dir", str(cifar10_small_dir), "--output-dir", str(tmp_path),
        "--steps", "0", "1", "--policies", "mixed_bfloat16",
        "--precision-depth", "2", "--precision-seeds", "1",
    ])
    result = json.loads((tmp_path / "numerics.json").read_text())
    rows = result["rows"]
    assert [(r["step"], r["policy"]) for r in rows] == [(0, "mixed_bfloat16"), (1, "mixed_bfloat16")]
    for row in rows:
        # Stage 1 (8 -> 8 channels, stride 1) is a reversible block; stage 2 a transition and a block.
        assert row["nonfinite"] == 0 and row["reversible_blocks"] == 2
        assert 0 <= row["angle_deg"] < 0.01 and math.isfinite(row["rebuild_relative_error"])
        # Against the float32 reference, low precision shows; float32 is close to float64.
        assert 1e-3 < row["plain_vs_f32_relative_error"] < 1
        assert row["rev_vs_f64_relative_error"] == pytest.approx(
            row["plain_vs_f64_relative_error"], rel=0.2)
    assert rows[1]["loss"] != rows[0]["loss"]  # one training step changed the weights
    assert {r["policy"] for r in result["precision"]["results"]} == {
        "mixed_bfloat16", "mixed_float16"}
    table = (tmp_path / "numerics.md").read_text()
    assert "| tiny | 8 | 1 | mixed_bfloat16 |" in table and "Stack of 2 reversible blocks" in table
    assert (tmp_path / "numerics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_steps_are_rejected():
    numerics = _load_benchmark()
    with pytest.raises(SystemExit):
        numerics.parse_args(["--steps", "5", "2"])
