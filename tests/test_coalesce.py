"""Coalescing a row-sparse gradient: what it computes, and what it costs.

Before a sparse step updates anything, fastadam groups the repeated rows of
the gradient (in the order they first appear) and sums each row's values in
the order its indices appear, as ``fastadam.reference.coalesce_rows`` does.
The grouping looks rows up in scratch sized by the number of indices: a
direct row table only when the table has few rows per index, a hash table
otherwise.  So:

* the results are the reference's bit for bit, whichever lookup is used; and
* a step's time and memory follow its indices, not its table: the first step
  that names 3 rows of a 5*10^7-row table allocates next to nothing.

The memory tests run in a fresh interpreter, whose coalescer has never been
used, and read the resident set from /proc (C++ allocations are invisible to
tracemalloc).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastadam
from conftest import assert_bitwise_equal

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)


def make_table(rows, width, dtype, rng):
    p = np.asarray(rng.standard_normal((rows, width)), dtype)
    m = np.asarray(0.1 * rng.standard_normal((rows, width)), dtype)
    v = np.asarray(np.abs(0.01 * rng.standard_normal((rows, width))), dtype)
    return p, m, v


def assert_step_matches_reference(indices, rows=1000, width=3, dtype=np.float32, rng=None, **kwargs):
    """One sparse step with `indices` on a random table, checked bit for bit against the reference."""
    rng = rng or np.random.default_rng(7)
    p, m, v = make_table(rows, width, dtype, rng)
    values = np.asarray(rng.standard_normal((len(indices), width)), dtype)
    expected = [a.copy() for a in (p, m, v)]
    fastadam.sparse_adam_step(p, indices, values, m, v, step=4, **HYPER, **kwargs)
    fastadam.reference.sparse_adam_step(expected[0], np.asarray(indices), values, expected[1], expected[2], step=4,
                                        **HYPER)
    for name, actual, wanted in zip(("param", "exp_avg", "exp_avg_sq"), (p, m, v), expected):
        assert_bitwise_equal(actual, wanted, name)


# --- Results: the same as the reference, bit for bit ----------------------------------------------------------

# Tables of 1000 rows: 10 indices go to the hash table, 2000 to the direct table
# (at most 4 table rows per index); both must give the same results.
PATTERNS = {
    "unique, sorted": lambda rng, n: np.arange(n) * (1000 // n),
    "unique, unsorted": lambda rng, n: rng.permutation(1000)[:n],
    "repeated, unsorted": lambda rng, n: rng.integers(0, 1000, n),
    "repeated, sorted": lambda rng, n: np.sort(rng.integers(0, 1000, n)),
    "one row many times": lambda rng, n: np.full(n, 617),
    "two rows interleaved": lambda rng, n: np.resize([999, 0], n),
    "first and last rows": lambda rng, n: np.resize([0, 999, 999, 0, 500], n),
}


@pytest.mark.parametrize("n", [10, 2000], ids=["hash-lookup", "direct-lookup"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_coalesced_step_equals_the_reference_for_every_pattern_of_indices(pattern, n, dtype):
    rng = np.random.default_rng(11)
    assert_step_matches_reference(PATTERNS[pattern](rng, n), dtype=dtype, rng=rng)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_many_repeats_of_few_rows_sum_in_index_order_on_any_thread_count(num_threads):
    # 50,000 indices over 7 rows of a 10^6-row table (hash lookup): long sums,
    # where any change of order would change the last bits.
    rng = np.random.default_rng(3)
    indices = rng.choice([5, 999_999, 123_456, 0, 77, 500_000, 31], 50_000)
    assert_step_matches_reference(indices, rows=1_000_000, width=1, rng=rng, num_threads=num_threads)


@pytest.mark.parametrize("index_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                         np.int64, np.uint64])
def test_every_integer_dtype_and_a_stride_group_the_same_rows(index_dtype):
    rng = np.random.default_rng(5)
    strided = np.empty(2 * 40, index_dtype)[::2]  # every other element: a stride of two items
    strided[:] = rng.integers(0, 100, 40)
    assert_step_matches_reference(strided, rows=120)


# Multiples of a large power of two, and a dense run of consecutive rows: the
# patterns a poor hash would pile into a few buckets.  After each add the hash
# table is emptied by a sweep when it is small next to the rows found, else
# row by row (the second case: 300 rows, each 60 times).
STRIDED = (np.arange(300) * 2048) % 1_000_000
CONSECUTIVE = np.arange(400_000, 400_000 + 3000)


@pytest.mark.parametrize("indices", [np.concatenate([STRIDED, CONSECUTIVE, STRIDED[::-1], CONSECUTIVE[::7]]),
                                     np.tile(STRIDED, 60)], ids=["many-rows", "few-rows-many-times"])
def test_rows_that_collide_in_the_hash_table_are_told_apart(indices):
    assert_step_matches_reference(indices, rows=1_000_000, width=1)


def test_a_step_over_several_tables_coalesces_each_on_its_own():
    # One optimizer step adds every table's gradient to one coalescer: a small
    # table (direct lookup), a large one (hash lookup) and a dense parameter.
    rng = np.random.default_rng(9)
    sizes = [(300, 4), (200_000, 2), (50, 1)]
    tables = [make_table(r, w, np.float32, rng)[0] for r, w in sizes]
    expected = [(t.copy(), np.zeros_like(t), np.zeros_like(t)) for t in tables]
    opt = fastadam.SparseAdam(tables, **HYPER)
    for step in range(1, 4):
        grads = []
        for (r, w), e in zip(sizes, expected):
            indices = rng.integers(0, r, 2000)
            values = np.asarray(rng.standard_normal((2000, w)), np.float32)
            grads.append(fastadam.RowSparseGrad(indices, values))
            fastadam.reference.sparse_adam_step(e[0], indices, values, e[1], e[2], step=step, **HYPER)
        opt.step(grads)
    for table, (p, _, _) in zip(tables, expected):
        assert_bitwise_equal(table, p)


def test_results_stay_exact_when_the_scratch_shrinks_after_a_large_step():
    # One large step, then more small ones than two of the coalescer's
    # trimming windows (32 steps), so its scratch is given back mid-way.
    rng = np.random.default_rng(13)
    assert_step_matches_reference(rng.integers(0, 2_000_000, 300_000), rows=2_000_000, width=1, rng=rng)
    for _ in range(70):
        assert_step_matches_reference(rng.integers(0, 5000, 50), rows=5000, width=2, rng=rng)


# --- Cost: sized by the indices, not by the table --------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, os, time
    import numpy as np
    import fastadam

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def first_step(rows, indices):
        # np.zeros leaves the pages unmapped; the rows the step will write are
        # touched first, so that what is measured is the call's own memory.
        p, m, v = (np.zeros((rows, 1), np.float32) for _ in range(3))
        for a in (p, m, v):
            a[indices] = 0
        values = np.ones((len(indices), 1), np.float32)
        before = rss()
        have_peak = reset_peak()
        start = time.perf_counter()
        fastadam.sparse_adam_step(p, indices, values, m, v, step=1, num_threads=1)
        seconds = time.perf_counter() - start
        after = rss()
        return {"seconds": seconds, "extra_bytes": max(after, peak_rss() if have_peak else after) - before}
""")


