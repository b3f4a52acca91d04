"""The code each rank runs in tests/test_distributed.py, under torch.distributed (gloo) or MPI.

Each scenario runs on every rank, checks what it promises on that rank (an
AssertionError fails the rank), and writes a JSON summary to
``<out>/rank<r>.json`` for the test to read: how many bitwise comparisons
passed, which errors were raised.  A rank that raises writes its traceback
to ``<out>/rank<r>.error`` instead.

    mpiexec -n 3 python tests/distributed_worker.py mpi SCENARIO ARG OUT
    (torch: run_torch_rank(rank, world, store_file, scenario, arg, out) in each process)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

import fastadam
from fastadam.distributed import ZeroAdam, ZeroAdamW

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - a test dependency
    ml_dtypes = None


# -- problems whose reduced gradients are exact --------------------------------------------------------------


def gradient_parts(shape: tuple, t: int, i: int, world: int, limit: int = 1024) -> tuple[np.ndarray, list]:
    """The total gradient of param ``i`` at step ``t`` (integers times 2**-8) and ``world`` integer parts
    that add up to it exactly, in any order and any dtype used here."""
    rng = np.random.default_rng([t, i])
    total = rng.integers(-limit, limit, shape)
    quotient, remainder = np.divmod(total, world)
    parts = [(quotient + (k < remainder)) * 2.0**-8 for k in range(world)]
    return total * 2.0**-8, parts


def float_config() -> dict[str, Any]:
    """float32 and float64 params (two flat sequences) in two groups covering Adam's options."""
    shapes32 = [(37, 5), (200,), (3,), (1000, 3), (0,), (64,), (129,)]
    shapes64 = [(50,), (7, 7)]
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes32] + \
           [rng.standard_normal(s) for s in shapes64]
    groups = [dict(lr=1e-2, weight_decay=0.05), dict(lr=3e-3, amsgrad=True, maximize=True)]
    split = [0, 4, len(init)]  # group 0: the first four float32 params; group 1 the rest (both dtypes)
    return dict(init=init, groups=groups, split=split, cls=(ZeroAdam, fastadam.Adam), options={})


def mixed_precision_config() -> dict[str, Any]:
    """bfloat16 and float16 params with float32 master weights, AdamW with amsgrad."""
    rng = np.random.default_rng(8)
    init = [rng.standard_normal((300,)).astype(ml_dtypes.bfloat16), rng.standard_normal((17, 9)).astype(np.float16),
            rng.standard_normal((90,)).astype(np.float32)]
    return dict(init=init, groups=[dict(lr=1e-2, amsgrad=True)], split=[0, len(init)],
                cls=(ZeroAdamW, fastadam.AdamW), options=dict(master_weights=True))


def bfloat16_state_config() -> dict[str, Any]:
    """The float params with bfloat16 moments (amsgrad's maximum too), rounded stochastically: the params
    of at least 150 elements store them compressed, the smaller ones (and the float64 ones) in their own
    dtype.  A rank's piece of a param draws the random bits of those elements of the whole param."""
    return {**float_config(), "options": dict(state_dtype="bfloat16", min_compressed_size=150,
                                              stochastic_rounding=True, rounding_seed=5)}


def mixed_precision_bfloat16_state_config() -> dict[str, Any]:
    """Master weights with bfloat16 first moments and float32 second moments (the pair form), for params
    of at least 100 elements.  The storage follows the whole param's size: on 2-4 ranks the float16 param's
    153 elements are cut into pieces of 25 elements and more, the bfloat16 param's 300 into pieces of 44 and
    more, and those pieces' first moments are bfloat16 too."""
    config = mixed_precision_config()
    return {**config, "options": dict(master_weights=True, state_dtype=("bfloat16", "float32"),
                                      min_compressed_size=100)}


def int8_state_config() -> dict[str, Any]:
    """The float params with 8-bit moments (amsgrad's maximum too) for the params of at least 100 elements:
    185, 200, 3000 and (in the amsgrad group) 129 elements, none a multiple of 256, so the layout pads
    before all but the first, and on 2-4 ranks the 3000-element param is cut into pieces of whole blocks."""
    return {**float_config(), "options": dict(state_dtype="int8", min_compressed_size=100)}


