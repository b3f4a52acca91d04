"""The main job's MLP on the digits with every moment storage: float32, bfloat16, bfloat16 with stochastic
rounding, 8-bit block-wise state (issue 10's accuracy target: within 0.5 points of float32).

    python benchmarks/accuracy_mlp_storages.py [--seeds 3] [--epochs 15]

For each seed, every storage trains from the same initial weights and batches (the main job's network:
64 -> 128 (ReLU) -> 10, batch 64, lr 1e-3), with ``min_compressed_size=0`` so that every param's moments are
stored as named.  It prints the mean training loss of the last epoch and the final test accuracy.
"""

from __future__ import annotations

import argparse

import numpy as np

import fastadam
from fastadam import _demo as demo

STORAGES = {
    "float32": {},
    "bfloat16": dict(state_dtype="bfloat16"),
    "bfloat16 + stochastic rounding": dict(state_dtype="bfloat16", stochastic_rounding=True),
    "int8": dict(state_dtype="int8"),
}


def train(data: demo.Dataset, seed: int, epochs: int, options: dict) -> tuple[float, float]:
    params = demo.init_params(data.x_train.shape[1], 128, 10, np.random.default_rng(seed))
    rounding = dict(rounding_seed=seed) if options.get("stochastic_rounding") else {}
    optimizer = fastadam.Adam(params, lr=1e-3, min_compressed_size=0, **options, **rounding)
    order_rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order, losses = order_rng.permutation(len(data.y_train)), []
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            logits, cache = demo.forward(params, data.x_train[batch])
            loss, dlogits = demo.softmax_cross_entropy(logits, data.y_train[batch])
            optimizer.step(demo.backward(params, cache, dlogits))
            losses.append(loss)
    return float(np.mean(losses)), demo.accuracy(params, data.x_test, data.y_test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=15, help="(default: %(default)s)")
    args = parser.parse_args()
    data = demo.load_dataset(None)
    print(f"data: {data.description}; fastadam {fastadam.__version__} ({fastadam.config()['isa']})")
    print(f"{'seed':>4}  " + "  ".join(f"{name:>32}" for name in STORAGES))
    for seed in range(args.seeds):
        cells = []
        for options in STORAGES.values():
            loss, acc = train(data, seed, args.epochs, options)
            cells.append(f"loss {loss:.5f}  acc {100 * acc:6.2f}%".rjust(32))
        print(f"{seed:>4}  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
