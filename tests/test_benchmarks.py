"""The benchmark suites run, check their contenders' results, and write their JSON.

Only that they work is tested here; their timings are for benchmarks/, never
for a unit test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastadam
from fastadam import _bench_sparse_mixed


def test_the_step_suite_runs_checks_and_writes_its_results(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "fastadam", "bench", "--quick", "--sizes", "12,16", "--threads",
                             "1", "--dtype", "float32", "--cases", "single,small-tensors", "--no-plot", "--json",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    # Both limits ran (each checked against its formula before it was timed),
    # and every contender is reported against each of them.
    assert {"probe", "exact probe"} <= set(document["contenders"])
    assert document["results"]
    for r in document["results"]:
        assert {"probe", "exact probe", "fastadam.adam_step"} <= set(r["contenders"])
        for c in r["contenders"].values():
            assert c["percent_of_probe"]["median"] > 0 and c["percent_of_exact_probe"]["median"] > 0
    assert "%exact" in result.stdout
    assert any("of the exact probe" in t["description"] for t in document["targets"])


def test_the_sparse_and_mixed_suite_runs_and_writes_its_results(tmp_path):
    out = tmp_path / "sparse_mixed.json"
    status = _bench_sparse_mixed.main(["--rows", "20000", "--dim", "16", "--indices", "500", "--mixed-size",
                                       "70000", "--threads", "1", "--repeats", "2", "--sample-seconds", "0.002",
                                       "--json", str(out)])
    assert status == 0
    results = json.loads(out.read_text())
    assert results["sparse"][0]["unique_rows"] <= 500
    assert results["sparse"][0]["dense_over_sparse"] > 0


@pytest.fixture(scope="module")
def training_loop_results(tmp_path_factory):
    """One tiny run of benchmarks/bench_training_loop.py, quiet and beside a busy process."""
    out = tmp_path_factory.mktemp("training_loop") / "loop.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training_loop.py"
    # 6e4 parameters: above the serial cut-off, so the default contender really runs on several threads.
    result = subprocess.run([sys.executable, str(script), "--quick", "--sizes", "2e3,6e4", "--seconds", "0.2",
                             "--busy", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS" in result.stdout or "FAIL" in result.stdout
    return json.loads(out.read_text())


def _cases(results, loop):
    return [(run["mode"], case) for run in results["runs"] for case in run["cases"] if case["loop"] == loop]


def test_the_training_loop_benchmark_runs_and_one_thread_changes_no_bit(training_loop_results):
    results = training_loop_results
    assert [run["mode"] for run in results["runs"]] == ["quiet", "busy"]
    assert results["machine"]["cores"] >= 1 and results["machine"]["fastadam"]["isa"]
    assert results["checks_passed"]
    cases = _cases(results, "numpy")
    assert [(mode, case["label"]) for mode, case in cases] == [("quiet", "2e3"), ("quiet", "6e4"),
                                                               ("busy", "2e3"), ("busy", "6e4")]
    assert max(case["params"] for _, case in cases) > fastadam.config()["parallel_threshold_elements"]["float32"]
    for _, case in cases:
        assert case["checks"] == {"default_equals_one_thread_bitwise": True, "finite": True}
        assert set(case["contenders"]) == {"fastadam", "fastadam 1-thread"}
        for figures in case["contenders"].values():
            assert set(figures) == {"step_us", "iteration_us", "block_medians_us"}
            assert len(figures["block_medians_us"]) == case["repeats"] == len(case["blocks"])
        assert set(case["ratios"]) == {"step_default_over_one_thread", "iteration_default_over_one_thread"}
        assert case["iterations_per_contender"] >= 2 + sum(b + 1 for b in case["blocks"])
    for target in results["targets"]:
        assert set(target) == {"where", "what", "value", "passed"}
    # The busy neighbours are gone once the run is over.
    for run in results["runs"]:
        for pid in run["busy_pids"]:
            cmdline = Path(f"/proc/{pid}/cmdline")
            assert not cmdline.exists() or "getppid" not in cmdline.read_text(errors="replace")


def test_the_training_loop_benchmark_steps_torch_models_through_their_views(training_loop_results):
    pytest.importorskip("torch")
    cases = _cases(training_loop_results, "torch")
    assert len(cases) == 4
    for _, case in cases:
        checks = case["checks"]
        assert checks["views_share_memory"] and checks["params_changed"] == [True, True, True]
        assert checks["default_equals_one_thread_bitwise"] and checks["finite"]
        assert checks["max_difference_to_torch_over_largest_param"] < 1e-2
        assert case["torch_optimizer"] in case["contenders"]
        assert "iteration_default_over_torch" in case["ratios"]