def mixed_precision_int8_state_config() -> dict[str, Any]:
    """Master weights with bfloat16 first moments and 8-bit second moments (and maxima) for the 16-bit
    params (300 and 153 elements), float32 ones for the 90-element float32 param."""
    config = mixed_precision_config()
    return {**config, "options": dict(master_weights=True, state_dtype=("bfloat16", "int8"),
                                      min_compressed_size=100)}


def int4_state_config() -> dict[str, Any]:
    """4-bit moments (blocks of 128, two codes per byte; amsgrad's maximum too) for the float32 params of at
    least 128 elements: 128, 129, 255, 256, 257 and 3001, beside a 127-element one with float32 moments
    (its size is under min_compressed_size) and float64 params (float64 moments).  Each 4-bit param starts on
    the next multiple of 256 (the float32 sequence holds 4793 elements): on 2-4 ranks the shards cut the
    3001-element param after its elements 768, 1792 and 2048, and the sequence at the first elements of the
    257- and 3001-element params; the odd sizes end on a byte holding one code."""
    rng = np.random.default_rng(11)
    shapes32 = [(127,), (128,), (3, 43), (255,), (16, 16), (257,), (3001,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes32] + [rng.standard_normal((60,))]
    groups = [dict(lr=1e-2, weight_decay=0.05), dict(lr=3e-3, amsgrad=True, maximize=True)]
    return dict(init=init, groups=groups, split=[0, 4, len(init)], cls=(ZeroAdamW, fastadam.AdamW),
                options=dict(state_dtype="int4", min_compressed_size=128))


def int4_pair_configs() -> list[dict[str, Any]]:
    """int4_state_config's params with 4-bit first and 8-bit second moments, and with float32 first and
    4-bit second moments (the pair forms)."""
    return [{**int4_state_config(), "options": dict(state_dtype=pair, min_compressed_size=128)}
            for pair in (("int4", "int8"), ("float32", "int4"))]


def mixed_precision_int4_state_config() -> dict[str, Any]:
    """Master weights with 4-bit moments for the 16-bit params (300 and 153 elements: the float16 one ends
    on a byte holding one code), float32 ones for the 90-element float32 param."""
    config = mixed_precision_config()
    return {**config, "options": dict(master_weights=True, state_dtype="int4", min_compressed_size=100)}


def grouped(params: list, config: dict) -> list[dict]:
    split = config["split"]
    return [{"params": params[a:b], **g} for g, a, b in zip(config["groups"], split, split[1:])]


def grads_for(config: dict, t: int, rank: int, world: int, reduction: str) -> tuple[list, list]:
    """This rank's gradients at step ``t`` and the reduced gradients a single process steps with."""
    mine, reduced = [], []
    for i, p in enumerate(config["init"]):
        work = np.dtype(np.float32) if p.dtype.itemsize == 2 else p.dtype
        # bfloat16 holds integers up to 256 exactly; the 16-bit params get bfloat16/float16 gradients.
        total, parts = gradient_parts(p.shape, t, i, world, limit=128 if p.dtype.itemsize == 2 else 1024)
        mine.append(parts[rank].astype(p.dtype))
        total = total.astype(work)
        reduced.append(total / work.type(world) if reduction == "mean" else total)
    return mine, reduced


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.itemsize}")


def check_equal(got: list, want: list, what: str) -> int:
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(bits(a), bits(b)), f"{what}[{i}]: not bitwise equal to the single-process step"
    return len(got)


