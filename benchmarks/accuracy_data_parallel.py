"""The main job's NumPy MLP trained data-parallel on 4 ranks (a quarter of each batch each) against 1 rank.

    python benchmarks/accuracy_data_parallel.py [--ranks 4] [--epochs 5] [--engine mpi|torch]

Both runs start from the same weights and see the same batches of 64 digits
(the incomplete last batch of an epoch is dropped, so that every batch splits
evenly).  The 1-rank run is ``fastadam.Adam`` on the full batch's gradient;
the N-rank run is ``ZeroAdam`` with ``reduction="mean"``: each rank computes
the mean gradient of its quarter, and the ranks' mean of those is the full
batch's mean gradient up to rounding (a different summation order).  The
script prints the largest difference of the full batch's loss before each
step, of the epoch's test accuracy, and of the params at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import fastadam
from fastadam._demo import backward, forward, init_params, load_dataset, softmax_cross_entropy, accuracy

BATCH = 64


def train(ranks: int, rank: int, epochs: int, engine: dict) -> dict:
    data = load_dataset("digits")
    rng = np.random.default_rng(0)
    params = init_params(data.n_features, 128, 10, rng)
    if engine is None:
        opt = fastadam.Adam(params, lr=1e-3)
    else:
        from fastadam.distributed import ZeroAdam

        opt = ZeroAdam(params, lr=1e-3, reduction="mean", **engine)
    losses, accuracies = [], []
    quarter = BATCH // ranks
    for _ in range(epochs):
        order = rng.permutation(len(data.x_train))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            x, y = data.x_train[batch], data.y_train[batch]
            losses.append(softmax_cross_entropy(forward(params, x)[0], y)[0])  # the full batch's loss
            mine = slice(rank * quarter, (rank + 1) * quarter)
            logits, cache = forward(params, x[mine])
            _, dlogits = softmax_cross_entropy(logits, y[mine])
            opt.step(backward(params, cache, dlogits))
        accuracies.append(accuracy(params, data.x_test, data.y_test))
    return {"losses": losses, "accuracies": accuracies, "params": [p.tolist() for p in params]}


def torch_rank(rank: int, world: int, store: str, out: str, epochs: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = train(world, rank, epochs, {})
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--mpi-rank":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        result = train(comm.Get_size(), comm.Get_rank(), int(sys.argv[3]), {"comm": comm})
        if comm.Get_rank() == 0:
            with open(os.path.join(sys.argv[2], "result.json"), "w") as f:
                json.dump(result, f)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--engine", choices=["mpi", "torch"], default="mpi")
    args = parser.parse_args()
    if BATCH % args.ranks:
        raise SystemExit(f"--ranks must divide the batch of {BATCH}")
    out = tempfile.mkdtemp()
    try:
        if args.engine == "mpi":
            mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
            subprocess.run([mpiexec, "--oversubscribe", "-n", str(args.ranks), sys.executable, __file__,
                            "--mpi-rank", out, str(args.epochs)], check=True, env=env)
        else:
            context = multiprocessing.get_context("spawn")
            procs = [context.Process(target=torch_rank, args=(r, args.ranks, os.path.join(out, "store"), out,
                                                              args.epochs)) for r in range(args.ranks)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        with open(os.path.join(out, "result.json")) as f:
            parallel = json.load(f)
    finally:
        shutil.rmtree(out)
    single = train(1, 0, args.epochs, None)
    loss_a, loss_b = np.array(single["losses"]), np.array(parallel["losses"])
    rel = np.abs(loss_a - loss_b) / np.abs(loss_a)
    param_diff = max(float(np.max(np.abs(np.array(a, np.float64) - np.array(b, np.float64))))
                     for a, b in zip(single["params"], parallel["params"]))
    print(f"{len(loss_a)} steps of batch {BATCH} ({args.ranks} ranks x {BATCH // args.ranks} examples, "
          f"{args.engine}) vs 1 rank x {BATCH}, {args.epochs} epochs, fastadam {fastadam.__version__}")
    print(f"loss at step 1: {loss_a[0]:.7f} / {loss_b[0]:.7f}; at the end: {loss_a[-1]:.7f} / {loss_b[-1]:.7f}")
    print(f"largest |loss difference|: {np.max(np.abs(loss_a - loss_b)):.3g} (relative {rel.max():.3g}); "
          f"steps with identical loss: {int(np.sum(loss_a == loss_b))} of {len(loss_a)}")
    print(f"test accuracy per epoch: 1 rank {single['accuracies']}, {args.ranks} ranks {parallel['accuracies']}")
    print(f"largest |param difference| at the end: {param_diff:.3g}")


if __name__ == "__main__":
    main()
