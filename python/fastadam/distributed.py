r"""Adam with its state sharded across processes (ZeRO stage 1/2), on ``torch.distributed`` or on MPI.

Every rank holds the full parameters and computes gradients on its part of
the data.  :class:`ZeroAdam` lays all parameters of one dtype out as one flat
sequence of elements (in the order they were given) and cuts it into ``N``
contiguous shards of equal length ``S`` (a multiple of ``A`` = 64 elements;
the last shard is shorter or empty)::

    S = A * ceil(ceil(T / N) / A)              T: elements of that dtype, N: ranks
    shard r = elements [min(r*S, T), min((r+1)*S, T))

With 8-bit or 4-bit moments (``state_dtype="int8"``, ``"int4"`` or a pair
holding one), which are quantized in blocks counted from each param's first
element -- 256 elements per absmax for 8-bit codes; 128 per absmax and two
codes per byte for 4-bit ones -- a sequence holding such a param is laid
out on blocks instead: every param with quantized moments starts at a
multiple of 256 (up to 255 elements of padding before it, which no param
owns) and ``A`` = 256, so each rank's piece of such a param starts on one of
the whole param's 256-element blocks and ends on one (or at the param's
end).  256 is a multiple of 128 and even, so the piece's quantized state --
for elements ``[a, b)`` of the param its 8-bit codes ``[a, b)``, or its
4-bit code bytes ``[a/2, ceil(b/2))``, its absmax ``[a/B, ceil(b/B))`` (``B``
= 256 or 128), the maps -- is exactly the whole param's state of those
blocks: no block and no byte of two codes is split between ranks.  The
padding costs at most ``255`` elements per quantized param, and the coarser
rounding of ``S`` at most ``255 - 63`` more elements per rank, in the
reduced gradient kept per rank (``S`` elements), the bucket buffers and the
checkpoint files; no state is kept for it.  Float32 and bfloat16 layouts
are unchanged.

Rank ``r`` keeps the Adam state (``exp_avg``, ``exp_avg_sq``, and
``max_exp_avg_sq`` / ``master_param`` when used) of its shard only, so the
state per rank is ``1/N`` of the unsharded state.  :meth:`ZeroAdam.step`:

1. **reduce**: the gradients are reduced across ranks and each rank receives
   its shard of the sum (a reduce-scatter: ``Reduce_scatter_block`` in MPI; in
   ``torch.distributed`` an ``all_reduce`` of each bucket, which measured
   twice as fast as gloo's ``reduce_scatter``); with
   ``reduction="mean"`` each received element is then divided by ``N``
   (``fl(sum / N)``, one correctly rounded division);
2. **step**: one :class:`fastadam.Adam` call over the rank's shard: its state
   is plain fastadam state over zero-copy views of the parameters (a
   parameter that straddles shards is a slice ``p.reshape(-1)[a:b]``);
3. **gather**: the updated shards are all-gathered into every rank's
   parameter arrays, in place.

The step is element-wise, so given the same reduced gradients every rank's
parameters are bitwise equal to a single-process :class:`fastadam.Adam` step,
whatever ``N``, the bucket size and ``overlap``; only the reduction's
summation order is the engine's.  Communication goes through buckets of at
most ``bucket_bytes``; the reduced gradient of the shard (``1/N`` of the
model) is kept between steps.

With ``overlap=True`` (the default on torch.distributed) the three phases are pipelined over the
buckets ``0 .. B-1`` (all param dtypes' buckets, in order): while bucket
``k``'s elements are stepped, the reduction of bucket ``k+1`` and the
all-gather of bucket ``k-1`` are in flight (MPI ``Ireduce_scatter_block`` /
``Iallgather``; gloo ``async_op=True``, run by gloo's threads)::

    start reduce(0)
    for k in 0 .. B-1:
        wait reduce(k); start reduce(k+1)
        step bucket k                          (reduce(k+1), gather(k-1) in flight)
        wait gather(k-1), unpack it; start gather(k)
    wait gather(B-1), unpack it

That takes two buffers of ``bucket_bytes``, the reductions' and the
gathers', instead of one; ``overlap=False`` keeps one and steps the whole
shard in one call after all reductions.  Each bucket is stepped by a plan
over views of the same state arrays, with the same values: the bits are
those of the serial step.  Open MPI progresses a nonblocking collective only
inside MPI calls, so under MPI little moves while a bucket is stepped
(measured: 0.93-1.04 of the serial step on 2-4 ranks, where gloo's own
threads, which keep communicating, gave 0.88-0.89; see
benchmarks/bench_distributed.py): ``overlap`` defaults to True on
torch.distributed and False under MPI.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _core
from ._functional import RowSparseGrad
from ._optim import (_HYPERPARAMETERS, _MOMENTS, Adam, _bfloat16, _check_group_hyperparameters, _checked_group,
                     _is_16bit_float, _is_bfloat16, _is_integer, _json_number, _listed, _read_npy_header,
                     _sorted_keys, _state_dtypes)
from .reference import (QUANT_BLOCK, QUANT_BLOCK_4BIT, QuantizedState, code_bits, moment_map,
                        quantization_block)

__all__ = ["ZeroAdam", "ZeroAdamW"]

#: Shard boundaries fall on multiples of this many elements (the kernel's chunk alignment).
SHARD_ALIGNMENT = 64
#: The default bound on the communication buffer.
DEFAULT_BUCKET_BYTES = 32 * 2**20
#: The default time an MPI collective may take before the others are declared lost.
DEFAULT_MPI_TIMEOUT = 300.0
_MANIFEST = "manifest.json"
_FORMAT = "fastadam.distributed/1"
_MANIFEST_LIMIT = 64 * 2**20
#: The quantized storages of a moment: elements per code byte, elements per absmax (a block), the map's
#: length.  The layout puts params with such moments, and the shard cuts of their sequence, on multiples of
#: QUANT_BLOCK (256), which both kinds of block and both code widths divide.
_CODE_LAYOUT = {"int8": (1, QUANT_BLOCK, 256), "int4": (2, QUANT_BLOCK_4BIT, 16)}


def _default_map(moment: str, storage: str) -> np.ndarray:
    """The map fastadam.Adam gives ``moment`` in ``storage`` (int8 or int4)."""
    return moment_map(moment == "exp_avg", 8 if storage == "int8" else 4)


# -- communicators -------------------------------------------------------------------------------------------


class _MPIComm:
    """The collectives ZeroAdam needs, on an ``mpi4py`` communicator.

    With a timeout, each collective is started non-blocking and polled until
    done or until the deadline, when it raises TimeoutError: a rank that
    stopped answering makes the others raise instead of waiting forever.
    """

    engine = "mpi"

    def __init__(self, comm: Any, timeout: Optional[float]) -> None:
        from mpi4py import MPI

        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm: expected an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), "
                            f"got {type(comm).__name__}")
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = timeout

    def _wait(self, request: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        polls = 0
        while not request.Test():
            polls += 1
            if polls > 2000:  # after a short spin, stop taking a core from the ranks being waited for
                time.sleep(5e-5)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: not every rank took part within the timeout of {self.timeout:g} s "
                                       f"(rank {self.rank} of {self.size}); a rank died, hangs, or raised before "
                                       "the collective. The communicator cannot be used any more.")

    def finish(self, request: Any, what: str = "collective") -> None:
        """Wait for a collective started by one of the ``start_`` methods."""
        if self.timeout is None:
            request.Wait()
        else:
            self._wait(request, what)

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> Any:
        """Start summing ``send`` (``size`` equal blocks) across ranks, this rank's block of the sum into
        ``recv``; both buffers stay in use until :meth:`finish_reduce_scatter`."""
        return self.comm.Ireduce_scatter_block(send, recv, op=self._MPI.SUM)

    def finish_reduce_scatter(self, request: Any) -> None:
        self.finish(request, "reduce-scatter")

    def start_allgather_inplace(self, buffer: np.ndarray) -> Any:
        """Start filling ``buffer``'s ``size`` equal blocks from every rank's own block (this rank's is filled)."""
        return self.comm.Iallgather(self._MPI.IN_PLACE, buffer)

    def finish_allgather(self, request: Any) -> None:
        self.finish(request, "all-gather")

    def allgather(self, send: np.ndarray) -> np.ndarray:
        recv = np.empty((self.size,) + send.shape, send.dtype)
        if self.timeout is None:
            self.comm.Allgather(send, recv)
        else:
            self._wait(self.comm.Iallgather(send, recv), "all-gather")
        return recv

    def barrier(self) -> None:
        if self.timeout is None:
            self.comm.Barrier()
        else:
            self._wait(self.comm.Ibarrier(), "barrier")


class _TorchComm:
    """The collectives ZeroAdam needs, on a ``torch.distributed`` process group (gloo on CPU).

    The buffers are NumPy arrays; the collectives see them through
    ``torch.from_numpy`` (shared memory, no copy).  Timeouts are the process
    group's (``init_process_group(timeout=...)``): a peer that died or hangs
    makes the collective raise then.
    """

    engine = "torch.distributed"

    def __init__(self, group: Any) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialized (call "
                             "torch.distributed.init_process_group first), and no mpi4py comm= was given")
        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # all_gather_into_tensor was renamed (the old name warns).
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def _tensor(self, a: np.ndarray) -> Any:
        if a.dtype == np.uint16:  # 16-bit payloads travel as float16 bits (gloo gathers no 16-bit integers)
            a = a.view(np.float16)
        return self._torch.from_numpy(a)

    def start_reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> Any:
        # gloo's reduce_scatter took twice as long as an all_reduce of the same buffer followed by taking
        # this rank's block (benchmarks/bench_distributed.py: 145 vs 68 ms for 32 MiB on 2 ranks, 277 vs
        # 149 on 4), though it could send half the bytes: so the all_reduce, in place in the bucket buffer.
        # async_op: gloo runs it on its own threads while this one steps the previous bucket.
        return self._dist.all_reduce(self._tensor(send), group=self.group, async_op=True), send, recv

    def finish_reduce_scatter(self, pending: Any) -> None:
        work, send, recv = pending
        work.wait()
        block = len(recv)
        recv[...] = send[self.rank * block:(self.rank + 1) * block]

    def start_allgather_inplace(self, buffer: np.ndarray) -> Any:
        block = len(buffer) // self.size
        out = self._tensor(buffer)
        mine = out[self.rank * block:(self.rank + 1) * block].clone()  # the input may not alias the output
        return self._all_gather(out, mine, group=self.group, async_op=True), mine

    def finish_allgather(self, pending: Any) -> None:
        pending[0].wait()

    def allgather(self, send: np.ndarray) -> np.ndarray:
        recv = np.empty((self.size,) + send.shape, send.dtype)
        self._all_gather(self._tensor(recv.reshape(-1)), self._tensor(send.reshape(-1)), group=self.group)
        return recv

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


def _communicator(process_group: Any, comm: Any, timeout: Optional[float]) -> Union[_MPIComm, _TorchComm]:
    if comm is not None and process_group is not None:
        raise ValueError("pass either comm= (an mpi4py communicator) or process_group= (torch.distributed), "
                         "not both")
    if comm is not None:
        return _MPIComm(comm, DEFAULT_MPI_TIMEOUT if timeout == "default" else timeout)
    if timeout != "default":
        raise ValueError("timeout= applies to MPI only; a torch.distributed group has its own "
                         "(init_process_group(timeout=...))")
    return _TorchComm(process_group)


# -- layout --------------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    """``length`` elements at ``offset`` in a bucket buffer <-> elements ``start:`` of flat param ``param``."""

    offset: int
    param: int
    start: int
    length: int


@dataclass
class _Sequence:
    """All params of one dtype as one flat sequence of ``total`` elements, in shards of ``shard`` elements."""

    dtype: np.dtype
    reduce_dtype: np.dtype      # gradients are reduced in this dtype (float32 for 16-bit params)
    gather_dtype: np.dtype      # the bits that are gathered (uint16 for 16-bit params)
    params: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    total: int = 0
    shard: int = 0
    alignment: int = SHARD_ALIGNMENT  # QUANT_BLOCK when a param of the sequence has 8-bit or 4-bit moments
    block: int = 0              # elements per rank per bucket
    buckets: list[tuple[int, list[list[_Segment]]]] = field(default_factory=list)  # (block length, per rank)
    sizes: list[int] = field(default_factory=list)

    def bounds(self, rank: int) -> tuple[int, int]:
        return min(rank * self.shard, self.total), min((rank + 1) * self.shard, self.total)

    def segments(self, lo: int, hi: int) -> list[_Segment]:
        """The params' pieces within elements ``[lo, hi)`` of the sequence, at buffer offsets from 0 (the
        padding before a param with quantized moments belongs to no piece)."""
        out: list[_Segment] = []
        k = max(bisect.bisect_right(self.offsets, lo) - 1, 0)
        while lo < hi and k < len(self.params) and self.offsets[k] < hi:
            a, b = max(lo, self.offsets[k]), min(hi, self.offsets[k] + self.sizes[k])
            if a < b:
                out.append(_Segment(a - lo, self.params[k], a - self.offsets[k], b - a))
            k += 1
        return out


def _shard_length(total: int, world: int, alignment: int = SHARD_ALIGNMENT) -> int:
    return alignment * math.ceil(math.ceil(total / world) / alignment) if total else 0


def _moment_part(state: dict[str, np.ndarray], key: str, part: slice) -> Any:
    """Elements ``part`` of a piece's moment ``key`` as the core takes them: a view of the array, or for
    8-bit or 4-bit state a QuantizedState of views -- the bytes holding their codes (``[a, b)`` for 8-bit
    codes, ``[a/2, ceil(b/2))`` for 4-bit ones), and the absmax of the blocks they fill (``part`` starts on
    a multiple of 256 elements from the piece's first element, itself a 256-element block's first, so on a
    block and a byte of either kind)."""
    if key in state:
        return state[key].reshape(-1)[part]
    if key + "_codes" not in state:
        return None
    qmap = state[key + "_map"]
    per_byte, block = 8 // code_bits(qmap), quantization_block(qmap)
    assert part.start % QUANT_BLOCK == 0, "a quantized moment is cut off a block boundary"
    return QuantizedState(state[key + "_codes"].reshape(-1)[part.start // per_byte:-(-part.stop // per_byte)],
                          state[key + "_absmax"][part.start // block:-(-part.stop // block)], qmap)


# -- the optimizer -------------------------------------------------------------------------------------------


class _ShardAdam(Adam):
    """The fastadam.Adam over a rank's pieces of params, each stepped as that part of the whole param.

    Whether a piece's moments take ``state_dtype``'s storage follows the
    size of the whole param it is cut from (against ``min_compressed_size``),
    not the piece's size; and stochastic rounding draws a piece's bits from
    the whole param's position and its elements' indices in the whole param
    (``rounding_positions``), as one process over all params would.
    """

    def __init__(self, groups: list[dict[str, Any]], whole_sizes: list[int],
                 rounding_positions: list[tuple[int, int]], **options: Any) -> None:
        self._whole_sizes = whole_sizes
        super().__init__(groups, **options)
        self._plan.rounding_positions = rounding_positions

    def _compresses(self, p: np.ndarray, i: int) -> bool:
        return self._whole_sizes[i] >= self.min_compressed_size



class ZeroAdam:
    r"""Adam whose state is sharded across the ranks of an MPI communicator or a torch.distributed group.

    Parameters
    ----------
    params
        The same list of arrays (or param-group dicts, as for
        :class:`fastadam.Adam`) on every rank: float32/float64 NumPy arrays,
        C-contiguous and writeable (float16/bfloat16 with
        ``master_weights=True``).  They are updated in place on every rank.
        Their count, shapes, dtypes, grouping and hyperparameters are compared
        across ranks at construction; any difference raises ValueError on
        every rank.
    process_group, comm
        The engine: ``comm=`` an ``mpi4py`` intracommunicator (MPI), or
        ``process_group=`` a ``torch.distributed`` group; with neither, the
        default ``torch.distributed`` group (which must be initialized).
    reduction
        ``"mean"`` (the reduced gradient is ``fl(sum / N)``) or ``"sum"``.
    bucket_bytes
        The most bytes one collective moves in all ranks' blocks together
        (default 32 MiB); each communication buffer is this large.  A
        bucket holds at least 64 elements per rank (256 in a sequence with
        8-bit or 4-bit moments, so that buckets, too, are cut on blocks).
    overlap
        Pipeline the buckets (default: True on torch.distributed, False under
        MPI, where Open MPI moves a nonblocking collective only inside MPI
        calls and the overlap measured no gain): the communication of buckets
        ``k+1`` (reduce) and ``k-1`` (gather) overlaps the step of bucket
        ``k``; this holds two buffers of ``bucket_bytes`` instead of one, and
        steps the shard in one kernel call per bucket instead of one call.
        The bits are the same either way.  Every rank must pass the same.
    timeout
        MPI only: seconds a collective may wait for the other ranks before it
        raises TimeoutError (default 300; ``None`` uses MPI's blocking calls,
        which wait forever for a rank that hangs).  torch.distributed uses
        the group's timeout.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, eps_before_bias_correction,
    master_weights, num_threads
        As for :class:`fastadam.Adam`.
    state_dtype, min_compressed_size
        As for :class:`fastadam.Adam`, ``"float32"``, ``"bfloat16"``,
        ``"int8"`` or ``"int4"`` (or a pair of them; amsgrad's maximum
        follows ``exp_avg_sq``): whether a param's moments are stored
        compressed is decided by the size of the whole param, as in one
        process, so a rank's piece of a large param is stored compressed
        however short it is.  bfloat16 needs no alignment (each element is
        rounded on its own); with ``"int8"`` or ``"int4"`` the params with
        quantized moments and the shard boundaries of their sequence fall on
        multiples of 256 elements (see the module's docstring), so a rank's
        8-bit or 4-bit state is the whole params' state of its blocks (and,
        4-bit, of its bytes of two codes).
    stochastic_rounding, rounding_seed
        As for :class:`fastadam.Adam`: bfloat16 moments rounded
        stochastically, the random bits of an element drawn from (seed, step,
        the param's position among all params, the element's index in the
        whole param) -- on every rank and any number of ranks the bits one
        process would draw.

    Examples
    --------
    >>> opt = ZeroAdam([W, b], comm=MPI.COMM_WORLD, lr=1e-3)
    >>> opt.step([dW, db])            # this rank's gradients; W and b are updated on every rank
    """

    def __init__(self, params: Any, *, process_group: Any = None, comm: Any = None, reduction: str = "mean",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: Optional[bool] = None,
                 timeout: Union[float, None, str] = "default",
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                 decoupled_weight_decay: bool = False, eps_before_bias_correction: bool = False,
                 master_weights: bool = False, state_dtype: Union[str, tuple[str, str]] = "float32",
                 min_compressed_size: int = 4096, stochastic_rounding: bool = False, rounding_seed: int = 0,
                 num_threads: Optional[int] = None) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        if overlap is not None and not isinstance(overlap, (bool, np.bool_)):
            raise TypeError(f"overlap must be True, False or None, got {overlap!r}")
        self.state_dtype = _state_dtypes(state_dtype)
        if "bfloat16" in self.state_dtype:
            _bfloat16()  # TypeError naming ml_dtypes when it is missing
        if not _is_integer(min_compressed_size) or min_compressed_size < 0:
            raise ValueError(f"min_compressed_size must be an integer >= 0, got {min_compressed_size!r}")
        if not isinstance(stochastic_rounding, (bool, np.bool_)):
            raise TypeError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
        if not _is_integer(rounding_seed) or not 0 <= rounding_seed < 2**63:
            raise ValueError(f"rounding_seed must be an integer in [0, 2**63), got {rounding_seed!r}")
        self._comm = _communicator(process_group, comm, timeout)
        self.rank, self.world_size = self._comm.rank, self._comm.size
        self.reduction = reduction
        self.bucket_bytes = int(bucket_bytes)
        # Default: overlap where the engine communicates during the kernel call (gloo's threads), not under
        # MPI, where it measured no gain (see the module docstring) and would only hold a second buffer.
        self.overlap = isinstance(self._comm, _TorchComm) if overlap is None else bool(overlap)
        self.min_compressed_size = int(min_compressed_size)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.rounding_seed = int(rounding_seed)
        self.master_weights = bool(master_weights)
        self.num_threads = num_threads
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
                             eps_before_bias_correction=eps_before_bias_correction)
        self.last_step_seconds = {"reduce": 0.0, "step": 0.0, "gather": 0.0, "total": 0.0}
        self._step_count = 0

        # Checked locally first; a rank whose params are malformed tells the others before raising, so that
        # no rank is left waiting in the comparison below.
        local_error: Optional[BaseException] = None
        try:
            self._take_params(params)
        except (TypeError, ValueError) as e:
            local_error = e
        self._agree_across_ranks(local_error)
        self._lay_out()
        self._build_inner()
        self._build_bucket_plans()

    # -- construction ----------------------------------------------------------------------------------------

    def _take_params(self, params: Any) -> None:
        items = _listed(params, "params", f"{type(self).__name__}([W])")
        if not items:
            raise ValueError("params: the optimizer got an empty parameter list")
        groups_in = items if isinstance(items[0], dict) else [{"params": items}]
        self._groups: list[dict[str, Any]] = []
        self._params: list[np.ndarray] = []
        for k, g in enumerate(groups_in):
            group = _checked_group(g, k, self.defaults)
            for p in group["params"]:
                self._check_param(p, len(self._params))
                self._params.append(p)
            self._groups.append(group)
        spans = sorted((p.__array_interface__["data"][0], p.nbytes, i) for i, p in enumerate(self._params)
                       if p.nbytes)
        for (a, n, i), (b, _, j) in zip(spans, spans[1:]):
            if b < a + n:
                raise ValueError(f"params[{max(i, j)}] shares memory with params[{min(i, j)}]; each parameter "
                                 "must be its own buffer")
        self._group_of = [k for k, g in enumerate(self._groups) for _ in g["params"]]
        self._built_amsgrad = [bool(g["amsgrad"]) for g in self._groups]

    def _check_param(self, p: Any, i: int) -> None:
        if not isinstance(p, np.ndarray):
            raise TypeError(f"params[{i}]: expected a numpy.ndarray, got {type(p).__name__} (a torch tensor: "
                            "pass p.detach().numpy(), a view of its memory)")
        if _is_16bit_float(p):
            if not self.master_weights:
                raise TypeError(f"params[{i}]: dtype {p.dtype} needs master_weights=True")
        elif p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{i}]: dtype {p.dtype} is not float32, float64, float16 or bfloat16")
        if not p.flags.c_contiguous:
            raise ValueError(f"params[{i}]: must be C-contiguous (the gathered shards are written into its memory)")
        if not p.flags.writeable:
            raise ValueError(f"params[{i}]: is read-only")

    def _description(self) -> dict[str, Any]:
        """What must be equal on every rank, as JSON-able data."""
        return {"params": [[list(p.shape), p.dtype.name] for p in self._params],
                "groups": [[len(g["params"]), {key: g[key] for key in _HYPERPARAMETERS}] for g in self._groups],
                "master_weights": self.master_weights, "reduction": self.reduction,
                "bucket_bytes": self.bucket_bytes, "overlap": self.overlap,
                "state_dtype": list(self.state_dtype), "min_compressed_size": self.min_compressed_size,
                "stochastic_rounding": self.stochastic_rounding, "rounding_seed": self.rounding_seed}

    def _agree_across_ranks(self, local_error: Optional[BaseException]) -> None:
        """Raise on every rank if any rank's params failed their checks or differ from rank 0's."""
        if local_error is None:
            text = json.dumps(self._description(), default=_json_number, sort_keys=True)
        else:
            text = json.dumps({"error": f"{type(local_error).__name__}: {local_error}"})
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8).copy()  # writeable: torch wants it
        digests = self._comm.allgather(digest)
        if local_error is None and (digests == digests[0]).all():
            return
        # Someone differs: every rank sees that, and all exchange their descriptions to say what.
        data = np.frombuffer(text.encode(), np.uint8).copy()
        lengths = self._comm.allgather(np.array([len(data)], np.int64))[:, 0]
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[:len(data)] = data
        texts = [bytes(row[:n]).decode() for row, n in zip(self._comm.allgather(padded), lengths)]
        if local_error is not None:
            raise local_error
        described = [json.loads(t) for t in texts]
        for r, d in enumerate(described):
            if "error" in d:
                raise ValueError(f"ZeroAdam: rank {r} refused its params: {d['error']}")
        mine = described[0]
        for r, d in enumerate(described[1:], 1):
            if d != mine:
                raise ValueError(f"ZeroAdam: the params differ across ranks: {_difference(mine, d, r)} "
                                 "(every rank must pass the same params, groups and options)")

    def _lay_out(self) -> None:
        """The flat sequences, their shards and buckets, and the communication buffer."""
        world, rank = self.world_size, self.rank
        self._sequences: list[_Sequence] = []
        by_dtype: dict[str, _Sequence] = {}
        self._where: dict[int, tuple[_Sequence, int]] = {}  # param -> its sequence and offset in it
        for i, p in enumerate(self._params):
            seq = by_dtype.get(p.dtype.name)
            if seq is None:
                sixteen = _is_16bit_float(p)
                seq = _Sequence(p.dtype, np.dtype(np.float32) if sixteen else p.dtype,
                                np.dtype(np.uint16) if sixteen else p.dtype)
                by_dtype[p.dtype.name] = seq
                self._sequences.append(seq)
            if self._quantized(i):  # its blocks must be the sequence's blocks: start it on one
                seq.alignment = QUANT_BLOCK
                seq.total = -(-seq.total // QUANT_BLOCK) * QUANT_BLOCK
            seq.params.append(i)
            self._where[i] = (seq, seq.total)
            seq.offsets.append(seq.total)
            seq.sizes.append(p.size)
            seq.total += p.size
        buffer_bytes = 0
        for seq in self._sequences:
            seq.shard = _shard_length(seq.total, world, seq.alignment)
            itemsize = max(seq.reduce_dtype.itemsize, seq.gather_dtype.itemsize)
            block = self.bucket_bytes // (world * itemsize) // seq.alignment * seq.alignment
            seq.block = max(seq.alignment, min(block, seq.shard))
            for start in range(0, seq.shard, seq.block):
                length = min(seq.block, seq.shard - start)
                per_rank = [seq.segments(min(r * seq.shard + start, seq.total),
                                         min(r * seq.shard + start + length, seq.total)) for r in range(world)]
                seq.buckets.append((length, per_rank))
                buffer_bytes = max(buffer_bytes, world * length * itemsize)
        # One buffer per bucket in flight: the reductions' and the gathers' (one shared buffer without overlap;
        # none on one rank, which communicates nothing).
        self._buffer = np.empty(buffer_bytes if world > 1 else 0, np.uint8)
        self._gather_buffer = np.empty(buffer_bytes, np.uint8) if self.overlap and world > 1 else self._buffer
        self._flat = [p.reshape(-1) for p in self._params]  # views: C-contiguous params
        self._flat_bits = [f.view(np.uint16) if _is_16bit_float(f) else f for f in self._flat]
        # This rank's reduced gradients, kept between steps (1/N of the model).
        self._shard_grads = [np.zeros(seq.shard if seq.bounds(rank)[1] > seq.bounds(rank)[0] else 0,
                                      seq.reduce_dtype) for seq in self._sequences]

    def _quantized(self, i: int) -> bool:
        """Whether params[i] has a moment in 8-bit or 4-bit state: as fastadam.Adam decides, by the whole
        param's size, for params of float32 working dtype (float32, or 16-bit with a float32 master)."""
        p = self._params[i]
        return (any(storage in _CODE_LAYOUT for storage in self.state_dtype)
                and (p.dtype == np.float32 or _is_16bit_float(p))
                and p.size >= self.min_compressed_size)

    def _build_inner(self) -> None:
        """A fastadam.Adam over this rank's pieces: views of the params and of the reduced gradients."""
        pieces: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for seq, grads in zip(self._sequences, self._shard_grads):
            lo, hi = seq.bounds(self.rank)
            for s in seq.segments(lo, hi):
                pieces[s.param] = (self._flat[s.param][s.start:s.start + s.length],
                                   grads[s.offset:s.offset + s.length])
        inner_groups, self._inner_group_of, self._inner_params = [], [], []
        inner_grads = []
        for k, g in enumerate(self._groups):
            views = [(i, pieces[i]) for i in range(len(self._params)) if self._group_of[i] == k and i in pieces]
            if views:
                inner_groups.append({"params": [v for _, (v, _) in views],
                                     **{key: g[key] for key in _HYPERPARAMETERS}})
                self._inner_group_of.append(k)
                self._inner_params.extend(i for i, _ in views)
                inner_grads.extend(gr for _, (_, gr) in views)
        self._inner_grads = inner_grads
        self._inner: Optional[Adam] = None
        if inner_groups:
            positions = []  # each piece's param and the param's element it starts at
            for i in self._inner_params:
                seq, offset = self._where[i]
                positions.append((i, max(seq.bounds(self.rank)[0] - offset, 0)))
            self._inner = _ShardAdam(inner_groups, [self._params[i].size for i in self._inner_params], positions,
                                     master_weights=self.master_weights, num_threads=self.num_threads,
                                     state_dtype=self.state_dtype, min_compressed_size=self.min_compressed_size,
                                     stochastic_rounding=self.stochastic_rounding, rounding_seed=self.rounding_seed)

    def _build_bucket_plans(self) -> None:
        """For the overlapped step: the rank's part of each bucket as its own plan over views of the state.

        ``self._pipeline`` lists every bucket of every sequence, in the order
        all ranks communicate them, with the plan that steps this rank's
        elements of it (None where it has none) and that plan's gradients (views
        of the kept reduced gradients).  The plans hold no state of their own:
        their arrays are slices of the inner optimizer's.
        """
        self._pipeline: list[tuple[_Sequence, np.ndarray, int, int, list, Any, list]] = []
        if not (self.overlap and self.world_size > 1):
            return
        piece_of = {i: j for j, i in enumerate(self._inner_params)}
        for seq, shard_grads in zip(self._sequences, self._shard_grads):
            lo, hi = seq.bounds(self.rank)
            for b, (length, per_rank) in enumerate(seq.buckets):
                start = b * seq.block
                params, exp_avgs, exp_avg_sqs, maxes, models, group_of, grads = [], [], [], [], [], [], []
                segments = seq.segments(min(lo + start, hi), min(lo + start + length, hi))
                for s in segments:
                    state = self._inner.state[piece_of[s.param]]
                    first = s.start - max(lo - self._where[s.param][1], 0)  # the segment's place in the piece
                    part = slice(first, first + s.length)
                    view = self._flat[s.param][s.start:s.start + s.length]
                    if "master_param" in state:
                        params.append(state["master_param"].reshape(-1)[part])
                        models.append(view)
                    else:
                        params.append(view)
                        models.append(None)
                    exp_avgs.append(_moment_part(state, "exp_avg", part))
                    exp_avg_sqs.append(_moment_part(state, "exp_avg_sq", part))
                    maxes.append(_moment_part(state, "max_exp_avg_sq", part))
                    group_of.append(self._group_of[s.param])
                    grads.append(shard_grads[start + s.offset:start + s.offset + s.length])
                plan = None
                if params:
                    plan = _core.AdamPlan(params, exp_avgs, exp_avg_sqs, maxes, models, group_of, len(self._groups),
                                          self.stochastic_rounding, self.rounding_seed)
                    plan.rounding_positions = [(s.param, s.start) for s in segments]
                self._pipeline.append((seq, shard_grads, b, length, per_rank, plan, grads))

    # -- what the caller sees --------------------------------------------------------------------------------

    @property
    def engine(self) -> str:
        """``"mpi"`` or ``"torch.distributed"``."""
        return self._comm.engine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups (``"params"``: a tuple of the arrays, and the hyperparameters, which may be changed
        between steps -- the same way on every rank)."""
        return self._groups

    @property
    def steps(self) -> int:
        """The number of steps taken."""
        return self._step_count

    def shard_bounds(self, rank: Optional[int] = None) -> dict[str, tuple[int, int]]:
        """Per param dtype, the elements ``[lo, hi)`` of its flat sequence whose state ``rank`` holds."""
        rank = self.rank if rank is None else rank
        return {seq.dtype.name: seq.bounds(rank) for seq in self._sequences}

    @property
    def local_state(self) -> dict[int, dict[str, np.ndarray]]:
        """This rank's state: ``{param index: {"exp_avg": slice state, ...}}`` for the params it holds a
        piece of (the arrays are the live ones, of the piece's length; an 8-bit moment is ``<key>_codes`` of
        the piece's length, a 4-bit one ``<key>_codes`` of half its length rounded up (two codes per byte),
        each with ``<key>_absmax`` of its blocks, which are the whole param's, and ``<key>_map``)."""
        if self._inner is None:
            return {}
        return {i: dict(s) for i, s in zip(self._inner_params, self._inner.state)}

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (its moments and master copies; the 8-bit and 4-bit maps,
        shared by all pieces, once)."""
        arrays = {id(a): a for s in self.local_state.values() for a in s.values()}
        return sum(a.nbytes for a in arrays.values())

    # -- the step --------------------------------------------------------------------------------------------

    def _check_grads(self, grads: Sequence[Any]) -> list[np.ndarray]:
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"grads: expected a list of arrays, got {type(grads).__name__}") from None
        if len(grads) != len(self._params):
            raise ValueError(f"grads: expected {len(self._params)} gradients (one per param), got {len(grads)}")
        flat = []
        for i, (g, p) in enumerate(zip(grads, self._params)):
            if isinstance(g, RowSparseGrad):
                raise TypeError(f"grads[{i}]: row-sparse gradients are not supported by {type(self).__name__} "
                                "(it reduces dense gradients across ranks); pass a dense array")
            if not isinstance(g, np.ndarray):
                raise TypeError(f"grads[{i}]: expected a numpy.ndarray, got {type(g).__name__}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}]: shape {g.shape} does not match params[{i}]'s shape {p.shape}")
            allowed = ((p.dtype, np.dtype(np.float32)) if _is_16bit_float(p) else (p.dtype,))
            if g.dtype not in allowed:
                raise TypeError(f"grads[{i}]: dtype {g.dtype} does not match params[{i}]'s dtype {p.dtype}")
            if not g.flags.c_contiguous:
                raise ValueError(f"grads[{i}]: must be C-contiguous (it is read through a flat view)")
            flat.append(g.reshape(-1))
        return flat

    def step(self, grads: Sequence[np.ndarray]) -> None:
        """Reduce this rank's ``grads`` across ranks, step this rank's shard, all-gather the params.

        ``grads`` holds one dense gradient per param, in the order of the
        params, each of the param's shape and dtype (float32 also for a
        float16/bfloat16 param).  Every rank must call ``step`` the same number
        of times.  A gradient or a hyperparameter that fails its checks raises
        on its rank before anything is sent; the other ranks then raise when
        their collective times out.

        ``last_step_seconds`` then holds the step's wall time (``"total"``)
        and the time spent in each phase; with ``overlap`` these are the times
        the phase kept this thread busy or waiting, the rest of its
        communication being hidden behind the step of another bucket.
        """
        flat = self._check_grads(grads)
        for k, group in enumerate(self._groups):  # checked here, before any collective starts
            _check_group_hyperparameters(group, f"param_groups[{k}]")
            if group["amsgrad"] and not self._built_amsgrad[k]:
                raise ValueError(f"param_groups[{k}]: amsgrad was switched on after the optimizer was built")
        if self._inner is not None:
            for j, k in enumerate(self._inner_group_of):
                inner, outer = self._inner.param_groups[j], self._groups[k]
                for key in _HYPERPARAMETERS:
                    inner[key] = outer[key]
        if self._pipeline:
            self._pipelined_step(flat)
        else:
            t0 = time.perf_counter()
            self._reduce(flat)
            t1 = time.perf_counter()
            if self._inner is not None:
                self._inner.step(self._inner_grads)
            t2 = time.perf_counter()
            self._gather()
            t3 = time.perf_counter()
            self.last_step_seconds = {"reduce": t1 - t0, "step": t2 - t1, "gather": t3 - t2, "total": t3 - t0}
        self._step_count += 1

    def _pipelined_step(self, flat_grads: list[np.ndarray]) -> None:
        """The step with communication overlapped: while bucket k is stepped, the reduction of bucket k+1 and
        the gather of bucket k-1 are in flight (two buffers: the reductions' and the gathers').

        Every rank starts the collectives in the same order: reduce(0),
        then for each k: reduce(k+1), gather(k).  The elements each bucket's
        plan steps, and the values it steps them with, are those of the serial
        step, so the bits are too.
        """
        clock = time.perf_counter
        spent = {"reduce": 0.0, "step": 0.0, "gather": 0.0}
        t_begin = clock()
        done = self._step_count
        pipeline = self._pipeline
        reducing = self._start_reduce(pipeline[0], flat_grads)
        gathering = None
        for k, bucket in enumerate(pipeline):
            t0 = clock()
            self._finish_reduce(bucket, reducing)
            if k + 1 < len(pipeline):
                reducing = self._start_reduce(pipeline[k + 1], flat_grads)
            t1 = clock()
            plan, grads = bucket[5], bucket[6]
            if plan is not None:
                plan.steps = [done] * len(plan)
                plan.step(grads, self._groups, None, False, self.num_threads)
            t2 = clock()
            if gathering is not None:
                self._finish_gather(*gathering)
            gathering = (pipeline[k], self._start_gather(bucket))
            t3 = clock()
            spent["reduce"] += t1 - t0
            spent["step"] += t2 - t1
            spent["gather"] += t3 - t2
        t0 = clock()
        self._finish_gather(*gathering)
        t_end = clock()
        spent["gather"] += t_end - t0
        if self._inner is not None:  # its step counts, which a later load or state_dict reads
            self._inner._plan.steps = [done + 1] * len(self._inner_params)
        self.last_step_seconds = {**spent, "total": t_end - t_begin}

    # The pieces of the step, one bucket at a time.  A bucket is (sequence, its kept reduced gradients, its
    # index, its block length, per rank the segments of params it covers[, plan, plan's gradients]).

    def _start_reduce(self, bucket: tuple, flat_grads: list[np.ndarray]) -> Any:
        """Copy the gradients of every rank's block of ``bucket`` into the reduction buffer, start the reduction."""
        seq, shard_grads, b, length, per_rank = bucket[:5]
        send = self._buffer[:self.world_size * length * seq.reduce_dtype.itemsize].view(seq.reduce_dtype)
        for r, segments in enumerate(per_rank):
            filled = 0
            for s in segments:
                send[r * length + filled:r * length + s.offset] = 0  # padding before a quantized param
                np.copyto(send[r * length + s.offset:r * length + s.offset + s.length],
                          flat_grads[s.param][s.start:s.start + s.length], casting="unsafe")
                filled = s.offset + s.length
            send[r * length + filled:(r + 1) * length] = 0  # past the last element: padding
        start = b * seq.block
        if len(shard_grads):
            recv = shard_grads[start:start + length]
        else:  # this rank's shard is empty: receive the padding into a scratch block
            recv = np.empty(length, seq.reduce_dtype)
        return self._comm.start_reduce_scatter(send, recv), recv

    def _finish_reduce(self, bucket: tuple, pending: Any) -> None:
        request, recv = pending
        self._comm.finish_reduce_scatter(request)
        if self.reduction == "mean" and len(bucket[1]):
            np.divide(recv, self.world_size, out=recv)

    def _start_gather(self, bucket: tuple) -> Any:
        """Copy this rank's updated elements of ``bucket`` into the gather buffer, start the all-gather."""
        seq, _, _, length, per_rank = bucket[:5]
        rank = self.rank
        buf = self._gather_buffer[:self.world_size * length * seq.gather_dtype.itemsize].view(seq.gather_dtype)
        for s in per_rank[rank]:
            buf[rank * length + s.offset:rank * length + s.offset + s.length] = \
                self._flat_bits[s.param][s.start:s.start + s.length]
        return self._comm.start_allgather_inplace(buf), buf

    def _finish_gather(self, bucket: tuple, pending: Any) -> None:
        """Wait for the all-gather of ``bucket``; copy the other ranks' elements into the params."""
        request, buf = pending
        self._comm.finish_allgather(request)
        length, per_rank = bucket[3], bucket[4]
        for r, segments in enumerate(per_rank):
            if r == self.rank:
                continue
            for s in segments:
                self._flat_bits[s.param][s.start:s.start + s.length] = \
                    buf[r * length + s.offset:r * length + s.offset + s.length]

    def _buckets(self) -> list[tuple]:
        return [(seq, shard_grads, b, length, per_rank) for seq, shard_grads in zip(self._sequences, self._shard_grads)
                for b, (length, per_rank) in enumerate(seq.buckets)]

    def _reduce(self, flat_grads: list[np.ndarray]) -> None:
        if self.world_size == 1:  # the gradients are the reduced ones: copy them into the shard, no collective
            for seq, shard_grads in zip(self._sequences, self._shard_grads):
                for s in seq.segments(0, seq.total):
                    np.copyto(shard_grads[s.offset:s.offset + s.length],
                              flat_grads[s.param][s.start:s.start + s.length], casting="unsafe")
            return
        for bucket in self._buckets():
            self._finish_reduce(bucket, self._start_reduce(bucket, flat_grads))

    def _gather(self) -> None:
        if self.world_size == 1:  # the step updated the params in place: nothing to gather
            return
        for bucket in self._buckets():
            self._finish_gather(bucket, self._start_gather(bucket))

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _state_keys(self) -> list[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        if any(g["amsgrad"] for g in self._groups):
            keys.append("max_exp_avg_sq")
        if self.master_weights and any(_is_16bit_float(p) for p in self._params):
            keys.append("master_param")
        return keys

    def _members(self, seq: _Sequence, length: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """A shard's checkpoint members of ``seq`` for ``length`` of its elements: name -> (dtype, shape).

        Per element of the shard: ``param`` (16-bit floats as their bits),
        and each state key in the working dtype.  In a sequence with 8-bit
        or 4-bit moments, each such moment also has ``<key>_codes`` (uint8:
        one per element, or for 4-bit one per two elements, element ``2k``
        of the shard in the low four bits of byte ``k``), ``<key>_absmax``
        (float32 per 256 or 128 elements of the shard: the shard starts on a
        256-element block, and so does every quantized param in it, so
        block ``k`` of the shard is a block of one param, and byte ``k`` of
        4-bit codes holds codes of one param) and ``<key>_map`` (256 or 16
        values).
        """
        work = np.dtype(np.float32) if seq.reduce_dtype != seq.dtype else seq.dtype
        out = {"param": (seq.gather_dtype, (length,))}
        for key in self._state_keys():
            out[key] = (work, (length,))
            storage = self.state_dtype[_MOMENTS[key]] if key in _MOMENTS else None
            if seq.alignment == QUANT_BLOCK and storage in _CODE_LAYOUT:
                for part, dtype in (("_codes", np.uint8), ("_absmax", np.float32)):
                    out[key + part] = (np.dtype(dtype), (-(-length // self._elements_per_entry(key + part)),))
                out[key + "_map"] = (np.dtype(np.float32), (_CODE_LAYOUT[storage][2],))
        return out

    def _elements_per_entry(self, member: str) -> int:
        """How many elements of a piece or a shard one entry of state or checkpoint member ``member`` stands
        for: 1, but for a quantized moment's ``<moment>_codes`` 2 with 4-bit codes (two per byte) and for its
        ``<moment>_absmax`` 256 (8-bit) or 128 (4-bit).  Pieces and shards of such moments start on a multiple
        of 256 elements, so their first element is a whole entry's first."""
        for suffix, column in (("_codes", 0), ("_absmax", 1)):
            if member.endswith(suffix):
                return _CODE_LAYOUT[self.state_dtype[_MOMENTS[member[:-len(suffix)]]]][column]
        return 1

    def _shard_arrays(self) -> dict[str, np.ndarray]:
        """This rank's shard of params and state, per sequence: flat arrays of the shard's length.

        State a param does not have (``max_exp_avg_sq`` of a group without
        amsgrad, ``master_param`` of a float32 param, the float moments of a
        quantized param and the quantized ones of a float param) and the
        padding before quantized params are written as zeros (a map as the
        one fastadam.Adam gives the moment: :func:`fastadam.dynamic_map`, or
        for 4-bit ``exp_avg_sq`` :func:`fastadam.linear_map`), so that every
        shard has the same members.
        """
        state = self.local_state
        out: dict[str, np.ndarray] = {}
        for seq in self._sequences:
            lo, hi = seq.bounds(self.rank)
            name = seq.dtype.name
            for member, (dtype, shape) in self._members(seq, hi - lo).items():
                out[f"{name}/{member}"] = np.zeros(shape, dtype)
                if member.endswith("_map"):  # also where no piece of this shard has the moment: a valid map
                    moment = member[:-len("_map")]
                    out[f"{name}/{member}"][...] = _default_map(moment, self.state_dtype[_MOMENTS[moment]])
            for s in seq.segments(lo, hi):
                out[f"{name}/param"][s.offset:s.offset + s.length] = \
                    self._flat_bits[s.param][s.start:s.start + s.length]
                for key, a in state[s.param].items():
                    if key.endswith("_map"):
                        out[f"{name}/{key}"][...] = a
                    else:  # per element, or per code byte / absmax: a quantized piece starts on a block
                        first = s.offset // self._elements_per_entry(key)
                        out[f"{name}/{key}"][first:first + a.size] = a.reshape(-1)
        return out

    def save(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        """Write a sharded checkpoint: on each rank ``shard-RRRRR-of-NNNNN.npz``, and rank 0's ``manifest.json``.

        Every rank must call it.  Each shard holds the rank's elements of the
        params and of their state, as flat arrays per param dtype (no
        pickle); the manifest holds the layout, the groups, the step count
        and the moments' storage (``state_dtype``, ``min_compressed_size``),
        and is written last (after all shards), so its presence means the
        checkpoint is complete.  :meth:`load` reads it on any number of
        ranks.  Moments are written in the param's working dtype: a bfloat16
        moment widened to float32, which is exact, and narrowed back exactly
        by :meth:`load` (which refuses a checkpoint of another storage); an
        8-bit moment as its codes (per element of the shard), its absmax
        (per 256-element block of the shard) and its map; a 4-bit one as its
        codes (two per byte of the shard), its absmax (per 128-element
        block) and its map.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        np.savez(os.path.join(directory, f"shard-{self.rank:05d}-of-{self.world_size:05d}.npz"),
                 **self._shard_arrays())
        self._comm.barrier()
        if self.rank == 0:
            manifest = {
                "format": _FORMAT, "world_size": self.world_size, "step": self._step_count,
                **self._description(), "state_keys": self._state_keys(), "sequences": self._layout(self.world_size),
            }
            manifest["groups"] = [{**hyper, "params": count} for count, hyper in manifest["groups"]]
            tmp = os.path.join(directory, _MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, default=_json_number, indent=1)
            os.replace(tmp, os.path.join(directory, _MANIFEST))
        self._comm.barrier()

    def load(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        """Restore a checkpoint written by :meth:`save`, on this number of ranks (any: the state is resharded).

        Every rank must call it.  Each rank reads the manifest and the
        shards that overlap its own shard (the files must be visible to it:
        a shared file system across hosts), checks every member's declared
        shape and dtype before reading it (nothing is unpickled), and fills
        its state and its part of the params; then the params are
        all-gathered.  If any rank finds a problem, every rank raises
        ValueError and nothing changes.  The trajectory after loading is
        bitwise that of an uninterrupted run.
        """
        directory = os.fspath(directory)
        local_error: Optional[str] = None
        try:
            manifest = self._read_manifest(directory)
            arrays = self._read_shards(directory, manifest)
            state = self._inner_state(arrays, manifest["step"])
        except (ValueError, OSError) as e:
            local_error = f"{type(e).__name__}: {e}"
        flags = self._comm.allgather(np.array([local_error is not None], np.uint8))[:, 0]
        if local_error is not None:
            raise ValueError(f"load({directory!r}): {local_error}")
        if flags.any():
            failed = [r for r, f in enumerate(flags) if f]
            raise ValueError(f"load({directory!r}): rank(s) {failed} could not read the checkpoint "
                             "(see their error); nothing was changed")
        # All checked everywhere: change things.
        for k, (group, saved) in enumerate(zip(self._groups, manifest["groups"])):
            group.update({key: (tuple(saved[key]) if key == "betas" else saved[key]) for key in _HYPERPARAMETERS})
        if self._inner is not None:
            inner_groups, first = [], 0
            for g in self._inner.param_groups:
                n = len(g["params"])
                inner_groups.append({**{key: g[key] for key in _HYPERPARAMETERS}, "params": list(range(first, first + n))})
                first += n
            for seq in self._sequences:
                lo, hi = seq.bounds(self.rank)
                for s in seq.segments(lo, hi):
                    self._flat_bits[s.param][s.start:s.start + s.length] = \
                        arrays[f"{seq.dtype.name}/param"][s.offset:s.offset + s.length]
            # The master copies (if any) are restored by this, and the 16-bit params rounded from them.
            self._inner.load_state_dict({"state": state, "param_groups": inner_groups})
        self._step_count = int(manifest["step"])
        self._gather()

    def _inner_state(self, arrays: dict[str, np.ndarray], step: int) -> dict[int, dict[str, Any]]:
        """The inner optimizer's state_dict entries from a checkpoint's arrays of this rank's shard.

        A checkpoint holds every moment in the param's working dtype; a
        bfloat16 moment is narrowed back, which is exact for what save()
        wrote (bfloat16 values widened), and refused for any other value.
        """
        state: dict[int, dict[str, Any]] = {}
        if self._inner is None:
            return state
        for j, i in enumerate(self._inner_params):
            seq, start = self._where[i]
            lo, _ = seq.bounds(self.rank)
            a = max(start, lo) - lo  # the piece's first element in this rank's shard
            entry: dict[str, Any] = {"step": step}
            for key, live in self._inner.state[j].items():
                saved = arrays[f"{seq.dtype.name}/{key}"]
                if key.endswith("_map"):
                    entry[key] = saved
                    continue
                unit = self._elements_per_entry(key)  # a quantized piece starts on a 256-element block
                saved = saved[a // unit:a // unit + live.size].reshape(live.shape)
                if _is_bfloat16(live):
                    narrowed = saved.astype(live.dtype)
                    if not np.array_equal(narrowed.astype(saved.dtype), saved, equal_nan=True):
                        raise ValueError(f"the {key} of params[{i}] holds values that are not bfloat16 (this "
                                         "optimizer stores it as bfloat16); the checkpoint was not written "
                                         "with this state_dtype")
                    saved = narrowed
                entry[key] = saved
            state[j] = entry
        return state

    def _read_manifest(self, directory: str) -> dict[str, Any]:
        path = os.path.join(directory, _MANIFEST)
        if os.path.getsize(path) > _MANIFEST_LIMIT:
            raise ValueError(f"{path}: larger than {_MANIFEST_LIMIT} bytes; not a manifest save() writes")
        with open(path) as f:
            try:
                manifest = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a fastadam.distributed checkpoint (format {_FORMAT!r})")
        mine = self._description()
        for key in ("params", "master_weights"):
            if manifest.get(key) != json.loads(json.dumps(mine[key])):
                raise ValueError(f"{path}: the checkpoint's {key} differ from this optimizer's: "
                                 f"{str(manifest.get(key))[:200]} vs {str(mine[key])[:200]}")
        groups = manifest.get("groups")
        if not isinstance(groups, list) or [g.get("params") if isinstance(g, dict) else None for g in groups] \
                != [len(g["params"]) for g in self._groups]:
            raise ValueError(f"{path}: the checkpoint's param groups hold other numbers of params than this "
                             "optimizer's")
        for k, (saved, group) in enumerate(zip(groups, self._groups)):
            if set(saved) != set(_HYPERPARAMETERS) | {"params"}:
                raise ValueError(f"{path}: groups[{k}] has the keys {_sorted_keys(saved)}")
            merged = {**group, **{key: saved[key] for key in _HYPERPARAMETERS}}
            merged["betas"] = tuple(merged["betas"]) if isinstance(merged["betas"], list) else merged["betas"]
            _check_group_hyperparameters(merged, f"{path}: groups[{k}]")
            if bool(saved["amsgrad"]) != bool(group["amsgrad"]):
                raise ValueError(f"{path}: groups[{k}]: amsgrad differs from this optimizer's")
        # Checkpoints written before state_dtype existed hold float32 moments.
        storage = manifest.get("state_dtype", ["float32", "float32"])
        if storage != list(self.state_dtype) or (storage != ["float32", "float32"] and manifest.get(
                "min_compressed_size") != self.min_compressed_size):
            raise ValueError(f"{path}: the checkpoint's moments were stored with state_dtype {str(storage)[:100]}, "
                             f"min_compressed_size {str(manifest.get('min_compressed_size'))[:30]}; this optimizer "
                             f"stores them with {list(self.state_dtype)}, {self.min_compressed_size}")
        if manifest.get("state_keys") != self._state_keys():
            raise ValueError(f"{path}: state keys {manifest.get('state_keys')} differ from {self._state_keys()}")
        world, step = manifest.get("world_size"), manifest.get("step")
        if not isinstance(world, int) or isinstance(world, bool) or not 1 <= world <= 2**20:
            raise ValueError(f"{path}: world_size {world!r} is not a positive integer")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63 - 1:
            raise ValueError(f"{path}: step {step!r} is not an integer in [0, 2**63 - 1)")
        expected = self._layout(world)
        if manifest.get("sequences") != expected:
            raise ValueError(f"{path}: the layout {manifest.get('sequences')} is not the one of "
                             f"{world} ranks over these params ({expected})")
        return manifest

    def _layout(self, world: int) -> dict[str, dict[str, int]]:
        """The flat sequences on ``world`` ranks, as the manifest records them (``alignment`` only where it is
        not 64 elements: a sequence with 8-bit or 4-bit moments, whose params and shards start on 256-element
        blocks)."""
        return {seq.dtype.name: {"total": seq.total, "shard": _shard_length(seq.total, world, seq.alignment),
                                 **({"alignment": seq.alignment} if seq.alignment != SHARD_ALIGNMENT else {})}
                for seq in self._sequences}

    def _read_shards(self, directory: str, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
        """This rank's new shard, assembled from the saved shards that overlap it.

        Old and new shards start on multiples of the sequence's alignment, so
        in a sequence with 8-bit or 4-bit moments (256) every block of the new
        shard, and every byte of two 4-bit codes, lies in one old shard, and
        its absmax and codes are copied from there.
        """
        world = manifest["world_size"]
        out: dict[str, np.ndarray] = {}
        for seq in self._sequences:
            lo, hi = seq.bounds(self.rank)
            members = self._members(seq, hi - lo)
            for member, (dtype, shape) in members.items():
                out[f"{seq.dtype.name}/{member}"] = np.empty(shape, dtype)
            if lo >= hi:
                continue
            old_shard = _shard_length(seq.total, world, seq.alignment)
            for r in range(lo // old_shard, (hi - 1) // old_shard + 1):
                old_lo, old_hi = min(r * old_shard, seq.total), min((r + 1) * old_shard, seq.total)
                a, b = max(lo, old_lo), min(hi, old_hi)
                path = os.path.join(directory, f"shard-{r:05d}-of-{world:05d}.npz")
                try:
                    zf = zipfile.ZipFile(path)
                except zipfile.BadZipFile as e:
                    raise ValueError(f"{path}: not an .npz file ({e})") from None
                with zf:
                    for member, (dtype, want_shape) in self._members(seq, old_hi - old_lo).items():
                        name = f"{seq.dtype.name}/{member}.npy"
                        try:
                            with zf.open(name) as fp:
                                shape, declared = _read_npy_header(fp)
                            if shape != want_shape or declared != dtype:
                                raise ValueError(f"expected {dtype}{want_shape}, the file declares "
                                                 f"{declared}{shape}")
                            with zf.open(name) as fp:
                                data = np.lib.format.read_array(fp, allow_pickle=False)
                        except KeyError:
                            raise ValueError(f"{path}: member {name!r} is missing") from None
                        except (ValueError, EOFError, OSError, zlib.error, zipfile.BadZipFile) as e:
                            raise ValueError(f"{path}: member {name!r}: {e}") from None
                        into = out[f"{seq.dtype.name}/{member}"]
                        if member.endswith("_map"):
                            into[...] = data
                        else:  # per element, or per code byte / absmax: a, lo, old_lo are multiples of 256
                            unit = self._elements_per_entry(member)
                            count = -(-(b - a) // unit)
                            into[(a - lo) // unit:(a - lo) // unit + count] = \
                                data[(a - old_lo) // unit:(a - old_lo) // unit + count]
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank {self.rank} of {self.world_size}, {self.engine}, "
                f"{len(self._params)} params in {len(self._groups)} groups, reduction={self.reduction!r})")


class ZeroAdamW(ZeroAdam):
    """:class:`ZeroAdam` with decoupled weight decay (AdamW), ``weight_decay`` 1e-2 by default."""

    def __init__(self, params: Any, *, weight_decay: float = 1e-2, **options: Any) -> None:
        if "decoupled_weight_decay" in options:
            raise TypeError("ZeroAdamW always uses decoupled weight decay; use ZeroAdam for the choice")
        super().__init__(params, weight_decay=weight_decay, decoupled_weight_decay=True, **options)


def _difference(first: dict[str, Any], other: dict[str, Any], rank: int) -> str:
    """Where rank ``rank``'s description first differs from rank 0's, in words."""
    a, b = first["params"], other["params"]
    if len(a) != len(b):
        return f"rank 0 has {len(a)} params, rank {rank} has {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x[0] != y[0]:
            return f"params[{i}] has shape {tuple(x[0])} on rank 0 and {tuple(y[0])} on rank {rank}"
        if x[1] != y[1]:
            return f"params[{i}] has dtype {x[1]} on rank 0 and {y[1]} on rank {rank}"
    for key in ("groups", "master_weights", "reduction", "bucket_bytes", "overlap", "state_dtype",
                "min_compressed_size", "stochastic_rounding", "rounding_seed"):
        if first[key] != other[key]:
            return f"{key} is {str(first[key])[:200]} on rank 0 and {str(other[key])[:200]} on rank {rank}"
    return f"rank {rank} differs from rank 0"  # pragma: no cover - the digests differed on equal descriptions
