"""The optimizer step inside real training loops, where it alternates with matrix products.

``bench_step.py`` times the step alone, back to back.  In a training loop each
step follows a forward and backward pass whose matrix products run on a
thread pool of their own (OpenBLAS under NumPy; OpenMP under PyTorch), and
on a machine with few cores the pools' idle workers, still spinning for more
work, can take the cores the next pool needs.  This benchmark runs such loops
and times the step inside them:

* **numpy**: a 3-layer float32 MLP (``d_in -> h -> h -> 10``, ReLU,
  softmax cross-entropy) whose forward and backward passes are NumPy
  matmuls, stepped by ``fastadam.Adam`` with its default thread count
  ("fastadam") and with ``num_threads=1`` ("fastadam 1-thread").
* **torch**: the same MLP as a ``torch.nn.Sequential`` (PyTorch's own
  threads), stepped by fastadam on zero-copy views (``p.detach().numpy()``,
  ``p.grad.numpy()``), default and one thread, and by
  ``torch.optim.Adam(fused=True)`` (``foreach=True`` where fused is refused).

Sizes are parameter counts (``--sizes 1e4,1e5,1e6,1e7``); the hidden width is
chosen to come closest.  Every contender trains its own copy of the model
from the same start on the same batches.  Each repeat runs ``block``
iterations of one contender, then of the next, the order reversed on every
other repeat, so the drift of a shared machine hits them alike; the first
iteration of a block is run untimed, so one contender's pools are not
charged to the next.  ``perf_counter`` brackets the step call alone (for the
torch views, building the gradient list too) and the whole iteration.
Reported: medians over all timed iterations, and ratios as the median of the
per-repeat ratios of block medians with their min and max.

Each mode runs every case: **quiet**, and **busy** with ``--busy N``
processes spinning beside it (a shared machine).  Quiet means no neighbours
of the benchmark's own; what other processes used is measured from
/proc/stat, and a quiet case they kept more than 0.25 cores busy is flagged.
The targets, printed as PASS/FAIL lines (``--check``: exit status 1 on a
FAIL): the default step at most 1.10x the one-thread step on every case;
at least 1.4x faster than it, quiet, from 2^22 parameters on 2 or more
cores; and a fastadam iteration no slower than the PyTorch optimizer's.

After the loops the runs are checked: the default and one-thread models must
be bitwise equal (thread count never changes fastadam's bits), and the torch
models' parameters must have moved through the views.

    python benchmarks/bench_training_loop.py                 # about 5 minutes on 2 cores
    python benchmarks/bench_training_loop.py --quick         # about 30 s
    python benchmarks/bench_training_loop.py --modes quiet --loops numpy --sizes 1e7
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import fastadam

D_IN = 256
D_OUT = 10
LR = 1e-3
DEFAULT_SIZES = (1e4, 1e5, 1e6, 1e7)
#: 4.3e6 parameters are just above 2^22, where the one-thread/default target applies.
QUICK_SIZES = (1e5, 4.3e6)
#: The one-thread/default target only applies where the step has this many elements or more.
LARGE_ELEMENTS = 1 << 22
#: Above this many cores kept busy by others, a "quiet" case is flagged as not quiet.
QUIET_OTHER_CORES = 0.25
TARGET_DEFAULT_OVER_ONE = 1.10
TARGET_ONE_OVER_DEFAULT_LARGE = 1.4
TARGET_FASTADAM_OVER_TORCH = 1.0

FAST = "fastadam"
FAST1 = "fastadam 1-thread"
TORCH = "torch"  # named "torch fused" or "torch foreach" once this PyTorch has said which it takes

#: The environment variables that change how the thread pools wait; printed with the results.
POOL_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS",
                  "MKL_NUM_THREADS", "FASTADAM_ISA")


# -- the machine --------------------------------------------------------------------------------------------


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(torch: Any) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        pools = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version", "filepath")}
                 for p in threadpool_info()]
    except ImportError:
        pools = None
    return {"cpu": cpu, "cores": cores(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "fastadam": fastadam.config(), "threadpools": pools,
            "torch": None if torch is None else torch.__version__,
            "torch_threads": None if torch is None else torch.get_num_threads(),
            "environment": {k: os.environ.get(k) for k in POOL_VARIABLES}}


class OtherLoad:
    """Cores kept busy by other processes (and the hypervisor's steal) while open; None without /proc/stat."""

    def __enter__(self) -> "OtherLoad":
        self.cores: Optional[float] = None
        self._start = (self._busy(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        (busy0, own0, wall0), busy = self._start, self._busy()
        if busy is not None and busy0 is not None:
            other = (busy - busy0) - (time.process_time() - own0)
            self.cores = max(0.0, other / (time.perf_counter() - wall0))

    @staticmethod
    def _busy() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


#: A neighbour stops by itself once its parent is gone, so a benchmark killed
#: with SIGKILL leaves no process spinning.
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"


class BusyNeighbours:
    """``n`` processes each spinning a core's worth of Python while open."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> "BusyNeighbours":
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([sys.executable, "-I", "-c", _SPIN], stdin=subprocess.DEVNULL))
            time.sleep(0.3)  # past the interpreters' start-up, so the first case meets them spinning
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


# -- the models ---------------------------------------------------------------------------------------------


def hidden_for(n_params: float) -> int:
    """The width h whose MLP d_in -> h -> h -> d_out (weights and biases) comes closest to n_params."""
    def count(h: int) -> int:
        return D_IN * h + h + h * h + h + h * D_OUT + D_OUT

    b = D_IN + D_OUT + 2  # count(h) = h^2 + b h + D_OUT
    h = max(1, int((-b + math.sqrt(b * b + 4 * max(n_params - D_OUT, 0))) / 2))
    return min((h, h + 1), key=lambda w: abs(count(w) - n_params))


def make_batches(batch: int, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A few fixed batches, cycled: every contender sees the same sequence, and none is drawn inside the loop."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, D_IN), dtype=np.float32), rng.integers(D_OUT, size=batch))
            for _ in range(n)]


def numpy_init(hidden: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out), dtype=np.float32) * np.float32(math.sqrt(2 / fan_in)))

    return [he(D_IN, hidden), np.zeros(hidden, np.float32), he(hidden, hidden), np.zeros(hidden, np.float32),
            he(hidden, D_OUT), np.zeros(D_OUT, np.float32)]


def numpy_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Forward and backward of the MLP with softmax cross-entropy; the gradients in the order of params."""
    w1, b1, w2, b2, w3, b3 = params
    a1 = x @ w1 + b1
    h1 = np.maximum(a1, 0)
    a2 = h1 @ w2 + b2
    h2 = np.maximum(a2, 0)
    logits = h2 @ w3 + b3
    logits -= logits.max(axis=1, keepdims=True)
    d3 = np.exp(logits)
    d3 /= d3.sum(axis=1, keepdims=True)
    d3[np.arange(len(y)), y] -= 1
    d3 /= np.float32(len(y))
    d2 = d3 @ w3.T
    d2[a2 <= 0] = 0
    d1 = d2 @ w2.T
    d1[a1 <= 0] = 0
    return [x.T @ d1, d1.sum(axis=0), h1.T @ d2, d2.sum(axis=0), h2.T @ d3, d3.sum(axis=0)]


class Contender:
    """One copy of the model, the optimizer stepping it, and the times of its timed iterations."""

    def __init__(self, name: str, iterate: Callable[[tuple[np.ndarray, np.ndarray]], tuple[float, float]],
                 batches: list) -> None:
        self.name, self._iterate, self._batches = name, iterate, batches
        self.done = 0
        self.step_s: list[float] = []
        self.iteration_s: list[float] = []
        self.blocks: list[tuple[float, float]] = []  # (median step, median iteration) of each timed block

    def run(self, n: int, timed: bool = True) -> None:
        steps, iterations = [], []
        for _ in range(n):
            step, iteration = self._iterate(self._batches[self.done % len(self._batches)])
            self.done += 1
            steps.append(step)
            iterations.append(iteration)
        if timed:
            self.step_s += steps
            self.iteration_s += iterations
            self.blocks.append((statistics.median(steps), statistics.median(iterations)))


def numpy_contenders(hidden: int, batches: list, seed: int) -> tuple[list[Contender], list[list[np.ndarray]]]:
    start = numpy_init(hidden, seed)
    contenders, models = [], []
    for name, threads in ((FAST, None), (FAST1, 1)):
        params = [p.copy() for p in start]
        opt = fastadam.Adam(params, lr=LR, num_threads=threads)

        def iterate(batch, params=params, opt=opt) -> tuple[float, float]:
            t0 = time.perf_counter()
            grads = numpy_grads(params, *batch)
            t1 = time.perf_counter()
            opt.step(grads)
            t2 = time.perf_counter()
            return t2 - t1, t2 - t0

        contenders.append(Contender(name, iterate, batches))
        models.append(params)
    return contenders, models


def torch_optimizer(torch: Any, params: list) -> tuple[Any, str]:
    """torch.optim.Adam fused, or foreach where this PyTorch refuses fused on the CPU."""
    try:
        return torch.optim.Adam(params, lr=LR, fused=True), "torch fused"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=LR, foreach=True), "torch foreach"


def torch_contenders(torch: Any, hidden: int, batches: list, seed: int) -> tuple[list[Contender], list, dict]:
    torch.manual_seed(seed)
    first = torch.nn.Sequential(torch.nn.Linear(D_IN, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, D_OUT))
    start = {k: v.clone() for k, v in first.state_dict().items()}
    torch_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    loss_fn = torch.nn.functional.cross_entropy
    contenders, models, shares = [], [], True
    for name in (FAST, FAST1, TORCH):
        model = first if name == FAST else copy.deepcopy(first)
        params = list(model.parameters())
        if name == TORCH:
            opt, name = torch_optimizer(torch, params)

            def step(opt=opt) -> None:
                opt.step()
        else:
            views = [p.detach().numpy() for p in params]
            shares = shares and all(v.ctypes.data == p.data_ptr() for v, p in zip(views, params))
            opt = fastadam.Adam(views, lr=LR, num_threads=1 if name == FAST1 else None)

            def step(params=params, opt=opt) -> None:
                opt.step([p.grad.numpy() for p in params])

        def iterate(batch, model=model, step=step) -> tuple[float, float]:
            t0 = time.perf_counter()
            model.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            return t2 - t1, t2 - t0

        contenders.append(Contender(name, iterate, torch_batches))
        models.append(model)
    return contenders, models, {"start": start, "views_share_memory": shares}


# -- running a case -----------------------------------------------------------------------------------------


def interleave(contenders: list[Contender], repeats: int, seconds: float, min_block: int) -> list[int]:
    """Warm up, then run the repeats, each block sized to last about its share of ``seconds``.

    Every contender runs the same number of iterations in a repeat (so the
    per-repeat ratios compare like with like, and all end at the same
    iteration), but a block's length is re-estimated from the slowest
    contender of the previous repeat: on a shared machine an iteration can
    become many times slower than it was when first measured.  Past three
    times the budget, the repeats stop once both orders have run.  Returns
    the block lengths.
    """
    for c in contenders:
        c.run(1, timed=False)  # the optimizer's state, PyTorch's first-call set-up, the pools' start
    estimate = 0.0
    for c in contenders:
        t0 = time.perf_counter()
        c.run(1, timed=False)
        estimate = max(estimate, time.perf_counter() - t0)
    per_block = seconds / (repeats * len(contenders))
    deadline = time.perf_counter() + 3 * seconds
    blocks: list[int] = []
    for r in range(repeats):
        block = int(min(200, max(min_block, per_block / estimate - 1)))
        for c in (contenders if r % 2 == 0 else contenders[::-1]):
            c.run(1, timed=False)  # what the previous contender's threads left behind is not this one's cost
            c.run(block)
        blocks.append(block)
        estimate = max(c.blocks[-1][1] for c in contenders)
        if r >= 1 and time.perf_counter() > deadline:
            break
    return blocks


def spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale}


def block_ratios(a: Contender, b: Contender, which: int) -> dict[str, float]:
    return spread([x[which] / y[which] for x, y in zip(a.blocks, b.blocks)])


def bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(a, b))


