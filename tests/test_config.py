"""fastadam.config() / show_config(), and where the thread count comes from."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastadam


def test_config_reports_the_build_and_the_selected_level():
    c = fastadam.config()
    assert c["version"] == fastadam.__version__
    assert c["isa"] in c["available_isas"]
    assert c["vector_bits"] in (128, 256, 512)
    assert isinstance(c["openmp"], bool)
    assert c["num_threads"] >= 1


def test_show_config_prints_every_key(capsys):
    fastadam.show_config()
    out = capsys.readouterr().out
    for key in fastadam.config():
        assert f"{key}:" in out
    assert f"isa: {fastadam.config()['isa']}" in out


@pytest.fixture
def restore_threads():
    yield
    fastadam.set_num_threads(None)


def test_set_num_threads_overrides_and_none_restores(restore_threads):
    default = fastadam.get_num_threads()
    fastadam.set_num_threads(3)
    assert fastadam.get_num_threads() == 3 and fastadam.config()["num_threads_override"] == 3
    fastadam.set_num_threads(None)
    assert fastadam.get_num_threads() == default and fastadam.config()["num_threads_override"] is None


def test_set_num_threads_rejects_nonsense(restore_threads):
    with pytest.raises(ValueError, match="num_threads must be None or >= 1"):
        fastadam.set_num_threads(0)


def test_omp_num_threads_sets_the_default():
    if not fastadam.config()["openmp"]:
        pytest.skip("built without OpenMP: always one thread")
    result = subprocess.run([sys.executable, "-c", "import fastadam; print(fastadam.get_num_threads())"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "3"})
    assert result.stdout.strip() == "3", result.stderr


def test_threadpoolctl_limits_apply():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fastadam.config()["openmp"]:
        pytest.skip("built without OpenMP: always one thread")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastadam.get_num_threads() == 1
    assert fastadam.get_num_threads() == fastadam.config()["num_threads"]


def test_the_step_runs_with_any_thread_count(restore_threads):
    # Correctness across counts is test_numerics' job; this checks the plumbing
    # of the global setting into a step large enough to be split.
    p, g, m, v = (np.ones(1 << 17, np.float32) for _ in range(4))
    for n in (1, 2, 4):
        fastadam.set_num_threads(n)
        fastadam.adam_step(p, g, m, v, step=1)
    assert np.all(p < 1)
