"""``python -m fastadam bench``: how fast the Adam step runs on this machine.

For users measuring their own machine.  It reports measurements and ratios,
nothing else: how many elements and GB a second ``fastadam.adam_step`` and
``fastadam.Adam.step`` move, that as a percentage of the machine's memory
bandwidth limit (the *probe*) and of the in-cache limit (the *exact probe*),
and the NumPy reference's time over fastadam's.  ``--help`` lists the
options; ``--quick`` runs a subset in well under a minute; ``--out DIR``
keeps the results (``bench.json``) and, with matplotlib, a plot
(``bench.png``); without ``--out`` nothing is written.

How it measures
---------------
* **Same buffers.**  Each case (one array of 2^k elements, the parameter list
  of ResNet-18, or 1,000 small tensors; float32 or float64; Adam, AdamW or
  AMSGrad; one thread count) allocates one set of arrays, and every contender
  steps those arrays in place (``fastadam.Adam`` on moments of its own that
  start as copies).
* **The limits** are ``fastadam._core.probe_step``, compiled with the kernel's
  flags and loop shape: the probe reads the four arrays and writes three, as
  the step does, with a multiply-add in place of the update (the memory
  limit); the exact probe adds exactly one correctly rounded division and one
  square root per element, the work the bitwise contract requires (the limit
  for arrays that fit in cache).
* **Interleaved.**  Each repeat times every contender once in turn, so that
  the drift of a shared machine hits them alike.  A figure is the median
  over the repeats; a ratio is the median of the per-repeat ratios.  A sample
  times many calls back to back (as ``timeit`` does).
* **Checked.**  Before timing, each contender takes one step on copies of the
  case's arrays, compared bit for bit with :func:`fastadam.reference.adam_step`
  (the probes with their own formulas).  A wrong result stops the run.
* **Flagged.**  A figure whose repeats spread over ``NOISY_SPREAD`` (max/min)
  is marked ``~``; a case timed while other processes kept more than
  ``BUSY_NEIGHBOUR_CORES`` cores busy is marked ``!`` (its figures, thread
  scaling above all, are not the kernel's).  Both show in the plot too.

The project's own suite (its targets, PyTorch and DeepSpeed side by side, the
thread cut-off sweep) is ``benchmarks/bench_step.py`` in the repository; it
builds on this module.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from . import _core, config, reference
from ._functional import adam_step
from ._optim import Adam

# The hyperparameters of every timed step (PyTorch's defaults).
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8

#: A sample times calls back to back for about this long.
SAMPLE_SECONDS = 0.01
#: Correctness checks of a larger single array look at its first this many elements.
CHECK_ELEMENTS = 1 << 22
#: Relative tolerance for contenders that round differently from fastadam.reference.
TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}

#: Exponents k of the default single-array sizes 2^k.  At 2^24 elements a
#: float64 AMSGrad case (five 128 MiB arrays, fastadam.Adam's own state and the
#: NumPy reference's temporaries) needs about 2 GiB, and arrays far larger
#: than any cache show the memory limit already.
DEFAULT_SIZE_EXPONENTS = tuple(range(10, 25))
QUICK_SIZE_EXPONENTS = (12, 16, 20)
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
QUICK_SAMPLE_SECONDS = 0.002

CASE_FAMILIES = ("single", "resnet18", "small-tensors")

PROBE = "probe"
EXACT_PROBE = "exact probe"
FASTADAM = "fastadam.adam_step"
FASTADAM_OPTIMIZER = "fastadam.Adam.step"

Step = Callable[[], None]


class ResultMismatch(AssertionError):
    """A contender's step disagrees with fastadam.reference: its timing would be meaningless."""


# -- what is stepped ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One flavour of the step: plain Adam, AdamW (decoupled weight decay) or AMSGrad."""

    name: str
    adamw_weight_decay: float = 0.0
    amsgrad: bool = False

    @property
    def decoupled(self) -> bool:
        return self.adamw_weight_decay != 0.0

    def options(self) -> dict[str, Any]:
        """Keyword arguments of fastadam.adam_step, fastadam.Adam and fastadam.reference.adam_step."""
        return dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=self.adamw_weight_decay,
                    decoupled_weight_decay=self.decoupled, amsgrad=self.amsgrad)


VARIANTS = {v.name: v for v in (Variant("adam"), Variant("adamw", adamw_weight_decay=1e-2),
                                Variant("amsgrad", amsgrad=True))}


