"""The stateful optimizers: fastadam.Adam, fastadam.AdamW and fastadam.SparseAdam."""

from __future__ import annotations

import json
import math
import os
import types
import zipfile
import zlib
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._functional import RowSparseGrad
from .reference import QuantizedState, code_bits, moment_map, quantization_block, zero_state

#: The hyperparameters of a param group, as the core reads them (named in one place: csrc/hyper.hpp).
_HYPERPARAMETERS: tuple[str, ...] = _core.HYPERPARAMETERS
#: The keys of a param group: exactly these, at construction and at every step.
_GROUP_KEYS = frozenset(("params", *_HYPERPARAMETERS))
#: Step counts are int64 in the core and each step adds one: a count must stay below 2**63 - 1.
_STEP_LIMIT = 2**63 - 1


def _is_16bit_float(a: np.ndarray) -> bool:
    """float16, or ml_dtypes' bfloat16 (NumPy has no bfloat16 of its own)."""
    return a.dtype == np.float16 or (a.dtype.itemsize == 2 and a.dtype.name == "bfloat16")


#: What state_dtype may say for a moment: uncompressed (the param's dtype), bfloat16, 8-bit or 4-bit.
_STATE_DTYPES = ("float32", "bfloat16", "int8", "int4")
#: The arrays of a moment in 8-bit or 4-bit state, under the moment's name + these suffixes (see
#: QuantizedState).
_QUANTIZED_PARTS = ("_codes", "_absmax", "_map")
#: The state arrays that state_dtype compresses (amsgrad's maximum is stored as exp_avg_sq is).
_MOMENTS = {"exp_avg": 0, "exp_avg_sq": 1, "max_exp_avg_sq": 1}


