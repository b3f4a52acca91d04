"""Show that a fastadam step allocates nothing per call.

Each workload takes STEPS steps after a warm-up, and reports how much
tracemalloc's traced memory (Python objects and NumPy data) and the process's
resident set grew over them.  A leak of even one small object or malloc per
call would add up to hundreds of kilobytes over 10,000 calls; a step that
allocates nothing leaves both where they were.  The peak of traced memory
above the start is reported too: memory allocated and freed within a call,
which is no leak but is a cost the Python side of a call may have.

    python benchmarks/bench_memory.py

Exits with status 1 if either figure grew beyond its slack in any workload.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from typing import Callable, Optional

import numpy as np

import fastadam

STEPS = 10_000
WARMUP_STEPS = 100
#: Traced Python/NumPy memory may differ by a few objects of the harness's own.
TRACED_SLACK_BYTES = 4 * 1024
#: The resident set moves in pages, and the allocator keeps some room; one
#: leaked malloc per call would still be ~300 KiB over STEPS calls.
RSS_SLACK_BYTES = 128 * 1024


def rss_bytes() -> Optional[int]:
    """The resident set size from /proc (Linux), or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def make_state(sizes: list[int], dtypes: list[type], rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Parameters, positive gradients and moments for tensors of the given sizes and dtypes."""
    params = [rng.standard_normal(n).astype(dt) for n, dt in zip(sizes, dtypes)]
    return {"params": params,
            "grads": [rng.uniform(0.01, 1.0, p.size).astype(p.dtype) for p in params],
            "exp_avgs": [np.zeros_like(p) for p in params],
            "exp_avg_sqs": [np.zeros_like(p) for p in params],
            "max_exp_avg_sqs": [np.zeros_like(p) for p in params]}


def workloads() -> dict[str, Callable[[int], None]]:
    """Steps to run, each taking the step number.

    A mix of float32 and float64 tensors of 176,000 elements in all: above the
    size where a call goes multi-threaded and releases the GIL, so those paths
    run too; and one 4,096-element array, the serial path.
    """
    rng = np.random.default_rng(0)
    sizes = [3, 64, 1000, 4096, 50_000, 100_000, 777, 20_060]
    dtypes = [np.float32] * 6 + [np.float64] * 2
    lists = make_state(sizes, dtypes, rng)
    single = make_state([4096], [np.float32], rng)
    optimizer = fastadam.Adam([p.copy() for p in lists["params"]], amsgrad=True)
    grads = lists["grads"]

    def adam_step_lists(t: int) -> None:
        fastadam.adam_step(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], step=t)

    def adamw_amsgrad_lists(t: int) -> None:
        fastadam.adam_step(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], step=t,
                           weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=True,
                           max_exp_avg_sqs=lists["max_exp_avg_sqs"])

    def adam_step_single(t: int) -> None:
        fastadam.adam_step(single["params"][0], single["grads"][0], single["exp_avgs"][0],
                           single["exp_avg_sqs"][0], step=t)

    return {
        f"adam_step, {len(sizes)} tensors": adam_step_lists,
        f"adam_step AdamW+AMSGrad, {len(sizes)} tensors": adamw_amsgrad_lists,
        "adam_step, one 4096-element array": adam_step_single,
        f"Adam(amsgrad=True).step, {len(sizes)} tensors": lambda t: optimizer.step(grads),
    }


def measure(step: Callable[[int], None]) -> tuple[int, int, Optional[int]]:
    """Net traced growth, traced peak above the start, and RSS growth over STEPS steps (after a warm-up)."""
    for t in range(1, WARMUP_STEPS + 1):  # thread pools, thread-local scratch, first-touch pages
        step(t)
    gc.collect()
    traced_before = tracemalloc.get_traced_memory()[0]
    rss_before = rss_bytes()
    tracemalloc.reset_peak()
    for t in range(WARMUP_STEPS + 1, WARMUP_STEPS + STEPS + 1):
        step(t)
    gc.collect()
    traced_after, peak = tracemalloc.get_traced_memory()
    rss_after = rss_bytes()
    rss_growth = None if rss_before is None or rss_after is None else rss_after - rss_before
    return traced_after - traced_before, peak - traced_before, rss_growth


def main() -> int:
    tracemalloc.start()
    cases = workloads()
    print(f"{STEPS:,} steps each (after {WARMUP_STEPS} to warm up); slack: traced {TRACED_SLACK_BYTES:,} B, "
          f"RSS {RSS_SLACK_BYTES:,} B")
    print(f"{'workload':<44}{'net traced':>12}{'peak in call':>14}{'RSS growth':>12}  verdict")
    failed = False
    for name, step in cases.items():
        net, peak, rss = measure(step)
        ok = net <= TRACED_SLACK_BYTES and (rss is None or rss <= RSS_SLACK_BYTES)
        failed |= not ok
        rss_text = "n/a" if rss is None else f"{rss:+,} B"
        print(f"{name:<44}{net:>+11,} B{peak:>12,} B{rss_text:>12}  {'ok' if ok else 'GREW'}")
    tracemalloc.stop()
    if failed:
        print("a step allocates memory it does not free", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
