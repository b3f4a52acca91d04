"""Speed and memory of bfloat16 and 8-bit Adam moments against float32 ones (issue 10) (``python benchmarks/bench_state_dtype.py``).

Speed.  For a float32 param the step reads param and gradient, reads and
writes both moments and writes the param: 28 bytes an element with float32
moments, 20 with bfloat16 ones (24 with one of each).  The step is
memory-bound beyond the caches, so fewer bytes should mean a faster step
(ideal 28/20 = 1.4x).  Each storage pair (exp_avg / exp_avg_sq: f32/f32,
bf16/bf16, bf16/f32, f32/bf16) is timed as ``fastadam.adam_step`` and as its
own limits, ``_core.probe_step`` with the same byte pattern (a trivial
multiply-add per stream: the memory limit) and the exact probe (the same
bytes plus the one correctly rounded division and square root an element the
bitwise contract requires: the in-cache limit).  fastadam's 8-bit state (both
moments, the dynamic maps) is timed beside them, and bitsandbytes' and
torchao's ``AdamW8bit`` (weight_decay=0, so the same update) join when
importable.

Everything of one size and thread count is timed in turns on the same
param and gradient buffers (``fastadam._bench.interleaved_samples``), each
contender first checked: adam_step (8-bit too) bitwise against ``fastadam.reference``,
the probes against their formulas, the 8-bit optimizers for being an Adam step
at all (loosely: they quantize).  Ratios are taken per round, then the median.

Targets from issue 10: at 2^24 and 2^26 params, bf16/bf16 >= 1.3x the
speed of f32/f32 and 8-bit state >= 1.55x, each >= 90% of its own probe; in
cache (2^16) 8-bit state >= 0.7x the f32/f32 step's speed.  The 8-bit probes
read and write the codes and the per-block floats as the step does (14.06
bytes an element), with a multiply-add per stream (the exact one adds the
division and square root).

Memory.  In a fresh interpreter per storage, ``fastadam.Adam([param],
state_dtype=...)`` over one 2^24-element float32 param: the state's nbytes,
and the growth of the resident set after construction (np.zeros: pages are
mapped lazily) and after the first step (every state page written).

Other processes share the cores (on this project's 2-core machine, other
agents): each table says how many cores they kept busy while it was timed
(from /proc/stat) and /proc/loadavg before and after; ``~`` marks a figure
whose repeats spread over 1.2x (max/min), ``!`` a table timed beside more than
0.25 busy cores.  Take such figures as rough.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import fastadam
from fastadam import _core
from fastadam._bench import BUSY_NEIGHBOUR_CORES, NOISY_SPREAD, OtherLoad, calls_per_sample, interleaved_samples

Step = Callable[[], None]

F32 = np.dtype(np.float32)
#: The storage pairs (exp_avg, exp_avg_sq), by label.  Filled with bfloat16 in main() (ml_dtypes).
PAIRS: dict[str, tuple[np.dtype, np.dtype]] = {}
FLOAT32, BFLOAT16 = "f32/f32", "bf16/bf16"
#: fastadam with 8-bit moments: param and gradient, one byte per moment each way, and per block of 256 a
#: float32 absmax per moment each way (14.06 bytes an element).
INT8, INT8_LABEL, INT8_BYTES = "fastadam int8/int8", "int8/int8", 4 + 4 + 4 + 2 + 2 + 2 * 2 * 4 / 256
#: fastadam with 4-bit moments (Li et al.'s maps, blocks of 128): half a byte per moment each way (14.13 bytes
#: an element).  It has no probe of its own.
INT4, INT4_BYTES = "fastadam int4/int4", 4 + 4 + 4 + 1 + 1 + 2 * 2 * 4 / 128
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
#: Elements checked before timing (a slice of the timed buffers, copied): above the
#: multi-threading threshold, with a tail no register width divides.
CHECK_ELEMENTS = (1 << 18) + 3
LIBRARIES = ("bitsandbytes", "torchao")
TARGET_SIZES = (24, 26)
MEMORY_PARAMS = 1 << 24


def bytes_per_element(pair: tuple[np.dtype, np.dtype]) -> int:
    """Param read and written, gradient read, each moment read and written."""
    return 4 + 4 + 4 + 2 * pair[0].itemsize + 2 * pair[1].itemsize


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def noisy(values: Sequence[float]) -> bool:
    return max(values) > NOISY_SPREAD * min(values)


def loadavg() -> Optional[str]:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- buffers and checks ---------------------------------------------------------------------------------------


class Buffers:
    """One param and gradient, and a float32 and a bfloat16 array for each moment (20 bytes an element)."""

    def __init__(self, elements: int, seed: int = 0, bf16_offset: int = 0) -> None:
        """``bf16_offset``: place the bfloat16 exp_avg_sq that many bytes past where NumPy would (a slice of
        a larger array), so that the two bfloat16 moments differ modulo 4 KiB, as fastadam.Adam allocates
        them (see README.md, "Optimizer state in bfloat16")."""
        rng = np.random.default_rng(seed)
        bf16 = PAIRS[BFLOAT16][0]
        self.param = rng.standard_normal(elements, dtype=np.float32)
        self.grad = rng.standard_normal(elements, dtype=np.float32)
        exp_avg = (0.1 * rng.standard_normal(elements, dtype=np.float32)).astype(np.float32)
        exp_avg_sq = rng.uniform(0.0, 1e-2, elements).astype(np.float32)
        self.moments = {F32: (exp_avg, exp_avg_sq),
                        bf16: (exp_avg.astype(bf16), _placed(exp_avg_sq.astype(bf16), bf16_offset))}
        # fastadam's 8-bit state of the same moments (the dynamic maps, blocks of 256), and its 4-bit state.
        self.quantized = tuple(_quantized(x, signed) for x, signed in ((exp_avg, True), (exp_avg_sq, False)))
        self.quantized4 = tuple(_quantized4(x, signed) for x, signed in ((exp_avg, True), (exp_avg_sq, False)))

    def pair(self, pair: tuple[np.dtype, np.dtype]) -> tuple[np.ndarray, np.ndarray]:
        return self.moments[pair[0]][0], self.moments[pair[1]][1]

    def head(self, n: int, pair: tuple[np.dtype, np.dtype]) -> list[np.ndarray]:
        """Copies of the first n elements of param, gradient and the pair's moments."""
        return [a[:n].copy() for a in (self.param, self.grad, *self.pair(pair))]


