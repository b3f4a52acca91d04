"""fastadam's own thread pool (csrc/parallel.cpp): every chunk once, any caller, workers that sleep.

A call's elements are cut into chunks that the calling thread and the pool's
workers claim as they arrive.  Bitwise equality with the reference is the
test that each chunk ran exactly once: a chunk skipped or stepped twice
changes the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastadam
from conftest import assert_problems_equal, fastadam_step, make_problem, reference_step

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
CHUNK_FLOOR = 1 << 13  # kMinChunkElements in csrc/parallel.cpp


@pytest.mark.parametrize("num_threads", [2, 3, 4, 16])
@pytest.mark.parametrize("size", [CHUNK_FLOOR - 1, CHUNK_FLOOR + 1, 2 * CHUNK_FLOOR + 63, 1 << 15, (1 << 17) + 5,
                                  (1 << 20) - 1])
def test_every_chunk_runs_exactly_once(size, num_threads, rng):
    expected = make_problem(size, np.float32, rng)
    actual = expected.copy()

    for step in (1, 2, 3):  # later calls reuse the pool's workers
        fastadam_step(actual, step=step, num_threads=num_threads, **HYPER)
        reference_step(expected, step=step, **HYPER)

    assert_problems_equal(actual, expected)


def test_a_list_of_many_small_arrays_splits_into_chunks_across_arrays(rng):
    sizes = [int(n) for n in rng.integers(0, 5000, size=300)]
    actual = [make_problem(n, np.float64, rng) for n in sizes]
    expected = [pr.copy() for pr in actual]

    fastadam.adam_step([a.param for a in actual], [a.grad for a in actual], [a.exp_avg for a in actual],
                       [a.exp_avg_sq for a in actual], step=1, num_threads=4, **HYPER)
    for e in expected:
        reference_step(e, step=1, **HYPER)

    for a, e in zip(actual, expected):
        assert_problems_equal(a, e)


def test_calls_from_several_python_threads_at_once_each_get_the_right_bits(rng):
    # One call holds the pool; a call that finds it busy runs on its own
    # thread.  Either way, each thread's arrays end as the reference's.
    problems = [make_problem(1 << 17, np.float32, rng) for _ in range(4)]
    expected = [pr.copy() for pr in problems]
    errors: list[BaseException] = []

    def train(pr):
        try:
            for step in range(1, 31):
                fastadam_step(pr, step=step, num_threads=2, **HYPER)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(pr,)) for pr in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    for e in expected:
        for step in range(1, 31):
            reference_step(e, step=step, **HYPER)
    for a, e in zip(problems, expected):
        assert_problems_equal(a, e)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one processor: every call runs on the caller")
def test_a_large_call_wakes_a_worker_that_keeps_off_the_callers_processor_and_then_sleeps():
    # In a fresh interpreter: the pool starts at the first call that goes
    # parallel; its worker may not run where the caller does (it would push the
    # caller aside); and it does not keep a core busy between calls (libgomp's
    # spun for milliseconds, taking the core from the BLAS of the next layer).
    script = textwrap.dedent("""
        import os, time, resource
        import numpy as np
        import fastadam

        def threads():
            return len(os.listdir("/proc/self/task"))

        p, g, m, v = (np.ones(1 << 21, np.float32) for _ in range(4))
        before = set(os.listdir("/proc/self/task"))
        fastadam.adam_step(p, g, m, v, step=1, num_threads=2)
        workers = set(os.listdir("/proc/self/task")) - before
        stats = fastadam._core.pool_stats()
        assert stats["parallel_calls"] == 1 and stats["caller_chunks"] + stats["worker_chunks"] >= 2, stats
        # A worker may run on every processor of the process but the caller's.
        allowed = os.sched_getaffinity(0)
        assert all(len(os.sched_getaffinity(int(w))) == len(allowed) - 1 for w in workers)
        time.sleep(0.05)
        cpu = lambda: resource.getrusage(resource.RUSAGE_SELF)
        start = cpu()
        time.sleep(0.5)
        end = cpu()
        busy = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
        print(len(before), len(before) + len(workers), busy)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before, after, busy = result.stdout.split()
    assert int(after) == int(before) + 1  # one worker for num_threads=2
    # Half a second idle: a spinning worker would use about 0.5 s of CPU.
    assert float(busy) < 0.05
