"""The ``python -m fastadam train`` demo: one network, two optimizers, identical results.

A small multilayer perceptron, written in plain NumPy, is trained on
scikit-learn's bundled handwritten digits (or, without scikit-learn, on a
generated data set).  Two copies of the network start from the same weights
and see the same mini-batches; one is stepped by :class:`fastadam.Adam`, the
other by :func:`fastadam.reference.adam_step`, the plain-NumPy specification.
fastadam's numerics contract says the two produce bitwise-identical
parameters, so the copies must report identical losses and accuracies at
every epoch; the demo checks that after every step and exits with status 1 if
the parameters ever differ.  It also times the optimizer step of each copy.

With ``--state-dtype`` it instead compares ways of storing Adam's moments
(issue 10's accuracy check): one copy of the network per storage (float32,
bfloat16, int8 or int4 -- 8-bit or 4-bit block-wise state -- or a pair such as
``bfloat16/float32`` for exp_avg/exp_avg_sq), all
from the same weights and batches, each stepped by fastadam.Adam and checked
bitwise against the reference with the same storage, then the final test
accuracies side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import Adam, config, get_num_threads, reference, show_config
from .reference import moment_map, zero_state

DTYPE = np.float32
N_CLASSES = 10
TEST_FRACTION = 0.2
# The data set and its train/test split are fixed, whatever --seed says, so
# that runs with different seeds differ only in initialisation and batch order.
DATA_SEED = 20240601


# -- data -----------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A standardised classification problem, split into train and test sets."""

    description: str
    x_train: np.ndarray  # (n_train, n_features), DTYPE
    y_train: np.ndarray  # (n_train,), int64 class labels
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits shipped with scikit-learn (no download).

    Raises ImportError when scikit-learn is not installed.
    """
    from sklearn.datasets import load_digits  # optional dependency: imported only when used

    digits = load_digits()
    return digits.data, digits.target


def make_synthetic_raw(n_samples: int = 1797, n_features: int = 64, blobs_per_class: int = 3,
                       spread: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed 10-class problem: a mixture of Gaussian blobs, several per class.

    Each class is the union of ``blobs_per_class`` unit-variance Gaussian blobs
    with randomly placed centres, so the classes are not linearly separable
    and the hidden layer has something to do.  The default size and width
    match the digits (1797 samples, 64 features); ``spread`` scales the
    distance between centres and so how much the blobs overlap.
    """
    rng = np.random.default_rng(DATA_SEED)
    centres = spread * rng.standard_normal((N_CLASSES * blobs_per_class, n_features))
    blob = rng.integers(len(centres), size=n_samples)
    x = centres[blob] + rng.standard_normal((n_samples, n_features))
    return x, blob % N_CLASSES  # blob k belongs to class k mod 10


