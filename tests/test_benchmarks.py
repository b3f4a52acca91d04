"""The benchmarks run, check their contenders' results, and write what they are told to.

Only that they work is tested here; their timings are for benchmarks/, never
for a unit test.  ``python -m fastadam bench`` is the installed, user-facing
tool; the scripts in benchmarks/ are the project's own suites.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import fastadam

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: A few seconds' worth of the user tool: two sizes, a list case, one thread, float32 Adam.
QUICK_USER_RUN = ["--quick", "--sizes", "12,16", "--threads", "1", "--dtype", "float32", "--cases",
                  "single,small-tensors"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_the_user_bench_reports_measurements_and_writes_only_where_out_says(tmp_path):
    result = run(["-m", "fastadam", "bench", *QUICK_USER_RUN, "--out", "mine"], cwd=tmp_path)
    expected = {"mine/bench.json"}
    if importlib.util.find_spec("matplotlib") is not None:
        expected.add("mine/bench.png")
    else:
        assert "matplotlib is not installed, so no plot was drawn" in result.stdout
    assert files_under(tmp_path) == expected
    # Measurements and ratios, not the project's targets.
    for word in ("MET", "NO DATA", "target", "Target"):
        assert word not in result.stdout
    assert "%probe" in result.stdout and "np-ref" in result.stdout
    assert "other processes' load while timing" in result.stdout
    document = json.loads((tmp_path / "mine" / "bench.json").read_text())
    assert document["machine"]["cores"] >= 1 and document["fastadam"]["isa"]
    assert {r["label"] for r in document["results"]} == {"2^12", "2^16", "small-tensors"}
    for r in document["results"]:
        assert set(r["contenders"]) == {"probe", "exact probe", "fastadam.adam_step", "fastadam.Adam.step",
                                        "numpy reference"}
        assert r["other_load_cores"] is None or r["other_load_cores"] >= 0
        for c in r["contenders"].values():
            assert len(c["seconds"]) == 3 and c["gb_per_s"] > 0 and c["percent_of_probe"]["median"] > 0


def test_the_user_bench_writes_nothing_without_out(tmp_path):
    result = run(["-m", "fastadam", "bench", *QUICK_USER_RUN, "--cases", "single", "--sizes", "12"], cwd=tmp_path)
    assert files_under(tmp_path) == set()
    assert "nothing written (--out DIR keeps the results and the plot)" in result.stdout


def test_the_user_bench_says_when_matplotlib_is_missing(tmp_path):
    # matplotlib made unimportable in this process only (None in sys.modules).
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastadam.__main__ import main\n"
            f"sys.exit(main(['bench', *{QUICK_USER_RUN!r}, '--cases', 'single', '--sizes', '12', '--out', 'o']))")
    result = run(["-c", code], cwd=tmp_path)
    assert "matplotlib is not installed, so no plot was drawn" in result.stdout
    assert files_under(tmp_path) == {"o/bench.json"}


def test_the_user_bench_names_itself_in_its_help(tmp_path):
    result = run(["-m", "fastadam", "bench", "--help"], cwd=tmp_path)
    assert result.stdout.startswith("usage: python -m fastadam bench ")


def test_the_project_step_suite_runs_checks_and_writes_its_results(tmp_path):
    out = tmp_path / "bench.json"
    result = run([str(BENCHMARKS / "bench_step.py"), *QUICK_USER_RUN, "--no-plot", "--json", str(out)],
                 cwd=tmp_path)
    document = json.loads(out.read_text())
    # Both limits ran (each checked against its formula before it was timed),
    # and every contender is reported against each of them.
    assert {"probe", "exact probe", "numpy out="} <= set(document["contenders"])
    assert document["results"]
    for r in document["results"]:
        assert {"probe", "exact probe", "fastadam.adam_step", "numpy out="} <= set(r["contenders"])
        for c in r["contenders"].values():
            assert c["percent_of_probe"]["median"] > 0 and c["percent_of_exact_probe"]["median"] > 0
    assert "%exact" in result.stdout and "Targets" in result.stdout
    assert any("of the exact probe" in t["description"] for t in document["targets"])
    assert {t["status"] for t in document["targets"]} <= {"MET", "NOT MET", "NO DATA"}


def test_the_sparse_and_mixed_suite_runs_and_writes_its_results(tmp_path):
    out = tmp_path / "sparse_mixed.json"
    run([str(BENCHMARKS / "bench_sparse_mixed.py"), "--rows", "20000", "--dim", "16", "--indices", "500",
         "--mixed-size", "70000", "--threads", "1", "--repeats", "2", "--sample-seconds", "0.002", "--json",
         str(out)], cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["sparse"][0]["unique_rows"] <= 500
    assert results["sparse"][0]["dense_over_sparse"] > 0


def test_the_state_dtype_suite_checks_times_and_writes_its_rows(tmp_path):
    pytest.importorskip("ml_dtypes")
    out = tmp_path / "state_dtype.json"
    # (--bf16-offset: the bfloat16 moments placed off NumPy's alignment are checked bitwise as the others)
    result = run([str(BENCHMARKS / "bench_state_dtype.py"), "--quick", "--sizes", "10,12", "--libraries",
                  "bitsandbytes", "--bf16-offset", "128", "--json", str(out)], cwd=tmp_path)
    document = json.loads(out.read_text())
    [(level, timings)] = document["levels"].items()
    assert level == fastadam.config()["isa"] and f"ISA level {level}" in result.stdout
    assert [(r["size_exponent"], r["threads"]) for r in timings["results"]] == [(10, 1), (12, 1)]
    pairs = ["f32/f32", "bf16/bf16", "bf16/f32", "f32/bf16"]
    for r in timings["results"]:
        names = {f"{kind} {pair}" for kind in ("adam_step", "probe", "exact probe") for pair in pairs}
        assert names <= set(r["contenders"])
        for pair, bytes_per_element in zip(pairs, [28, 20, 24, 24]):
            step = r["contenders"][f"adam_step {pair}"]
            assert step["bytes_per_element"] == bytes_per_element and len(step["seconds"]) == 3
            assert step["percent_of_probe"]["median"] > 0 and step["float32_step_time_over_this"]["median"] > 0
        # The 8-bit step, against its own probes (the codes' and block floats' bytes).
        assert {"fastadam int8/int8", "probe int8/int8", "exact probe int8/int8"} <= set(r["contenders"])
        int8 = r["contenders"]["fastadam int8/int8"]
        assert int8["percent_of_probe"]["median"] > 0 and int8["percent_of_exact_probe"]["median"] > 0
        assert r["other_load_cores"] is None or r["other_load_cores"] >= 0
    if "bitsandbytes" in timings["not_importable"]:
        assert "not importable, so not in the run: bitsandbytes AdamW8bit" in result.stdout
    else:
        assert all("bitsandbytes AdamW8bit" in r["contenders"] for r in timings["results"])
    # Measured in fresh interpreters: the state's own bytes are exact, whatever the resident set did.
    memory = document["memory"]["optimizers"]
    assert memory["fastadam float32"]["state_nbytes_per_param"] == 8.0
    assert memory["fastadam bfloat16"]["state_nbytes_per_param"] == 4.0
    assert "other processes share this machine's cores" in result.stdout


@pytest.fixture(scope="module")
def training_loop_results(tmp_path_factory):
    """One tiny run of benchmarks/bench_training_loop.py, quiet and beside a busy process."""
    out = tmp_path_factory.mktemp("training_loop") / "loop.json"
    script = BENCHMARKS / "bench_training_loop.py"
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


def test_the_state_dtype_accuracy_run_trains_every_storage_and_torch_from_one_start(tmp_path):
    for module in ("torch", "sklearn", "ml_dtypes"):
        pytest.importorskip(module)
    run([str(BENCHMARKS / "accuracy_state_dtype.py"), "--epochs", "1", "--out", "out",
         "--state-dtype", "float32,bfloat16,bfloat16+sr,int8"], cwd=tmp_path)
    document = json.loads((tmp_path / "out" / "accuracy_state_dtype.json").read_text())
    runs = {r["name"]: r for r in document["runs"]}
    assert list(runs) == ["fastadam.Adam, float32 moments", "fastadam.Adam, bfloat16 moments",
                          "fastadam.Adam, bfloat16 (stochastic rounding) moments", "fastadam.Adam, int8 moments",
                          "torch.optim.Adam, float32"]
    n_params = document["settings"]["n_params"]
    assert runs["fastadam.Adam, float32 moments"]["moment_bytes"] == n_params * 8
    assert runs["fastadam.Adam, bfloat16 moments"]["moment_bytes"] == n_params * 4  # min_compressed_size=0
    assert n_params * 2 < runs["fastadam.Adam, int8 moments"]["moment_bytes"] < n_params * 2.05  # + absmax/block
    assert runs["torch.optim.Adam, float32"]["moment_bytes"] == n_params * 8
    for r in runs.values():
        assert len(r["train_loss"]) == len(r["test_loss"]) == len(r["test_accuracy"]) == 1
        assert 0 < r["train_loss"][0] < math.log(10) * 1.5  # trained from a 10-class start, not diverged
    # Rounded moments change the trajectory: same start and batches, different losses.
    losses = [tuple(r["train_loss"]) for r in runs.values()]
    assert len(set(losses)) == len(losses)
    expected = {"out/accuracy_state_dtype.json"}
    if importlib.util.find_spec("matplotlib") is not None:
        expected.add("out/accuracy_state_dtype.png")
    assert files_under(tmp_path) == expected
