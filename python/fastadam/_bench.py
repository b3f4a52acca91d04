"""fastadam's benchmark suite: the step against the memory-bandwidth limit and against its peers.

Run it as ``python -m fastadam bench`` or ``python benchmarks/bench_step.py``;
``--help`` lists the options; ``--quick`` runs a subset in well under a minute.

How it measures
---------------
* **Same buffers.**  Each case (one array of 2^k elements, the parameter list
  of ResNet-18, or 1,000 small tensors; float32 or float64; Adam, AdamW or
  AMSGrad; one thread count) allocates one set of arrays, and every contender
  steps those arrays in place.  PyTorch and DeepSpeed get zero-copy tensors
  (``torch.from_numpy``) with their optimizer state pointed at the same moment
  arrays.  Only ``fastadam.Adam`` keeps moment arrays of its own, as it owns
  them by design; they start as copies of the case's.
* **The limits** are ``fastadam._core.probe_step``, compiled into the extension
  with the kernel's flags and its loop shape: it reads the four arrays and
  writes three, as the step does, with a multiply-add per array in place of
  the update -- the memory limit; and the *exact probe*
  (``probe_step(..., exact=True)``): the same traffic plus exactly one
  correctly rounded division and one square root per element, the work the
  bitwise contract requires, which bounds the step in cache.
* **Interleaved.**  Each repeat times every contender once in turn, so that
  the drift of a shared machine hits them alike.  A figure is the median over
  the repeats; a ratio is the median of the per-repeat ratios, with their min
  and max.
* **Many calls per sample**, as ``timeit`` does: a sample lasts about
  ``SAMPLE_SECONDS``, so a per-call time of a microsecond is meaningful.  The
  steps repeat on the same buffers; the values stay finite and normal.
* **Checked.**  Before timing, each contender takes one step on copies of the
  case's arrays (of their first ``CHECK_ELEMENTS`` elements for a larger
  array), compared with :func:`fastadam.reference.adam_step`: fastadam and the
  ``out=`` NumPy version must match it bit for bit, PyTorch and DeepSpeed within
  a loose tolerance.  A wrong result stops the run with an error.

Metrics: elements/s; GB/s, counting 7 accesses of the element size per element
(read p, g, m, v; write p, m, v), 9 with AMSGrad (v_max read and written);
percent of the probe and of the exact probe (bandwidth over theirs, per repeat); and
the time ratio ``contender / fastadam.adam_step`` (above 1: fastadam is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
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

#: Exponents k of the default single-array sizes 2^k.  2^26 elements is the
#: largest that keeps a float64 AMSGrad case (five 512 MiB arrays, fastadam.Adam's
#: own state and the NumPy reference's temporaries: about 7 GiB) well inside a
#: 24 GiB machine, and the whole suite near a quarter of an hour on two cores.
DEFAULT_SIZE_EXPONENTS = tuple(range(10, 27))
QUICK_SIZE_EXPONENTS = (12, 16, 20)
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
QUICK_SAMPLE_SECONDS = 0.002
#: The threshold sweep: sizes 2^10 .. 2^18 in steps of a half power of two.
THRESHOLD_SIZES = tuple(round(2 ** (k / 2)) for k in range(20, 37))

CASE_FAMILIES = ("single", "resnet18", "small-tensors")
DEFAULT_JSON = Path("benchmarks/results/bench_step.json")
DEFAULT_THRESHOLD_JSON = Path("benchmarks/results/bench_threshold.json")
DEFAULT_PLOT = Path("benchmarks/results/bench_step.png")

PROBE = "probe"
EXACT_PROBE = "exact probe"
FASTADAM = "fastadam.adam_step"
FASTADAM_OPTIMIZER = "fastadam.Adam.step"
TORCH_FUSED = "torch fused"
DEEPSPEED = "deepspeed"

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


class NumpyOutStep:
    """The step written carefully in NumPy: every ufunc writes into an existing array.

    Two scratch arrays as long as the largest parameter are allocated once,
    when the object is built, so a call allocates no temporary.  The operations,
    their order and their constants are fastadam.reference's, so the result is
    the reference's bit for bit; what differs is only the memory traffic.  It
    is what a careful NumPy user can do: still a pass over memory per ufunc,
    on one thread.
    """

    def __init__(self, b: Buffers, variant: Variant) -> None:
        self.variant = variant
        options = variant.options()
        constants = {}  # per dtype: the same step, so the same scalars for every tensor
        scratch = {}
        for p in b.params:
            if p.dtype not in constants:
                constants[p.dtype] = reference.constants(1, options["lr"], options["betas"], options["eps"],
                                                         options["weight_decay"], p.dtype)
                largest = max(q.size for q in b.params if q.dtype == p.dtype)
                scratch[p.dtype] = (np.empty(largest, p.dtype), np.empty(largest, p.dtype))
        maxima = b.max_exp_avg_sqs if variant.amsgrad else [None] * len(b.params)
        # Per tensor, views of the scratch in its shape: made here, not per call.
        self.tensors = [(p, g, m, v, v_max, constants[p.dtype],
                         *(s[:p.size].reshape(p.shape) for s in scratch[p.dtype]))
                        for p, g, m, v, v_max in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, maxima)]

    def __call__(self) -> None:
        decoupled, amsgrad = self.variant.decoupled, self.variant.amsgrad
        for p, g, m, v, v_max, c, t1, t2 in self.tensors:
            # m = beta1 * m + (1 - beta1) * g
            np.multiply(m, c.beta1, out=m)
            np.multiply(g, c.one_minus_beta1, out=t1)
            np.add(m, t1, out=m)
            # v = beta2 * v + ((1 - beta2) * g) * g
            np.multiply(v, c.beta2, out=v)
            np.multiply(g, c.one_minus_beta2, out=t1)
            np.multiply(t1, g, out=t1)
            np.add(v, t1, out=v)
            second_moment = v
            if amsgrad:
                np.maximum(v_max, v, out=v_max)
                second_moment = v_max
            # u = (step_size * m) / (sqrt(v') * inv_bias_correction2_sqrt + eps)
            np.sqrt(second_moment, out=t1)
            np.multiply(t1, c.inv_bias_correction2_sqrt, out=t1)
            np.add(t1, c.eps, out=t1)
            np.multiply(m, c.step_size, out=t2)
            np.divide(t2, t1, out=t2)
            if decoupled:  # u = (lr * weight_decay) * p + u
                np.multiply(p, c.lr_weight_decay, out=t1)
                np.add(t1, t2, out=t2)
            np.subtract(p, t2, out=p)


def _bind_numpy_out(b: Buffers, variant: Variant, threads: int) -> Bound:
    return Bound(NumpyOutStep(b, variant), b)


def _torch_params(b: Buffers) -> list:
    """Zero-copy tensors over the case's parameters, with the gradients as their .grad."""
    import torch

    params = [torch.from_numpy(p) for p in b.params]
    for t, g in zip(params, b.grads):
        t.grad = torch.from_numpy(g)
    return params