def bytes_per_element(dtype: np.dtype, amsgrad: bool) -> int:
    """Memory traffic of one element's step: read p, g, m, v and write p, m, v; AMSGrad adds v_max both ways."""
    return (9 if amsgrad else 7) * np.dtype(dtype).itemsize


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of ResNet-18 (He et al., 2016) for 1000 classes, in torchvision's order.

    A 7x7 stem convolution; four stages of two basic blocks (two 3x3
    convolutions) at 64, 128, 256 and 512 channels, where the first block of
    stages 2-4 also projects its input with a 1x1 convolution; a batch norm
    (weight and bias) after every convolution, which has no bias of its own;
    and the fully connected classifier.  62 tensors, 11,689,512 parameters.
    """

    def conv_bn(out_channels: int, in_channels: int, kernel: int) -> list[tuple[int, ...]]:
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(64, 3, 7)
    in_channels = 64
    for channels in (64, 128, 256, 512):
        for block in range(2):
            shapes += conv_bn(channels, in_channels, 3) + conv_bn(channels, channels, 3)
            if block == 0 and channels != in_channels:
                shapes += conv_bn(channels, in_channels, 1)
            in_channels = channels
    return shapes + [(1000, 512), (1000,)]


def small_tensor_shapes(count: int = 1000, smallest: int = 64, largest: int = 65536,
                        seed: int = 0) -> list[tuple[int, ...]]:
    """`count` vectors with log-uniform sizes in [smallest, largest], from a fixed seed."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(smallest), math.log(largest), count))
    return [(int(round(n)),) for n in sizes]


@dataclass(frozen=True)
class Case:
    """The arrays of one row of the results: their shapes and how they are passed."""

    family: str  # one of CASE_FAMILIES
    label: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def single(self) -> bool:
        """One array, passed to the functional APIs as an array rather than a one-element list."""
        return self.family == "single"

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def build_cases(families: Sequence[str], size_exponents: Sequence[int]) -> list[Case]:
    cases = []
    for family in families:
        if family == "single":
            cases += [Case("single", f"2^{k}", ((1 << k,),)) for k in size_exponents]
        elif family == "resnet18":
            cases.append(Case("resnet18", "resnet18", tuple(resnet18_shapes())))
        else:
            cases.append(Case("small-tensors", "small-tensors", tuple(small_tensor_shapes())))
    return cases


@dataclass
class Buffers:
    """The arrays of one case, which every contender steps in place."""

    params: list[np.ndarray]
    grads: list[np.ndarray]
    exp_avgs: list[np.ndarray]
    exp_avg_sqs: list[np.ndarray]
    max_exp_avg_sqs: Optional[list[np.ndarray]]  # None when no AMSGrad variant runs on them
    single: bool

    @classmethod
    def random(cls, shapes: Sequence[tuple[int, ...]], dtype: np.dtype, *, with_max: bool, single: bool,
               seed: int = 0) -> Buffers:
        """Arrays of realistic magnitudes.

        The gradients are positive: the probe adds them to the moments in
        place, and a negative second moment would make the step's square root
        NaN.  So every value stays finite and normal however many steps and
        probes run on the buffers.
        """
        rng = np.random.default_rng(seed)

        def uniform(shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
            x = rng.random(shape, dtype=dtype)
            x *= high - low
            x += low
            return x

        exp_avg_sqs = [uniform(s, 0.0, 1e-2) for s in shapes]
        return cls(params=[rng.standard_normal(s, dtype=dtype) for s in shapes],
                   grads=[uniform(s, 1e-2, 1.0) for s in shapes],
                   exp_avgs=[rng.standard_normal(s, dtype=dtype) * dtype.type(0.1) for s in shapes],
                   exp_avg_sqs=exp_avg_sqs,
                   max_exp_avg_sqs=[v + uniform(v.shape, 0.0, 1e-2) for v in exp_avg_sqs] if with_max else None,
                   single=single)

    def arguments(self, amsgrad: bool) -> tuple[Any, Any, Any, Any, Any]:
        """params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs as the functional APIs take them."""
        lists = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs,
                 self.max_exp_avg_sqs if amsgrad else None)
        if self.single:
            return tuple(x[0] if x is not None else None for x in lists)
        return lists

    def _fields(self) -> tuple[Optional[list[np.ndarray]], ...]:
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs

    def head(self, limit: int) -> Buffers:
        """Views of the first `limit` elements of a single array (the buffers themselves otherwise)."""
        if not self.single or self.params[0].size <= limit:
            return self
        return Buffers(*(None if x is None else [x[0].reshape(-1)[:limit]] for x in self._fields()), single=True)

    def copy(self) -> Buffers:
        return Buffers(*(None if x is None else [a.copy() for a in x] for x in self._fields()), single=self.single)


# -- the contenders -----------------------------------------------------------------------------------------


def _always(dtype: np.dtype, variant: Variant) -> bool:
    return True


@dataclass(frozen=True)
class Bound:
    """A contender set up on a case's buffers.

    ``step()`` takes one step in place; ``state`` holds the arrays it updates:
    the case's own, except for fastadam.Adam's moments, which it owns.
    """

    step: Step
    state: Buffers