def split_and_standardise(x: np.ndarray, y: np.ndarray, description: str) -> Dataset:
    """Shuffle into a fixed train/test split and standardise with the training statistics.

    The mean and standard deviation come from the training set only, so no
    information about the test set leaks into training.
    """
    rng = np.random.default_rng(DATA_SEED)
    order = rng.permutation(len(x))
    n_test = int(round(TEST_FRACTION * len(x)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # some digit pixels are always blank: leave those columns at zero

    def standardise(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(DTYPE)

    return Dataset(description, standardise(x[train]), y[train].astype(np.int64),
                   standardise(x[test]), y[test].astype(np.int64))


def load_dataset(name: Optional[str]) -> Dataset:
    """Load ``"digits"`` or ``"synthetic"``; ``None`` means the digits if scikit-learn can be imported."""
    if name in (None, "digits"):
        try:
            x, y = load_digits_raw()
        except ImportError as e:
            if name == "digits":
                raise SystemExit(f"error: --dataset digits needs scikit-learn ({e}); "
                                 "install it or use --dataset synthetic") from None
            print(f"note: scikit-learn could not be imported ({e}); training on the synthetic data set instead",
                  file=sys.stderr)
        else:
            return split_and_standardise(x, y, "scikit-learn handwritten digits (8x8 images, 10 classes)")
    x, y = make_synthetic_raw()
    return split_and_standardise(x, y, "synthetic: fixed-seed Gaussian blobs, 3 per class, 10 classes")


# -- the network ----------------------------------------------------------------------------------------------
#
# The parameters are the list [W1, b1, W2, b2] of a 2-layer perceptron
#     logits = relu(x @ W1 + b1) @ W2 + b2
# and every gradient list is in the same order, as the optimizers expect.


def init_params(n_in: int, n_hidden: int, n_out: int, rng: np.random.Generator) -> list[np.ndarray]:
    """He-initialised weights (normal, variance 2 / fan_in) and zero biases, all DTYPE."""
    def he(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(DTYPE)

    return [he(n_in, n_hidden), np.zeros(n_hidden, DTYPE), he(n_hidden, n_out), np.zeros(n_out, DTYPE)]


def forward(params: Sequence[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """The logits for a batch, and what :func:`backward` needs from the forward pass."""
    w1, b1, w2, b2 = params
    hidden_pre = x @ w1 + b1
    hidden = np.maximum(hidden_pre, 0)
    logits = hidden @ w2 + b2
    return logits, (x, hidden_pre, hidden)


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean cross-entropy of ``softmax(logits)`` against labels ``y``, and its gradient.

    Subtracting each row's maximum before exponentiating changes nothing
    mathematically but keeps ``exp`` from overflowing; working with
    log-probabilities avoids taking ``log`` of a probability that underflowed
    to zero.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    loss = -log_probs[rows, y].mean()
    # d loss / d logits = (softmax - one_hot) / batch_size
    dlogits = np.exp(log_probs)
    dlogits[rows, y] -= 1
    dlogits /= len(y)
    return float(loss), dlogits


def backward(params: Sequence[np.ndarray], cache: tuple, dlogits: np.ndarray) -> list[np.ndarray]:
    """The gradients ``[dW1, db1, dW2, db2]`` of the loss, given its gradient w.r.t. the logits."""
    _, _, w2, _ = params
    x, hidden_pre, hidden = cache
    dw2 = hidden.T @ dlogits
    db2 = dlogits.sum(axis=0)
    dhidden = dlogits @ w2.T
    dhidden[hidden_pre <= 0] = 0  # ReLU passes gradient only where it was active
    dw1 = x.T @ dhidden
    db1 = dhidden.sum(axis=0)
    return [dw1, db1, dw2, db2]


def accuracy(params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of ``x`` classified correctly."""
    logits, _ = forward(params, x)
    return float((logits.argmax(axis=1) == y).mean())


# -- the two optimizers ---------------------------------------------------------------------------------------


class ReferenceAdam:
    """Adam through :func:`fastadam.reference.adam_step`, keeping the state the reference leaves to its caller."""

    def __init__(self, params: list[np.ndarray], lr: float, betas: tuple[float, float], eps: float,
                 moment_dtypes: Optional[tuple[np.dtype, np.dtype]] = None) -> None:
        """``moment_dtypes``: how (exp_avg, exp_avg_sq) are stored, for every param -- a dtype, or ``"int8"``
        / ``"int4"`` for 8-bit / 4-bit block-wise state (fastadam.Adam's maps); default: the param's dtype."""
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        m_dtype, v_dtype = moment_dtypes or (None, None)
        self.exp_avgs = [zero_moment(p, m_dtype, signed=True) for p in params]
        self.exp_avg_sqs = [zero_moment(p, v_dtype, signed=False) for p in params]
        self.steps = 0

    def step(self, grads: Sequence[np.ndarray]) -> None:
        self.steps += 1  # the reference numbers steps from 1 (it sets the bias corrections)
        reference.adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, step=self.steps, lr=self.lr,
                            betas=self.betas, eps=self.eps)


def zero_moment(p: np.ndarray, storage: Union[np.dtype, str, None], signed: bool) -> Any:
    """A zero moment of param ``p``: an array of ``storage`` (default p's dtype), or for ``"int8"`` / ``"int4"``
    block-wise state of zeros (absmax 0) over fastadam.Adam's map for the moment."""
    if storage not in ("int8", "int4"):
        return np.zeros_like(p, dtype=storage)
    return zero_state(p.shape, moment_map(signed, 8 if storage == "int8" else 4))


def storage_of(state: dict[str, np.ndarray], key: str) -> Union[np.dtype, str]:
    """How fastadam.Adam stores a param's moment ``key``: its dtype, "int8" or "int4"."""
    if key + "_codes" in state:
        return "int4" if state[key + "_map"].size == 16 else "int8"
    return state[key].dtype


@dataclass
class Replica:
    """One copy of the network, the step function that updates it, and its timers."""

    name: str
    params: list[np.ndarray]
    step: Callable[[Sequence[np.ndarray]], None]
    step_seconds: float = 0.0  # time inside the optimizer step only
    train_seconds: float = 0.0  # forward + backward + step

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        """One training step on a batch; returns the batch's loss before the step."""
        start = time.perf_counter()
        logits, cache = forward(self.params, x)
        loss, dlogits = softmax_cross_entropy(logits, y)
        grads = backward(self.params, cache, dlogits)
        before_step = time.perf_counter()
        self.step(grads)
        end = time.perf_counter()
        self.step_seconds += end - before_step
        self.train_seconds += end - start
        return loss


def bitwise_equal(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """Whether two lists of float arrays hold the same bits.

    Comparing the raw bits, not the values, tells -0.0 from 0.0 and counts
    NaNs with the same payload as equal, which ``==`` would not.
    """
    return all(x.shape == y.shape and x.dtype == y.dtype
               and np.array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")) for x, y in zip(a, b))


def warm_up(lr: float, betas: tuple[float, float], eps: float) -> None:
    """Run both step functions once on scratch arrays, so one-time costs stay out of the timings.

    The first fastadam step starts its thread pool; this keeps that (and
    NumPy's first-call overheads) from being charged to either copy.
    """
    scratch = [np.zeros(1 << 16, DTYPE), np.zeros(16, DTYPE)]
    grads = [np.ones_like(p) for p in scratch]
    Adam([p.copy() for p in scratch], lr=lr, betas=betas, eps=eps).step(grads)
    ReferenceAdam([p.copy() for p in scratch], lr, betas, eps).step(grads)


# -- the command ----------------------------------------------------------------------------------------------


def _positive(kind: type) -> Callable[[str], object]:
    """An argparse ``type`` that converts with ``kind`` and rejects values that are not > 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The options of the ``train`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a small NumPy MLP twice side by side, once stepped by fastadam.Adam and once by the "
                    "NumPy reference fastadam.reference.adam_step, check that both stay bitwise identical, "
                    "and time the optimizer steps.",
        epilog="Other command: 'python -m fastadam bench [--quick] [--out DIR]' times the step on this machine.")
    parser.add_argument("--epochs", type=_positive(int), default=15,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive(int), default=64,
                        help="examples per mini-batch (default: %(default)s)")
    parser.add_argument("--hidden", type=_positive(int), default=128,
                        help="hidden units; a larger layer (e.g. 2048) makes the optimizer's share of the "
                             "training time, and fastadam's multi-threading, visible (default: %(default)s)")
    parser.add_argument("--lr", type=_positive(float), default=1e-3,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and the batch order (default: %(default)s)")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default=None,
                        help="the data (default: digits when scikit-learn is installed, else synthetic)")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="the most threads fastadam's step may use (default: fastadam's own default)")
    parser.add_argument("--state-dtype", type=_storages, nargs="+", default=None, metavar="STORAGE[,STORAGE...]",
                        help="instead of the comparison with the reference, train one copy per storage of the "
                             "moments side by side and compare their test accuracy: float32, bfloat16, int8, int4 "
                             "(8-bit or 4-bit block-wise state), or "
                             "M/V for exp_avg and exp_avg_sq stored differently (e.g. bfloat16/float32); "
                             "several separated by commas or spaces, e.g. --state-dtype float32,bfloat16. "
                             "bfloat16 needs ml_dtypes")
    return parser


#: The storages of a moment that fastadam.Adam's state_dtype accepts.
MOMENT_STORAGES = ("float32", "bfloat16", "int8", "int4")
#: Issue 10's accuracy target: final test accuracy with compressed moments within this many points of float32.
TARGET_POINTS = 0.5


def _storages(text: str) -> list[tuple[str, str]]:
    """An argparse ``type``: ``"float32,bfloat16/float32"`` -> ``[("float32", "float32"), ("bfloat16", "float32")]``.

    Each storage is a pair (exp_avg's, exp_avg_sq's), as fastadam.Adam's
    ``state_dtype`` takes it; a single name stands for both moments.
    """
    storages = []
    for item in text.split(","):
        names = item.strip().split("/")
        if len(names) not in (1, 2) or any(name not in MOMENT_STORAGES for name in names):
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not a storage: use {' or '.join(MOMENT_STORAGES)}, or M/V with each of them "
                "(exp_avg's/exp_avg_sq's storage)")
        storages.append((names[0], names[-1]))
    return storages


def storage_label(storage: tuple[str, str]) -> str:
    """``("bfloat16", "bfloat16")`` -> ``"bfloat16"``; ``("bfloat16", "float32")`` -> ``"bfloat16/float32"``."""
    return storage[0] if storage[0] == storage[1] else "/".join(storage)


def train(args: argparse.Namespace) -> int:
    """Run the side-by-side training; returns the exit status (1 if the copies ever differed)."""
    data = load_dataset(args.dataset)
    betas, eps = (0.9, 0.999), 1e-8
    rng = np.random.default_rng(args.seed)
    initial = init_params(data.n_features, args.hidden, N_CLASSES, rng)

    fast_params = [p.copy() for p in initial]
    ref_params = [p.copy() for p in initial]
    fast_opt = Adam(fast_params, lr=args.lr, betas=betas, eps=eps, num_threads=args.threads)
    fast = Replica("fastadam.Adam", fast_params, fast_opt.step)
    ref = Replica("reference.adam_step", ref_params, ReferenceAdam(ref_params, args.lr, betas, eps).step)
    warm_up(args.lr, betas, eps)

    n_train = len(data.x_train)
    n_params = sum(p.size for p in initial)
    print(f"data:      {data.description}; {n_train} train / {len(data.x_test)} test examples")
    print(f"network:   {data.n_features} -> {args.hidden} (ReLU) -> {N_CLASSES} (softmax), float32, "
          f"{n_params:,} parameters in {len(initial)} arrays")
    threshold = config()["parallel_threshold_elements"][np.dtype(DTYPE).name]
    max_threads = args.threads or get_num_threads()
    threads = (f"1 ({n_params:,} < {threshold:,} elements run on the calling thread)" if n_params < threshold
               else "1" if max_threads == 1 else f"up to {max_threads}")
    print(f"training:  Adam lr={args.lr:g} betas={betas} eps={eps:g}, batch size {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}")
    print(f"fastadam:  threads per step: {threads}")
    print()
    print("         |     fastadam.Adam      |  reference.adam_step   |")
    print("  epoch  | train loss   test acc  | train loss   test acc  | bitwise equal")

    first_difference: Optional[str] = None
    steps = 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(n_train)  # both copies see the same batches in the same order
        loss_sums = {fast.name: 0.0, ref.name: 0.0}
        epoch_equal = True
        for start in range(0, n_train, args.batch_size):
            batch = order[start:start + args.batch_size]
            x, y = data.x_train[batch], data.y_train[batch]
            for replica in (fast, ref):
                loss_sums[replica.name] += replica.train_batch(x, y) * len(batch)
            steps += 1
            if not bitwise_equal(fast.params, ref.params):
                epoch_equal = False
                if first_difference is None:
                    worst = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in
                                zip(fast.params, ref.params))
                    first_difference = f"epoch {epoch}, step {steps}: max |difference| {worst:.3g}"
        losses = [loss_sums[r.name] / n_train for r in (fast, ref)]
        accs = [accuracy(r.params, data.x_test, data.y_test) for r in (fast, ref)]
        equal = epoch_equal and losses[0] == losses[1] and accs[0] == accs[1]
        print(f"  {epoch:5d}  |  {losses[0]:.7f}   {accs[0]:7.2%}  |  {losses[1]:.7f}   {accs[1]:7.2%}  | "
              f"{'yes' if equal else 'NO'}")

    print()
    print(f"time in the optimizer step ({steps} steps of {n_params:,} parameters; perf_counter around each call):")
    for r in (fast, ref):
        print(f"  {r.name:<20} {r.step_seconds:8.4f} s  {r.step_seconds / steps * 1e6:8.1f} us/step  "
              f"{r.step_seconds / r.train_seconds:6.1%} of this copy's training time")
    print(f"  ratio reference / fastadam: {ref.step_seconds / fast.step_seconds:.1f}x")
    if fast.step_seconds > ref.step_seconds:
        # On a machine busy with other processes, both copies' times are mostly waiting for a core.
        print("  note: fastadam was the slower one here; the machine may be busy with other work "
              "(compare with --threads 1)")
    print()
    show_config()

    if first_difference is not None:
        print(f"\nerror: the parameters stopped being bitwise equal at {first_difference}; "
              "this breaks fastadam's numerics contract", file=sys.stderr)
        return 1
    return 0


def moment_dtype(name: str) -> Union[np.dtype, str]:
    """The NumPy dtype of a moment storage's name (bfloat16 from ml_dtypes: NumPy has none); "int8" stays
    "int8", 8-bit block-wise state."""
    if name == "float32":
        return np.dtype(DTYPE)
    if name in ("int8", "int4"):
        return name
    try:
        import ml_dtypes  # optional dependency: imported only when used
    except ImportError as e:
        raise SystemExit(f"error: --state-dtype {name} needs ml_dtypes ({e}); pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


@dataclass
class StorageRun:
    """One storage of the moments: the copy fastadam.Adam steps, its reference twin, and their history."""

    label: str
    fast: Replica
    ref: Replica
    moment_bytes: int
    losses: list[float]
    accuracies: list[float]


def compare_storages(args: argparse.Namespace, storages: Sequence[tuple[str, str]]) -> int:
    """Train one copy of the network per moment storage, side by side; returns the exit status.

    Every copy starts from the same weights and sees the same batches, so the
    copies differ only in how their moments are stored.  Each copy is also
    checked, after every step, against a twin stepped by the reference with
    the same storage (status 1 if they ever differ).  The final accuracies are
    reported against float32's (issue 10's target: within 0.5 points); that
    is a measurement, not a check: one seed, and on the digits' 359 test
    examples one example is 0.28 points.
    """
    data = load_dataset(args.dataset)
    betas, eps = (0.9, 0.999), 1e-8
    rng = np.random.default_rng(args.seed)
    initial = init_params(data.n_features, args.hidden, N_CLASSES, rng)

    runs = []
    for storage in storages:
        label = storage_label(storage)
        dtypes = (moment_dtype(storage[0]), moment_dtype(storage[1]))
        fast_params = [p.copy() for p in initial]
        ref_params = [p.copy() for p in initial]
        # min_compressed_size=0: every param stores its moments as named.  The default (4096, as
        # bitsandbytes) would keep the small arrays (the biases, W2 at 128 hidden units) in float32.
        optimizer = Adam(fast_params, lr=args.lr, betas=betas, eps=eps, num_threads=args.threads,
                         state_dtype=storage, min_compressed_size=0)
        stored = {(storage_of(s, "exp_avg"), storage_of(s, "exp_avg_sq")) for s in optimizer.state}
        if stored != {dtypes}:
            print(f"error: fastadam.Adam(state_dtype={storage!r}, min_compressed_size=0) stored its moments as "
                  f"{sorted(map(str, stored))}, not {dtypes}", file=sys.stderr)
            return 1
        # Every array of the moments, each shared 8-bit map once.
        moment_bytes = sum(a.nbytes for a in {id(a): a for s in optimizer.state for key, a in s.items()
                                              if key.startswith("exp_avg")}.values())
        runs.append(StorageRun(
            label, Replica(f"fastadam.Adam {label}", fast_params, optimizer.step),
            Replica(f"reference {label}", ref_params, ReferenceAdam(ref_params, args.lr, betas, eps, dtypes).step),
            moment_bytes, [], []))

    n_train = len(data.x_train)
    n_params = sum(p.size for p in initial)
    print(f"data:      {data.description}; {n_train} train / {len(data.x_test)} test examples")
    print(f"network:   {data.n_features} -> {args.hidden} (ReLU) -> {N_CLASSES} (softmax), float32, "
          f"{n_params:,} parameters in {len(initial)} arrays ({', '.join(f'{p.size:,}' for p in initial)} elements)")
    print(f"training:  Adam lr={args.lr:g} betas={betas} eps={eps:g}, batch size {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}; every copy from the same weights and batches")
    print(f"moments:   stored as {', '.join(r.label for r in runs)} (a pair is exp_avg/exp_avg_sq), with "
          "min_compressed_size=0: every param is compressed, the small ones too")
    print("checked:   each copy (fastadam.Adam) bitwise against a twin stepped by fastadam.reference.adam_step "
          "with the same storage, after every step")
    print()
    print("         |" + "".join(f"{r.label + ' moments':^24}|" for r in runs))
    print("  epoch  |" + " train loss   test acc  |" * len(runs) + " bitwise equal to reference")

    first_difference: Optional[str] = None
    steps = 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(n_train)  # every copy sees the same batches in the same order
        loss_sums = [0.0] * len(runs)
        epoch_equal = True
        for start in range(0, n_train, args.batch_size):
            batch = order[start:start + args.batch_size]
            x, y = data.x_train[batch], data.y_train[batch]
            steps += 1
            for k, run in enumerate(runs):
                loss_sums[k] += run.fast.train_batch(x, y) * len(batch)
                run.ref.train_batch(x, y)
                if not bitwise_equal(run.fast.params, run.ref.params):
                    epoch_equal = False
                    if first_difference is None:
                        first_difference = f"{run.label} moments, epoch {epoch}, step {steps}"
        cells = ""
        for k, run in enumerate(runs):
            run.losses.append(loss_sums[k] / n_train)
            run.accuracies.append(accuracy(run.fast.params, data.x_test, data.y_test))
            epoch_equal = epoch_equal and run.accuracies[-1] == accuracy(run.ref.params, data.x_test, data.y_test)
            cells += f"  {run.losses[-1]:.7f}   {run.accuracies[-1]:7.2%}  |"
        print(f"  {epoch:5d}  |{cells} {'yes' if epoch_equal else 'NO'}")

    print()
    baseline = next((r for r in runs if r.label == "float32"), None)
    print(f"after {args.epochs} epochs ({steps} steps):")
    print("  moments            moment bytes   train loss   test acc" + ("   vs float32 (points)  max |param - "
                                                                        "float32 copy's|" if baseline else ""))
    for run in runs:
        line = f"  {run.label:<17} {run.moment_bytes:>13,}   {run.losses[-1]:.7f}   {run.accuracies[-1]:7.2%}"
        if baseline is not None and run is not baseline:
            points = 100 * (run.accuracies[-1] - baseline.accuracies[-1])
            drift = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in
                        zip(run.fast.params, baseline.fast.params))
            verdict = "within" if abs(points) <= TARGET_POINTS else "OUTSIDE"
            line += f"   {points:+6.2f} ({verdict} {TARGET_POINTS})    {drift:.3g}"
        print(line)
    if baseline is None:
        print("  (add float32 to --state-dtype to compare against float32 moments)")
    else:
        print(f"  issue 10's target: final test accuracy within {TARGET_POINTS} points of float32's "
              f"(one test example is {100 / len(data.x_test):.2f} points)")

    if first_difference is not None:
        print(f"\nerror: fastadam.Adam and the reference stopped being bitwise equal ({first_difference}); "
              "this breaks fastadam's numerics contract", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the demo; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    if args.state_dtype is None:
        return train(args)
    # nargs="+" of comma-separated lists: flatten, and train each storage once however often it was named
    storages = list(dict.fromkeys(storage for group in args.state_dtype for storage in group))
    return compare_storages(args, storages)