def _bind_torch(b: Buffers, variant: Variant, threads: int, *, implementation: str) -> Bound:
    import torch

    params = _torch_params(b)
    optimizer_class = torch.optim.AdamW if variant.decoupled else torch.optim.Adam
    optimizer = optimizer_class(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=variant.adamw_weight_decay,
                                amsgrad=variant.amsgrad, **{implementation: True})
    # The state torch would create on the first step (a float32 step counter,
    # the moments), but over the case's arrays: torch steps the same memory.
    for i, t in enumerate(params):
        state = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.from_numpy(b.exp_avgs[i]),
                 "exp_avg_sq": torch.from_numpy(b.exp_avg_sqs[i])}
        if variant.amsgrad:
            state["max_exp_avg_sq"] = torch.from_numpy(b.max_exp_avg_sqs[i])
        optimizer.state[t] = state
    return Bound(optimizer.step, b)


def _bind_deepspeed(b: Buffers, variant: Variant, threads: int) -> Bound:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = _torch_params(b)
    optimizer = DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=variant.adamw_weight_decay,
                                 adamw_mode=variant.decoupled)
    # DeepSpeed creates its state on the first step only for a parameter without one.
    for i, t in enumerate(params):
        optimizer.state[t] = {"step": 0, "exp_avg": torch.from_numpy(b.exp_avgs[i]),
                              "exp_avg_sq": torch.from_numpy(b.exp_avg_sqs[i])}
    return Bound(optimizer.step, b)