def run_case(loop: str, label: str, n_params: float, args: argparse.Namespace, torch: Any) -> dict[str, Any]:
    hidden = hidden_for(n_params)
    batches = make_batches(args.batch, 4, args.seed)
    if loop == "numpy":
        contenders, models = numpy_contenders(hidden, batches, args.seed)
        arrays = models[0]
    else:
        contenders, models, extra = torch_contenders(torch, hidden, batches, args.seed)
        arrays = [p.detach().numpy() for p in models[0].parameters()]
    gc.collect()
    gc.disable()  # a collection inside one contender's block would be charged to it alone
    try:
        with OtherLoad() as other:
            blocks = interleave(contenders, args.repeats, args.seconds, 2 if args.quick else 3)
    finally:
        gc.enable()

    fast, fast1 = contenders[0], contenders[1]
    result: dict[str, Any] = {
        "loop": loop, "label": label, "hidden": hidden, "layers": [D_IN, hidden, hidden, D_OUT], "batch": args.batch,
        "params": sum(a.size for a in arrays), "arrays": len(arrays), "largest_array": max(a.size for a in arrays),
        "repeats": len(blocks), "blocks": blocks, "iterations_per_contender": fast.done,
        "other_load_cores": other.cores,
        # The block medians show a shared machine's moods: a case can switch between fast and slow states.
        "contenders": {c.name: {"step_us": spread(c.step_s, 1e6), "iteration_us": spread(c.iteration_s, 1e6),
                                "block_medians_us": [[s * 1e6, i * 1e6] for s, i in c.blocks]}
                       for c in contenders},
        "ratios": {"step_default_over_one_thread": block_ratios(fast, fast1, 0),
                   "iteration_default_over_one_thread": block_ratios(fast, fast1, 1)},
    }
    if loop == "numpy":
        result["checks"] = {"default_equals_one_thread_bitwise": bitwise_equal(models[0], models[1]),
                            "finite": all(np.isfinite(p).all() for m in models for p in m)}
    else:
        result["torch_optimizer"] = contenders[2].name
        result["ratios"]["iteration_default_over_torch"] = block_ratios(fast, contenders[2], 1)
        final = [[p.detach().numpy() for p in m.parameters()] for m in models]
        start = [t.numpy() for t in extra["start"].values()]
        scale = max(float(np.abs(p).max()) for p in start)
        result["checks"] = {
            "default_equals_one_thread_bitwise": bitwise_equal(final[0], final[1]),
            "views_share_memory": extra["views_share_memory"],
            "params_changed": [not bitwise_equal(f, start) for f in final],
            "finite": all(np.isfinite(p).all() for m in final for p in m),
            # Rounding differs from PyTorch's, so only near: a wiring mistake would show as a large gap.
            "max_difference_to_torch_over_largest_param": max(float(np.abs(a - b).max())
                                                              for a, b in zip(final[0], final[2])) / scale,
        }
    return result


