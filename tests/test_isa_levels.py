"""Every instruction-set level gives the same bits, and FASTADAM_ISA picks the level.

The level is chosen once, at import, so each forced level runs in a fresh
interpreter: the bitwise suites (dense, row-sparse, mixed precision and bfloat16 state, whose
float16/bfloat16 conversions differ most between levels) and the benchmarks' probes run again under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastadam

TESTS = Path(__file__).parent
KNOWN_LEVELS = ["baseline", "avx2", "avx512"]
BITWISE_SUITES = ["test_numerics.py", "test_sparse.py", "test_mixed_precision.py", "test_state_dtype.py",
                  "test_state_int8.py", "test_state_int4.py", "test_probe.py"]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_the_best_level_the_cpu_supports_is_selected_by_default():
    result = run_python("import fastadam; c = fastadam.config(); print(c['isa'], *c['available_isas'])",
                        FASTADAM_ISA="")
    selected, *available = result.stdout.split()
    assert available[0] == "baseline"
    assert selected == available[-1]
    assert set(available) <= set(KNOWN_LEVELS)


@pytest.mark.parametrize("level", KNOWN_LEVELS)
def test_forcing_a_level_runs_the_bitwise_suites_unchanged(level):
    if level not in fastadam.config()["available_isas"]:
        pytest.skip(f"this CPU cannot run the {level} level")
    check = run_python("import fastadam; print(fastadam.config()['isa'])", FASTADAM_ISA=level)
    assert check.stdout.strip() == level, check.stderr

    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *[str(TESTS / suite) for suite in BITWISE_SUITES]], capture_output=True, text=True,
                            env={**os.environ, "FASTADAM_ISA": level}, cwd=TESTS.parent, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_an_unknown_level_is_a_clear_error_at_import():
    result = run_python("import fastadam", FASTADAM_ISA="sse9")
    assert result.returncode != 0
    assert "FASTADAM_ISA='sse9' is not a level of this build (baseline" in result.stderr


def test_a_level_the_cpu_lacks_is_a_clear_error_at_import():
    missing = [lv for lv in KNOWN_LEVELS if lv not in fastadam.config()["available_isas"]]
    if not missing:
        pytest.skip("this CPU runs every level, so none can be refused")
    result = run_python("import fastadam", FASTADAM_ISA=missing[-1])
    assert result.returncode != 0
    assert f"FASTADAM_ISA='{missing[-1]}' is not supported by this CPU" in result.stderr