def _deepspeed_supports(dtype: np.dtype, variant: Variant) -> bool:
    # DeepSpeedCPUAdam has float32 (and half) kernels only, and no AMSGrad.
    return dtype == np.float32 and not variant.amsgrad


def _import_optional(name: str) -> tuple[Any, str]:
    """The module, or None and why it could not be imported."""
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # a broken install raises more than ImportError
        return None, f"{type(e).__name__}: {e}"


@dataclass
class Peers:
    """The optional libraries found, and why the others are missing."""

    torch: Any = None
    deepspeed: Any = None
    missing: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        found = [f"{m.__name__} {m.__version__}" for m in (self.torch, self.deepspeed) if m is not None]
        lost = [f"{name} ({why})" for name, why in self.missing.items()]
        return ", ".join(found) + (f"; not importable: {'; '.join(lost)}" if lost else "")


def find_peers() -> Peers:
    peers = Peers()
    for name in ("torch", "deepspeed"):
        module, why = _import_optional(name)
        if module is None:
            peers.missing[name] = why
        setattr(peers, name, module)
    return peers


ADAM_STEP = Contender(FASTADAM, "adam_step", _bind_adam_step, "bitwise")
#: The contenders that need nothing beyond NumPy, the probes first.
BUILTIN_CONTENDERS = (
    Contender(PROBE, "probe", _bind_probe, "probe"),
    Contender(EXACT_PROBE, "exact", functools.partial(_bind_probe, exact=True), "exact probe"),
    ADAM_STEP,
    Contender(FASTADAM_OPTIMIZER, "Adam.step", _bind_adam_optimizer, "bitwise"),
    Contender("numpy reference", "np-ref", _bind_numpy_reference, "bitwise"),
    Contender("numpy out=", "np-out", _bind_numpy_out, "bitwise"),
)


def contenders(peers: Peers) -> list[Contender]:
    """Every contender this environment can run: the built-in ones, then PyTorch's and DeepSpeed's."""
    found = list(BUILTIN_CONTENDERS)
    if peers.torch is not None:
        found += [Contender(TORCH_FUSED, "t-fused", functools.partial(_bind_torch, implementation="fused"), "close"),
                  Contender("torch foreach", "t-foreach", functools.partial(_bind_torch, implementation="foreach"),
                            "close")]
    if peers.deepspeed is not None:
        found.append(Contender(DEEPSPEED, "deepspeed", _bind_deepspeed, "close", _deepspeed_supports))
    return found


# -- checking -----------------------------------------------------------------------------------------------


def expected_step(start: Buffers, variant: Variant) -> Buffers:
    """The buffers after one fastadam.reference step from `start` (left unchanged)."""
    expected = start.copy()
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = expected.arguments(variant.amsgrad)
    reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, step=1, max_exp_avg_sqs=max_exp_avg_sqs,
                        **variant.options())
    return expected


def expected_probe(start: Buffers) -> Buffers:
    """The buffers after one probe from `start`: a = a/2 + b for a in params, exp_avgs, exp_avg_sqs."""
    expected = start.copy()
    for written in (expected.params, expected.exp_avgs, expected.exp_avg_sqs):
        for a, b in zip(written, expected.grads):
            a[...] = a * a.dtype.type(0.5) + b
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


def _use_threads(peers: Peers, threads: int) -> None:
    """Run the peers on `threads` threads: torch's setting also governs DeepSpeed's OpenMP loops.

    fastadam gets its count per call, so the OpenMP setting torch changes on
    the way does not matter to it.
    """
    if peers.torch is not None:
        peers.torch.set_num_threads(threads)


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


def run_suite(settings: Settings, peers: Peers) -> list[dict[str, Any]]:
    everyone = contenders(peers)
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
                        _use_threads(peers, threads)
                        results.append(run_case(case, dtype, variant, threads, buffers, start, expected,
                                                probe_results, present, settings))
                del buffers, start, probe_results  # before the next case allocates its own
    finally:
        progress.close()
    return results


