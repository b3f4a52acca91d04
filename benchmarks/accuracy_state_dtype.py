"""How much storing Adam's moments in bfloat16 costs a real model: a small CNN on the digits (issue 10, accuracy).

A PyTorch convolutional network (three 3x3 convolutions, a max-pool, two
linear layers; about 155,000 parameters) is trained on CPU on scikit-learn's
bundled 8x8 handwritten digits (no download), several times from the same
initial weights with the same mini-batches:

* ``fastadam.Adam`` with each storage of the moments named by ``--state-dtype``
  (default: float32 and bfloat16), stepping the model's parameters in place
  through zero-copy NumPy views (``p.detach().numpy()``, gradients through
  ``p.grad.numpy()``).  ``min_compressed_size=0``: every parameter's moments,
  the biases' too, are stored as named (the default, 4096, would keep the
  small ones in float32);
* ``torch.optim.Adam`` in float32, as a reference curve.

It prints the training loss (mean over the epoch's batches), the test loss and
the test accuracy of every run after every epoch, the final figures side by
side, and writes them (``accuracy_state_dtype.json``) with a plot of the curves
(``accuracy_state_dtype.png``, when matplotlib is installed) into ``--out``.

    python benchmarks/accuracy_state_dtype.py [--epochs 20] [--out benchmarks/results]
        [--state-dtype float32,bfloat16[,bfloat16/float32,...]] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import fastadam

RESULTS = Path(__file__).resolve().parent / "results"
MOMENT_STORAGES = ("float32", "bfloat16", "int8", "int4")
#: A storage named with this suffix rounds its bfloat16 moments stochastically (seeded with --seed).
STOCHASTIC = "+sr"
# The data set and its split are fixed whatever --seed says: seeds change only the weights and the batch order.
DATA_SEED = 20240601
TEST_FRACTION = 0.2


def storages(text: str) -> list[tuple[str, str, bool]]:
    """``"float32,bfloat16/float32,bfloat16+sr"`` -> ``[("float32", "float32", False), ("bfloat16", "float32",
    False), ("bfloat16", "bfloat16", True)]``: (exp_avg's, exp_avg_sq's storage, stochastic rounding)."""
    result = []
    for item in text.split(","):
        item = item.strip()
        stochastic = item.endswith(STOCHASTIC)
        names = item[:-len(STOCHASTIC)].split("/") if stochastic else item.split("/")
        if len(names) not in (1, 2) or any(n not in MOMENT_STORAGES for n in names):
            raise argparse.ArgumentTypeError(f"{item!r} is not a storage: use float32, bfloat16, int8, int4, or "
                                             f"M/V of them, with {STOCHASTIC} for stochastic rounding of bfloat16")
        result.append((names[0], names[-1], stochastic))
    return result


def label(storage: tuple[str, str, bool]) -> str:
    name = storage[0] if storage[0] == storage[1] else "/".join(storage[:2])
    return name + (" (stochastic rounding)" if storage[2] else "")


def load_digits():
    """The digits as (N, 1, 8, 8) float32 images scaled to [0, 1], split into fixed train and test sets."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(DATA_SEED).permutation(len(x))
    n_test = int(round(TEST_FRACTION * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(torch, seed: int):
    nn = torch.nn
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8 -> 4x4
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


class FastadamStepper:
    """fastadam.Adam over zero-copy NumPy views of a torch model's parameters."""

    def __init__(self, model, lr: float, storage: tuple[str, str, bool], threads, seed: int) -> None:
        self.params = list(model.parameters())
        views = [p.detach().numpy() for p in self.params]
        # The views must be the parameters' own memory: a copy would train nothing, silently.
        for p, v in zip(self.params, views):
            assert v.ctypes.data == p.data_ptr() and v.dtype == np.float32, "not a zero-copy view"
        self.optimizer = fastadam.Adam(views, lr=lr, state_dtype=storage[:2], min_compressed_size=0,
                                       num_threads=threads, stochastic_rounding=storage[2], rounding_seed=seed)
        # Every state array but the 8-bit maps, which one optimizer shares between all its params.
        self.moment_bytes = sum(a.nbytes for s in self.optimizer.state for k, a in s.items() if not k.endswith("_map"))

    def step(self) -> None:
        self.optimizer.step([p.grad.numpy() for p in self.params])


class TorchStepper:
    def __init__(self, torch, model, lr: float) -> None:
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.moment_bytes = None  # torch allocates its state at the first step

    def step(self) -> None:
        self.optimizer.step()
        if self.moment_bytes is None:
            self.moment_bytes = sum(s[k].nbytes for s in self.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))


def evaluate(torch, model, x, y) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on a whole set."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
        return float(loss), float((logits.argmax(1).numpy() == y).mean())


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ["-", "--", ":", "-.", (0, (5, 1))]
    for run, style in zip(runs, styles * 3):
        epochs = range(1, len(run["train_loss"]) + 1)
        axes[0].plot(epochs, run["train_loss"], linestyle=style, label=run["name"])
        axes[1].plot(epochs, run["test_loss"], linestyle=style, label=run["name"])
        axes[2].plot(epochs, [100 * a for a in run["test_accuracy"]], linestyle=style, label=run["name"])
    axes[0].set(title="training loss (mean over the epoch's batches)", xlabel="epoch", yscale="log")
    axes[1].set(title="test loss", xlabel="epoch", yscale="log")
    axes[2].set(title="test accuracy (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[2].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: %(default)s)")
    parser.add_argument("--state-dtype", type=storages, default=storages("float32,bfloat16"),
                        help="fastadam's moment storages, comma-separated: float32, bfloat16, int8, int4; M/V "
                             "stores exp_avg and exp_avg_sq differently; a +sr suffix rounds bfloat16 stochastically "
                             "(default: float32,bfloat16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads and fastadam's step threads (default: %(default)s; the figures "
                             "do not depend on it, only the time does)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where the JSON and the PNG go (default: benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_digits()
    initial = make_model(torch, args.seed)
    n_params = sum(p.numel() for p in initial.parameters())

    runs = []
    for storage in args.state_dtype:
        model = copy.deepcopy(initial)
        runs.append(dict(name=f"fastadam.Adam, {label(storage)} moments", model=model,
                         stepper=FastadamStepper(model, args.lr, storage, args.threads, args.seed)))
    model = copy.deepcopy(initial)
    runs.append(dict(name="torch.optim.Adam, float32", model=model, stepper=TorchStepper(torch, model, args.lr)))
    for run in runs:
        run.update(train_loss=[], test_loss=[], test_accuracy=[], seconds=0.0)

    print(f"model:  small CNN (3 conv 3x3, max-pool, 2 linear), {n_params:,} float32 parameters in "
          f"{len(list(initial.parameters()))} tensors; torch {torch.__version__}, fastadam {fastadam.__version__} "
          f"({fastadam.config()['isa']})")
    print(f"data:   scikit-learn digits, 8x8 images, {len(x_train)} train / {len(x_test)} test "
          f"(one test example = {100 / len(x_test):.2f} points)")
    print(f"train:  Adam lr={args.lr:g} betas=(0.9, 0.999) eps=1e-08, batch {args.batch_size}, {args.epochs} epochs, "
          f"seed {args.seed}, same initial weights and batches for every run; fastadam with min_compressed_size=0 "
          "(every param's moments compressed)")
    print()
    header = "".join(f" | {'run ' + str(k + 1):^28}" for k in range(len(runs)))
    for k, run in enumerate(runs):
        print(f"  run {k + 1}: {run['name']}")
    print(f"\n  epoch{header}")
    print("       " + " | train loss  test loss   acc " * len(runs))

    batch_rng = np.random.default_rng(args.seed)
    loss_fn = torch.nn.functional.cross_entropy
    for epoch in range(1, args.epochs + 1):
        order = batch_rng.permutation(len(x_train))
        batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
        cells = ""
        for run in runs:
            model, stepper = run["model"], run["stepper"]
            total = 0.0
            start = time.perf_counter()
            for batch in batches:
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(torch.from_numpy(x_train[batch])), torch.from_numpy(y_train[batch]))
                loss.backward()
                stepper.step()
                total += float(loss.detach()) * len(batch)
            run["seconds"] += time.perf_counter() - start
            run["train_loss"].append(total / len(x_train))
            test_loss, test_acc = evaluate(torch, model, x_test, y_test)
            run["test_loss"].append(test_loss)
            run["test_accuracy"].append(test_acc)
            cells += f" | {run['train_loss'][-1]:.3e}  {test_loss:.3e}  {100 * test_acc:5.1f}"
        print(f"  {epoch:5d}{cells}", flush=True)

    baseline = runs[0] if args.state_dtype[0][:2] == ("float32", "float32") else None
    print(f"\nafter {args.epochs} epochs:")
    print(f"  {'run':<41} {'moment bytes':>12}  {'train loss':>10}  {'test loss':>9}  {'test acc':>8}"
          + ("  vs run 1 (points)" if baseline else ""))
    for run in runs:
        line = (f"  {run['name']:<41} {run['stepper'].moment_bytes:>12,}  {run['train_loss'][-1]:10.4e}  "
                f"{run['test_loss'][-1]:9.4e}  {100 * run['test_accuracy'][-1]:7.2f}%")
        if baseline and run is not baseline:
            line += f"  {100 * (run['test_accuracy'][-1] - baseline['test_accuracy'][-1]):+6.2f}"
        print(line)
    print("  (issue 10's target, for the digits: final test accuracy of compressed moments within 0.5 points of "
          "float32's)")

    args.out.mkdir(parents=True, exist_ok=True)
    document = dict(
        command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        machine=dict(python=platform.python_version(), torch=torch.__version__, fastadam=fastadam.__version__,
                     isa=fastadam.config()["isa"]),
        settings=dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      min_compressed_size=0, n_params=n_params, n_train=len(x_train), n_test=len(x_test)),
        runs=[{k: run[k] for k in ("name", "train_loss", "test_loss", "test_accuracy")}
              | dict(moment_bytes=run["stepper"].moment_bytes) for run in runs])
    json_path = args.out / "accuracy_state_dtype.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {json_path}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (pip install matplotlib)")
    else:
        png = args.out / "accuracy_state_dtype.png"
        plot(document["runs"], png, f"small CNN ({n_params:,} params) on the digits: Adam lr={args.lr:g}, "
                                    f"batch {args.batch_size}, seed {args.seed}; fastadam min_compressed_size=0")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