def _is_bfloat16(a: np.ndarray) -> bool:
    return a.dtype.itemsize == 2 and a.dtype.name == "bfloat16"


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("state_dtype='bfloat16' needs the ml_dtypes package (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _state_dtypes(state_dtype: Any, allowed: tuple[str, ...] = _STATE_DTYPES) -> tuple[str, str]:
    """state_dtype as (exp_avg's, exp_avg_sq's): a name for both, or a pair of names (of ``allowed``)."""
    pair = (state_dtype, state_dtype) if isinstance(state_dtype, str) else state_dtype
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(d not in allowed for d in pair):
        raise ValueError(f"state_dtype must be one of {allowed}, or a pair of them for (exp_avg, exp_avg_sq), "
                         f"got {state_dtype!r}")
    return pair[0], pair[1]


def _moment(s: Mapping[str, np.ndarray], key: str) -> Any:
    """A param's moment as the core takes it: its array, or for 8-bit or 4-bit state its QuantizedState."""
    if key in s or key + "_codes" not in s:
        return s.get(key)
    return QuantizedState(*(s[key + part] for part in _QUANTIZED_PARTS))


def _moment_names(s: Mapping[str, Any]) -> list[str]:
    """The moments a param's state holds, in whatever storage."""
    return [key for key in _MOMENTS if key in s or key + "_codes" in s]


def _storage_kind(s: Mapping[str, Any], key: str) -> Any:
    """How a state stores moment ``key``: "array" (float32 or bfloat16), or 8 or 4 (the bits of its codes,
    which its map's length says)."""
    if key in s:
        return "array"
    qmap = s[key + "_map"]
    return code_bits(qmap) if isinstance(qmap, np.ndarray) and qmap.shape in ((16,), (256,)) else 8


def _check_saved_state(saved: dict[str, Any], mine: dict[str, np.ndarray], i: int, shape: tuple[int, ...]) -> None:
    """Check a saved param state against this optimizer's, before anything is loaded (load_state_dict).

    Each moment may be stored otherwise than this optimizer stores it -- float32, bfloat16, 8-bit or 4-bit
    (``<key>_codes``, ``_absmax``, ``_map``) -- and is converted on loading; everything else must match.
    ``shape`` is the param's.
    """
    moment_keys = {m + part for m in _MOMENTS for part in ("", *_QUANTIZED_PARTS)}
    want = {"step"} | (set(mine) - moment_keys)
    for key in _moment_names(mine):
        want |= {key} if key in saved else {key + part for part in _QUANTIZED_PARTS}
    if set(saved) != want:
        raise ValueError(f"state[{i}]: expected keys {sorted({'step', *mine})} (any moment may be float32, "
                         f"bfloat16, 8-bit or 4-bit state), got {_sorted_keys(saved)}")
    for key in want - {"step"}:
        if not isinstance(saved[key], np.ndarray):
            raise ValueError(f"state[{i}][{key!r}]: expected a numpy.ndarray, got {type(saved[key]).__name__}")
    quantized_parts = {m + part for m in _MOMENTS for part in _QUANTIZED_PARTS}
    for key, a in mine.items():
        if key not in saved or key in quantized_parts:  # quantized parts: _check_quantized_parts below
            continue
        src = saved[key]
        # float32 and bfloat16 moments load into each other (converting a live optimizer).
        convertible = key in _MOMENTS and {src.dtype.name, a.dtype.name} <= {"float32", "bfloat16"}
        if src.shape != a.shape or (src.dtype != a.dtype and not convertible):
            raise ValueError(f"state[{i}][{key!r}]: expected {a.dtype}{a.shape}, got {src.dtype}{src.shape}")
    for key in _moment_names(mine):
        if key in saved and key in mine:  # float32 or bfloat16 on both sides: checked above
            continue
        shape = tuple(shape)
        if key in saved:  # a float32/bfloat16 moment to quantize into this optimizer's 8-bit or 4-bit state
            src = saved[key]
            if src.shape != shape or src.dtype.name not in ("float32", "bfloat16"):
                raise ValueError(f"state[{i}][{key!r}]: expected float32 or bfloat16{shape} to convert into "
                                 f"{_storage_kind(mine, key)}-bit state, got {src.dtype}{src.shape}")
            continue
        if key in mine and mine[key].dtype.name not in ("float32", "bfloat16"):
            raise ValueError(f"state[{i}]: quantized {key!r} cannot load into a {mine[key].dtype} moment")
        _check_quantized_parts([saved[key + part] for part in _QUANTIZED_PARTS], shape, f"state[{i}]", key)


def _check_shared_maps(saved_states: Sequence[dict[str, Any]], states: Sequence[dict[str, np.ndarray]]) -> None:
    """The optimizer keeps one map of each kind for all params (one array): the maps saved for the params that
    share one must be the same values, or loading would decode some params' codes with another param's map."""
    first: dict[int, tuple[str, np.ndarray]] = {}
    for i, (saved, mine) in enumerate(zip(saved_states, states)):
        for key in mine:
            if not key.endswith("_map") or key not in saved:
                continue
            where = f"state[{i}][{key!r}]"
            values = np.asarray(saved[key], np.float32)
            shared = first.setdefault(id(mine[key]), (where, values))
            if not np.array_equal(shared[1].view(np.uint32), values.view(np.uint32)):
                raise ValueError(f"{where} differs from {shared[0]}: this optimizer keeps one map of each kind for "
                                 "all params; re-quantize the moments with one map before loading")


def _check_quantized_parts(parts: Sequence[np.ndarray], shape: tuple[int, ...], where: str, key: str) -> None:
    """The arrays ``(codes, absmax, map)`` of moment ``key`` in 8-bit or 4-bit state (a map of 256 or 16
    values), for a param of ``shape``.

    They must be what a step takes: uint8 codes of the param's shape (8-bit) or ``ceil(size / 2)`` of them
    (4-bit, two per byte), one float32 absmax per block of 256 (8-bit) or 128 (4-bit) elements, and a map of
    finite, strictly ascending float32 values (an 8-bit one holding 0).  A ValueError names the entry,
    ``where[key + part]``.
    """
    size, qmap = math.prod(shape), parts[2]
    if qmap.dtype != np.float32 or qmap.shape not in ((256,), (16,)):
        raise ValueError(f"{where}[{key + '_map'!r}]: expected float32(256,) (8-bit codes) or float32(16,) "
                         f"(4-bit), got {qmap.dtype}{qmap.shape}")
    four = qmap.size == 16
    codes_shape = (-(-size // 2),) if four else tuple(shape)
    wants = ((np.uint8, codes_shape), (np.float32, (-(-size // quantization_block(qmap)),)), (np.float32, qmap.shape))
    for part, a, (dtype, part_shape) in zip(_QUANTIZED_PARTS, parts, wants):
        if a.dtype != dtype or a.shape != part_shape:
            raise ValueError(f"{where}[{key + part!r}]: expected {np.dtype(dtype)}{part_shape}, "
                             f"got {a.dtype}{a.shape}")
    try:
        _core.codebook_layout(parts[2])
    except ValueError as e:
        raise ValueError(f"{where}[{key + '_map'!r}]: {e}") from None


def _copy_converted(src: np.ndarray, a: np.ndarray) -> None:
    if src.dtype == a.dtype:
        np.copyto(a, src)
    else:  # float32 <-> bfloat16 moments: exact one way, to nearest-even the other
        with np.errstate(over="ignore", invalid="ignore"):
            a[...] = src.astype(a.dtype)


def _convert_moment(src: Any, into: Any, shape: tuple[int, ...]) -> None:
    """A checked moment of a param of ``shape`` from one storage into another (quantized on one side at
    least): its values (widened from bfloat16, or decoded) quantized as the step stores them, or rounded to
    nearest-even into bfloat16."""
    if isinstance(src, QuantizedState):
        values = np.empty(shape, np.float32)
        _core.dequantize_blockwise(QuantizedState(*(np.ascontiguousarray(a) for a in src)), values)
    else:
        values = np.ascontiguousarray(src, dtype=np.float32)
    if isinstance(into, QuantizedState):
        _core.quantize_blockwise(values.reshape(shape), into)
    else:
        _copy_converted(values, into)


#: bfloat16 moments start this many bytes apart modulo 4 KiB (see _staggered_zeros).
_STAGGER_BYTES = 256


def _staggered_zeros(shape: tuple[int, ...], dtype: np.dtype, k: int) -> np.ndarray:
    """Zeros of ``shape``, starting ``k * _STAGGER_BYTES`` bytes into their own allocation.

    NumPy puts every large array at the same offset from a page boundary, so a param's moments, which the
    step walks in lockstep, have the same address modulo 4 KiB element by element.  On this project's Zen 3
    VM, bfloat16 moments so placed ran the step at half its speed at 2^26 params, and 256 bytes apart they
    did not (`bench_state_dtype.py --bf16-offset` shows it; why is not understood -- presumably the two
    2-byte streams' accesses alias).  The offset costs nothing elsewhere: the arrays stay 256-byte aligned
    relative to NumPy's own placement.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    offset = k * _STAGGER_BYTES
    return np.zeros(nbytes + offset, np.uint8)[offset:].view(dtype).reshape(shape)


def _stored(a: np.ndarray) -> np.ndarray:
    """An array as save() writes it: bfloat16, which has no .npy dtype of its own, as its uint16 bits."""
    return a.view(np.uint16) if _is_bfloat16(a) else a


ParamsOrGroups = Union[Iterable[np.ndarray], Iterable[dict]]
PathLike = Union[str, "os.PathLike[str]"]


def _is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _listed(value: Any, where: str, wrap_hint: str) -> list:
    """The items of a list/tuple/iterable of params; a single array (or dict, str) is refused, not iterated."""
    if isinstance(value, np.ndarray):
        raise TypeError(f"{where}: expected a list of arrays, got a single numpy.ndarray "
                        f"(iterating it would split it into rows); wrap it in a list: {wrap_hint}")
    if isinstance(value, (dict, str, bytes)):
        raise TypeError(f"{where}: expected a list of arrays, got a single {type(value).__name__}; "
                        f"wrap it in a list: {wrap_hint}")
    try:
        iterator = iter(value)
    except TypeError:
        raise TypeError(f"{where}: expected a list of arrays, got {type(value).__name__}") from None
    return list(iterator)


def _sorted_keys(keys: Iterable[Any]) -> list:
    """Keys sorted for a message, whatever their types."""
    return sorted(keys, key=repr)


def _checked_step(value: Any, where: str) -> int:
    """A saved step count as an int in [0, 2**63 - 1); a bool or float is refused."""
    if not _is_integer(value):
        raise ValueError(f"{where}: expected an integer step count, got {type(value).__name__}")
    step = int(value)
    if not 0 <= step < _STEP_LIMIT:
        raise ValueError(f"{where} must be in [0, 2**63 - 1), got {step}")
    return step


def _npz_path(path: Any) -> Any:
    """The file :meth:`Adam.save` and :meth:`Adam.load` use: ``path`` with ``.npz`` appended unless it ends so.

    File objects are passed through unchanged.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        return path
    path = os.fspath(path)
    suffix = b".npz" if isinstance(path, bytes) else ".npz"
    return path if path.endswith(suffix) else path + suffix


def _check_group_hyperparameters(group: dict, where: str) -> None:
    """Raise the core's error for a bad hyperparameter, prefixed with the group."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    try:
        _core.check_hyperparameters(group)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


def _checked_group(g: Any, k: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """Param group ``g``, to become ``param_groups[k]``: a dict of ``"params"`` and known options, the
    defaults filled in, its params a non-empty tuple (not yet checked) and its hyperparameters checked."""
    where = f"param_groups[{k}]"
    if not isinstance(g, dict):
        raise TypeError(f"params[{k}]: expected a param-group dict with a 'params' key, got {type(g).__name__}")
    if "params" not in g:
        raise TypeError(f"params[{k}]: expected a param-group dict with a 'params' key")
    unknown = set(g) - _GROUP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {_sorted_keys(unknown)}")
    group = {**defaults, **g}
    group["params"] = tuple(_listed(g["params"], f"{where}['params']", "{'params': [W]}"))
    group["betas"] = tuple(group["betas"]) if isinstance(group["betas"], (tuple, list)) else group["betas"]
    if not group["params"]:
        raise ValueError(f"{where}: empty parameter list")
    _check_group_hyperparameters(group, where)
    return group


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The declared shape and dtype of a ``.npy`` stream, read without reading its data."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy format version {version} is not one save() writes")
    return shape, dtype


def _json_number(value: Any) -> Any:
    """NumPy scalars (accepted as hyperparameters) as the Python numbers JSON can hold."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    raise TypeError(f"save: a hyperparameter of type {type(value).__name__} cannot be written as JSON")


class Adam:
    r"""Adam (Kingma & Ba, 2015) over NumPy arrays, with the options of ``torch.optim.Adam``.

    The optimizer owns the state of every parameter array: the first and
    second moment estimates ``exp_avg`` and ``exp_avg_sq`` (and
    ``max_exp_avg_sq`` with ``amsgrad``), zero-initialised arrays of the
    parameter's dtype, and the number of steps taken.  Each :meth:`step`
    updates every parameter in place in one pass over memory, with the formula
    of :func:`fastadam.adam_step`.

    A gradient may be a :class:`fastadam.RowSparseGrad` ``(indices, values)``
    instead of an array: then only the rows named by ``indices`` (repeats
    summed) are updated, with the same formula, and the moments of the other
    rows are left as they are -- the "lazy" update of embedding tables.

    The optimizer works on the very arrays it was given and on the state
    arrays it created; it never swaps them.  So that its view cannot diverge
    from the caller's, the containers are fixed: :attr:`state` is a tuple of
    read-only mappings (``opt.state[i]["exp_avg"] = a`` raises TypeError;
    the arrays themselves are updated in place and may be written into,
    ``opt.state[i]["exp_avg"][...] = a``), and each group's ``"params"`` is a
    tuple.  Parameters are added with :meth:`add_param_group`.  The groups'
    hyperparameters may be changed between steps (schedules); a group may hold
    no other keys.

    Parameters
    ----------
    params
        A list (or any iterable, not a single array) of arrays
        (float32/float64, C-contiguous, writeable, each given once), or a list
        of param-group dicts ``{"params": [...], "lr": ..., ...}`` whose keys
        override the defaults below for that group.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As in ``torch.optim.Adam``; ``decoupled_weight_decay=True`` is AdamW.
    eps_before_bias_correction
        Add eps to ``sqrt(v)`` before the bias correction, as Keras,
        TensorFlow and scikit-learn do (see :func:`fastadam.adam_step`); a
        per-group option like the others.
    num_threads
        The most threads a step uses (default: OpenMP's setting).
    master_weights
        For float16 / bfloat16 params (bfloat16 from ``ml_dtypes``): keep a
        float32 master copy of each (``state[i]["master_param"]``) and float32
        moments; each step updates the master and, in the same pass, writes it
        rounded to nearest-even into the param.  Without it such params are
        refused.
    state_dtype, min_compressed_size
        How the moments of float32 params (master-weighted ones included) are
        stored: ``"float32"`` (default), ``"bfloat16"``, ``"int8"`` or
        ``"int4"``, for both, or a pair ``(exp_avg's, exp_avg_sq's)``;
        amsgrad's ``max_exp_avg_sq`` follows ``exp_avg_sq``.  ``"int8"`` is
        8-bit block-wise state (a :class:`fastadam.QuantizedState` per moment:
        the state holds ``exp_avg_codes``, ``exp_avg_absmax`` and
        ``exp_avg_map`` in place of ``exp_avg``, and so on; the signed
        :func:`fastadam.dynamic_map` for ``exp_avg``, the unsigned one for the
        others), about 1.02 bytes per element and moment.  ``"int4"`` is
        4-bit block-wise state (Li et al., NeurIPS 2023): blocks of 128, two
        codes per byte, ``dynamic_map(True, bits=4)`` for ``exp_avg`` and
        :func:`fastadam.linear_map` (no zero) for the others, about 0.53
        bytes per element and moment.  bfloat16 moments halve the state (8 to 4 bytes per
        parameter) and the step's memory traffic (28 to 20 bytes): each step
        widens them exactly to float32, computes in float32 and rounds them
        back to nearest-even.  Params of fewer than ``min_compressed_size``
        elements (default 4096, as bitsandbytes) and float64 params keep
        moments in their own dtype.
    stochastic_rounding, rounding_seed
        Round bfloat16 moments stochastically instead, from a counter-based
        hash of (``rounding_seed``, the param's step count, its position
        among all params, the element): see :func:`fastadam.adam_step`.

    Examples
    --------
    >>> opt = fastadam.Adam([W, b], lr=1e-3)
    >>> opt.step([dW, db])                       # gradients in the order of the params
    >>> opt.param_groups[0]["lr"] = 5e-4         # schedules change hyperparameters between steps
    """


    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, eps_before_bias_correction: bool = False,
                 num_threads: Optional[int] = None, master_weights: bool = False,
                 state_dtype: Union[str, tuple[str, str]] = "float32", min_compressed_size: int = 4096,
                 stochastic_rounding: bool = False, rounding_seed: int = 0) -> None:
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.rounding_seed = rounding_seed
        self.state_dtype = _state_dtypes(state_dtype)
        if not _is_integer(min_compressed_size) or min_compressed_size < 0:
            raise ValueError(f"min_compressed_size must be an integer >= 0, got {min_compressed_size!r}")
        self.min_compressed_size = int(min_compressed_size)
        self.defaults: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                             decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                                             maximize=maximize, eps_before_bias_correction=eps_before_bias_correction)
        self.num_threads = num_threads
        items = _listed(params, "params", f"{type(self).__name__}([W])")
        if not items:
            raise ValueError("params: the optimizer got an empty parameter list")
        groups_in = items if isinstance(items[0], dict) else [{"params": items}]

        groups: list[dict[str, Any]] = []
        states: list[dict[str, np.ndarray]] = []
        seen: dict[int, int] = {}
        for k, g in enumerate(groups_in):
            group, new_states = self._new_group(g, k, len(states), seen)
            groups.append(group)
            states.extend(new_states)
        params_all = [p for g in groups for p in g["params"]]
        group_of = [k for k, g in enumerate(groups) for _ in g["params"]]
        self._plan = self._build_plan(params_all, states, group_of, len(groups))
        self._commit(groups, params_all, states, group_of)

    # -- building ----------------------------------------------------------------------------------------------

    def _new_group(self, g: Any, k: int, start: int, seen: dict[int, int]) -> tuple[dict[str, Any], list[dict]]:
        """Check param group ``g`` (to become ``param_groups[k]``, its first param ``params[start]``) and
        create its zero state; ``seen`` maps ``id`` of every param taken so far to its position."""
        group = _checked_group(g, k, self.defaults)
        states = []
        for j, p in enumerate(group["params"]):
            i = start + j
            if not isinstance(p, np.ndarray):
                raise TypeError(f"params[{i}]: expected a numpy.ndarray, got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"params[{i}] shares memory with params[{seen[id(p)]}]: the same array is given "
                                 "twice (each parameter may appear once in an optimizer)")
            seen[id(p)] = i
            states.append(self._new_state(p, i, bool(group["amsgrad"])))
        return group, states

    def _new_state(self, p: np.ndarray, i: int, amsgrad: bool) -> dict[str, np.ndarray]:
        """Zero-initialised state in the parameter's dtype (float32 with a master copy); the core checks
        dtypes, contiguity, writeability and aliasing of all of it when the plan is built."""
        s: dict[str, np.ndarray] = {}
        if _is_16bit_float(p):
            if not self.master_weights:
                raise TypeError(f"params[{i}]: dtype {p.dtype} needs master_weights=True "
                                "(a float32 master copy is kept and rounded into it)")
            s["master_param"] = np.ascontiguousarray(p, dtype=np.float32)
        work_dtype = np.dtype(np.float32) if "master_param" in s else p.dtype
        compressed = work_dtype == np.float32 and self._compresses(p, i)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        for k, key in enumerate(keys):
            storage = self.state_dtype[_MOMENTS[key]] if compressed else "float32"
            if storage in ("int8", "int4"):  # a zero moment; one map of each kind per optimizer
                maps = self.__dict__.setdefault("_quantization_maps", {})
                kind = (key == "exp_avg", 8 if storage == "int8" else 4)
                zero = zero_state(p.shape, maps.setdefault(kind, moment_map(*kind)))
                s[key + "_codes"], s[key + "_absmax"], s[key + "_map"] = zero
            elif storage == "bfloat16":
                s[key] = _staggered_zeros(p.shape, _bfloat16(), k)
            else:
                s[key] = np.zeros(p.shape, work_dtype)
        return s

    def _compresses(self, p: np.ndarray, i: int) -> bool:
        """Whether params[i] is large enough for state_dtype's storage (fastadam.distributed's shards, which
        hold pieces of params, decide by the whole param's size instead)."""
        return p.size >= self.min_compressed_size

    def _build_plan(self, params: list[np.ndarray], states: list[dict], group_of: list[int],
                    group_count: int) -> Any:
        """The core's plan over all params: it checks every array and holds their data pointers."""
        return _core.AdamPlan([s.get("master_param", p) for s, p in zip(states, params)],
                              [_moment(s, "exp_avg") for s in states], [_moment(s, "exp_avg_sq") for s in states],
                              [_moment(s, "max_exp_avg_sq") for s in states],
                              [p if "master_param" in s else None for s, p in zip(states, params)],
                              group_of, group_count, self.stochastic_rounding, self.rounding_seed)

    def _commit(self, groups: list[dict], params: list[np.ndarray], states: list[dict], group_of: list[int]) -> None:
        """Take over checked groups and state (the plan over them is already in ``self._plan``)."""
        self._param_groups = groups
        self._group_params = [g["params"] for g in groups]  # the tuples the plan was built over
        self._params = params
        self._state = states
        self._state_view = tuple(types.MappingProxyType(s) for s in states)
        self._group_of = group_of

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group`` does.

        ``param_group`` is a dict ``{"params": [arrays...], **hyperparameters}``
        with the keys and rules of the constructor's groups; options it does
        not set take the optimizer's defaults.  Its params must not be in the
        optimizer already (the same array, or one sharing memory with a param
        or state array, is refused).  The new params get zero state and step
        count 0; the existing state arrays and step counts are kept.  From
        then on :meth:`step` takes one gradient per param of all groups, the
        new ones last, and :meth:`state_dict` / :meth:`save` include the
        group.  On error nothing is changed.
        """
        self._check_groups()
        k = len(self._param_groups)
        seen = {id(p): i for i, p in enumerate(self._params)}
        group, new_states = self._new_group(param_group, k, len(self._params), seen)
        params = self._params + list(group["params"])
        states = self._state + new_states
        group_of = self._group_of + [k] * len(new_states)
        plan = self._build_plan(params, states, group_of, k + 1)
        plan.steps = list(self._plan.steps) + [0] * len(new_states)
        self._plan = plan
        self._commit(self._param_groups + [group], params, states, group_of)

    # -- what the caller sees ----------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups: dicts of ``"params"`` (a tuple of the group's arrays) and the hyperparameters.

        Hyperparameters may be changed between steps; the list, the keys and
        the ``"params"`` tuples may not (use :meth:`add_param_group`).
        """
        return self._param_groups

    @property
    def state(self) -> tuple[Mapping[str, np.ndarray], ...]:
        """The state of each param, in the order of all params: read-only mappings of the live arrays.

        ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad,
        ``master_param`` with master weights).  The arrays are the ones the
        steps update in place; write into them with ``a[...] = x``, never
        replace them (that raises TypeError).
        """
        return self._state_view

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for k, g in enumerate(self._param_groups):
            opts = ", ".join(f"{key}={g.get(key)!r}" for key in _HYPERPARAMETERS)
            lines.append(f"  param_groups[{k}]: {len(self._group_params[k])} arrays, {opts}")
        return "\n".join(lines) + "\n)"

    @property
    def steps(self) -> list[int]:
        """The number of steps taken by each parameter array, in the order of all params."""
        return list(self._plan.steps)

    def _check_groups(self) -> None:
        """The groups still have the optimizer's structure: O(groups), so cheap enough for every step."""
        groups, expected = self._param_groups, self._group_params
        if len(groups) != len(expected):
            raise ValueError(f"param_groups has {len(groups)} groups but the optimizer has {len(expected)}; "
                             "add a group with add_param_group()")
        for k, g in enumerate(groups):
            if not isinstance(g, dict):
                raise TypeError(f"param_groups[{k}]: expected a dict, got {type(g).__name__}")
            if g.keys() != _GROUP_KEYS:
                unknown, missing = set(g) - _GROUP_KEYS, _GROUP_KEYS - set(g)
                raise ValueError(f"param_groups[{k}]: " + "; ".join(
                    ([f"unknown option(s) {_sorted_keys(unknown)} (a group holds only 'params' and the "
                      "hyperparameters)"] if unknown else []) +
                    ([f"missing option(s) {sorted(missing)}"] if missing else [])))
            if g["params"] is not expected[k]:
                raise ValueError(f"param_groups[{k}]['params'] was replaced after the optimizer was built; "
                                 "the optimizer would not update the new arrays (add them with add_param_group())")

    def step(self, grads: Sequence[Union[np.ndarray, RowSparseGrad]], *, grad_scale: Optional[float] = None,
             skip_if_nonfinite: bool = False) -> bool:
        """Apply one step to every parameter, in place; returns False if it was skipped.

        ``grads`` is a list with one gradient per parameter, in the order the
        parameters were given (across all groups): an array of the parameter's
        shape, or a :class:`fastadam.RowSparseGrad` to update only some rows.
        The gradient of a float32 (or master-weighted) param may be float16 or
        bfloat16.  ``grad_scale`` divides every gradient (loss scaling, applied
        as a multiplication by its reciprocal); with ``skip_if_nonfinite`` a
        NaN or inf in any scaled gradient skips the whole step: no array and
        no step count changes (like ``torch.amp.GradScaler``).  Only the gradients,
        the groups' structure and their current hyperparameters are checked; a
        bad one raises before anything is written.
        """
        self._check_groups()
        # The core reads each group's hyperparameters by name (and checks them) before anything is written.
        return self._plan.step(grads, self._param_groups, grad_scale, skip_if_nonfinite, self.num_threads)

    # -- saving and restoring --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the optimizer: copies of the state arrays, the step counts and the groups.

        ``{"state": {i: {"step": int, "exp_avg": array, "exp_avg_sq": array[, "max_exp_avg_sq": array]
        [, "master_param": array]}},
        "param_groups": [{hyperparameters..., "params": [indices]}]}`` with ``i``
        the position of the parameter across all groups, as in PyTorch.  The
        parameters themselves are not included.
        """
        self._check_groups()
        steps = self._plan.steps
        state = {i: {"step": int(steps[i]), **{key: a.copy() for key, a in s.items()}}
                 for i, s in enumerate(self._state)}
        groups, start = [], 0
        for g in self._param_groups:
            n = len(g["params"])
            groups.append({**{key: g[key] for key in _HYPERPARAMETERS}, "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of an optimizer over parameters of the same shapes).

        Loading is atomic: everything is checked first -- the structure
        (``state_dict`` a dict of ``"state"``, a dict of per-parameter dicts,
        and ``"param_groups"``, a list of dicts, as many as this optimizer's,
        each with as many ``"params"`` ids as its group), each group's
        hyperparameters (``amsgrad`` must be this optimizer's), and each
        parameter's state (exactly this optimizer's keys, arrays of its
        shapes and dtypes, and a ``"step"`` that is a Python or NumPy integer
        in ``[0, 2**63 - 1)``).  Any failure raises (ValueError for a
        malformed ``state_dict``, naming the entry) and changes nothing: state
        arrays, hyperparameters and step counts stay as they were.  Otherwise
        the arrays are copied into the optimizer's own state arrays, and
        resuming gives the bitwise-identical trajectory of an uninterrupted run.
        """
        self._check_groups()
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        if set(state_dict) != {"state", "param_groups"}:
            raise ValueError(f"state_dict: expected the keys ['param_groups', 'state'], "
                             f"got {_sorted_keys(state_dict)}")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"state_dict['param_groups']: expected a list of dicts, got {type(groups).__name__}")
        if not isinstance(state, dict):
            raise ValueError(f"state_dict['state']: expected a dict of per-parameter dicts, "
                             f"got {type(state).__name__}")
        if len(groups) != len(self._param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self._param_groups)}")

        # The groups: hyperparameters, and the id under which each param's state is saved.
        new_hyper: list[dict[str, Any]] = []
        ids: list[int] = []
        for k, (saved, mine) in enumerate(zip(groups, self._param_groups)):
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict['param_groups'][{k}]: expected a dict, got {type(saved).__name__}")
            unknown = set(saved) - _GROUP_KEYS
            if unknown:
                raise ValueError(f"state_dict['param_groups'][{k}]: unknown option(s) {_sorted_keys(unknown)}")
            saved_ids = saved.get("params")
            if not isinstance(saved_ids, (list, tuple)):
                raise ValueError(f"state_dict['param_groups'][{k}]['params']: expected a list of parameter ids, "
                                 f"got {type(saved_ids).__name__}")
            if len(saved_ids) != len(mine["params"]):
                raise ValueError(f"param_groups[{k}]: state_dict has {len(saved_ids)} params, "
                                 f"this optimizer {len(mine['params'])}")
            for j, pid in enumerate(saved_ids):
                if not _is_integer(pid):
                    raise ValueError(f"state_dict['param_groups'][{k}]['params'][{j}]: expected an integer id, "
                                     f"got {type(pid).__name__}")
                ids.append(int(pid))
            merged = {**mine, **{key: saved[key] for key in _HYPERPARAMETERS if key in saved}}
            if isinstance(merged["betas"], (tuple, list)):
                merged["betas"] = tuple(merged["betas"])
            _check_group_hyperparameters(merged, f"state_dict param_groups[{k}]")
            if bool(merged["amsgrad"]) != bool(mine["amsgrad"]):
                raise ValueError(f"param_groups[{k}]: amsgrad differs from this optimizer's")
            new_hyper.append({key: merged[key] for key in _HYPERPARAMETERS})
        if len(set(ids)) != len(ids):
            raise ValueError("state_dict['param_groups']: a parameter id appears in more than one place")

        # The per-parameter state, keyed by id (an int, or its decimal string as JSON writes it).
        by_id: dict[int, Any] = {}
        for key, s in state.items():
            if _is_integer(key):
                pid = int(key)
            elif isinstance(key, str) and key.isascii() and key.isdigit():
                pid = int(key)
            else:
                raise ValueError(f"state_dict['state']: expected integer parameter ids as keys, got {key!r}")
            if pid in by_id:
                raise ValueError(f"state_dict['state']: parameter id {pid} appears twice")
            by_id[pid] = s
        extra = set(by_id) - set(ids)
        if extra:
            raise ValueError(f"state_dict['state'] has entries for ids {sorted(extra)[:10]} that no group lists")
        steps = []
        for i, mine in enumerate(self._state):
            saved = by_id.get(ids[i])
            if saved is None:
                raise ValueError(f"state_dict has no state for params[{i}]")
            if not isinstance(saved, dict):
                raise ValueError(f"state[{i}]: expected a dict, got {type(saved).__name__}")
            _check_saved_state(saved, mine, i, self._params[i].shape)
            steps.append(_checked_step(saved["step"], f"state[{i}]['step']"))
        _check_shared_maps([by_id[pid] for pid in ids], self._state)
        for i, mine in enumerate(self._state):
            targets = list(mine.items()) + ([("param", self._params[i])] if "master_param" in mine else [])
            for key, a in targets:
                if not a.flags.writeable:
                    raise ValueError(f"state[{i}][{key!r}]: the optimizer's array became read-only"
                                     if key != "param" else f"params[{i}]: became read-only")

        # All checked: now change things (nothing below can fail).
        for hyper, mine in zip(new_hyper, self._param_groups):
            mine.update(hyper)
        # The maps first: a moment converted into quantized state below is quantized with the map it keeps.
        for i, mine in enumerate(self._state):
            saved = by_id[ids[i]]
            for key in mine:
                if key.endswith("_map") and key in saved and saved[key].shape == mine[key].shape:
                    _copy_converted(saved[key], mine[key])
        for i, mine in enumerate(self._state):
            saved = by_id[ids[i]]
            converted = [key for key in _moment_names(mine) if _storage_kind(saved, key) != _storage_kind(mine, key)]
            skipped = {c + part for c in converted for part in ("", *_QUANTIZED_PARTS)}
            for key in mine:
                if key in saved and not key.endswith("_map") and key not in skipped:
                    _copy_converted(saved[key], mine[key])
            for key in converted:  # quantized state from or into another storage
                _convert_moment(_moment(saved, key), _moment(mine, key), self._params[i].shape)
            if "master_param" in mine:  # the model copy follows its restored master
                self._params[i][...] = mine["master_param"].astype(self._params[i].dtype)
        self._plan.steps = steps

    def save(self, path: Union[PathLike, Any]) -> None:
        """Write :meth:`state_dict` to an ``.npz`` file (arrays, plus the groups as JSON; no pickle).

        ``.npz`` is appended to ``path`` unless it ends so -- the rule of
        ``numpy.savez``, which :meth:`load` follows too: ``save("ckpt")`` and
        ``load("ckpt")`` both use ``ckpt.npz``.  An open binary file is written
        as it is.
        """
        sd = self.state_dict()
        arrays = {f"state/{i}/{key}": _stored(a) for i, s in sd["state"].items() for key, a in s.items()
                  if key != "step"}
        arrays["steps"] = np.array([s["step"] for s in sd["state"].values()], dtype=np.int64)
        arrays["param_groups"] = np.array(json.dumps(sd["param_groups"], default=_json_number))
        np.savez(_npz_path(path), **arrays)

    def load(self, path: Union[PathLike, Any]) -> None:
        """Restore from a file written by :meth:`save` (``.npz`` appended to ``path`` as there).

        The file is treated as untrusted: it must hold exactly the members
        this optimizer's :meth:`save` writes, each member's declared shape and
        dtype is checked against this optimizer's state *before* its data is
        read (so a small file cannot make it allocate more than the
        optimizer's own state), nothing is unpickled, and then
        :meth:`load_state_dict` checks the rest.  A file that does not fit
        raises ValueError and changes nothing.
        """
        path = _npz_path(path)
        expected: dict[str, Any] = {f"state/{i}/{key}.npy": (a.shape, _stored(a).dtype)
                                    for i, s in enumerate(self._state) for key, a in s.items()}
        n = len(self._state)
        expected["steps.npy"] = "steps"
        expected["param_groups.npy"] = "json"
        # The groups' JSON: ~300 characters of hyperparameters per group, <= ~21 per param id.
        json_limit = 4096 * (len(self._param_groups) + 1) + 32 * n
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not an .npz file ({e})") from None
        with zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                raise ValueError(f"{path}: a member appears twice in the archive")
            missing, unexpected = set(expected) - set(names), set(names) - set(expected)
            if missing or unexpected:
                raise ValueError(f"{path}: not a save() of this optimizer: "
                                 + "; ".join(([f"missing {sorted(missing)[:5]}"] if missing else []) +
                                             ([f"unexpected {sorted(unexpected)[:5]}"] if unexpected else [])))
            arrays: dict[str, np.ndarray] = {}
            for name, want in expected.items():
                try:
                    with zf.open(name) as fp:
                        shape, dtype = _read_npy_header(fp)
                    if want == "json":
                        ok = shape == () and dtype.kind == "U" and dtype.itemsize <= 4 * json_limit
                        want_text = f"a string of at most {json_limit} characters"
                    elif want == "steps":
                        ok = shape == (n,) and dtype.kind in "iu" and dtype.itemsize <= 8
                        want_text = f"int64({n},)"
                    else:
                        ok = shape == want[0] and dtype == want[1]
                        want_text = f"{want[1]}{want[0]}"
                    if not ok:
                        raise ValueError(f"expected {want_text}, the file declares {dtype}{shape}")
                    with zf.open(name) as fp:
                        arrays[name[:-len(".npy")]] = np.lib.format.read_array(fp, allow_pickle=False)
                except (ValueError, EOFError, OSError, zlib.error, zipfile.BadZipFile, NotImplementedError) as e:
                    raise ValueError(f"{path}: member {name!r}: {e}") from None
        try:
            groups = json.loads(str(arrays["param_groups"][()]))
        except RecursionError:
            raise ValueError(f"{path}: 'param_groups' is JSON nested too deeply to be a save() of param groups") \
                from None
        except ValueError as e:
            raise ValueError(f"{path}: 'param_groups' is not valid JSON ({e})") from None
        steps = arrays["steps"]
        state = {i: {"step": steps[i], **{key: arrays[f"state/{i}/{key}"].view(a.dtype) for key, a in s.items()}}
                 for i, s in enumerate(self._state)}
        self.load_state_dict({"state": state, "param_groups": groups})


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), like ``torch.optim.AdamW``.

    Each step shrinks the parameters by ``lr * weight_decay`` of their value as
    well as applying the Adam update -- ``p = p - ((lr * weight_decay) * p + u)``
    with ``u`` the Adam update, the decoupled decay ``p * (1 - lr * weight_decay)``
    computed without rounding ``1 - lr * weight_decay`` (see
    :mod:`fastadam.reference`); ``weight_decay`` defaults to 1e-2.
    """

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 eps_before_bias_correction: bool = False, num_threads: Optional[int] = None,
                 master_weights: bool = False, state_dtype: Union[str, tuple[str, str]] = "float32",
                 min_compressed_size: int = 4096, stochastic_rounding: bool = False, rounding_seed: int = 0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, eps_before_bias_correction=eps_before_bias_correction,
                         num_threads=num_threads, master_weights=master_weights, state_dtype=state_dtype,
                         min_compressed_size=min_compressed_size, stochastic_rounding=stochastic_rounding,
                         rounding_seed=rounding_seed)


class SparseAdam(Adam):
    """Lazy Adam for embedding tables, like ``torch.optim.SparseAdam``.

    Each step takes one :class:`fastadam.RowSparseGrad` per parameter and
    updates only the rows it names (repeats summed), leaving the moments of
    the other rows undecayed; see :func:`fastadam.sparse_adam_step` for the
    formula, which adds eps before the bias correction as PyTorch's
    SparseAdam does (``eps_before_bias_correction=True``, which a group may
    override).  A dense array is also accepted, as a gradient for every row.
    """

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, maximize: bool = False, num_threads: Optional[int] = None,
                 state_dtype: Union[str, tuple[str, str]] = "float32", min_compressed_size: int = 4096,
                 stochastic_rounding: bool = False, rounding_seed: int = 0) -> None:
        super().__init__(params, lr, betas, eps, maximize=maximize, eps_before_bias_correction=True,
                         num_threads=num_threads, state_dtype=state_dtype, min_compressed_size=min_compressed_size,
                         stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed)