def measure_latency(settings: Settings) -> dict[str, Any]:
    """One 4096-element float32 step from Python, as a user writes it, with the default options.

    ``adam_step(p, g, m, v, step=1)`` and ``opt.step([g])``, interleaved with
    an empty call whose time (the timing loop and one lambda call) is reported
    as ``overhead`` and included in the others: the figures are end to end.
    """
    b = Buffers.random([(4096,)], np.dtype(np.float32), with_max=False, single=True)
    p, g, m, v = b.params[0], b.grads[0], b.exp_avgs[0], b.exp_avg_sqs[0]
    optimizer = Adam([p])
    grads = [g]
    steps = {FASTADAM: lambda: adam_step(p, g, m, v, step=1), FASTADAM_OPTIMIZER: lambda: optimizer.step(grads),
             "overhead": lambda: None}
    numbers = {name: calls_per_sample(step, settings.sample_seconds) for name, step in steps.items()}
    samples = interleaved_samples(steps, numbers, max(settings.repeats, DEFAULT_REPEATS))
    return {"elements": 4096, "dtype": "float32",
            "seconds": {name: {**_spread(s), "samples": s, "calls_per_sample": numbers[name]}
                        for name, s in samples.items()}}


def threshold_sweep(dtypes: Sequence[np.dtype], repeats: int, sample_seconds: float) -> dict[str, Any]:
    """fastadam.adam_step on 1 vs 2 threads over THRESHOLD_SIZES: where two threads start to win.

    Calls below the kernel's serial cut-off run on one thread whatever they
    ask for, so there the two columns time the same code; the sweep shows
    whether two threads already win just above the cut-off (it could be
    lower) or still lose there (it should be higher).
    """
    cutoffs = {name: int(n) for name, n in config()["parallel_threshold_elements"].items()}
    variant = VARIANTS["adam"]
    out: dict[str, Any] = {"cutoff_elements": cutoffs, "variant": variant.name, "dtypes": {}}
    for dtype in dtypes:
        cutoff = cutoffs[dtype.name]
        rows = []
        for n in THRESHOLD_SIZES:
            buffers = Buffers.random([(n,)], dtype, with_max=False, single=True)
            expected = expected_step(buffers, variant)
            for threads in (1, 2):
                check_contender(ADAM_STEP, buffers, expected, variant, threads, f"{n} {dtype.name}")
            steps = {f"{t}": ADAM_STEP.bind(buffers, variant, t).step for t in (1, 2)}
            numbers = {name: calls_per_sample(step, sample_seconds) for name, step in steps.items()}
            samples = interleaved_samples(steps, numbers, repeats)
            rows.append({"elements": n, "serial_both": n < cutoff, "one_thread_s": _spread(samples["1"]),
                         "two_threads_s": _spread(samples["2"]),
                         "speedup": _spread([a / b for a, b in zip(samples["1"], samples["2"])])})
        # The smallest size from which on two threads win at every larger size.
        wins_from = None
        for row in reversed(rows):
            if row["speedup"]["median"] <= 1.0:
                break
            wins_from = row["elements"]
        out["dtypes"][dtype.name] = {"rows": rows, "two_threads_win_from": wins_from}
    return out


# -- reporting ----------------------------------------------------------------------------------------------


def _format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _format_size(n: int) -> str:
    k = n.bit_length() - 1
    return f"2^{k}" if n == 1 << k else f"{n:,}"


def _row_label(r: dict[str, Any]) -> str:
    return r["label"] if r["case"] == "single" else f"{r['label']} ({r['tensors']} tensors)"


def _disturbed(r: dict[str, Any]) -> bool:
    return (r["other_load_cores"] or 0.0) > BUSY_NEIGHBOUR_CORES


def _where(r: dict[str, Any]) -> str:
    return f"{_row_label(r)} {r['dtype']} {r['variant']}, {r['threads']} thread(s)"


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