@dataclass(frozen=True)
class Contender:
    """One implementation of the step.

    ``bind(buffers, variant, threads)`` sets it up on those buffers.  ``check`` says how its result is
    verified: ``"bitwise"`` (equal to fastadam.reference bit for bit),
    ``"close"`` (within TOLERANCE), ``"probe"`` or ``"exact probe"`` (the probes' own formulas).
    """

    name: str
    column: str  # short heading in the tables
    bind: Callable[[Buffers, Variant, int], Bound]
    check: str
    supports: Callable[[np.dtype, Variant], bool] = field(default=_always)


def _bind_probe(b: Buffers, variant: Variant, threads: int, exact: bool = False) -> Bound:
    params, grads, exp_avgs, exp_avg_sqs, _ = b.arguments(False)
    return Bound(lambda: _core.probe_step(params, grads, exp_avgs, exp_avg_sqs, threads, exact=exact), b)


def _bind_adam_step(b: Buffers, variant: Variant, threads: int) -> Bound:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = b.arguments(variant.amsgrad)
    options = variant.options()
    lr, betas, eps, weight_decay = options["lr"], options["betas"], options["eps"], options["weight_decay"]
    decoupled, amsgrad = options["decoupled_weight_decay"], options["amsgrad"]

    # Spelled out rather than a functools.partial, whose keywords would cost a
    # dict per call that no user pays.  The step number only sets two scalars:
    # 1 keeps every call, the checked one included, the same.
    def step() -> None:
        adam_step(params, grads, exp_avgs, exp_avg_sqs, step=1, lr=lr, betas=betas, eps=eps,
                  weight_decay=weight_decay, decoupled_weight_decay=decoupled, amsgrad=amsgrad,
                  max_exp_avg_sqs=max_exp_avg_sqs, num_threads=threads)

    return Bound(step, b)


def _bind_adam_optimizer(b: Buffers, variant: Variant, threads: int) -> Bound:
    optimizer = Adam(b.params, num_threads=threads, **variant.options())
    state = Buffers(b.params, b.grads, [s["exp_avg"] for s in optimizer.state],
                    [s["exp_avg_sq"] for s in optimizer.state],
                    [s["max_exp_avg_sq"] for s in optimizer.state] if variant.amsgrad else None, b.single)
    # The optimizer owns its moments; they start from the case's values.
    pairs = [(state.exp_avgs, b.exp_avgs), (state.exp_avg_sqs, b.exp_avg_sqs)]
    if variant.amsgrad:
        pairs.append((state.max_exp_avg_sqs, b.max_exp_avg_sqs))
    for own, case in pairs:
        for x, y in zip(own, case):
            np.copyto(x, y)
    grads = list(b.grads)
    return Bound(lambda: optimizer.step(grads), state)


def _bind_numpy_reference(b: Buffers, variant: Variant, threads: int) -> Bound:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = b.arguments(variant.amsgrad)
    options = variant.options()
    return Bound(lambda: reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, step=1,
                                             max_exp_avg_sqs=max_exp_avg_sqs, **options), b)



ADAM_STEP = Contender(FASTADAM, "adam_step", _bind_adam_step, "bitwise")
#: The contenders that need nothing beyond NumPy, the probes first (run_case needs the first three).
BUILTIN_CONTENDERS = (
    Contender(PROBE, "probe", _bind_probe, "probe"),
    Contender(EXACT_PROBE, "exact", functools.partial(_bind_probe, exact=True), "exact probe"),
    ADAM_STEP,
    Contender(FASTADAM_OPTIMIZER, "Adam.step", _bind_adam_optimizer, "bitwise"),
    Contender("numpy reference", "np-ref", _bind_numpy_reference, "bitwise"),
)


# -- checking -----------------------------------------------------------------------------------------------


def expected_step(start: Buffers, variant: Variant) -> Buffers:
    """The buffers after one fastadam.reference step from `start` (left unchanged)."""
    expected = start.copy()
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = expected.arguments(variant.amsgrad)
    reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, step=1, max_exp_avg_sqs=max_exp_avg_sqs,
                        **variant.options())
    return expected


def expected_probe(start: Buffers) -> Buffers:
    """The buffers after one probe from `start`: a = a/2 + b for a in params and exp_avgs, a = a/2 + b*b for a in
    exp_avg_sqs (a second moment stays non-negative)."""
    expected = start.copy()
    for written, squared in ((expected.params, False), (expected.exp_avgs, False), (expected.exp_avg_sqs, True)):
        for a, b in zip(written, expected.grads):
            a[...] = a * a.dtype.type(0.5) + (b * b if squared else b)
    return expected


