"""The project's step benchmark: the step against the memory-bandwidth limit, its peers and its targets.

    python benchmarks/bench_step.py [--quick] [--threshold] [--help]

Built on the installed package's ``fastadam._bench`` (the user-facing
``python -m fastadam bench``: the cases, buffers, checks, interleaved timing
and tables), this adds what is the project's own: the peers (a careful NumPy
version with ``out=``, PyTorch's fused and foreach Adam, DeepSpeed's CPU Adam,
when importable), the end-to-end latency of a 4096-element step, the targets
the project holds itself to (printed MET / NOT MET / NO DATA), and the sweep
that justifies the serial cut-off (``--threshold``).  It writes
``benchmarks/results/bench_step.json`` (and a PNG with matplotlib) unless
``--json``/``--plot`` say otherwise.

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
import functools
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from fastadam import config, reference
from fastadam._bench import (
    ADAM_STEP, BETAS, BUILTIN_CONTENDERS, DEFAULT_REPEATS, EPS, FASTADAM, FASTADAM_OPTIMIZER, LR, Bound, Buffers, Contender, ResultMismatch, Settings, Variant, VARIANTS,
    _format_seconds, _row_label, _spread, add_suite_arguments, available_cores, calls_per_sample,
    check_contender, expected_step, format_notes, format_tables, interleaved_samples, machine_info, now,
    run_suite, save_plot, settings_from, write_json,
)
from fastadam._optim import Adam
from fastadam._functional import adam_step

TORCH_FUSED = "torch fused"
DEEPSPEED = "deepspeed"
#: The project's suite runs to 2^26 elements: the largest that keeps a float64
#: AMSGrad case (about 7 GiB with fastadam.Adam's state and the reference's
#: temporaries) inside a 24 GiB machine, the whole suite near a quarter of an hour on two cores.
SIZE_EXPONENTS = tuple(range(10, 27))
#: The threshold sweep: sizes 2^10 .. 2^18 in steps of a half power of two.
THRESHOLD_SIZES = tuple(round(2 ** (k / 2)) for k in range(20, 37))
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "bench_step.json"
DEFAULT_THRESHOLD_JSON = RESULTS / "bench_threshold.json"
DEFAULT_PLOT = RESULTS / "bench_step.png"


def _where(r: dict[str, Any]) -> str:
    return f"{_row_label(r)} {r['dtype']} {r['variant']}, {r['threads']} thread(s)"

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



def contenders(peers: Peers) -> list[Contender]:
    """Every contender this environment can run: the built-in ones, NumPy out=, then PyTorch's and DeepSpeed's."""
    found = list(BUILTIN_CONTENDERS) + [Contender("numpy out=", "np-out", _bind_numpy_out, "bitwise")]
    if peers.torch is not None:
        found += [Contender(TORCH_FUSED, "t-fused", functools.partial(_bind_torch, implementation="fused"), "close"),
                  Contender("torch foreach", "t-foreach", functools.partial(_bind_torch, implementation="foreach"),
                            "close")]
    if peers.deepspeed is not None:
        found.append(Contender(DEEPSPEED, "deepspeed", _bind_deepspeed, "close", _deepspeed_supports))
    return found


def _use_threads(peers: Peers, threads: int) -> None:
    """Run the peers on `threads` threads: torch's setting also governs DeepSpeed's OpenMP loops.

    fastadam gets its count per call, so the OpenMP setting torch changes on
    the way does not matter to it.
    """
    if peers.torch is not None:
        peers.torch.set_num_threads(threads)



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



def _format_size(n: int) -> str:
    k = n.bit_length() - 1
    return f"2^{k}" if n == 1 << k else f"{n:,}"



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



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_step.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n", 1)[0])
    add_suite_arguments(parser, SIZE_EXPONENTS)
    parser.add_argument("--threshold", action="store_true",
                        help="instead of the suite, time fastadam on 1 vs 2 threads at 2^10..2^18 elements and "
                             "report where two threads start to win (the serial cut-off's justification)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help=f"where to write all results (default {DEFAULT_JSON}; with --threshold "
                             f"{DEFAULT_THRESHOLD_JSON})")
    parser.add_argument("--plot", type=Path, metavar="PATH", default=DEFAULT_PLOT,
                        help=f"the PNG, drawn when matplotlib is installed (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite (or, with --threshold, the threshold sweep) with command-line arguments `argv`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from(parser, args, SIZE_EXPONENTS)
    created = now()

    if args.threshold:
        if available_cores() < 2:
            print("bench_step.py --threshold: needs at least two cores", file=sys.stderr)
            return 1
        try:
            sweep = threshold_sweep(settings.dtypes, settings.repeats, settings.sample_seconds)
        except ResultMismatch as e:
            print(f"bench_step.py: wrong result: {e}", file=sys.stderr)
            return 1
        print(format_threshold(sweep))
        path = args.json or DEFAULT_THRESHOLD_JSON
        write_json(path, {"created": created, "machine": machine_info(), "fastadam": config(), "threshold": sweep})
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
        results = run_suite(settings, everyone, functools.partial(_use_threads, peers))
        latency = measure_latency(settings) if any(c.single for c in settings.cases) else None
    except ResultMismatch as e:
        print(f"bench_step.py: wrong result: {e}", file=sys.stderr)
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
    notes = format_notes(results)
    if notes:
        print("\n" + "\n".join(notes))

    machine = machine_info(torch=peers.torch, deepspeed=peers.deepspeed)
    path = args.json or DEFAULT_JSON
    write_json(path, {"created": created, "machine": machine, "fastadam": cfg,
                      "settings": settings.describe(), "contenders": [c.name for c in everyone],
                      "results": results, "latency": latency,
                      "targets": [t.__dict__ for t in targets]})
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(save_plot(results, everyone, args.plot, machine, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