def format_latency(latency: dict[str, Any]) -> str:
    s = latency["seconds"]
    parts = [f"{name} {_format_seconds(s[name]['median'])} ({_format_seconds(s[name]['min'])}-"
             f"{_format_seconds(s[name]['max'])})" for name in (FASTADAM, FASTADAM_OPTIMIZER)]
    return (f"One 4096-element float32 step from Python, end to end: {', '.join(parts)}; "
            f"timing loop overhead {_format_seconds(s['overhead']['median'])} (included)")


def format_threshold(sweep: dict[str, Any]) -> str:
    cutoffs = ", ".join(f"{_format_size(n)} elements for {name}" for name, n in sweep["cutoff_elements"].items())
    lines = [f"Threshold sweep: fastadam.adam_step ({sweep['variant']}), 1 vs 2 threads; the kernel's serial "
             f"cut-off is {cutoffs} (below it both calls run on one thread)"]
    for dtype, result in sweep["dtypes"].items():
        lines += ["", f"{dtype}", f"{'elements':>10}{'1 thread':>13}{'2 threads':>13}{'speedup':>9}  (min-max)"]
        for row in result["rows"]:
            sp = row["speedup"]
            note = "  serial: below the cut-off" if row["serial_both"] else ""
            lines.append(f"{row['elements']:>10,}{_format_seconds(row['one_thread_s']['median']):>13}"
                         f"{_format_seconds(row['two_threads_s']['median']):>13}{sp['median']:>8.2f}x"
                         f"  ({sp['min']:.2f}-{sp['max']:.2f}){note}")
        win = result["two_threads_win_from"]
        lines.append(f"{dtype}: two threads win from {win:,} elements on" if win is not None
                     else f"{dtype}: two threads do not win at the largest size swept")
    return "\n".join(lines)


@dataclass
class Target:
    description: str
    status: str  # "MET", "NOT MET" or "NO DATA"
    detail: str

    def line(self) -> str:
        return f"  {self.status:<8} {self.description}: {self.detail}"


def _at_least_target(description: str, values: list[tuple[float, dict[str, Any]]], limit: float,
                      unit: str) -> Target:
    """MET when every value (with the result it came from) is >= limit; reports the worst."""
    if not values:
        return Target(description, "NO DATA", "no matching case was measured")
    worst, where = min(values, key=lambda v: v[0])
    failing = [v for v in values if v[0] < limit]
    detail = f"worst {worst:.{1 if unit == '%' else 2}f}{unit} ({_where(where)}) over {len(values)} cases"
    if failing:
        detail += f"; {len(failing)} below {limit:g}{unit}"
    return Target(description, "NOT MET" if failing else "MET", detail)