# -- targets and report -------------------------------------------------------------------------------------


def targets(mode: str, case: dict[str, Any], n_cores: int) -> list[dict[str, Any]]:
    where = f"{mode:5} {case['loop']:5} {case['label']:>5}"
    step = case["ratios"]["step_default_over_one_thread"]["median"]
    found = [{"where": where, "what": f"default step <= {TARGET_DEFAULT_OVER_ONE:.2f} x one-thread step",
              "value": step, "passed": step <= TARGET_DEFAULT_OVER_ONE}]
    if mode == "quiet" and case["params"] >= LARGE_ELEMENTS and n_cores >= 2:
        found.append({"where": where,
                      "what": f"one-thread step / default step >= {TARGET_ONE_OVER_DEFAULT_LARGE} (>= 2^22 elements)",
                      "value": 1 / step, "passed": 1 / step >= TARGET_ONE_OVER_DEFAULT_LARGE})
    if case["loop"] == "torch":
        it = case["ratios"]["iteration_default_over_torch"]["median"]
        found.append({"where": where, "what": f"fastadam iteration <= {case['torch_optimizer']} iteration",
                      "value": it, "passed": it <= TARGET_FASTADAM_OVER_TORCH})
    return found


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def print_case(case: dict[str, Any]) -> None:
    h = case["hidden"]
    print(f"{case['loop']} {case['label']}: MLP {D_IN}->{h}->{h}->{D_OUT}, {case['params']:,} params "
          f"(largest array {case['largest_array']:,}), batch {case['batch']}, "
          f"{case['repeats']} repeats of {'/'.join(map(str, case['blocks']))} iterations; other load "
          + ("?" if case["other_load_cores"] is None else f"{case['other_load_cores']:.2f} cores"))
    print(f"  {'contender':<18} {'step us':>10} {'iteration us':>13} {'step share':>11}")
    for name, c in case["contenders"].items():
        s, i = c["step_us"]["median"], c["iteration_us"]["median"]
        print(f"  {name:<18} {s:10.1f} {i:13.1f} {s / i:11.0%}")
    r = case["ratios"]
    line = (f"  default/1-thread: step {_ratio(r['step_default_over_one_thread'])}, "
            f"iteration {_ratio(r['iteration_default_over_one_thread'])}")
    if "iteration_default_over_torch" in r:
        line += f"; fastadam/{case['torch_optimizer']} iteration {_ratio(r['iteration_default_over_torch'])}"
    print(line)
    bad = [k for k, v in case["checks"].items()
           if v is False or (isinstance(v, list) and not all(v))]
    if bad:
        print(f"  CHECK FAILED: {', '.join(bad)}")