def expected_exact_probe(start: Buffers) -> Buffers:
    """The buffers after one exact probe from `start`, in the kernel's order of operations:
    c = c/2 + b, d = d/2 + b*b, a = a - c / (sqrt(d) + 1e-8) for a, c, d the params, exp_avgs, exp_avg_sqs."""
    expected = start.copy()
    for a, b, c, d in zip(expected.params, expected.grads, expected.exp_avgs, expected.exp_avg_sqs):
        half, k = a.dtype.type(0.5), a.dtype.type(1e-8)
        c[...] = c * half + b
        d[...] = d * half + b * b
        a[...] = a - c / (np.sqrt(d) + k)
    return expected


def _bits(a: np.ndarray) -> np.ndarray:
    """The array's bit patterns: equal exactly when the floats are identical (NaNs and signed zeros included)."""
    return a.view(f"u{a.itemsize}")


def _first_difference(name: str, actual: np.ndarray, expected: np.ndarray, wrong: np.ndarray) -> str:
    i = int(np.flatnonzero(wrong)[0])
    return (f"{name} differs at {int(wrong.sum())} of {wrong.size} elements "
            f"(first at flat index {i}: {actual.flat[i]!r}, expected {expected.flat[i]!r})")


def compare(actual: Buffers, expected: Buffers, start: Buffers, *, exact: bool, amsgrad: bool) -> Optional[str]:
    """Why `actual` is not `expected`, or None.  Inexact contenders are held to TOLERANCE, on the
    parameters' change (not their value, which would hide a missing update)."""
    names = ["params", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    for name in names:
        for i, (a, e, s) in enumerate(zip(getattr(actual, name), getattr(expected, name), getattr(start, name))):
            label = f"{name}[{i}]"
            if exact:
                wrong = _bits(a) != _bits(e)
            else:
                if name == "params":
                    a, e, label = a - s, e - s, f"the change of {label}"
                rtol = TOLERANCE[a.dtype]
                wrong = ~np.isclose(a, e, rtol=rtol, atol=rtol * float(np.max(np.abs(e), initial=0.0)))
            if wrong.any():
                return _first_difference(label, a, e, wrong)
    return None


def check_contender(contender: Contender, start: Buffers, expected: Buffers, variant: Variant, threads: int,
                    where: str) -> None:
    """Take one step of `contender` on a copy of `start`; raise ResultMismatch unless it gives `expected`."""
    bound = contender.bind(start.copy(), variant, threads)
    bound.step()
    probe = contender.check in (PROBE, EXACT_PROBE)
    problem = compare(bound.state, expected, start, exact=contender.check != "close",
                      amsgrad=variant.amsgrad and not probe)
    if problem is not None:
        kind = f"the {contender.check} formula" if probe else "fastadam.reference"
        how = "within tolerance" if contender.check == "close" else "bit for bit"
        raise ResultMismatch(f"{contender.name} does not match {kind} {how} on {where}: {problem}")


# -- timing -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection during a measurement (as timeit does): its pauses are not the step's cost."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _time_calls(step: Step, number: int) -> float:
    """Seconds taken by `number` back-to-back calls (the loop's few ns a call included)."""
    calls = itertools.repeat(None, number)
    start = time.perf_counter_ns()
    for _ in calls:
        step()
    return (time.perf_counter_ns() - start) * 1e-9


def calls_per_sample(step: Step, sample_seconds: float) -> int:
    """How many calls make a sample last about `sample_seconds`; warms the step up on the way."""
    if _time_calls(step, 1) >= sample_seconds:  # the first call also takes page faults and thread start-up
        return 1
    number = 1
    while True:
        elapsed = _time_calls(step, number)
        if elapsed >= sample_seconds / 10:  # long enough to extrapolate from
            return max(1, round(number * sample_seconds / elapsed))
        number *= 10


def interleaved_samples(steps: dict[str, Step], numbers: dict[str, int], repeats: int) -> dict[str, list[float]]:
    """Per-call seconds of every step, one sample each per repeat, taken in turns.

    Each round starts one contender further along, so that none always runs
    right after the same neighbour and inherits its cache footprint.
    """
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _gc_paused():
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_calls(steps[name], numbers[name]) / numbers[name])
    return samples


class OtherLoad:
    """How many cores other processes (and the hypervisor's steal) kept busy while it was open.

    On a shared machine a busy neighbour is the main source of bad samples,
    multi-threaded ones above all: a thread that loses its core stalls the
    whole parallel step.  Measured from /proc/stat's busy time less this
    process's own CPU time; None where there is no /proc/stat.
    """

    def __enter__(self) -> OtherLoad:
        self._start = (self._busy_seconds(), time.process_time(), time.perf_counter())
        self.cores: Optional[float] = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._busy_seconds(), time.process_time(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is not None and busy0 is not None and wall > wall0:
            self.cores = max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0))

    @staticmethod
    def _busy_seconds() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: all but idle and iowait were busy.
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