def run_fresh(body: str) -> dict:
    """Run MEASURE + body in a new interpreter; body prints one JSON object."""
    done = subprocess.run([sys.executable, "-c", MEASURE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_first_step_on_a_huge_table_with_three_indices_costs_almost_nothing():
    # 5*10^7 rows: a lookup table with a slot per row would be 200 MB and take
    # a tenth of a second to fill; the gradient names 3 rows.
    result = run_fresh("""
        print(json.dumps(first_step(50_000_000, np.array([49_999_999, 3, 49_999_999]))))
    """)
    assert result["extra_bytes"] < 1 << 20, result
    # The target is under 1 ms; the bound leaves room for a loaded machine.
    assert result["seconds"] < 0.02, result


@pytest.mark.slow
def test_memory_follows_the_indices_whatever_the_table():
    # 10^5 indices into tables of 10^3 to 5*10^7 rows: the scratch is bounded
    # by a few dozen bytes an index (indices, slots, occurrence lists, lookup),
    # the same on every table.
    result = run_fresh("""
        rng = np.random.default_rng(0)
        out = {}
        for rows in (1_000, 1_000_000, 50_000_000):
            out[rows] = first_step(rows, rng.integers(0, rows, 100_000))
        print(json.dumps(out))
    """)
    for rows, r in result.items():
        assert r["extra_bytes"] < 100 * 100_000, (rows, r)


@pytest.mark.slow
def test_scratch_of_a_large_step_is_given_back_after_smaller_steps():
    # 4*10^6 indices need ~250 MB of scratch; 70 steps of 100 indices later
    # (two of the coalescer's 32-step windows), it keeps a small fraction.
    result = run_fresh("""
        rng = np.random.default_rng(0)
        rows = 20_000_000
        p, m, v = (np.ones((rows, 1), np.float32) for _ in range(3))  # resident before the steps
        big = rng.integers(0, rows, 4_000_000)
        small = rng.integers(0, rows, 100)
        base = rss()
        fastadam.sparse_adam_step(p, big, np.ones((len(big), 1), np.float32), m, v, step=1, num_threads=1)
        after_big = rss()
        for t in range(70):
            fastadam.sparse_adam_step(p, small, np.ones((100, 1), np.float32), m, v, step=t + 2, num_threads=1)
        # Freed blocks below glibc's (adaptive, up to 32 MB) mmap threshold stay
        # in its heap; ask it to return them, so that what is left is what the
        # coalescer still holds.
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        print(json.dumps({"big": after_big - base, "after_small": rss() - base}))
    """)
    assert result["big"] > 50e6, result  # the large step's scratch is retained for reuse ...
    assert result["after_small"] < 10e6, result  # ... but not forever