def checks_passed(case: dict[str, Any]) -> bool:
    c = case["checks"]
    return (c["default_equals_one_thread_bitwise"] and c["finite"] and c.get("views_share_memory", True)
            and all(c.get("params_changed", [True])) and c.get("max_difference_to_torch_over_largest_param", 0) < 1e-2)


# -- command line -------------------------------------------------------------------------------------------


def size_label(n: float) -> str:
    """1e5 for 100000, 4.3e6 for 4300000: the figures' labels."""
    exponent = int(math.floor(math.log10(n)))
    return f"{n / 10 ** exponent:.3g}e{exponent}"


def parse_sizes(text: str) -> list[tuple[str, float]]:
    try:
        sizes = [(size_label(float(s)), float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected parameter counts like 1e4,1e5, got {text!r}") from None
    if not sizes or any(not 100 <= n <= 1e9 for _, n in sizes):
        raise argparse.ArgumentTypeError(f"parameter counts must lie in 100..1e9, got {text!r}")
    return sizes


def parse_choices(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items or any(s not in choices for s in items):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items
    return parse


def at_least(kind: type, lowest: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time fastadam's step inside NumPy and PyTorch training loops, default threads against one "
                    "thread (and PyTorch's fused Adam), on a quiet machine and beside busy processes.",
        epilog="Exit status 0 whatever the figures (it is a measurement); with --check, 1 if a target or a "
               "correctness check fails.")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {','.join(map(size_label, QUICK_SIZES))}, 2 repeats, 1 s per case "
                             "(about 30 s)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="parameter counts of the models (default: 1e4,1e5,1e6,1e7)")
    parser.add_argument("--loops", type=parse_choices(("numpy", "torch")), default=["numpy", "torch"],
                        help="which loops (default: numpy,torch; torch is skipped when it cannot be imported)")
    parser.add_argument("--modes", type=parse_choices(("quiet", "busy")), default=["quiet", "busy"],
                        help="quiet, and/or busy beside --busy spinning processes (default: both)")
    parser.add_argument("--busy", type=at_least(int, 0), default=max(1, cores() // 2),
                        help="busy neighbour processes in busy mode (default: half the cores, at least 1: "
                             "%(default)s here)")
    parser.add_argument("--repeats", type=at_least(int, 1), default=None,
                        help="interleaved repeats per case (default 6; 2 with --quick)")
    parser.add_argument("--seconds", type=at_least(float, 0.001), default=None,
                        help="timed seconds per case, all contenders together (default 7; 1 with --quick)")
    parser.add_argument("--batch", type=at_least(int, 1), default=32, help="examples per batch (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_training_loop.json"),
                        help="where to write the results (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a target or check fails")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sizes is None:
        args.sizes = [(size_label(n), n) for n in (QUICK_SIZES if args.quick else DEFAULT_SIZES)]
    args.repeats = args.repeats or (2 if args.quick else 6)
    args.seconds = args.seconds or (1.0 if args.quick else 7.0)
    if args.busy == 0 and "busy" in args.modes:
        print("note: --busy 0: the busy mode would be the quiet one; skipped")
        args.modes = [m for m in args.modes if m != "busy"] or ["quiet"]
    torch = None
    if "torch" in args.loops:
        try:
            import torch
        except ImportError as e:
            print(f"note: torch cannot be imported ({e}); the torch loop is skipped")
            args.loops = [loop for loop in args.loops if loop != "torch"]

    machine = machine_info(torch)
    fa = machine["fastadam"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; fastadam {fa['version']} isa {fa['isa']}, "
          f"threads {fa['num_threads']} (max {fa['max_threads']}), openmp {fa['openmp']}; numpy {np.__version__}"
          + (f"; torch {torch.__version__}, {torch.get_num_threads()} threads" if torch else ""))
    for p in machine["threadpools"] or []:
        print(f"  pool: {p['internal_api']} {p['version'] or ''} {p['num_threads']} threads "
              f"({Path(p['filepath']).name})")
    if machine["threadpools"] is None:
        print("  pools: threadpoolctl is not installed")
    set_vars = {k: v for k, v in machine["environment"].items() if v is not None}
    print(f"  environment: {' '.join(f'{k}={v}' for k, v in set_vars.items()) or 'no pool variables set'}")

    runs, found = [], []
    for mode in args.modes:
        n_busy = args.busy if mode == "busy" else 0
        print(f"\n== {mode}" + (f": {n_busy} busy neighbour process(es)" if n_busy else "") + " ==")
        with BusyNeighbours(n_busy) as neighbours:
            cases = []
            for loop in args.loops:
                for label, n in args.sizes:
                    case = run_case(loop, label, n, args, torch)
                    print_case(case)
                    cases.append(case)
                    found += targets(mode, case, machine["cores"])
                    if mode == "quiet" and (case["other_load_cores"] or 0) > QUIET_OTHER_CORES:
                        print(f"  note: not quiet: other processes kept {case['other_load_cores']:.2f} cores busy")
        runs.append({"mode": mode, "busy_processes": n_busy, "busy_pids": neighbours.pids, "cases": cases})

    print("\ntargets:")
    for t in found:
        print(f"  {'PASS' if t['passed'] else 'FAIL'}  {t['where']}  {t['what']}: {t['value']:.3f}")
    checks_ok = all(checks_passed(c) for r in runs for c in r["cases"])
    print(f"checks (bitwise default = one thread, parameters moved through the views): "
          f"{'all passed' if checks_ok else 'FAILED'}")
    if torch is not None:  # PyTorch's pools show up once it has run
        machine["threadpools_after_torch"] = machine_info(torch)["threadpools"]
    document = {"benchmark": "training_loop", "argv": sys.argv if argv is None else argv,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
                "settings": {"sizes": [label for label, _ in args.sizes], "loops": args.loops, "modes": args.modes,
                             "busy": args.busy, "repeats": args.repeats, "seconds": args.seconds,
                             "batch": args.batch, "seed": args.seed, "lr": LR},
                "runs": runs, "targets": found, "targets_passed": all(t["passed"] for t in found),
                "checks_passed": checks_ok}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    print(f"results: {args.json}")
    if not checks_ok:
        return 1  # a contender computed the wrong thing: its figures mean nothing
    return 1 if args.check and not document["targets_passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