#: Cases timed while other processes kept more cores than this busy are marked in the tables.
BUSY_NEIGHBOUR_CORES = 0.25


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- running the suite --------------------------------------------------------------------------------------


@dataclass
class Settings:
    cases: list[Case]
    dtypes: list[np.dtype]
    variants: list[Variant]
    threads: list[int]
    repeats: int
    sample_seconds: float

    def describe(self) -> dict[str, Any]:
        return {"cases": [c.label for c in self.cases], "dtypes": [d.name for d in self.dtypes],
                "variants": [v.name for v in self.variants], "threads": self.threads, "repeats": self.repeats,
                "sample_seconds": self.sample_seconds, "check_elements": CHECK_ELEMENTS,
                "hyperparameters": {"lr": LR, "betas": BETAS, "eps": EPS}}


class Progress:
    """A one-line ``[i/n] what`` counter on stderr, shown only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty()

    def advance(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K[{self.done}/{self.total}] {what}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()



def run_case(case: Case, dtype: np.dtype, variant: Variant, threads: int, buffers: Buffers, start: Buffers,
             expected: Buffers, expected_probes: dict[str, Buffers], present: list[Contender],
             settings: Settings) -> dict[str, Any]:
    """Check every contender (one step from `start`), then time them on `buffers`; a JSON-ready dict.
    `expected_probes` holds the probes' results from `start`, by check."""
    where = f"{case.label} {dtype.name} {variant.name}, {threads} thread(s)"
    for c in present:
        check_contender(c, start, expected_probes.get(c.check, expected), variant, threads, where)

    steps = {c.name: c.bind(buffers, variant, threads).step for c in present}
    numbers = {name: calls_per_sample(step, settings.sample_seconds) for name, step in steps.items()}
    with OtherLoad() as other:
        samples = interleaved_samples(steps, numbers, settings.repeats)

    elements = case.elements
    traffic = bytes_per_element(dtype, variant.amsgrad) * elements
    probe_traffic = bytes_per_element(dtype, False) * elements
    results = {}
    for name, seconds in samples.items():
        moved = probe_traffic if name in (PROBE, EXACT_PROBE) else traffic
        median = statistics.median(seconds)
        results[name] = {
            "calls_per_sample": numbers[name],
            "seconds": seconds,
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "elements_per_s": elements / median,
            "gb_per_s": moved / median / 1e9,
            "percent_of_probe": _spread([100 * (moved / t) / (probe_traffic / tp)
                                         for t, tp in zip(seconds, samples[PROBE])]),
            "percent_of_exact_probe": _spread([100 * (moved / t) / (probe_traffic / tp)
                                               for t, tp in zip(seconds, samples[EXACT_PROBE])]),
            "ratio": _spread([t / tf for t, tf in zip(seconds, samples[FASTADAM])]),
        }
    return {"case": case.family, "label": case.label, "elements": elements, "tensors": len(case.shapes),
            "dtype": dtype.name, "variant": variant.name, "threads": threads,
            "bytes_per_element": bytes_per_element(dtype, variant.amsgrad), "other_load_cores": other.cores,
            "contenders": results}


def run_suite(settings: Settings, everyone: Sequence[Contender],
              use_threads: Optional[Callable[[int], None]] = None) -> list[dict[str, Any]]:
    """Every case of `settings` with every contender of `everyone` (BUILTIN_CONTENDERS first) that supports it.

    ``use_threads(n)``, if given, is called before the cases at n threads
    (for contenders whose thread count is a global setting).
    """
    progress = Progress(len(settings.cases) * len(settings.dtypes) * len(settings.variants) * len(settings.threads))
    with_max = any(v.amsgrad for v in settings.variants)
    results = []
    try:
        for case in settings.cases:
            for dtype in settings.dtypes:
                buffers = Buffers.random(case.shapes, dtype, with_max=with_max, single=case.single)
                # A snapshot: the timed steps change the buffers, and every check starts from these values.
                start = buffers.head(CHECK_ELEMENTS).copy()
                probe_results = {PROBE: expected_probe(start), EXACT_PROBE: expected_exact_probe(start)}
                for variant in settings.variants:
                    present = [c for c in everyone if c.supports(dtype, variant)]
                    expected = expected_step(start, variant)
                    for threads in settings.threads:
                        progress.advance(f"{case.label} {dtype.name} {variant.name} {threads} thread(s)")
                        if use_threads is not None:
                            use_threads(threads)
                        results.append(run_case(case, dtype, variant, threads, buffers, start, expected,
                                                probe_results, present, settings))
                del buffers, start, probe_results  # before the next case allocates its own
    finally:
        progress.close()
    return results



# -- reporting ----------------------------------------------------------------------------------------------


def _format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"