def evaluate_targets(results: list[dict[str, Any]], latency: Optional[dict[str, Any]]) -> list[Target]:
    def single(lo_exp: int, hi_exp: Optional[int] = None) -> list[dict[str, Any]]:
        return [r for r in results if r["case"] == "single" and r["elements"] >= 1 << lo_exp
                and (hi_exp is None or r["elements"] <= 1 << hi_exp)]

    def percent(rs: list[dict[str, Any]], who: str = FASTADAM,
                of: str = "percent_of_probe") -> list[tuple[float, dict[str, Any]]]:
        return [(r["contenders"][who][of]["median"], r) for r in rs]

    def versus(rs: list[dict[str, Any]], peers: Sequence[str], who: str = FASTADAM) -> list:
        """`who`'s speedup over the fastest of `peers` present in each result (from the tables' ratios)."""
        values = []
        for r in rs:
            ratios = [r["contenders"][p]["ratio"]["median"] for p in peers if p in r["contenders"]]
            if ratios:
                values.append((min(ratios) / r["contenders"][who]["ratio"]["median"], r))
        return values

    targets = [
        _at_least_target("2^12..2^26, every thread count, dtype and variant: >= 1.0x the faster of torch fused / "
                         "DeepSpeed (where it runs: float32 Adam, AdamW)",
                         versus(single(12, 26), (TORCH_FUSED, DEEPSPEED)), 1.0, "x"),
        _at_least_target(">= 2^22 elements: >= 95% of the probe", percent(single(22)), 95.0, "%"),
        _at_least_target("2^14..2^20 elements: >= 75% of the probe", percent(single(14, 20)), 75.0, "%"),
        _at_least_target("2^14..2^20 elements: >= 95% of the exact probe (one division and square root an element)",
                         percent(single(14, 20), of="percent_of_exact_probe"), 95.0, "%"),
    ]
    for who, limit in ((FASTADAM, 2e-6), (FASTADAM_OPTIMIZER, 3e-6)):
        description = f"4096-element float32 step through {who}: < {limit * 1e6:g} µs"
        if latency is None:
            targets.append(Target(description, "NO DATA", "not measured (needs the single case)"))
        else:
            t = latency["seconds"][who]["median"]
            targets.append(Target(description, "MET" if t < limit else "NOT MET", f"{_format_seconds(t)} (median)"))
    resnet = [r for r in results if r["case"] == "resnet18"]
    small = [r for r in results if r["case"] == "small-tensors"]
    for who in (FASTADAM, FASTADAM_OPTIMIZER):
        targets += [
            _at_least_target(f"ResNet-18 list, {who}: >= 95% of the probe", percent(resnet, who), 95.0, "%"),
            _at_least_target(f"ResNet-18 list, {who}: >= 1.0x torch fused", versus(resnet, (TORCH_FUSED,), who),
                             1.0, "x"),
            _at_least_target(f"ResNet-18 list, {who}: >= 1.0x DeepSpeed", versus(resnet, (DEEPSPEED,), who),
                             1.0, "x"),
            _at_least_target(f"1,000 small tensors, {who}: >= 90% of the probe", percent(small, who), 90.0, "%"),
        ]
    # Two threads against one, for the large arrays measured at both counts.
    speedups = []
    for r2 in single(22):
        if r2["threads"] == 2:
            for r1 in single(22):
                if r1["threads"] == 1 and all(r1[k] == r2[k] for k in ("elements", "dtype", "variant")):
                    speedups.append((r1["contenders"][FASTADAM]["median_s"] / r2["contenders"][FASTADAM]["median_s"],
                                     r2))
    targets.append(_at_least_target(">= 2^22 elements: two threads faster than one (speedup)", speedups, 1.0, "x"))
    return targets


