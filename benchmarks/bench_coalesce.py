"""What coalescing a row-sparse gradient costs, against the indices and the table's rows.

``fastadam.sparse_adam_step`` reads the indices, range-checks them and groups
repeated rows before it updates anything.  The grouping's memory and time
should follow the number of indices n, not the table's rows: a step naming 3
rows of a 10^8-row table costs microseconds and no memory.  With rows of 1
float32 element the Adam update itself is a few loads and stores a row, so
the figures are mostly coalescing.

Each (rows, n) point runs in a fresh process, so its first call meets an
empty coalescer, as a training job's first step does.  The table, its
moments, the indices (uniform with replacement, so some repeat) and the
values are allocated and touched before anything is measured; what the call
adds to the resident set is then the coalescer's scratch (and anything else
the call allocates).  Reported per point:

    first     the first call's time, scratch allocation included
    steady    the median of --repeats later calls (the scratch reused)
    peak MB   the resident set's peak during the first call, above the start
              (/proc/self/clear_refs resets the high-water mark; where that is
              refused, the growth over the call instead)

    python benchmarks/bench_coalesce.py            # n 10^2..10^7, rows 10^3..10^8
    python benchmarks/bench_coalesce.py --quick

To compare builds, run it under each (e.g. PYTHONPATH pointing at another
installed copy of fastadam): the child processes inherit the environment.
Points whose arrays would exceed --max-gb are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_peak_rss() -> bool:
    """Make VmHWM the current RSS (Linux 4.0+); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def array_bytes(rows: int, n: int, width: int) -> int:
    """Table, two moments, int64 indices and float32 values."""
    return 3 * rows * width * 4 + n * (8 + width * 4)


def child(rows: int, n: int, width: int, repeats: int, threads: int) -> dict:
    """One point, measured in this (fresh) process."""
    import fastadam

    rng = np.random.default_rng(rows ^ n)
    table = np.ones((rows, width), np.float32)  # np.ones touches every page: resident before the call
    m = np.full_like(table, 0.1)
    v = np.full_like(table, 0.01)
    indices = rng.integers(0, rows, n)
    values = rng.standard_normal((n, width), dtype=np.float32)
    unique = int(np.unique(indices).size)

    before = rss_bytes()
    have_peak = reset_peak_rss()
    start = time.perf_counter()
    fastadam.sparse_adam_step(table, indices, values, m, v, step=1, num_threads=threads)
    first = time.perf_counter() - start
    after = rss_bytes()
    peak = peak_rss_bytes() if have_peak else None
    extra = max(after, peak or after) - before

    steady = []
    for t in range(repeats):
        start = time.perf_counter()
        fastadam.sparse_adam_step(table, indices, values, m, v, step=t + 2, num_threads=threads)
        steady.append(time.perf_counter() - start)
    return {"rows": rows, "n": n, "unique": unique, "first_s": first, "steady_s": statistics.median(steady),
            "extra_bytes": extra, "peak_measured": have_peak, "module": fastadam.__file__}


def powers(lo: int, hi: int) -> list[int]:
    return [10 ** k for k in range(lo, hi + 1)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small points (seconds)")
    parser.add_argument("--indices", type=lambda s: [int(float(x)) for x in s.split(",")],
                        help="comma-separated numbers of indices (default 1e2..1e7)")
    parser.add_argument("--rows", type=lambda s: [int(float(x)) for x in s.split(",")],
                        help="comma-separated table rows (default 1e3..1e8)")
    parser.add_argument("--width", type=int, default=1, help="elements per row (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="later calls timed per point")
    parser.add_argument("--threads", type=int, default=1, help="num_threads of the step (default 1)")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip points whose arrays exceed this")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, type=int, metavar=("ROWS", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(*args.child, args.width, args.repeats, args.threads)))
        return 0

    if args.quick:
        indices, rows_list, repeats = args.indices or powers(2, 4), args.rows or [10 ** 3, 10 ** 5, 10 ** 7], 3
    else:
        indices, rows_list, repeats = args.indices or powers(2, 7), args.rows or powers(3, 8), args.repeats

    print(f"row width {args.width} float32, {args.threads} thread(s), indices uniform with replacement")
    header = f"{'rows':>12}{'indices':>12}{'unique':>12}{'first ms':>12}{'steady ms':>12}{'peak MB':>10}"
    print(header)
    results = []
    for rows in rows_list:
        for n in indices:
            if array_bytes(rows, n, args.width) > args.max_gb * 1e9:
                print(f"{rows:>12,}{n:>12,}   skipped: arrays over {args.max_gb:g} GB")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(rows), str(n), "--width",
                   str(args.width), "--repeats", str(repeats), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout + done.stderr, file=sys.stderr)
                return 1
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            mark = "" if r["peak_measured"] else "*"
            print(f"{rows:>12,}{n:>12,}{r['unique']:>12,}{r['first_s'] * 1e3:>12.3f}{r['steady_s'] * 1e3:>12.3f}"
                  f"{r['extra_bytes'] / 1e6:>9.2f}{mark}", flush=True)
    if results:
        print(f"module: {results[0]['module']}")
        if not all(r["peak_measured"] for r in results):
            print("* peak not measurable here (clear_refs refused): growth over the call instead")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