def _row_label(r: dict[str, Any]) -> str:
    return r["label"] if r["case"] == "single" else f"{r['label']} ({r['tensors']} tensors)"


def _disturbed(r: dict[str, Any]) -> bool:
    return (r["other_load_cores"] or 0.0) > BUSY_NEIGHBOUR_CORES


#: A table cell is marked noisy when its repeats' max/min exceeds this.
NOISY_SPREAD = 1.2


def _cell(spread: dict[str, float], text: str) -> str:
    return text + ("~" if spread["max"] > NOISY_SPREAD * spread["min"] else " ")


def format_tables(results: list[dict[str, Any]], everyone: list[Contender]) -> str:
    """One table per dtype and variant: fastadam.adam_step's throughput, and each contender's time ratio."""
    others = [c for c in everyone if c.name not in (PROBE, EXACT_PROBE, FASTADAM)]
    lines = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["variant"]), []).append(r)
    for (dtype, variant), rows in groups.items():
        lines += ["", f"{dtype} {variant}: fastadam.adam_step's throughput, then each contender's time over "
                      f"fastadam.adam_step's (>1: fastadam faster).  Medians; ~: max/min of the repeats over "
                      f"{NOISY_SPREAD:g} (all in the JSON); !: other processes kept over "
                      f"{BUSY_NEIGHBOUR_CORES:g} cores busy"]
        header = (f"{'case':<30}{'thr':>4}{'Melem/s':>9}{'GB/s':>7}{'probe':>7}{'%probe':>9}{'exact':>7}{'%exact':>9}"
                  + "".join(f"{c.column:>11}" for c in others))
        lines += [header, "-" * len(header)]
        for r in rows:
            fa, probe, exact = (r["contenders"][n] for n in (FASTADAM, PROBE, EXACT_PROBE))
            cells = [_cell(r["contenders"][c.name]["ratio"], f"{r['contenders'][c.name]['ratio']['median']:>9.2f}x")
                     if c.name in r["contenders"] else f"{'-':>10} " for c in others]
            label = _row_label(r) + (" !" if _disturbed(r) else "")
            lines.append(f"{label:<30}{r['threads']:>4}{fa['elements_per_s'] / 1e6:>9.0f}"
                         f"{fa['gb_per_s']:>7.1f}{probe['gb_per_s']:>7.1f}"
                         + _cell(fa["percent_of_probe"], f"{fa['percent_of_probe']['median']:>7.1f}%")
                         + f"{exact['gb_per_s']:>7.1f}"
                         + _cell(fa["percent_of_exact_probe"], f"{fa['percent_of_exact_probe']['median']:>7.1f}%")
                         + "".join(cells))
    return "\n".join(lines)



def _noisy(seconds: Sequence[float]) -> bool:
    return max(seconds) > NOISY_SPREAD * min(seconds)


def format_notes(results: list[dict[str, Any]]) -> list[str]:
    """What the ~ and ! marks of this run amount to, and the other processes' load over the run."""
    notes = []
    noisy = sum(any(_noisy(c["seconds"]) for c in r["contenders"].values()) for r in results)
    if noisy:
        notes.append(f"~ {noisy} of {len(results)} cases have a figure whose repeats spread over {NOISY_SPREAD:g}x "
                     f"(max/min): take their medians as rough")
    loads = [r["other_load_cores"] for r in results if r["other_load_cores"] is not None]
    busy = sum(map(_disturbed, results))
    if busy:
        notes.append(f"! {busy} of {len(results)} cases ran while other processes kept over "
                     f"{BUSY_NEIGHBOUR_CORES:g} cores busy: their figures, thread scaling above all, are not the "
                     f"kernel's; rerun them on a quiet machine (--sizes, --cases, --threads)")
    if loads:
        notes.append(f"other processes' load while timing: {statistics.median(loads):.2f} cores (median), "
                     f"{min(loads):.2f}-{max(loads):.2f} over the cases, on {available_cores()} usable cores")
    return notes


def plot_title(results: list[dict[str, Any]], machine: dict[str, Any], cfg: dict[str, Any]) -> str:
    libraries = ", ".join(f"{name} {machine[name]}" for name in ("python", "numpy", "torch", "deepspeed")
                          if machine.get(name))
    title = (f"fastadam {cfg['version']}, ISA level {cfg['isa']} ({cfg['vector_bits']}-bit vectors); "
             f"{machine['cpu']}, {machine['cores']} usable cores\n{libraries}; {machine['platform']}")
    busy = sum(map(_disturbed, results))
    if busy:
        title += f"\n! {busy} of {len(results)} cases ran on a busy machine (red x): not the kernel's figures"
    return title


