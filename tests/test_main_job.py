"""``python -m fastadam``, the main job: the side-by-side training runs and reports what it promises.

CI runs ``python -m fastadam --epochs 2`` as a step of its own; these tests
run it (and the ``--state-dtype`` comparison of moment storages) on the
generated data set, so they need neither scikit-learn nor its digits.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

PARAM_SIZES = (64 * 128, 128, 128 * 10, 10)  # the default network: 64 -> 128 -> 10
N_PARAMS = sum(PARAM_SIZES)


def main_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastadam", "--dataset", "synthetic", *args],
                          capture_output=True, text=True, timeout=600)


def epoch_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"\s+\d+\s+\|", line)]


def test_the_default_job_trains_fastadam_and_the_reference_bitwise_equal():
    result = main_job("--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = epoch_rows(result.stdout)
    assert len(rows) == 2
    for row in rows:
        # two identical (loss, accuracy) cells, then the verdict
        cells = re.findall(r"(\d\.\d{7})\s+(\d+\.\d\d%)", row)
        assert len(cells) == 2 and cells[0] == cells[1], row
        assert row.endswith("yes"), row
    assert "ratio reference / fastadam" in result.stdout


def test_state_dtype_trains_one_copy_per_storage_and_compares_them():
    pytest.importorskip("ml_dtypes")
    result = main_job("--epochs", "2", "--state-dtype", "float32,bfloat16", "bfloat16/float32", "int8")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "min_compressed_size=0" in out
    assert re.search(r"float32 moments\s*\|\s*bfloat16 moments\s*\|\s*bfloat16/float32 moments\s*\|"
                     r"\s*int8 moments", out)

    rows = epoch_rows(out)
    assert len(rows) == 2
    for row in rows:
        assert len(re.findall(r"\d\.\d{7}\s+\d+\.\d\d%", row)) == 4, row
        assert row.endswith("yes"), row  # each copy bitwise equal to the reference with its storage

    final = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
             for m in re.finditer(r"^  (\S+)\s+([\d,]+)\s+(\d\.\d{7})\s+\d+\.\d\d%", out, re.MULTILINE)}
    assert set(final) == {"float32", "bfloat16", "bfloat16/float32", "int8"}
    # min_compressed_size=0 compresses every param: bytes of (exp_avg, exp_avg_sq) per parameter
    assert final["float32"][0] == N_PARAMS * (4 + 4)
    assert final["bfloat16"][0] == N_PARAMS * (2 + 2)
    assert final["bfloat16/float32"][0] == N_PARAMS * (2 + 4)
    # 8-bit state: a byte of each moment, a float32 absmax per started block of 256, and the two shared maps
    blocks = sum(-(-size // 256) for size in PARAM_SIZES)
    assert final["int8"][0] == N_PARAMS * (1 + 1) + blocks * (4 + 4) + 2 * 256 * 4
    assert final["int8"][1] != final["float32"][1]
    # the storage really changed the training: rounded moments give a different trajectory
    assert final["bfloat16"][1] != final["float32"][1]
    assert re.search(r"^  bfloat16 .*[+-]\d+\.\d\d \((within|OUTSIDE) 0\.5\)", out, re.MULTILINE)


def test_state_dtype_refuses_an_unknown_storage_naming_it():
    result = main_job("--state-dtype", "float32,float16")
    assert result.returncode == 2
    assert "argument --state-dtype: 'float16' is not a storage" in result.stderr
