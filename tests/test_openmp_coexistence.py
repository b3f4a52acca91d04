"""fastadam and PyTorch in one process: two OpenMP runtimes, no hang, the same results.

A repaired fastadam wheel bundles its own copy of GNU OpenMP (fastadam.libs/)
and PyTorch's wheel bundles another (torch.libs/).  Both get loaded in a
process that uses both libraries.  Each case runs in a fresh interpreter
under a timeout, imports the two in a given order, and steps both on two
threads -- one after the other and at the same time from two Python threads
-- and prints digests of the results, which must equal those of processes
that loaded only one of the libraries.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.torch,
              pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")]

#: Above the serial cut-off, so that both libraries really run their threads.
ELEMENTS = 1 << 20
STEPS = 3
TIMEOUT_S = 180

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, threading
    libraries, n, steps = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    modules = {name: __import__(name) for name in libraries}   # in the order given
    import numpy as np

    def start(seed):
        rng = np.random.default_rng(seed)
        p, g, m = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
        return p, g, m, rng.random(n, dtype=np.float32) * np.float32(1e-2)

    def digest(*arrays):
        return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()

    def fastadam_steps(out):
        p, g, m, v = start(1)
        for step in range(1, steps + 1):
            modules["fastadam"].adam_step(p, g, m, v, step=step, num_threads=2)
        out["fastadam"] = digest(p, m, v)

    def torch_steps(out):
        torch = modules["torch"]
        p, g, m, v = start(2)
        param = torch.nn.Parameter(torch.from_numpy(p))
        param.grad = torch.from_numpy(g)
        optimizer = torch.optim.Adam([param], fused=True)
        for _ in range(steps):
            optimizer.step()
        state = optimizer.state[param]
        out["torch"] = digest(param.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy())

    if "torch" in modules:
        modules["torch"].set_num_threads(2)
    runs = [f for name, f in (("fastadam", fastadam_steps), ("torch", torch_steps)) if name in modules]
    one_after_other, side_by_side = {}, {}
    for run in runs:
        run(one_after_other)
    threads = [threading.Thread(target=run, args=(side_by_side,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open("/proc/self/maps") as f:
        runtimes = sorted({line.split()[-1] for line in f if "libgomp" in line})
    print(json.dumps({"one_after_other": one_after_other, "side_by_side": side_by_side, "runtimes": runtimes}))
""")


def run_process(libraries: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, libraries, str(ELEMENTS), str(STEPS)], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def alone() -> dict[str, str]:
    """The digests from processes that load only one of the two libraries."""
    digests = {}
    for library in ("fastadam", "torch"):
        out = run_process(library)
        assert out["one_after_other"] == out["side_by_side"]
        digests[library] = out["one_after_other"][library]
    return digests


@pytest.mark.parametrize("order", ["torch,fastadam", "fastadam,torch"])
def test_fastadam_and_torch_step_together_as_each_does_alone(order, alone):
    together = run_process(order)
    assert together["one_after_other"] == alone, together["runtimes"]
    assert together["side_by_side"] == alone, together["runtimes"]