def plot(results: list[dict[str, Any]], everyone: list[Contender], path: Path, title: str) -> None:
    """GB/s of every contender: against size for the single arrays, as bars for the lists of tensors.

    One row of panels per dtype and variant (and kind of case), one column
    per thread count; the probes are black.  Cases timed on a busy machine
    are crossed in red, figures with noisy repeats ringed in grey.  Needs
    matplotlib (an ImportError otherwise).
    """
    from matplotlib.figure import Figure

    groups = sorted({(r["dtype"], r["variant"]) for r in results})
    columns = sorted({r["threads"] for r in results})
    kinds = [k for k in ("single", "list") if any((r["case"] == "single") == (k == "single") for r in results)]
    rows = [(g, k) for g in groups for k in kinds]
    figure = Figure(figsize=(5.5 * len(columns), 3.6 * len(rows) + 0.8), layout="constrained")
    figure.suptitle(title, fontsize="small")
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    limits = {PROBE: ("probe (the memory limit)", "--"), EXACT_PROBE: ("exact probe (the in-cache limit)", ":")}
    for (i, ((dtype, variant), kind)), (j, threads) in itertools.product(enumerate(rows), enumerate(columns)):
        ax = axes[i][j]
        panel = [r for r in results if (r["dtype"], r["variant"], r["threads"]) == (dtype, variant, threads)
                 and (r["case"] == "single") == (kind == "single")]
        ax.set_title(f"{dtype} {variant}, {threads} thread(s)" + ("" if kind == "single" else ", lists of tensors"),
                     fontsize="medium")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        if kind == "single":
            _plot_sizes(ax, panel, everyone, limits)
        else:
            _plot_lists(ax, panel, everyone, limits)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _marks(ax: Any, points: list[tuple[float, float, dict[str, Any], dict[str, Any]]]) -> None:
    """Red crosses on cases timed on a busy machine, grey rings on figures with noisy repeats."""
    busy = [(x, y) for x, y, r, _ in points if _disturbed(r)]
    noisy = [(x, y) for x, y, _, c in points if _noisy(c["seconds"])]
    if busy:
        ax.scatter(*zip(*busy), marker="x", color="red", s=60, zorder=5, label="busy machine (!)")
    if noisy:
        ax.scatter(*zip(*noisy), facecolors="none", edgecolors="grey", s=110, zorder=4,
                   label=f"repeats spread over {NOISY_SPREAD:g}x (~)")


def _plot_sizes(ax: Any, panel: list[dict[str, Any]], everyone: list[Contender], limits: dict) -> None:
    points = []
    for c in everyone:
        mine = [(r["elements"], r["contenders"][c.name]["gb_per_s"], r, r["contenders"][c.name])
                for r in panel if c.name in r["contenders"]]
        if not mine:
            continue
        x, y = [p[0] for p in mine], [p[1] for p in mine]
        if c.name in limits:
            ax.plot(x, y, label=limits[c.name][0], color="black", linestyle=limits[c.name][1], linewidth=2)
        else:
            ax.plot(x, y, label=c.name, marker=".")
        points += mine
    _marks(ax, points)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements")


def _plot_lists(ax: Any, panel: list[dict[str, Any]], everyone: list[Contender], limits: dict) -> None:
    bars = [c for c in everyone if c.name not in limits and any(c.name in r["contenders"] for r in panel)]
    width = 0.8 / max(len(bars), 1)
    points = []
    for k, c in enumerate(bars):
        mine = [(i - 0.4 + width * (k + 0.5), r["contenders"][c.name]["gb_per_s"], r, r["contenders"][c.name])
                for i, r in enumerate(panel) if c.name in r["contenders"]]
        ax.bar([p[0] for p in mine], [p[1] for p in mine], width, label=c.name, color=f"C{k}")
        points += mine
    for name, (label, style) in limits.items():
        for i, r in enumerate(panel):
            if name in r["contenders"]:
                ax.hlines(r["contenders"][name]["gb_per_s"], i - 0.45, i + 0.45, color="black", linestyle=style,
                          linewidth=2, label=label)
    _marks(ax, points)
    ax.set_xticks(range(len(panel)), [_row_label(r) for r in panel])


