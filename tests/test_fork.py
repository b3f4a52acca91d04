"""Steps keep working in processes made by fork(), and in every multiprocessing start method.

No thread pool survives fork(): a child whose forking thread had run a
multi-threaded step must not wait for workers that are not there (with GNU
libgomp's team it used to hang at its next parallel region).  Each case runs
in its own interpreter under a timeout, so a regression fails here instead of
hanging the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

TIMEOUT_S = 120

#: A multi-threaded step in the parent first: that is what leaves a stale pool behind.
PARENT = textwrap.dedent("""
    import os, sys, multiprocessing as mp
    import numpy as np
    import fastadam

    N = 1 << 20          # large enough for two threads (the serial cut-off is far below)

    def problem():
        return [np.full(N, 1.0, np.float32), np.full(N, 0.5, np.float32),
                np.zeros(N, np.float32), np.zeros(N, np.float32)]

    def expected_after(steps):
        p, g, m, v = problem()
        for t in range(1, steps + 1):
            fastadam.adam_step(p, g, m, v, step=t, num_threads=1)
        return p

    def two_steps(_=None):
        p, g, m, v = problem()
        fastadam.adam_step(p, g, m, v, step=1, num_threads=2)
        fastadam.adam_step(p, g, m, v, step=2, num_threads=2)
        return p.tobytes() == expected_after(2).tobytes()

    def in_forked_child(succeeds):
        # Fork; the child exits 0 if succeeds() is true.  Returns the child's exit code.
        pid = os.fork()
        if pid == 0:
            os._exit(0 if succeeds() else 3)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    if __name__ == "__main__":
        assert two_steps()
""")


@pytest.fixture
def run(tmp_path):
    """Run PARENT then ``body`` as a script file (spawned workers re-import it), under a timeout."""
    def run_script(body: str) -> str:
        script = tmp_path / "script.py"
        script.write_text(PARENT + textwrap.dedent(body))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout
    return run_script


def test_a_forked_child_steps_with_several_threads(run):
    out = run("""
        print("child exit", in_forked_child(two_steps))
    """)
    assert "child exit 0" in out


def test_a_child_of_a_forked_child_steps_too(run):
    out = run("""
        print("child exit", in_forked_child(lambda: two_steps() and in_forked_child(two_steps) == 0))
    """)
    assert "child exit 0" in out


def test_a_thread_created_in_the_child_steps_too(run):
    out = run("""
        import threading

        def in_a_new_thread_then_in_this_one():
            results = []
            t = threading.Thread(target=lambda: results.append(two_steps()))
            t.start(); t.join()
            return results == [True] and two_steps()

        print("child exit", in_forked_child(in_a_new_thread_then_in_this_one))
    """)
    assert "child exit 0" in out


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_multiprocessing_pool_steps_with_every_start_method(method, run):
    out = run(f"""
        if __name__ == "__main__":
            with mp.get_context({method!r}).Pool(2) as pool:
                print("workers", pool.map(two_steps, range(4)))
    """)
    assert "workers [True, True, True, True]" in out
