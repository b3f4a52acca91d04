"""The benchmark suites run, check their contenders' results, and write their JSON.

Only that they work is tested here; their timings are for benchmarks/, never
for a unit test.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