def plot(results: list[dict[str, Any]], everyone: list[Contender], path: Path) -> bool:
    """GB/s against size for every contender on the single-array cases; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    singles = [r for r in results if r["case"] == "single"]
    if not singles:
        return False
    rows = sorted({(r["dtype"], r["variant"]) for r in singles})
    columns = sorted({r["threads"] for r in singles})
    figure = Figure(figsize=(5.5 * len(columns), 3.6 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), squeeze=False, sharex=True)
    for (i, (dtype, variant)), (j, threads) in itertools.product(enumerate(rows), enumerate(columns)):
        ax = axes[i][j]
        panel = [r for r in singles if (r["dtype"], r["variant"], r["threads"]) == (dtype, variant, threads)]
        for c in everyone:
            points = [(r["elements"], r["contenders"][c.name]["gb_per_s"]) for r in panel if c.name in r["contenders"]]
            if points:
                x, y = zip(*points)
                limits = {PROBE: ("probe (the memory limit)", "--"), EXACT_PROBE: ("exact probe (the in-cache limit)", ":")}
                if c.name in limits:
                    ax.plot(x, y, label=limits[c.name][0], color="black", linestyle=limits[c.name][1], linewidth=2)
                else:
                    ax.plot(x, y, label=c.name, marker=".")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} {variant}, {threads} thread(s)", fontsize="medium")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("elements")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def machine_info(peers: Peers) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": available_cores(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": getattr(peers.torch, "__version__", None),
            "deepspeed": getattr(peers.deepspeed, "__version__", None)}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadam bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0] + "\n\nSee fastadam/_bench.py's docstring for the method.")
    parser.add_argument("--quick", action="store_true",
                        help=f"a subset for smoke tests: sizes 2^{'/'.join(map(str, QUICK_SIZE_EXPONENTS))}, "
                             f"Adam only, one thread and all, {QUICK_REPEATS} repeats, short samples")
    parser.add_argument("--sizes", type=_parse_exponents, metavar="EXPONENTS",
                        help="exponents k of the 2^k-element single arrays, e.g. 10-26 (the default) or 12,20,24")
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
    parser.add_argument("--threshold", action="store_true",
                        help="instead of the suite, time fastadam on 1 vs 2 threads at 2^10..2^18 elements and "
                             "report where two threads start to win (the serial cut-off's justification)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help=f"where to write all results (default {DEFAULT_JSON}; with --threshold "
                             f"{DEFAULT_THRESHOLD_JSON})")
    parser.add_argument("--plot", type=Path, metavar="PATH", default=DEFAULT_PLOT,
                        help=f"the PNG of GB/s against size, drawn when matplotlib is installed "
                             f"(default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    exponents = args.sizes or (QUICK_SIZE_EXPONENTS if args.quick else DEFAULT_SIZE_EXPONENTS)
    threads = args.threads or (sorted({1, available_cores()}) if args.quick else default_threads())
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    variants = args.variants or (["adam"] if args.quick else list(VARIANTS))
    return Settings(cases=build_cases(args.cases, exponents), dtypes=[np.dtype(d) for d in args.dtype],
                    variants=[VARIANTS[v] for v in variants], threads=threads, repeats=repeats,
                    sample_seconds=QUICK_SAMPLE_SECONDS if args.quick else SAMPLE_SECONDS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite (or, with --threshold, the threshold sweep) with command-line arguments `argv`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    settings = settings_from(args)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    if args.threshold:
        if available_cores() < 2:
            print("fastadam bench --threshold: needs at least two cores", file=sys.stderr)
            return 1
        try:
            sweep = threshold_sweep(settings.dtypes, settings.repeats, settings.sample_seconds)
        except ResultMismatch as e:
            print(f"fastadam bench: wrong result: {e}", file=sys.stderr)
            return 1
        print(format_threshold(sweep))
        path = args.json or DEFAULT_THRESHOLD_JSON
        write_json(path, {"created": created, "machine": machine_info(Peers()), "fastadam": config(),
                          "threshold": sweep})
        print(f"\nwrote {path}")
        return 0

    peers = find_peers()
    everyone = contenders(peers)
    cfg = config()
    print(f"fastadam {cfg['version']} ({cfg['isa']}, OpenMP {cfg['openmp']}); {available_cores()} cores; "
          f"threads {settings.threads}; {settings.repeats} interleaved repeats")
    print(f"contenders: {', '.join(c.name for c in everyone)}")
    print(f"peers: {peers.describe() or 'none'}")
    torch_threads = peers.torch.get_num_threads() if peers.torch is not None else None
    try:
        results = run_suite(settings, peers)
        latency = measure_latency(settings) if any(c.single for c in settings.cases) else None
    except ResultMismatch as e:
        print(f"fastadam bench: wrong result: {e}", file=sys.stderr)
        return 1
    finally:
        if torch_threads is not None:
            peers.torch.set_num_threads(torch_threads)

    print(format_tables(results, everyone))
    if latency is not None:
        print("\n" + format_latency(latency))
    targets = evaluate_targets(results, latency)
    print("\nTargets")
    print("\n".join(t.line() for t in targets))
    disturbed = sum(map(_disturbed, results))
    if disturbed:
        print(f"\n{disturbed} of {len(results)} cases ran while other processes kept over "
              f"{BUSY_NEIGHBOUR_CORES:g} cores busy (marked !): their figures, thread scaling above all, "
              f"are not the kernel's; rerun them on a quiet machine (--sizes, --cases, --threads).")

    path = args.json or DEFAULT_JSON
    write_json(path, {"created": created, "machine": machine_info(peers), "fastadam": cfg,
                      "settings": settings.describe(), "contenders": [c.name for c in everyone],
                      "results": results, "latency": latency,
                      "targets": [t.__dict__ for t in targets]})
    print(f"\nwrote {path}")
    if not args.no_plot and plot(results, everyone, args.plot):
        print(f"wrote {args.plot}")
    return 0