def param_offsets(opt: ZeroAdam) -> list[int]:
    """Each param's first element in its dtype's flat sequence, as the layout promises: the params one after
    the other, except that a param with 8-bit moments starts on the next multiple of 256."""
    ends: dict[str, int] = {}
    offsets = []
    for i, p in enumerate(opt._params):
        offset = ends.get(p.dtype.name, 0)
        if any(key.endswith("_codes") for key in opt_state_keys(opt, i)):
            offset = -(-offset // 256) * 256
        offsets.append(offset)
        ends[p.dtype.name] = offset + p.size
    return offsets


def opt_state_keys(opt: ZeroAdam, i: int) -> list[str]:
    """The state keys of params[i] in fastadam.Adam with the same options (the piece's keys)."""
    alone = fastadam.Adam([np.zeros(opt._params[i].shape, opt._params[i].dtype)], master_weights=opt.master_weights,
                          state_dtype=opt.state_dtype, min_compressed_size=opt.min_compressed_size)
    return list(alone.state[0])


def check_local_state(opt: ZeroAdam, ref: fastadam.Adam, what: str) -> int:
    """This rank's state pieces equal the slices of the single-process state they stand for: for 8-bit
    moments the codes of those elements, the absmax of the whole 256-element blocks they cover (a piece
    starts on a block of the param) and the map; for 4-bit moments the bytes holding those elements' codes
    (two per byte: elements [a, b) are bytes [a/2, ceil(b/2))), the absmax of their 128-element blocks and
    the map."""
    count = 0
    offsets = param_offsets(opt)
    assert [opt._where[i][1] for i in range(len(offsets))] == offsets, f"{what}: the layout is not as promised"
    for name, (lo, hi) in opt.shard_bounds().items():
        mine = [i for i, p in enumerate(opt._params) if p.dtype.name == name]
        # Shards of a multiple of 64 elements, or of 256 in a sequence with 8-bit moments.
        align = 256 if any(key.endswith("_codes") for i in mine for key in opt_state_keys(opt, i)) else 64
        total = max(offsets[i] + opt._params[i].size for i in mine)
        shard = align * -(-(-(-total // opt.world_size)) // align) if total else 0
        assert (lo, hi) == (min(opt.rank * shard, total), min((opt.rank + 1) * shard, total)), f"{what}: shard"
        for i, p in enumerate(opt._params):
            if p.dtype.name != name:
                continue
            offset = offsets[i]
            a, b = max(lo, offset) - offset, min(hi, offset + p.size) - offset
            if a >= b:
                continue
            assert set(opt.local_state[i]) == set(ref.state[i]), f"{what}: state[{i}] keys differ"
            for key, piece in opt.local_state[i].items():
                full = ref.state[i][key].reshape(-1)
                if key.endswith("_map"):
                    pass
                elif key.endswith(("_codes", "_absmax")):
                    assert a % 256 == 0 and (b % 256 == 0 or b == p.size), f"{what}: piece [{a}, {b}) of {i}"
                    four_bit = ref.state[i][key.rsplit("_", 1)[0] + "_map"].size == 16
                    if key.endswith("_codes"):
                        per_entry = 2 if four_bit else 1
                    else:
                        per_entry = 128 if four_bit else 256
                    full = full[a // per_entry:-(-b // per_entry)]
                else:
                    full = full[a:b]
                assert piece.dtype == full.dtype, f"{what}: state[{i}][{key!r}] is {piece.dtype}, not {full.dtype}"
                assert np.array_equal(bits(piece.reshape(-1)), bits(full)), f"{what}: state[{i}][{key!r}] differs"
                count += 1
    return count


# -- scenarios ---------------------------------------------------------------------------------------------


def scenario_exact(engine: dict, rank: int, world: int, arg: str) -> dict:
    """Bitwise equality with a single-process step, for several bucket sizes, both reductions, the options
    and the moments' storages, with the communication overlapped and not."""
    every = [(reduction, bucket_bytes) for reduction in ("mean", "sum")
             for bucket_bytes in (1, 4096, 1 << 25)]  # 1 byte: the smallest bucket, 64 elements per rank
    cases = [(float_config(), every)]
    if ml_dtypes is not None:
        # The storages change no communication: two of the cases (many buckets, one bucket) each.
        cases += [(mixed_precision_config(), every), (bfloat16_state_config(), [("mean", 1), ("sum", 1 << 25)]),
                  (mixed_precision_bfloat16_state_config(), [("sum", 1), ("mean", 1 << 25)]),
                  (mixed_precision_int8_state_config(), [("mean", 1), ("sum", 1 << 25)]),
                  (mixed_precision_int4_state_config(), [("sum", 1), ("mean", 1 << 25)])]
    # 8-bit and 4-bit moments need no ml_dtypes; 1 byte: buckets of one 256-element block per rank, 4 KiB: of
    # 2-4 blocks.
    cases += [(int8_state_config(), [("sum", 1), ("mean", 4096), ("mean", 1 << 25)]),
              (int4_state_config(), [("sum", 1), ("mean", 4096), ("mean", 1 << 25)])]
    cases += [(config, [("mean", 1), ("sum", 1 << 25)]) for config in int4_pair_configs()]
    compared = 0
    for config, grid in cases:
        for reduction, bucket_bytes in grid:
            ref_params = [p.copy() for p in config["init"]]
            zero_cls, ref_cls = config["cls"]
            ref = ref_cls(grouped(ref_params, config), **config["options"])
            runs = {}
            for overlap in (True, False):
                params = [p.copy() for p in config["init"]]
                runs[overlap] = params, zero_cls(grouped(params, config), reduction=reduction,
                                                 bucket_bytes=bucket_bytes, overlap=overlap, **engine,
                                                 **config["options"])
            for t in range(1, 4):
                if t == 3:  # a schedule changes the learning rate of group 0 on every rank
                    ref.param_groups[0]["lr"] = 5e-3
                    for _, opt in runs.values():
                        opt.param_groups[0]["lr"] = 5e-3
                mine, reduced = grads_for(config, t, rank, world, reduction)
                ref.step(reduced)
                for overlap, (params, opt) in runs.items():
                    opt.step(mine)
                    what = (f"{zero_cls.__name__} {config['options']} {reduction} bucket {bucket_bytes} "
                            f"overlap {overlap} step {t}")
                    compared += check_equal(params, ref_params, what)
                    compared += check_local_state(opt, ref, what)
    return {"compared": compared, "configs": len(cases)}


def scenario_mismatch(engine: dict, rank: int, world: int, arg: str) -> dict:
    """Params that differ on the last rank are refused on every rank, with the difference named."""
    last = rank == world - 1
    cases: dict[str, Callable[[], list]] = {
        "count": lambda: [np.zeros(10, np.float32) for _ in range(1 if last else 2)],
        "shape": lambda: [np.zeros(10, np.float32), np.zeros((3, 4) if last else (4, 3), np.float32)],
        "dtype": lambda: [np.zeros(10, np.float32), np.zeros(7, np.float64 if last else np.float32)],
        "lr": lambda: [{"params": [np.zeros(10, np.float32)], "lr": 0.1 if last else 0.2}],
        "local": lambda: [np.zeros(10, np.float32), np.zeros((4, 6), np.float32)[:, ::2] if last
                          else np.zeros((4, 3), np.float32)],
    }
    raised = {}
    for name, make in cases.items():
        try:
            ZeroAdam(make(), **engine)
        except (TypeError, ValueError) as e:
            raised[name] = f"{type(e).__name__}: {e}"
        else:
            raised[name] = None
    # Errors every rank meets alike: they raise before anything is sent.
    p = [np.zeros((6, 2), np.float32)]
    opt = ZeroAdam(p, **engine)
    for name, grads in {"sparse": [fastadam.RowSparseGrad(np.array([0]), np.zeros((1, 2), np.float32))],
                        "count_grads": [], "dtype_grads": [np.zeros((6, 2), np.float64)],
                        "strided_grads": [np.zeros((6, 4), np.float32)[:, ::2]]}.items():
        try:
            opt.step(grads)
        except (TypeError, ValueError) as e:
            raised[name] = f"{type(e).__name__}: {e}"
        else:
            raised[name] = None
    opt.step([np.ones((6, 2), np.float32)])  # the optimizer still works after refusing those
    return {"raised": raised, "steps": opt.steps}


def checkpoint_config() -> dict[str, Any]:
    rng = np.random.default_rng(9)
    init = [rng.standard_normal((333,)).astype(np.float32), rng.standard_normal((20, 7)),
            rng.standard_normal((11, 13)).astype(np.float32)]
    if ml_dtypes is not None:
        init.append(rng.standard_normal((150,)).astype(ml_dtypes.bfloat16))
    # With ml_dtypes, bfloat16 moments, rounded stochastically, for the 333-element param (cut into pieces
    # of 64-192 elements on 4, 2 and 3 ranks), float32 ones for the smaller params.
    options = dict(master_weights=True, state_dtype="bfloat16", min_compressed_size=300, stochastic_rounding=True,
                   rounding_seed=11) if ml_dtypes else {}
    return dict(init=init, groups=[dict(lr=1e-2, amsgrad=True), dict(lr=2e-3, weight_decay=0.1)],
                split=[0, 2, len(init)], cls=(ZeroAdam, fastadam.Adam), options=options)


def int8_checkpoint_config() -> dict[str, Any]:
    """8-bit moments (amsgrad's maximum too) for the float32 params of 2100 and 700 elements, float32 ones
    for the others.  The float32 sequence: 2100 elements, 143, 61 of padding, 700 (3004 in all), in shards of
    768 elements on 4 ranks, 1536 on 2, 1024 on 3: the 8-bit params are cut into pieces of whole blocks at
    other places on each number of ranks, and the absmax of every new piece comes from one old shard."""
    rng = np.random.default_rng(10)
    init = [rng.standard_normal((2100,)).astype(np.float32), rng.standard_normal((20, 7)),
            rng.standard_normal((11, 13)).astype(np.float32), rng.standard_normal((700,)).astype(np.float32)]
    if ml_dtypes is not None:
        init.append(rng.standard_normal((150,)).astype(ml_dtypes.bfloat16))
    return dict(init=init, groups=[dict(lr=1e-2, amsgrad=True), dict(lr=2e-3, weight_decay=0.1)],
                split=[0, 2, len(init)], cls=(ZeroAdam, fastadam.Adam),
                options=dict(master_weights=True, state_dtype="int8", min_compressed_size=300))


def int4_checkpoint_config() -> dict[str, Any]:
    """4-bit moments (amsgrad's maximum too) for the float32 params of 2101 and 701 elements, float32 ones
    for the others.  The float32 sequence: 2101 elements, 143, 60 of padding, 701 (3005 in all), in shards of
    768 elements on 4 ranks, 1536 on 2, 1024 on 3: the 4-bit params are cut into pieces of whole 256-element
    blocks at other places on each number of ranks (each piece's codes whole bytes, its absmax whole
    128-element blocks of one old shard), and both end on a byte holding one code.  An optimizer with 8-bit
    moments refuses the checkpoint."""
    rng = np.random.default_rng(12)
    init = [rng.standard_normal((2101,)).astype(np.float32), rng.standard_normal((20, 7)),
            rng.standard_normal((11, 13)).astype(np.float32), rng.standard_normal((701,)).astype(np.float32)]
    if ml_dtypes is not None:
        init.append(rng.standard_normal((150,)).astype(ml_dtypes.bfloat16))
    return dict(init=init, groups=[dict(lr=1e-2, amsgrad=True), dict(lr=2e-3, weight_decay=0.1)],
                split=[0, 2, len(init)], cls=(ZeroAdam, fastadam.Adam), other_storage="int8",
                options=dict(master_weights=True, state_dtype="int4", min_compressed_size=300))


def scenario_checkpoint(engine: dict, rank: int, world: int, arg: str) -> dict:
    """Phase A on 4 ranks: steps 1-3, save.  B on 2: load, 4-5, save.  C on 3: load, 6-7.

    ``arg`` is ``PHASE:DIRECTORY``.  Each phase runs checkpoint_config in
    DIRECTORY (its report at the top level), int8_checkpoint_config in
    DIRECTORY/int8 (under ``"int8"``) and int4_checkpoint_config in
    DIRECTORY/int4 (under ``"int4"``), in the same ranks, which take longer
    to start than to run all three.
    """
    phase, directory = arg.split(":", 1)
    result = checkpoint_phase(engine, rank, world, phase, checkpoint_config(), directory)
    for name, config in (("int8", int8_checkpoint_config()), ("int4", int4_checkpoint_config())):
        result[name] = checkpoint_phase(engine, rank, world, phase, config, os.path.join(directory, name))
    return result


def checkpoint_phase(engine: dict, rank: int, world: int, phase: str, config: dict, directory: str) -> dict:
    """One phase of scenario_checkpoint for one config.

    Each phase compares with a single process stepped without interruption.
    The params start from zeros in B and C: load() restores them too.  The
    learning rate of group 1 is changed at step 2; the checkpoint carries it.
    """
    first, last = {"A": (1, 3), "B": (4, 5), "C": (6, 7)}[phase]
    ref_params = [p.copy() for p in config["init"]]
    ref = fastadam.Adam(grouped(ref_params, config), **config["options"])
    params = [p.copy() for p in config["init"]] if phase == "A" else [np.zeros_like(p) for p in config["init"]]
    opt = ZeroAdam(grouped(params, config), reduction="sum", bucket_bytes=4096, **engine, **config["options"])
    result: dict[str, Any] = {}
    if phase == "C":
        # A damaged shard: every rank refuses the load, and nothing changes.
        damaged = os.path.join(directory, "damaged")
        if rank == 0:
            import shutil
            shutil.copytree(os.path.join(directory, "B"), damaged)
            with open(os.path.join(damaged, "shard-00001-of-00002.npz"), "r+b") as f:
                f.truncate(200)
        opt._comm.barrier()
        try:
            opt.load(damaged)
        except ValueError as e:
            result["damaged"] = str(e)
        assert all(not p.any() for p in params), "a failed load changed the params"
        if config["options"].get("state_dtype"):  # moments stored otherwise are refused
            other = ZeroAdam(grouped([np.zeros_like(p) for p in config["init"]], config), reduction="sum",
                             bucket_bytes=4096, **engine,
                             **{**config["options"], "state_dtype": config.get("other_storage", "float32")})
            try:
                other.load(os.path.join(directory, "B"))
            except ValueError as e:
                result["other_storage"] = str(e)
    if phase != "A":
        opt.load(os.path.join(directory, "B" if phase == "C" else "A"))
        assert opt.steps == first - 1
    compared = 0
    for t in range(1, last + 1):
        if t == 2:
            ref.param_groups[1]["lr"] = 1e-3
            if phase == "A":
                opt.param_groups[1]["lr"] = 1e-3
        mine, reduced = grads_for(config, t, rank, world, "sum")
        ref.step(reduced)
        if t >= first:
            opt.step(mine)
            compared += check_equal(params, ref_params, f"phase {phase} step {t}")
            compared += check_local_state(opt, ref, f"phase {phase} step {t}")
    if phase != "C":
        opt.save(os.path.join(directory, phase))
    result.update(compared=compared, steps=opt.steps, files=sorted(os.listdir(os.path.join(directory, phase)))
                  if phase != "C" else [])
    return result


def scenario_dead_rank(engine: dict, rank: int, world: int, arg: str) -> dict:
    """The last rank leaves (``exit``) or hangs (``stall``) instead of stepping; the others must raise."""
    params = [np.zeros(1000, np.float32)]
    if "comm" in engine:
        engine = {**engine, "timeout": 3.0}
    opt = ZeroAdam(params, **engine)
    opt.step([np.ones(1000, np.float32)])
    if rank == world - 1:
        if arg == "exit":
            os._exit(7)
        time.sleep(60)
        return {}
    start = time.monotonic()
    try:
        opt.step([np.ones(1000, np.float32)])
    except Exception as e:  # noqa: BLE001 - the test reads which one
        return {"raised": type(e).__name__, "message": str(e)[:300], "seconds": time.monotonic() - start}
    return {"raised": None, "seconds": time.monotonic() - start}


SCENARIOS = {"exact": scenario_exact, "mismatch": scenario_mismatch, "checkpoint": scenario_checkpoint,
             "dead_rank": scenario_dead_rank}


# -- entry points ------------------------------------------------------------------------------------------


def _run(engine: dict, rank: int, world: int, scenario: str, arg: str, out: str) -> None:
    try:
        result = SCENARIOS[scenario](engine, rank, world, arg)
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def run_torch_rank(rank: int, world: int, store_file: str, scenario: str, arg: str, out: str,
                   timeout_s: float) -> None:
    """One rank of a torch.distributed (gloo) run, in its own process."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        _run({}, rank, world, scenario, arg, out)
    finally:
        if scenario != "dead_rank":  # a group with a lost peer cannot be torn down collectively
            dist.destroy_process_group()


def main_mpi(argv: list[str]) -> None:
    from mpi4py import MPI

    scenario, arg, out = argv
    comm = MPI.COMM_WORLD
    _run({"comm": comm}, comm.Get_rank(), comm.Get_size(), scenario, arg, out)
    if scenario == "dead_rank":
        comm.Abort(0)  # the last rank is still asleep: end the job without waiting for it


if __name__ == "__main__":
    main_mpi(sys.argv[2:])