def _quantized(x: np.ndarray, signed: bool) -> fastadam.QuantizedState:
    state = fastadam.QuantizedState(np.empty(x.shape, np.uint8), np.empty(-(-x.size // 256), np.float32),
                                    fastadam.dynamic_map(signed))
    fastadam.quantize_blockwise(x, state)
    return state


def _placed(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` that starts ``offset`` bytes into a fresh allocation (``a`` itself when 0)."""
    if offset == 0:
        return a
    raw = np.empty(a.nbytes + offset, np.uint8)
    placed = raw[offset:].view(a.dtype)
    placed[...] = a
    return placed


def _quantized4(x: np.ndarray, signed: bool) -> fastadam.QuantizedState:
    qmap = fastadam.reference.moment_map(signed, 4)
    state = fastadam.QuantizedState(np.empty(-(-x.size // 2), np.uint8), np.empty(-(-x.size // 128), np.float32),
                                    qmap)
    fastadam.quantize_blockwise(x, state)
    return state


def check_quantized_step(buffers: Buffers, threads: int, head: Callable[[int], tuple], what: str) -> None:
    """adam_step with quantized moments bitwise equal to fastadam.reference, on a slice: ``head(n)`` gives
    fresh states of the first n elements."""
    n = min(CHECK_ELEMENTS, buffers.param.size)
    runs = []
    for step in (fastadam.adam_step, fastadam.reference.adam_step):
        p, g = buffers.param[:n].copy(), buffers.grad[:n].copy()
        m, v = head(n)
        kwargs = {"num_threads": threads} if step is fastadam.adam_step else {}
        step(p, g, m, v, step=1, lr=LR, betas=BETAS, eps=EPS, **kwargs)
        runs.append([p, m.codes, m.absmax, v.codes, v.absmax])
    if not _same_bits(*runs):
        raise AssertionError(f"adam_step with {what} moments differs from fastadam.reference")


def check_int4(buffers: Buffers, threads: int) -> None:
    """adam_step with 4-bit moments bitwise equal to fastadam.reference, on a slice."""
    def head(n: int) -> tuple:
        size = buffers.param.size
        values = (fastadam.dequantize_blockwise(q, np.empty(size, np.float32)) for q in buffers.quantized4)
        return tuple(_quantized4(x[:n], signed) for x, signed in zip(values, (True, False)))
    check_quantized_step(buffers, threads, head, "4-bit")


def probe_int8_formula(a: np.ndarray, b: np.ndarray, m: fastadam.QuantizedState, v: fastadam.QuantizedState,
                       exact: bool) -> list[np.ndarray]:
    """What ``_core.probe_step`` leaves in a and the two 8-bit states (see its docstring)."""
    half = np.float32(0.5)
    c, d = m.codes.astype(np.float32), v.codes.astype(np.float32)
    c_new = c * half + b
    d_new = d * half + b * b
    a_new = a - c_new / (np.sqrt(d_new) + np.float32(1e-8)) if exact else a * half + b
    second_byte = [((x.view(np.uint32) >> 8) & 0xFF).astype(np.uint8) for x in (c_new, d_new)]
    return [a_new, second_byte[0], m.absmax * half + half, second_byte[1], v.absmax * half + half]


def check_int8(buffers: Buffers, threads: int) -> None:
    """adam_step with 8-bit moments bitwise equal to fastadam.reference, and the 8-bit probes equal to their
    formulas, on a slice."""
    def head(n: int) -> tuple:
        return tuple(_quantized(fastadam.dequantize_blockwise(q)[:n], signed)
                     for q, signed in zip(buffers.quantized, (True, False)))
    check_quantized_step(buffers, threads, head, "8-bit")
    n = min(CHECK_ELEMENTS, buffers.param.size)
    for exact in (False, True):
        a, b = buffers.param[:n].copy(), buffers.grad[:n].copy()
        m, v = head(n)
        expected = probe_int8_formula(a, b, m, v, exact)
        _core.probe_step(a, b, m, v, threads, exact=exact)
        if not _same_bits([a, m.codes, m.absmax, v.codes, v.absmax], expected):
            raise AssertionError(f"the {'exact ' if exact else ''}probe with 8-bit moments is not its formula")


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def _same_bits(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> bool:
    return all(np.array_equal(_bits(a), _bits(e)) for a, e in zip(actual, expected))


def check_pair(buffers: Buffers, label: str, threads: int) -> None:
    """adam_step bitwise equal to fastadam.reference, and both probes equal to their formulas, on a slice."""
    pair = PAIRS[label]
    n = min(CHECK_ELEMENTS, buffers.param.size)
    actual, expected = buffers.head(n, pair), buffers.head(n, pair)
    fastadam.adam_step(*actual, step=1, lr=LR, betas=BETAS, eps=EPS, num_threads=threads)
    fastadam.reference.adam_step(*expected, step=1, lr=LR, betas=BETAS, eps=EPS)
    if not _same_bits(actual, expected):
        raise AssertionError(f"adam_step with {label} moments differs from fastadam.reference")
    for exact in (False, True):
        a, b, c, d = buffers.head(n, pair)
        half = np.float32(0.5)
        c32, d32 = c.astype(np.float32), d.astype(np.float32)
        if exact:
            c_new, d_new = c32 * half + b, d32 * half + b * b
            with np.errstate(invalid="ignore"):  # the plain probe's calls may have left d negative: NaN both ways
                a_new = a - c_new / (np.sqrt(d_new) + np.float32(1e-8))
        else:
            a_new, c_new, d_new = a * half + b, c32 * half + b, d32 * half + b * b
        _core.probe_step(a, b, c, d, threads, exact=exact)
        if not _same_bits([a, c, d], [a_new, c_new.astype(pair[0]), d_new.astype(pair[1])]):
            raise AssertionError(f"the {'exact ' if exact else ''}probe with {label} moments is not its formula")


# -- the 8-bit optimizers of other libraries -------------------------------------------------------------------


def _torch_adamw8bit(library: str) -> Optional[Callable[..., Any]]:
    """The library's AdamW8bit class, or None when it does not import."""
    try:
        if library == "bitsandbytes":
            import bitsandbytes
            return bitsandbytes.optim.AdamW8bit
        from torchao.optim import AdamW8bit
        return AdamW8bit
    except Exception:  # noqa: BLE001 - these fail to import in many ways (no GPU build, torch mismatch)
        return None


def library_version(library: str) -> Optional[str]:
    try:
        return __import__(library).__version__
    except Exception:  # noqa: BLE001
        return None


def bind_library(library: str, buffers: Buffers, threads: int) -> tuple[Step, float]:
    """One step of the library's AdamW8bit over the same param and gradient buffers (zero-copy torch
    views), first checked loosely; returns the step and the seconds its first calls at this size took
    (the check's and the timed buffers': torchao compiles then)."""
    import torch
    torch.set_num_threads(threads)
    cls = _torch_adamw8bit(library)
    assert cls is not None

    # The check: one step from zero state on fresh params of the slice's size (the timed params have
    # drifted far from 1, where a step of lr would round away), against fastadam's float32 step.
    # 8-bit state quantizes, so only this: most elements move as Adam moves them.  Its time is the
    # library's first call at this size (torchao compiles then).
    n = min(CHECK_ELEMENTS, buffers.param.size)
    start, g = np.random.default_rng(1).standard_normal(n, dtype=np.float32), buffers.grad[:n].copy()
    p, expected = start.copy(), start.copy()
    fastadam.reference.adam_step(expected, g, np.zeros_like(p), np.zeros_like(p), step=1, lr=LR, betas=BETAS,
                                 eps=EPS)
    weight = torch.nn.Parameter(torch.from_numpy(p))
    weight.grad = torch.from_numpy(g)
    started = time.perf_counter()
    cls([weight], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    first_call = time.perf_counter() - started
    change, expected_change = p - start, expected - start
    close = np.abs(change - expected_change) <= 0.1 * np.abs(expected_change)
    if close.mean() < 0.9:
        raise AssertionError(f"{library} AdamW8bit: only {100 * close.mean():.1f}% of the elements moved within "
                             f"10% of float32 Adam's step")

    weight = torch.nn.Parameter(torch.from_numpy(buffers.param))  # shares the buffer
    weight.grad = torch.from_numpy(buffers.grad)
    optimizer = cls([weight], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    started = time.perf_counter()
    optimizer.step()
    return optimizer.step, first_call + time.perf_counter() - started


# -- one size and thread count -------------------------------------------------------------------------------


def run_cell(buffers: Buffers, threads: int, repeats: int, sample_seconds: float,
             libraries: Sequence[str]) -> dict[str, Any]:
    steps: dict[str, Step] = {}
    traffic: dict[str, int] = {}
    for label, pair in PAIRS.items():
        check_pair(buffers, label, threads)
        m, v = buffers.pair(pair)
        p, g = buffers.param, buffers.grad
        steps[f"adam_step {label}"] = (lambda m=m, v=v: fastadam.adam_step(
            p, g, m, v, step=1, lr=LR, betas=BETAS, eps=EPS, num_threads=threads))
        steps[f"probe {label}"] = lambda m=m, v=v: _core.probe_step(p, g, m, v, threads)
        steps[f"exact probe {label}"] = lambda m=m, v=v: _core.probe_step(p, g, m, v, threads, exact=True)
        for kind in ("adam_step", "probe", "exact probe"):
            traffic[f"{kind} {label}"] = bytes_per_element(pair)
    check_int8(buffers, threads)
    m8, v8 = buffers.quantized
    p, g = buffers.param, buffers.grad
    steps[INT8] = lambda: fastadam.adam_step(p, g, m8, v8, step=1, lr=LR, betas=BETAS, eps=EPS, num_threads=threads)
    steps[f"probe {INT8_LABEL}"] = lambda: _core.probe_step(p, g, m8, v8, threads)
    steps[f"exact probe {INT8_LABEL}"] = lambda: _core.probe_step(p, g, m8, v8, threads, exact=True)
    for name in (INT8, f"probe {INT8_LABEL}", f"exact probe {INT8_LABEL}"):
        traffic[name] = INT8_BYTES
    check_int4(buffers, threads)
    m4, v4 = buffers.quantized4
    steps[INT4] = lambda: fastadam.adam_step(p, g, m4, v4, step=1, lr=LR, betas=BETAS, eps=EPS, num_threads=threads)
    traffic[INT4] = INT4_BYTES
    first_call: dict[str, float] = {}
    for library in libraries:
        step, first_call[library] = bind_library(library, buffers, threads)
        steps[f"{library} AdamW8bit"] = step

    numbers = {name: calls_per_sample(step, sample_seconds) for name, step in steps.items()}
    before = loadavg()
    with OtherLoad() as load:
        samples = interleaved_samples(steps, numbers, repeats)
    after = loadavg()

    elements = buffers.param.size
    f32 = samples[f"adam_step {FLOAT32}"]
    contenders: dict[str, Any] = {}
    for name, seconds in samples.items():
        c: dict[str, Any] = {"seconds": seconds, "ms": spread([1e3 * s for s in seconds]), "noisy": noisy(seconds),
                             "calls_per_sample": numbers[name],
                             "float32_step_time_over_this": spread([t / s for t, s in zip(f32, seconds)])}
        if name in traffic:
            c["bytes_per_element"] = traffic[name]
            c["gb_per_s"] = traffic[name] * elements / statistics.median(seconds) / 1e9
        if name.startswith("adam_step ") or name == INT8:
            label = INT8_LABEL if name == INT8 else name[len("adam_step "):]
            for probe in ("probe", "exact probe"):
                limit = samples[f"{probe} {label}"]
                c[f"percent_of_{probe.replace(' ', '_')}"] = spread([100 * t / s for t, s in zip(limit, seconds)])
        else:
            for library in libraries:
                if name.startswith(library):
                    c["first_call_seconds"] = first_call[library]
        contenders[name] = c
    return {"elements": elements, "size_exponent": elements.bit_length() - 1, "threads": threads,
            "other_load_cores": load.cores, "loadavg_before": before, "loadavg_after": after,
            "contenders": contenders}


def format_cell(r: dict[str, Any]) -> str:
    busy = (r["other_load_cores"] or 0.0) > BUSY_NEIGHBOUR_CORES
    load = "unknown" if r["other_load_cores"] is None else f"{r['other_load_cores']:.2f}"
    lines = [f"\n2^{r['size_exponent']} float32 params, {r['threads']} thread(s){' !' if busy else ''}: "
             f"other processes kept {load} cores busy; loadavg {r['loadavg_before']} -> {r['loadavg_after']}",
             f"  {'adam_step, moments m/v':<26}{'B/el':>5}{'ms (median)':>13}{'min-max':>18}{'GB/s':>7}"
             f"{'%probe':>9}{'%exact':>9}{'speed vs f32':>14}"]
    cs = r["contenders"]

    def mark(figure: dict[str, float], text: str) -> str:
        return text + ("~" if figure["max"] > NOISY_SPREAD * figure["min"] else " ")

    for label in PAIRS:
        c = cs[f"adam_step {label}"]
        lines.append(f"  {label:<26}{c['bytes_per_element']:>5}" + mark(c["ms"], f"{c['ms']['median']:>12.4g}")
                     + f" {c['ms']['min']:>8.4g}-{c['ms']['max']:<8.4g}{c['gb_per_s']:>7.1f}"
                     + mark(c["percent_of_probe"], f"{c['percent_of_probe']['median']:>7.1f}%")
                     + mark(c["percent_of_exact_probe"], f"{c['percent_of_exact_probe']['median']:>7.1f}%")
                     + mark(c["float32_step_time_over_this"],
                            f"{c['float32_step_time_over_this']['median']:>12.2f}x"))
    c = cs[INT8]
    lines.append(f"  {'int8/int8 (8-bit state)':<26}{c['bytes_per_element']:>5.0f}"
                 + mark(c["ms"], f"{c['ms']['median']:>12.4g}")
                 + f" {c['ms']['min']:>8.4g}-{c['ms']['max']:<8.4g}{c['gb_per_s']:>7.1f}"
                 + mark(c["percent_of_probe"], f"{c['percent_of_probe']['median']:>7.1f}%")
                 + mark(c["percent_of_exact_probe"], f"{c['percent_of_exact_probe']['median']:>7.1f}%")
                 + mark(c["float32_step_time_over_this"], f"{c['float32_step_time_over_this']['median']:>12.2f}x"))
    c = cs[INT4]
    lines.append(f"  {'int4/int4 (4-bit state)':<26}{c['bytes_per_element']:>5.0f}"
                 + mark(c["ms"], f"{c['ms']['median']:>12.4g}")
                 + f" {c['ms']['min']:>8.4g}-{c['ms']['max']:<8.4g}{c['gb_per_s']:>7.1f}{'-':>9} {'-':>8} "
                 + mark(c["float32_step_time_over_this"], f"{c['float32_step_time_over_this']['median']:>12.2f}x"))
    for label in (*PAIRS, INT8_LABEL):
        for probe in ("probe", "exact probe"):
            c = cs[f"{probe} {label}"]
            lines.append(f"  {'(' + probe + ' ' + label + ')':<26}{c['bytes_per_element']:>5.0f}"
                         + mark(c["ms"], f"{c['ms']['median']:>12.4g}")
                         + f" {c['ms']['min']:>8.4g}-{c['ms']['max']:<8.4g}{c['gb_per_s']:>7.1f}")
    for name, c in cs.items():
        if "AdamW8bit" in name:
            slower = 1 / c["float32_step_time_over_this"]["median"]
            lines.append(f"  {name:<31}" + mark(c["ms"], f"{c['ms']['median']:>12.4g}")
                         + f" {c['ms']['min']:>8.4g}-{c['ms']['max']:<8.4g}   {slower:.1f}x the f32 step's time, "
                         f"{c['ms']['median'] / cs['adam_step ' + BFLOAT16]['ms']['median']:.1f}x the bf16 step's "
                         f"(first calls {c['first_call_seconds']:.1f} s)")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 10's targets for bfloat16 and 8-bit moments, on the sizes they name."""
    out = []
    for r in results:
        where = f"2^{r['size_exponent']}, {r['threads']} thread(s)"
        for label, name, speedup in ((BFLOAT16, f"adam_step {BFLOAT16}", 1.3), (INT8_LABEL, INT8, 1.55)):
            c = r["contenders"][name]
            ratio, percent = c["float32_step_time_over_this"]["median"], c["percent_of_probe"]["median"]
            if r["size_exponent"] in TARGET_SIZES:
                out.append({"where": where, "what": f"{label} speed >= {speedup}x f32/f32", "value": ratio,
                            "met": ratio >= speedup})
                out.append({"where": where, "what": f"{label} >= 90% of its probe", "value": percent,
                            "met": percent >= 90.0})
            elif label == INT8_LABEL and r["size_exponent"] == 16:
                out.append({"where": where, "what": f"{label} speed >= 0.7x f32/f32 (in cache)", "value": ratio,
                            "met": ratio >= 0.7})
    return out


# -- memory ---------------------------------------------------------------------------------------------------


MEMORY_CHILD = r"""
import json, os, sys
import numpy as np
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kind, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
param = rng.standard_normal(n, dtype=np.float32)
grad = rng.standard_normal(n, dtype=np.float32)
# Each optimizer first builds and steps a small param of its own (8192 elements, above every
# library's minimum for compressed state), so that what it loads on first use (ml_dtypes,
# a library's kernels, torchao's compiled step) is not counted as state.
if kind.startswith("fastadam"):
    import fastadam
    state_dtype = kind.split(" ", 1)[1]
    small = np.ones(8192, np.float32)
    fastadam.Adam([small], state_dtype=state_dtype).step([small.copy()])
    start = rss()
    optimizer = fastadam.Adam([param], state_dtype=state_dtype)
    built = rss()
    optimizer.step([grad])
    nbytes = sum(a.nbytes for s in optimizer.state for a in s.values())
else:
    import torch
    torch.set_num_threads(1)
    if kind == "bitsandbytes":
        from bitsandbytes.optim import AdamW8bit
    else:
        from torchao.optim import AdamW8bit
    small = torch.nn.Parameter(torch.ones(8192))
    small.grad = torch.ones(8192)
    AdamW8bit([small], weight_decay=0.0).step()
    weight = torch.nn.Parameter(torch.from_numpy(param))
    weight.grad = torch.from_numpy(grad)
    start = rss()
    optimizer = AdamW8bit([weight], weight_decay=0.0)
    built = rss()
    optimizer.step()
    def tensor_bytes(x):
        if hasattr(x, "__tensor_flatten__"):  # torchao's OptimState8bit: codes, scale, map
            names, _ = x.__tensor_flatten__()
            return sum(tensor_bytes(getattr(x, name)) for name in names)
        return x.numel() * x.element_size() if torch.is_tensor(x) else 0
    nbytes = sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values())
stepped = rss()
print(json.dumps({"state_nbytes": nbytes, "rss_growth_built": built - start, "rss_growth_stepped": stepped - start}))
"""


def measure_memory(kind: str, params: int) -> dict[str, Any]:
    """State bytes and resident-set growth of one optimizer over one float32 param, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(params)], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {**figures, **{f"{k}_per_param": v / params for k, v in figures.items()}}


def format_memory(memory: dict[str, dict[str, Any]], params: int) -> str:
    lines = [f"\nState memory, one float32 param of {params} elements, each optimizer in a fresh interpreter "
             f"(bytes per param)",
             f"  {'optimizer':<34}{'nbytes':>8}{'RSS built':>11}{'RSS after step 1':>18}"]
    for kind, m in memory.items():
        if "error" in m:
            lines.append(f"  {kind:<34}  failed: {m['error']}")
            continue
        lines.append(f"  {kind:<34}{m['state_nbytes_per_param']:>8.3f}{m['rss_growth_built_per_param']:>11.3f}"
                     f"{m['rss_growth_stepped_per_param']:>18.3f}")
    lines.append("  (np.zeros maps its pages lazily: the resident set grows when the first step writes the state; "
                 "the 8-bit optimizers' RSS after a step also holds what their allocator kept of float32 "
                 "temporaries)")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------


def parse_list(text: str) -> list[str]:
    return [] if text in ("", "none") else [x.strip() for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="exponents of the param sizes (default 16,24,26; --quick: 10,12)")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="thread counts (default 1,2; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per contender (default 7; --quick: 3)")
    parser.add_argument("--sample-seconds", type=float, default=None,
                        help="length of one sample (default 0.05; --quick: 0.002)")
    parser.add_argument("--libraries", type=parse_list, default=None,
                        help="8-bit optimizers to join when importable: 'bitsandbytes,torchao' (default) or 'none'; "
                             "--quick: bitsandbytes (torchao compiles for tens of seconds)")
    parser.add_argument("--memory-params", type=int, default=None,
                        help=f"param size of the memory measurement (default {MEMORY_PARAMS}; --quick: 2^16); "
                             "0 skips it")
    parser.add_argument("--bf16-offset", type=int, default=0,
                        help="place the bfloat16 exp_avg_sq this many bytes past where NumPy would, as "
                             "fastadam.Adam does with 256 (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few seconds' run that checks the benchmark works")
    parser.add_argument("--all-levels", action="store_true",
                        help="run the timings once per ISA level this CPU has (FASTADAM_ISA, a fresh process each)")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "bench_state_dtype.json")
    return parser


def fill_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    args.sizes = args.sizes or ([10, 12] if quick else [16, 24, 26])
    args.threads = args.threads or ([1] if quick else [1, 2])
    args.repeats = args.repeats or (3 if quick else 7)
    args.sample_seconds = args.sample_seconds or (0.002 if quick else 0.05)
    if args.libraries is None:
        args.libraries = ["bitsandbytes"] if quick else list(LIBRARIES)
    if args.memory_params is None:
        args.memory_params = 1 << 16 if quick else MEMORY_PARAMS


def run_timings(args: argparse.Namespace) -> dict[str, Any]:
    """This process's ISA level: every size and thread count, printed as it goes."""
    cfg = fastadam.config()
    print(f"fastadam {cfg['version']}, ISA level {cfg['isa']} (of {', '.join(cfg['available_isas'])}; "
          f"FASTADAM_ISA forces one), {cfg['max_threads']} cores; loadavg {loadavg()}", flush=True)
    libraries = [lib for lib in args.libraries if lib in LIBRARIES and _torch_adamw8bit(lib) is not None]
    missing = [lib for lib in args.libraries if lib not in libraries]
    if missing:
        print(f"not importable, so not in the run: {', '.join(f'{lib} AdamW8bit' for lib in missing)}")
    results, skipped = [], []
    for exponent in args.sizes:
        elements = 1 << exponent
        # Our buffers, plus what the 8-bit optimizers hold (2 bytes) and their float32 temporaries.
        needed = elements * (20 + (2 + 12 if libraries else 0))
        available = available_bytes()
        if available is not None and needed > 0.8 * available:
            message = (f"2^{exponent}: skipped, needs ~{needed / 2**30:.2f} GiB and "
                       f"{available / 2**30:.2f} GiB is available")
            print(message)
            skipped.append(message)
            continue
        buffers = Buffers(elements, bf16_offset=args.bf16_offset)
        for threads in args.threads:
            r = run_cell(buffers, threads, args.repeats, args.sample_seconds, libraries)
            results.append(r)
            print(format_cell(r), flush=True)
        del buffers
    goals = targets(results)
    if goals:
        print("\nTargets (issue 10), bfloat16 and 8-bit moments:")
        for t in goals:
            unit = "x" if "speed" in t["what"] else "%"
            print(f"  {t['where']:<24}{t['what']:<44}{t['value']:>8.2f}{unit}  {'MET' if t['met'] else 'NOT MET'}")
    in_cache = [r for r in results if r["size_exponent"] <= 16]
    for r in in_cache:
        ratio = r["contenders"][f"adam_step {BFLOAT16}"]["float32_step_time_over_this"]["median"]
        print(f"  in cache, 2^{r['size_exponent']}, {r['threads']} thread(s): bf16/bf16 at {ratio:.2f}x the "
              f"f32/f32 step's speed (no target for bf16)")
    noisy_cells = sum(any(c["noisy"] for c in r["contenders"].values()) for r in results)
    busy_cells = sum((r["other_load_cores"] or 0.0) > BUSY_NEIGHBOUR_CORES for r in results)
    print(f"\n{noisy_cells} of {len(results)} tables have figures whose repeats spread over {NOISY_SPREAD:g}x (~), "
          f"{busy_cells} were timed beside over {BUSY_NEIGHBOUR_CORES:g} busy cores (!): other processes share "
          f"this machine's cores, so take marked figures as rough.")
    return {"config": cfg, "libraries": {lib: library_version(lib) for lib in libraries},
            "not_importable": missing, "skipped": skipped, "results": results, "targets": goals}


def run_all_levels(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Each ISA level in a fresh process (the level is chosen at import), its output shown as it comes."""
    child_args = [a for a in argv if a != "--all-levels"]
    levels: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for level in fastadam.config()["available_isas"]:
            out = Path(folder) / f"{level}.json"
            print(f"\n===== FASTADAM_ISA={level}", flush=True)
            subprocess.run([sys.executable, __file__, *child_args, "--memory-params", "0", "--json", str(out)],
                           env={**os.environ, "FASTADAM_ISA": level}, check=True)
            levels[level] = json.loads(out.read_text())["levels"][level]
    return levels


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_defaults(args)
    try:
        import ml_dtypes
    except ImportError:
        print("ml_dtypes is not installed: no bfloat16 moments to measure (pip install ml_dtypes)")
        return 1
    bf16 = np.dtype(ml_dtypes.bfloat16)
    PAIRS.update({FLOAT32: (F32, F32), BFLOAT16: (bf16, bf16), "bf16/f32": (bf16, F32), "f32/bf16": (F32, bf16)})

    document: dict[str, Any] = {"command": [sys.executable, *sys.argv[:1], *argv], "quick": args.quick}
    if args.all_levels:
        document["levels"] = run_all_levels(args, argv)
    else:
        document["levels"] = {fastadam.config()["isa"]: run_timings(args)}
    if args.memory_params:
        kinds = ["fastadam float32", "fastadam bfloat16", "fastadam int8", "fastadam int4"] + [lib for lib in args.libraries
                                                             if _torch_adamw8bit(lib) is not None]
        memory = {kind: measure_memory(kind, args.memory_params) for kind in kinds}
        document["memory"] = {"params": args.memory_params, "optimizers": memory}
        print(format_memory(memory, args.memory_params))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