def machine_info(**libraries: Any) -> dict[str, Any]:
    """The CPU, core count, platform, and the versions of Python, NumPy and the given modules."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": available_cores(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            **{name: getattr(module, "__version__", None) for name, module in libraries.items()}}


def save_plot(results: list[dict[str, Any]], everyone: list[Contender], path: Path, machine: dict[str, Any],
              cfg: dict[str, Any]) -> str:
    """Draw the plot into `path` if matplotlib is there; the line to print either way."""
    try:
        plot(results, everyone, path, plot_title(results, machine, cfg))
    except ImportError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise  # matplotlib is there but broken: show that
        return "matplotlib is not installed, so no plot was drawn (python -m pip install matplotlib)"
    return f"wrote {path}"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


# -- command line -------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> list[int]:
    """1, 2, 4, ... and every core: the whole range without timing each count on a large machine."""
    cores = available_cores()
    counts = [1 << k for k in range(cores.bit_length()) if 1 << k < cores]
    return counts + [cores]


def _parse_exponents(text: str) -> list[int]:
    """'10-26' or '12,16,20' (or both: '10-14,20') as sorted exponents."""
    exponents: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            exponents.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected exponents like 10-26 or 12,16,20, got {text!r}") from None
    if not exponents or min(exponents) < 0 or max(exponents) > 40:
        raise argparse.ArgumentTypeError(f"exponents must lie in 0..40, got {text!r}")
    return sorted(exponents)


def _parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def _parse_threads(text: str) -> list[int]:
    try:
        counts = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2,4, got {text!r}") from None
    if counts[0] < 1:
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return counts



def add_suite_arguments(parser: argparse.ArgumentParser, default_sizes: Sequence[int] = DEFAULT_SIZE_EXPONENTS) -> None:
    """The options that choose what is timed (shared with benchmarks/bench_step.py)."""
    sizes = f"{min(default_sizes)}-{max(default_sizes)}"
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: sizes 2^{'/'.join(map(str, QUICK_SIZE_EXPONENTS))}, Adam only, one "
                             f"thread and all, {QUICK_REPEATS} repeats, short samples")
    parser.add_argument("--sizes", type=_parse_exponents, metavar="EXPONENTS",
                        help=f"exponents k of the 2^k-element single arrays, e.g. {sizes} (the default) or 12,20,24")
    parser.add_argument("--threads", type=_parse_threads, metavar="N,N,...",
                        help=f"thread counts (default: {','.join(map(str, default_threads()))})")
    parser.add_argument("--dtype", type=_parse_list(("float32", "float64")), metavar="DTYPES",
                        default=["float32", "float64"], help="float32, float64 or both, comma-separated (default both)")
    parser.add_argument("--variants", type=_parse_list(tuple(VARIANTS)), metavar="VARIANTS",
                        help=f"comma-separated from {', '.join(VARIANTS)} (default all; --quick adam)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"interleaved samples per contender and case (default {DEFAULT_REPEATS}, "
                             f"--quick {QUICK_REPEATS})")
    parser.add_argument("--cases", type=_parse_list(CASE_FAMILIES), metavar="CASES", default=list(CASE_FAMILIES),
                        help=f"comma-separated from {', '.join(CASE_FAMILIES)} (default all)")


def build_parser(prog: str = "python -m fastadam bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n", 2)[1])
    add_suite_arguments(parser)
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write the results to DIR/bench.json and, with matplotlib, the plot to DIR/bench.png "
                             "(default: write nothing)")
    parser.add_argument("--no-plot", action="store_true", help="with --out, draw no plot")
    return parser


def settings_from(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  default_sizes: Sequence[int] = DEFAULT_SIZE_EXPONENTS) -> Settings:
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    exponents = args.sizes or (QUICK_SIZE_EXPONENTS if args.quick else default_sizes)
    threads = args.threads or (sorted({1, available_cores()}) if args.quick else default_threads())
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    variants = args.variants or (["adam"] if args.quick else list(VARIANTS))
    return Settings(cases=build_cases(args.cases, exponents), dtypes=[np.dtype(d) for d in args.dtype],
                    variants=[VARIANTS[v] for v in variants], threads=threads, repeats=repeats,
                    sample_seconds=QUICK_SAMPLE_SECONDS if args.quick else SAMPLE_SECONDS)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m fastadam bench") -> int:
    """Time the step on this machine with command-line arguments `argv`; the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    settings = settings_from(parser, args)
    created = now()
    everyone = list(BUILTIN_CONTENDERS)
    cfg = config()
    print(f"fastadam {cfg['version']} (ISA level {cfg['isa']}); {available_cores()} usable cores; "
          f"threads {settings.threads}; {settings.repeats} interleaved repeats")
    print(f"contenders: {', '.join(c.name for c in everyone)}")
    try:
        results = run_suite(settings, everyone)
    except ResultMismatch as e:
        print(f"{prog}: wrong result: {e}", file=sys.stderr)
        return 1
    print(format_tables(results, everyone))
    notes = format_notes(results)
    if notes:
        print("\n" + "\n".join(notes))
    if args.out is None:
        print("\nnothing written (--out DIR keeps the results and the plot)")
        return 0
    machine = machine_info()
    path = args.out / "bench.json"
    write_json(path, {"created": created, "machine": machine, "fastadam": cfg, "settings": settings.describe(),
                      "contenders": [c.name for c in everyone], "results": results})
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(save_plot(results, everyone, args.out / "bench.png", machine, cfg))
    return 0
