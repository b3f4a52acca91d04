"""Instructions of fastadam.torch.Adam's step(), counted by callgrind: repeatable where timings are not.

    valgrind --tool=callgrind --toggle-collect=starmap_next --callgrind-out-file=OUT \
        python benchmarks/callgrind_torch_step.py CASE GRADS STEPS [fastadam|torch]

CASE is single-4096, small-tensors or resnet18 (the cases of bench_torch_optim.py), GRADS ``same`` or
``new`` (two prepared sets of gradient tensors alternate, assigned as a training loop's backward pass
would: that assignment is counted too).  The optimizer is built and stepped three times outside the
count; then STEPS steps run inside ``itertools.starmap``, whose ``starmap_next`` is the only C function
callgrind is told to count in (``--toggle-collect``): "Collected" divided by STEPS is the instructions of
one step, whatever torch's import costs.  Run it on the two builds to compare and divide the difference
by the params (or tensors) for a per-param saving; ``callgrind_annotate --inclusive=yes OUT`` says where
they go.  One thread, so the count does not depend on how the work is split.
"""

from __future__ import annotations

import collections
import itertools
import sys

import torch

import fastadam.torch
from fastadam._bench import resnet18_shapes, small_tensor_shapes


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[0] not in ("single-4096", "small-tensors", "resnet18") or \
            argv[1] not in ("same", "new"):
        print(__doc__, file=sys.stderr)
        return 2
    case, grads, steps = argv[0], argv[1], int(argv[2])
    who = argv[3] if len(argv) == 4 else "fastadam"
    torch.set_num_threads(1)
    shapes = {"single-4096": [(4096,)], "small-tensors": small_tensor_shapes(), "resnet18": resnet18_shapes()}[case]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grad_sets = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    for p, g in zip(params, grad_sets[0]):
        p.grad = g
    opt = torch.optim.Adam(params, lr=1e-3, fused=True) if who == "torch" else \
        fastadam.torch.Adam(params, lr=1e-3, num_threads=1)
    turn = [0]

    def step() -> None:
        if grads == "new":
            turn[0] ^= 1
            for p, g in zip(params, grad_sets[turn[0]]):
                p.grad = g
        opt.step()

    for _ in range(3):
        step()
    collections.deque(itertools.starmap(step, itertools.repeat((), steps)), maxlen=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
