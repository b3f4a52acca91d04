"""fastadam's step as ``torch.optim`` optimizers: ``fastadam.torch.Adam``, ``AdamW`` and ``SparseAdam``.

They are :class:`torch.optim.Optimizer` subclasses with torch's option names,
defaults and ``state_dict`` format, so LR schedulers, ``torch.amp.GradScaler``,
``zero_grad``, the step and state-dict hooks, checkpoints of ``torch.optim``
and ``ZeroRedundancyOptimizer`` work with them as with ``torch.optim.Adam``.
Each :meth:`~Adam.step` updates every CPU parameter that has a gradient, of
every group, in one call of fastadam's kernel, on the tensors' own memory::

    >>> import torch, fastadam.torch
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = fastadam.torch.AdamW(model.parameters(), lr=1e-2)
    >>> model(torch.ones(8, 4)).sum().backward()
    >>> opt.step(); opt.zero_grad()

Importing this module imports PyTorch; ``import fastadam`` alone does not.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from itertools import compress, count, repeat
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import _core
from ._optim import _QUANTIZED_PARTS, _STAGGER_BYTES, _check_quantized_parts, _convert_moment, _state_dtypes
from .reference import QuantizedState, moment_map, quantization_block, zero_state

__all__ = ["Adam", "AdamW", "SparseAdam"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The per-step checks run over every param: C-level maps of these instead of Python loops.
_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_as_numpy = torch.Tensor.numpy
# torch.autograd.graph.increment_version without its Python wrapper (which only wraps a lone tensor in a tuple).
_increment_versions = getattr(torch._C, "_increment_version", torch.autograd.graph.increment_version)
_WORK_DTYPES = (torch.float32, torch.float64)
#: The state tensors of a param that the step updates, besides "step", where its moments are not quantized.
_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: A moment in 8-bit or 4-bit state is three tensors, named as in fastadam.Adam's state: <moment>_codes
#: (uint8: 8-bit, the param's shape and strides; 4-bit, 1-D, ceil(numel / 2) bytes of two codes each, in
#: the param's memory order), <moment>_absmax (float32, one per block of 256 (8-bit) or 128 (4-bit)
#: elements of the param's memory) and <moment>_map (float32, 256 or 16 values; one per kind, shared by the
#: optimizer's params).  The map's length says which.
_QUANTIZED_KEYS = tuple(key + part for key in _MOMENT_KEYS for part in _QUANTIZED_PARTS)
_QUANTIZED_DTYPES = dict(zip(_QUANTIZED_PARTS, (torch.uint8, torch.float32, torch.float32)))
#: What a step writes into (a map is only read).
_WRITTEN_TENSORS = _STATE_TENSORS + tuple(key for key in _QUANTIZED_KEYS if not key.endswith("_map"))

# -- state containers that report replaced tensors ---------------------------------------------------------
#
# The step keeps NumPy views of the state tensors between steps.  A tensor put
# into the state in their place (by load_state_dict, ZeroRedundancyOptimizer,
# or by hand) must be the one updated from then on, so every change of which
# tensor a state entry holds advances this counter, and a step that sees it
# advanced takes its views afresh.  A change of a tensor's values needs nothing.

_generation = [0]


def _touch() -> None:
    _generation[0] += 1


class _ParamState(dict):
    """The state of one param (a dict; every replacement of an entry is noticed by the next step)."""

    def __setitem__(self, key, value):
        _touch()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _touch()
        super().__delitem__(key)

    def __ior__(self, other):
        _touch()
        return super().__ior__(other)

    def _changing(name: str) -> Callable:  # noqa: N805 - a decorator factory used in the class body
        method = getattr(dict, name)

        def changed(self, *args, **kwargs):
            _touch()
            return method(self, *args, **kwargs)

        changed.__name__ = name
        return changed

    clear = _changing("clear")
    pop = _changing("pop")
    popitem = _changing("popitem")
    setdefault = _changing("setdefault")
    update = _changing("update")
    del _changing


class _State(defaultdict):
    """``optimizer.state``: param -> :class:`_ParamState`, created empty on first access (as torch's)."""

    def __init__(self, default_factory: Any = None, *args: Any, **kwargs: Any) -> None:
        # default_factory is taken (pickle and copy pass it) and replaced: entries are always _ParamState.
        super().__init__(_ParamState)
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, _ParamState(value) if type(value) is dict else value)

    def __setitem__(self, key, value):
        _touch()
        super().__setitem__(key, _ParamState(value) if type(value) is dict else value)

    def __delitem__(self, key):
        _touch()
        super().__delitem__(key)

    def clear(self):
        _touch()
        super().clear()

    def pop(self, *args):
        _touch()
        return super().pop(*args)

    def popitem(self):
        _touch()
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


# -- tensors as NumPy views -----------------------------------------------------------------------------------

def _layout(p: torch.Tensor) -> Optional[bool]:
    """False if C-contiguous, True if dense in another order (channels_last), None otherwise."""
    if p.is_contiguous():
        return False
    if (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)) or \
            (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)):
        return True
    return None


def _view(t: torch.Tensor, flat: bool, name: str) -> np.ndarray:
    """``t``'s memory as an ndarray: the same elements, never a copy.

    A dense tensor in another order than C's (channels_last) is viewed as the
    flat run of memory it fills; its state and gradient have its strides, so
    element ``i`` of each flat view belongs to the same parameter element.
    """
    t = t.detach()
    if flat:
        t = t.as_strided((t.numel(),), (1,))
    if t.dtype is torch.bfloat16:  # NumPy has no bfloat16; fastadam reads it through DLPack as ml_dtypes'
        return _core.as_array(t, name)
    return t.numpy()


def _moment_view(s: dict, key: str, e: "_Entry") -> Any:
    """A moment as the kernel takes it: a view of its tensor, or for 8-bit or 4-bit state a QuantizedState of
    views (4-bit codes are 1-D: viewed flat or not, the same bytes)."""
    if key + "_codes" in s:
        return QuantizedState(_view(s[key + "_codes"], e.flat, e.name), _view(s[key + "_absmax"], False, e.name),
                              _view(s[key + "_map"], False, e.name))
    return _view(s[key], e.flat, e.name)


# -- 8-bit and 4-bit state -----------------------------------------------------------------------------------

#: state_dtype's names of quantized storage -> the bits of a code.
_CODE_BITS = {"int8": 8, "int4": 4}


def _staggered_zeros_like(p: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """Zeros laid out as ``p`` (its strides); bfloat16 ones for a C-contiguous ``p`` start ``k * 256`` bytes into
    their own buffer, so that a param's bfloat16 moments differ modulo 4 KiB (as fastadam.Adam's: see
    ``fastadam._optim._staggered_zeros``; at 2^26 elements on Zen 3 equal offsets cost the step half its speed)."""
    if dtype is not torch.bfloat16 or not p.is_contiguous() or k == 0:
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    offset = k * _STAGGER_BYTES // 2
    return torch.zeros(p.numel() + offset, dtype=dtype)[offset:].view(p.shape)


def _has_quantized(s: dict, key: str) -> bool:
    """Whether ``s`` holds (a part of) moment ``key`` in 8-bit or 4-bit state."""
    return key + "_codes" in s or key + "_absmax" in s or key + "_map" in s


def _stored_bits(s: dict, key: str) -> int:
    """The bits of a code of quantized moment ``key`` of ``s``, as its map's length says: 4 for 16 values, 8
    otherwise (a map of another length is refused by _check_quantized)."""
    qmap = s.get(key + "_map")
    return 4 if isinstance(qmap, torch.Tensor) and qmap.numel() == 16 else 8


def _is_plain(t: Any, dtype: torch.dtype, stride: tuple) -> bool:
    """A CPU tensor of ``dtype`` and ``stride`` outside autograd: one the step can view as it is."""
    return isinstance(t, torch.Tensor) and t.dtype is dtype and t.device.type == "cpu" and \
        t.layout is torch.strided and t.stride() == stride and not t.requires_grad


def _check_quantized(s: dict, key: str, p: torch.Tensor, where: str) -> int:
    """Check moment ``key`` of ``s`` in 8-bit or 4-bit state against param ``p``: ValueError naming the entry.
    Returns the bits of a code (8 or 4, as the map's length says).

    Three tensors as the step takes them (fastadam.Adam's check of their arrays: a map of 256 (8-bit) or 16
    (4-bit) finite, strictly ascending float32 values, an 8-bit one holding 0; uint8 codes of the param's
    shape (8-bit) or ``ceil(numel / 2)`` of them (4-bit); ``ceil(numel / 256)`` or ``ceil(numel / 128)``
    float32 absmax values); the codes laid out densely (their blocks run over their memory: 8-bit codes
    C-contiguous or channels_last, 4-bit ones one contiguous run); a float32 working param.
    """
    if key in s:
        raise ValueError(f"{where}: holds both {key!r} and {key + '_codes'!r}; a moment is one float tensor "
                         f"or 8-bit or 4-bit state")
    arrays = []
    for part, dtype in _QUANTIZED_DTYPES.items():
        name = key + part
        if name not in s:
            raise ValueError(f"{where}: no {name!r} (a moment in 8-bit or 4-bit state is {key}_codes, "
                             f"{key}_absmax and {key}_map)")
        t = s[name]
        if not isinstance(t, torch.Tensor) or t.layout is not torch.strided or t.dtype is not dtype:
            got = f"a {t.dtype} tensor" + ("" if t.layout is torch.strided else f" of layout {t.layout}") \
                if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}[{name!r}]: expected a {dtype} tensor, got {got}")
        arrays.append(t.detach().cpu().resolve_neg().numpy())
    _check_quantized_parts(arrays, tuple(p.shape), where, key)
    bits = 4 if arrays[2].size == 16 else 8
    codes = s[key + "_codes"]
    if _layout(codes) is None:
        raise ValueError(f"{where}[{key + '_codes'!r}]: strides {codes.stride()} are not dense " + (
            "(C-contiguous or channels_last), and the blocks of 8-bit state run over the codes' memory" if bits == 8
            else "(4-bit codes are one contiguous run of bytes, two codes each, in the param's memory order)"))
    if p.dtype is not torch.float32 and p.dtype not in _LOW_PRECISION:
        raise ValueError(f"{where}[{key + '_codes'!r}]: {bits}-bit state needs a float32 param (or "
                         f"float16/bfloat16 with master weights), this one is {p.dtype}")
    return bits


def _dequantized(s: dict, key: str, p: torch.Tensor, written_for: Optional[tuple], where: str) -> torch.Tensor:
    """The values of checked quantized moment ``key`` of ``s`` (map[code] * absmax), in float32 laid out as
    the codes are: 8-bit codes carry their strides; 4-bit codes are in the memory order of the param they
    were written for, ``written_for`` ((shape, strides)), or ``p``'s where that is not known."""
    codes = s[key + "_codes"].detach().cpu()
    if _stored_bits(s, key) == 8:
        flat = bool(_layout(codes))
        values = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    else:
        shape, stride = written_for or (tuple(p.shape), p.stride())
        flat, values = True, torch.empty_strided(shape, stride, dtype=torch.float32)
    out = _view(values, flat, where)
    _convert_moment(QuantizedState(_view(codes, flat, where), _view(s[key + "_absmax"].cpu(), False, where),
                                   _view(s[key + "_map"].cpu(), False, where)), out, out.shape)
    return values


#: The state dict's entry of a param with 4-bit moments: the strides of the param its codes were written for.
_CODE_STRIDES = "codes_strides"


def _is_dense(shape: tuple, stride: tuple) -> bool:
    """Whether ``stride`` (in elements, each >= 0) lays ``shape`` out densely: its elements fill one run of
    memory, in some order of the dimensions (C-contiguous, channels_last, any other permutation).  The strides
    of dimensions of size 1 step over nothing and may be anything."""
    if any(s < 0 for s in stride):
        return False
    expected = 1
    for size, s in sorted(((n, s) for n, s in zip(shape, stride) if n > 1), key=lambda d: d[1]):
        if s != expected:
            return False
        expected *= size
    return True


def _same_order(shape: tuple, stride: tuple, other: tuple) -> bool:
    """Whether two dense layouts of ``shape`` put its elements in the same memory order (their strides agree
    wherever a dimension has more than one element)."""
    return all(a == b for n, a, b in zip(shape, stride, other) if n > 1)


def _saved_code_strides(value: Any, p: torch.Tensor, where: str) -> tuple:
    """A state dict's ``codes_strides`` entry checked against ``p``: the strides, a tuple of ints, of a dense
    layout of ``p``'s shape; else ValueError naming the entry."""
    name = f"{where}[{_CODE_STRIDES!r}]"
    if not isinstance(value, torch.Tensor) or value.dtype is not torch.int64 or value.layout is not torch.strided \
            or value.is_meta or value.shape != (p.dim(),):
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise ValueError(f"{name}: expected an int64 tensor of {p.dim()} values (the strides, in elements, of the "
                         f"param the 4-bit codes were written for), got {got}")
    stride = tuple(int(v) for v in value.detach().cpu().tolist())
    if not _is_dense(tuple(p.shape), stride):
        raise ValueError(f"{name}: strides {stride} are not a dense layout of the param's shape {tuple(p.shape)} "
                         "(4-bit codes are one run over the memory of the param they were written for)")
    return stride


def _step_value(value: Any, where: str) -> float:
    """A saved step count (a tensor, as torch.optim.Adam saves it, or a number) as a float >= 0."""
    try:
        step = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where}: expected a step count (a number or a one-element tensor), "
                         f"got {type(value).__name__}") from None
    if not (0.0 <= step < 2.0**63) or step != int(step):
        raise ValueError(f"{where}: a step count must be a whole number >= 0, got {step!r}")
    return step


def _param_name(k: int, j: int) -> str:
    return f"param_groups[{k}]['params'][{j}]"


class _Entry:
    """A param that takes part in the step: where it is, its state, and how it is viewed."""

    __slots__ = ("k", "j", "param", "state", "master", "flat", "name", "dtype", "stride", "grad_dtypes")

    def __init__(self, k: int, j: int, param: torch.Tensor, state: dict, master: bool, flat: bool) -> None:
        self.k, self.j, self.param, self.state, self.master, self.flat = k, j, param, state, master, flat
        self.name = _param_name(k, j)
        # What each new gradient is checked against (a change of the param's memory rebuilds the entry).
        self.dtype, self.stride = param.dtype, param.stride()
        self.grad_dtypes = (param.dtype, torch.float32) if master else (param.dtype,)


class _Prepared:
    """What a step needs, kept between steps while the groups, the params' grads and the state stay put."""

    def __init__(self) -> None:
        self.state_obj: Any = None
        self.generation = -1
        self.groups: Any = None
        self.group_dicts: tuple = ()
        self.param_lists: tuple = ()
        self.amsgrad: tuple = ()          # what the plan was built with, per group
        self.amsgrad_keys: tuple = ()     # bool(group.get("amsgrad")) then: a change means a rebuild
        self.all_params: list = []
        self.entries: list[_Entry] = []
        self.positions: list[int] = []    # index in all_params of each entry
        # The gradients and their views (an ndarray, or (indices, values) for a sparse grad).  Holding them
        # holds their memory, so a gradient seen for the first time is let go after the step (None) --
        # zero_grad() must free it -- and only one seen at two steps in a row (set_to_none=False, or
        # accumulating) is kept.  The ids of last step's gradients tell which is which.
        self.grad_objs: list = []
        self.grad_arrays: list = []
        self.grad_ids: list[int] = []
        self.let_go: list[int] = []       # the entries whose gradients this step lets go of
        self.ptrs: list[int] = []         # params' data_ptr(): a `p.data = ...` swap must not go unnoticed
        self.params: list = []            # the params with gradients, in plan order
        self.all_present = False          # every param had a gradient when the plan was built
        # New gradients go to the core as t.numpy(), unchecked here, when every entry is a plain float32/float64
        # C-contiguous param (the core checks dtype, shape and layout, and a failure retakes the slow path):
        self.fast_grads = False
        self.dtypes: list = []            # each entry's param dtype, the only dtype its grad may have then
        self.unchecked = False            # this step's new gradients took the fast path
        self.plan: Any = None
        self.buffer: Optional[torch.Tensor] = None  # the step counts; each state["step"] is a 0-d view of it
        self.steps: Optional[np.ndarray] = None     # a NumPy view of the buffer
        self.buffer_version = -1          # its version counter after our last step: a write into a count shows
        self.written: tuple = ()          # the tensors whose version counters a step bumps


class _FastAdamOptimizer(Optimizer):
    """The machinery shared by :class:`Adam` and :class:`SparseAdam`."""

    _step_supports_amp_scaling = True
    #: torch.optim.SparseAdam refuses dense gradients.
    _sparse_only = False

    def __init__(self, params: Any, defaults: dict[str, Any], master_weights: bool,
                 num_threads: Optional[int], state_dtype: Any = "float32", min_compressed_size: int = 4096) -> None:
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
        if isinstance(min_compressed_size, bool) or not isinstance(min_compressed_size, int) or min_compressed_size < 0:
            raise ValueError(f"min_compressed_size must be an integer >= 0, got {min_compressed_size!r}")
        self.state_dtype = _state_dtypes(state_dtype)
        if "bfloat16" in self.state_dtype:
            try:
                import ml_dtypes  # noqa: F401 - NumPy's bfloat16, through which fastadam reads the state
            except ImportError:
                raise TypeError("state_dtype='bfloat16' needs the ml_dtypes package (pip install ml_dtypes)") \
                    from None
        self.min_compressed_size = min_compressed_size
        self.master_weights = bool(master_weights)
        self.num_threads = num_threads
        self._prepared_step: Optional[_Prepared] = None
        self._loading: Optional[dict] = None
        # (signed?, bits) -> the map new 8-bit or 4-bit moments take
        self._quantization_maps: dict[tuple[bool, int], torch.Tensor] = {}
        self._code_layouts: Any = WeakIdKeyDictionary()  # see _written_for
        super().__init__(params, defaults)
        self.state = _State(None, self.state)

    # -- torch.optim.Optimizer's interface ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as :meth:`torch.optim.Optimizer.add_param_group`, after checking its tensors.

        Each param must be a dense CPU tensor of float32 or float64 (float16
        or bfloat16 with ``master_weights=True``), C-contiguous or
        channels_last, and appear once; a bad one raises before anything changes.
        """
        if isinstance(param_group, dict) and "params" in param_group:
            k = len(self.param_groups)
            self._check_group_options({**self.defaults, **param_group}, f"param_groups[{k}]")
            params = param_group["params"]
            # A list, as torch makes it (it may be a generator, which checking it would use up).
            items = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group["params"] = items
            seen: dict[int, int] = {}
            for j, item in enumerate(items):
                p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                if isinstance(p, torch.Tensor):
                    self._check_param(p, _param_name(k, j))
                    if id(p) in seen:
                        raise ValueError(f"{_param_name(k, j)} is {_param_name(k, seen[id(p)])} again; "
                                         "each param may appear once (a step updates it once)")
                    seen[id(p)] = j
        super().add_param_group(param_group)
        self._prepared_step = None

    def _check_param(self, p: torch.Tensor, name: str) -> None:
        if p.device.type != "cpu":
            raise ValueError(f"{name} is on {p.device}; fastadam.torch steps CPU tensors in place")
        if p.layout is not torch.strided:
            raise ValueError(f"{name}: a {p.layout} param; fastadam.torch steps dense (strided) params")
        if p.dtype in _LOW_PRECISION:
            if not self.master_weights:
                raise TypeError(f"{name}: dtype {p.dtype} needs master_weights=True (a float32 master copy "
                                "and float32 moments are kept, and each step rounds the master into it)")
            if p.dtype is torch.bfloat16:
                try:
                    import ml_dtypes  # noqa: F401 - NumPy's bfloat16, through which fastadam reads the tensor
                except ImportError:
                    raise TypeError(f"{name}: a bfloat16 param needs the ml_dtypes package "
                                    "(pip install ml_dtypes)") from None
        elif p.dtype not in _WORK_DTYPES:
            raise TypeError(f"{name}: dtype {p.dtype} is not supported (float32, float64; float16 or bfloat16 "
                            "with master_weights=True)")
        if _layout(p) is None:
            raise ValueError(f"{name}: a param with strides {p.stride()} (not C-contiguous nor channels_last); "
                             "fastadam updates params in place and never works on a copy")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(master_weights=self.master_weights, num_threads=self.num_threads, state_dtype=self.state_dtype,
                     min_compressed_size=self.min_compressed_size)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("master_weights", False)
        self.__dict__.setdefault("num_threads", None)
        self.__dict__.setdefault("state_dtype", ("float32", "float32"))
        self.__dict__.setdefault("min_compressed_size", 4096)
        self.__dict__.setdefault("_loading", None)
        self.__dict__.setdefault("_quantization_maps", {})
        self.__dict__.setdefault("_code_layouts", WeakIdKeyDictionary())
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.state = _State(None, self.state)
        self._prepared_step = None
        if self._loading is not None:
            self._take_loaded_state(self._loading)

    def state_dict(self) -> dict[str, Any]:
        """The state in torch.optim's format (see :meth:`torch.optim.Optimizer.state_dict`).

        ``{"state": {i: {"step": tensor, "exp_avg": tensor, "exp_avg_sq":
        tensor[, "max_exp_avg_sq"][, "master_param"]}}, "param_groups": [...]}``;
        as in torch the tensors are the optimizer's own (no copies).  A
        moment in 8-bit or 4-bit state (``state_dtype="int8"``, ``"int4"``) is
        three tensors in place of one, named as in :class:`fastadam.Adam`'s
        state: ``exp_avg_codes`` (uint8: the param's shape for 8-bit state;
        ``ceil(numel / 2)`` bytes in the param's memory order for 4-bit),
        ``exp_avg_absmax`` (float32, one per block of 256 or 128 elements) and
        ``exp_avg_map`` (float32, 256 or 16 values), and so on for
        ``exp_avg_sq`` and ``max_exp_avg_sq``.  4-bit codes, one flat run,
        carry no layout: a param with 4-bit moments also has
        ``"codes_strides"``, an int64 tensor of the strides (in elements) of
        the param its codes were written for, so they load right into a param
        of any memory format (see :meth:`load_state_dict`).  A checkpoint of
        ``torch.optim.Adam`` loads into :class:`Adam` and the other way round
        (with float32 or bfloat16 moments; torch cannot read quantized ones).
        """
        sd = super().state_dict()
        state = sd.get("state") if isinstance(sd, dict) else None
        if isinstance(state, dict):  # plain dicts: torch.load(weights_only=True) refuses other classes
            param_of = {id(s): p for p, s in self.state.items()}
            sd["state"] = {k: self._saved_param_state(v, param_of.get(id(v))) if isinstance(v, _ParamState) else v
                           for k, v in state.items()}
        return sd

    def _saved_param_state(self, s: _ParamState, p: Optional[torch.Tensor]) -> dict:
        """A param's state as state_dict() holds it: a plain dict, with ``codes_strides`` if it has 4-bit moments."""
        saved = dict(s)
        if isinstance(p, torch.Tensor) and _CODE_STRIDES not in saved:  # (one put there by hand is kept)
            strides = self._code_strides(s, p)
            if strides is not None:
                saved[_CODE_STRIDES] = torch.tensor(strides, dtype=torch.int64)
        return saved

    def _code_strides(self, s: dict, p: torch.Tensor) -> Optional[tuple]:
        """The strides of the param that the 4-bit codes of ``s`` were written for (see _written_for; ``p``'s
        own for codes this optimizer has not seen, as a step takes them); None without 4-bit moments."""
        found: dict[str, tuple] = {}
        for key in _MOMENT_KEYS:
            codes = s.get(key + "_codes")
            if isinstance(codes, torch.Tensor) and _has_quantized(s, key) and _stored_bits(s, key) == 4:
                written_for = self._written_for(codes)
                found[key] = written_for[1] if written_for is not None else p.stride()
        if not found:
            return None
        (first, stride), *others = found.items()
        for key, other in others:
            if not _same_order(tuple(p.shape), stride, other):
                # Only codes put in by hand after a change of the param's memory format can do this; the next
                # step re-lays them all in the param's order.
                raise ValueError(f"the 4-bit codes of {first!r} were written for strides {stride}, those of "
                                 f"{key!r} for {other}: a state dict holds one layout per param (take a step first)")
        return stride

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of this class or of its ``torch.optim`` counterpart.

        Everything is checked first (after the load pre-hooks): the groups'
        options, and for each param a step count and state tensors of its
        shape (8-bit moments: uint8 codes of its shape, ``ceil(numel / 256)``
        float32 absmax values, a map of 256 finite ascending float32 values
        holding 0; 4-bit moments: ``ceil(numel / 2)`` contiguous uint8 codes,
        ``ceil(numel / 128)`` absmax values, a map of 16 finite ascending
        values, and ``codes_strides``: the param's ndim int64 strides of a
        dense layout of its shape); a bad state dict raises ValueError naming
        the entry and changes nothing.  4-bit codes are read in the memory
        order ``codes_strides`` gives: loaded as 4-bit state they stay in it
        until the next step, which re-lays them in the param's order if that
        differs (a model converted after loading loses nothing); into other
        storage they are dequantized in it.  The state tensors are copied in, so the optimizer
        never shares them with ``state_dict``, and each moment is converted to
        this optimizer's storage of it (``state_dtype``, ``min_compressed_size``):
        float32 into bfloat16 rounds to nearest-even, float32 or bfloat16 into
        8-bit or 4-bit state is quantized as a step stores it, quantized state
        is dequantized (``map[code] * absmax``) into a float32 or bfloat16
        moment, or into the values that are quantized again into the other
        bit width; a moment of the same storage loads bitwise.  The float32
        state of a float16 or bfloat16 param stays float32 (torch's loader
        would cast it to the param's dtype).
        """
        # Checking after every user pre-hook has had its say: a hook of our own, run last.
        handle = self.register_load_state_dict_pre_hook(type(self)._check_and_hold)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def _check_and_hold(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Load pre-hook: check ``state_dict`` against this optimizer; keep its state tensors for __setstate__.

        torch's loader is handed the state without those tensors (it would cast each to the param's dtype:
        8-bit codes to float32, four times their memory, and every tensor of a float16 param to float16).
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups) if isinstance(saved_groups, (list, tuple)) else '?'}"
                             f" param groups, this optimizer {len(self.param_groups)}")
        if not isinstance(saved_state, dict):
            raise ValueError(f"state_dict['state']: expected a dict, got {type(saved_state).__name__}")
        held: dict[int, dict] = {}
        without_tensors: dict[Any, dict] = {}
        for k, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"state_dict['param_groups'][{k}]: expected a dict with a list of 'params'")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param_groups[{k}]: state_dict has {len(saved['params'])} params, "
                                 f"this optimizer {len(mine['params'])}")
            options = {**mine, **{key: value for key, value in saved.items() if key != "params"}}
            where = f"state_dict['param_groups'][{k}]"
            self._check_group_options(options, where)
            try:
                _check_range(options["lr"], options["betas"], options["eps"], options.get("weight_decay", 0.0))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            amsgrad = bool(options.get("amsgrad", False))
            for j, (pid, p) in enumerate(zip(saved["params"], mine["params"])):
                s = saved_state.get(pid)
                if s is None:
                    continue
                where = f"state_dict['state'][{pid!r}] (for {_param_name(k, j)})"
                if not isinstance(s, dict):
                    raise ValueError(f"{where}: expected a dict, got {type(s).__name__}")
                if not s:
                    continue
                if "step" not in s:
                    raise ValueError(f"{where}: no 'step'")
                _step_value(s["step"], f"{where}['step']")
                four_bit = False
                for key in _MOMENT_KEYS:
                    if _has_quantized(s, key):
                        four_bit |= _check_quantized(s, key, p, where) == 4
                    elif key not in s and (key != "max_exp_avg_sq" or amsgrad):
                        raise ValueError(f"{where}: no {key!r}" + (" (the group has amsgrad=True)"
                                                                   if key == "max_exp_avg_sq" else ""))
                if _CODE_STRIDES in s:
                    _saved_code_strides(s[_CODE_STRIDES], p, where)
                elif four_bit:
                    raise ValueError(f"{where}: no {_CODE_STRIDES!r}: 4-bit codes are one flat run in the memory "
                                     "order of the param they were written for, whose strides are needed to read "
                                     "them (state_dict() saves them)")
                for key in _STATE_TENSORS:
                    if key in s:
                        t = s[key]
                        if not isinstance(t, torch.Tensor) or t.shape != p.shape or \
                                not (t.is_floating_point() and t.layout is torch.strided):
                            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) \
                                else type(t).__name__
                            raise ValueError(f"{where}[{key!r}]: expected a floating-point tensor of shape "
                                             f"{tuple(p.shape)}, got {got}")
                held[id(p)] = s
                without_tensors[pid] = {key: value for key, value in s.items() if key not in _STATE_TENSORS
                                        and key not in _QUANTIZED_KEYS and key != _CODE_STRIDES}
        self._loading = held
        return {**state_dict, "state": {**saved_state, **without_tensors}}

    def _take_loaded_state(self, held: dict[int, dict]) -> None:
        """After torch's loader: the held state tensors copied in, each moment stored as this optimizer stores it."""
        copied_maps: dict[int, torch.Tensor] = {}  # a map shared by params in the state dict stays shared
        for k, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                s = self.state.get(p)
                original = held.get(id(p))
                if not s or original is None:
                    continue
                master = p.dtype in _LOW_PRECISION
                for key in _STATE_TENSORS:
                    if key in original:
                        copy = torch.empty_like(p, dtype=torch.float32 if master else p.dtype,
                                                memory_format=torch.preserve_format)
                        with torch.no_grad():
                            copy.copy_(original[key])
                        s[key] = copy
                for key in _QUANTIZED_KEYS:
                    if key in original:
                        s[key] = self._copied_part(original[key], key, copied_maps)
                if _CODE_STRIDES in original:  # read (and let go of) by _adopt_moments
                    s[_CODE_STRIDES] = original[_CODE_STRIDES].detach().cpu().clone()
                if "step" in s:
                    s["step"] = torch.tensor(_step_value(s["step"], "step"), dtype=_step_dtype())
                self._adopt_moments(s, p, self._storage(p, master), f"state[{_param_name(k, j)}]", relay_codes=False)
        self._loading = None

    def _copied_part(self, t: torch.Tensor, key: str, copied_maps: dict[int, torch.Tensor]) -> torch.Tensor:
        """A CPU copy of a checked tensor of 8-bit or 4-bit state: codes keep their strides (their blocks run over
        their memory), absmax is contiguous, a map equal to this optimizer's of its kind becomes that one."""
        source, t = id(t), t.detach()
        if key.endswith("_codes"):
            return torch.empty_like(t, device="cpu", memory_format=torch.preserve_format).copy_(t)
        if not key.endswith("_map"):
            return torch.empty(t.shape, dtype=t.dtype).copy_(t)
        if source not in copied_maps:
            own = self._map_for(key[:-len("_map")], 4 if t.numel() == 16 else 8)
            copied_maps[source] = own if torch.equal(t.cpu().view(torch.int32), own.view(torch.int32)) \
                else torch.empty(t.shape, dtype=t.dtype).copy_(t)
        return copied_maps[source]

    # -- the step --------------------------------------------------------------------------------------------

    def _check_group_options(self, group: dict[str, Any], where: str) -> None:
        for option in ("capturable", "differentiable"):
            if group.get(option):
                raise ValueError(f"{where}: {option}=True is not supported by fastadam.torch "
                                 f"(its step runs on the CPU, outside autograd and CUDA graphs)")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group as the core reads it: its hyperparameters by name (fastadam._core.HYPERPARAMETERS)."""
        raise NotImplementedError

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step for every param that has a gradient, in one call of fastadam's kernel.

        Params whose ``.grad`` is None are skipped and their step count stays.
        The formula is :func:`fastadam.adam_step`'s (:func:`fastadam.sparse_adam_step`'s
        for :class:`SparseAdam`).  Under ``torch.amp.GradScaler`` the
        gradients are unscaled inside the same pass (``grad_scale``) and a step
        with ``found_inf`` set changes nothing.  The params and the state are
        updated in place, and their version counters are bumped, so autograd
        sees the change.  Step hooks run as for any ``torch.optim`` optimizer.
        """
        # torch.optim wraps step() in a function that runs the step hooks inside a profiler range, which
        # costs more than the whole step of a small model; this step is marked as hooked (below), and takes
        # that same wrapper only when a hook is registered or a profiler is on.  A subclass's own step()
        # is wrapped by torch.optim as usual, and lands here through super().step().
        if type(self).step is _FastAdamOptimizer.step and (
                self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_STEP_PRE_HOOKS
                or _GLOBAL_STEP_POST_HOOKS or torch.autograd._profiler_enabled()):
            return _hooked_step(self, closure)
        return self._step(closure)

    step.hooked = True  # type: ignore[attr-defined]

    def _step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pr = self._prepare()
        try:
            found_inf = getattr(self, "found_inf", None)
            if not pr.entries or (found_inf is not None and float(found_inf) != 0.0):
                return loss
            grad_scale = getattr(self, "grad_scale", None)
            grad_scale = None if grad_scale is None else float(grad_scale)
            groups = self.param_groups
            hyper = groups if type(groups) is list and type(self)._hyper is Adam._hyper \
                else [self._hyper(g) for g in groups]
            try:
                pr.plan.step(pr.grad_arrays, hyper, grad_scale, False, self.num_threads)  # counts += 1 too
            except (TypeError, ValueError) as e:
                if not pr.unchecked:
                    raise type(e)(self._named(str(e), pr.entries)) from None
                # Gradients taken unchecked did not pass the core's checks (nothing was written): everything
                # is checked afresh -- params, state and gradients -- and the checked step taken, or the error
                # of the check raised.  This optimizer then takes its gradients the checked way.
                self._release_grads(pr)
                pr = self._rebuild()
                pr.fast_grads = False
                try:
                    pr.plan.step(pr.grad_arrays, hyper, grad_scale, False, self.num_threads)
                except (TypeError, ValueError) as e:
                    raise type(e)(self._named(str(e), pr.entries)) from None
            _increment_versions(pr.written)
            pr.buffer_version = pr.buffer._version
            return loss
        finally:
            self._release_grads(pr)

    @staticmethod
    def _release_grads(pr: _Prepared) -> None:
        if pr.let_go:
            for i in pr.let_go:
                pr.grad_objs[i] = pr.grad_arrays[i] = None
            pr.let_go = []

    def _prepare(self) -> _Prepared:
        """The step's views, checked against the groups, grads and state of now; taken afresh where they moved."""
        groups = self.param_groups
        pr = self._prepared_step
        if pr is None or self.state is not pr.state_obj or _generation[0] != pr.generation \
                or groups is not pr.groups or len(groups) != len(pr.group_dicts):
            return self._rebuild()
        for g, known, params, amsgrad in zip(groups, pr.group_dicts, pr.param_lists, pr.amsgrad_keys):
            if g is not known or g["params"] is not params or bool(g.get("amsgrad")) is not amsgrad \
                    or g.get("capturable") or g.get("differentiable"):
                return self._rebuild()
        all_params = groups[0]["params"] if len(groups) == 1 else [p for g in groups for p in g["params"]]
        if len(all_params) != len(pr.all_params) or not all(map(operator.is_, all_params, pr.all_params)):
            return self._rebuild()
        grads = list(map(_grad_of, all_params))
        present = grads if pr.all_present else [g for g in grads if g is not None]
        pr.unchecked = False
        if len(present) != len(pr.grad_objs) or not all(map(operator.is_, present, pr.grad_objs)):
            if pr.all_present:
                if not all(map(operator.is_not, grads, repeat(None))):
                    return self._rebuild()
            elif [i for i, g in enumerate(grads) if g is not None] != pr.positions:
                return self._rebuild()
            self._take_grads(pr, present)
        if pr.entries:
            if list(map(_data_ptr, pr.params)) != pr.ptrs:
                return self._rebuild()
            if pr.buffer._version != pr.buffer_version:  # a step count was written into
                pr.plan.steps = [int(c) for c in pr.steps]
                pr.buffer_version = pr.buffer._version
        return pr

    def _take_grads(self, pr: _Prepared, present: list) -> None:
        """The views of the gradients that are not last step's tensors (after zero_grad(), all of them)."""
        changed = list(compress(count(), map(operator.is_not, present, pr.grad_objs)))
        every = len(changed) == len(present)
        new = present if every else [present[i] for i in changed]
        arrays = None
        if pr.fast_grads and list(map(_dtype_of, new)) == (pr.dtypes if every else [pr.dtypes[i] for i in changed]):
            try:
                arrays = list(map(_as_numpy, new))  # refuses sparse, non-CPU and requires_grad tensors
            except (TypeError, RuntimeError, ValueError):
                arrays = None
        if arrays is None:
            arrays = [self._grad_array(pr.entries[i], g) for i, g in zip(changed, new)]
        else:
            pr.unchecked = True
        ids = list(map(id, new))
        # (an id may be a freed tensor's: then g is kept one step more)
        if every:
            pr.let_go = list(compress(count(), map(operator.ne, ids, pr.grad_ids)))
            pr.grad_objs, pr.grad_arrays, pr.grad_ids = new, arrays, ids
            return
        let_go = []
        for i, g, a, gid in zip(changed, new, arrays, ids):
            pr.grad_arrays[i] = a
            pr.grad_objs[i] = g
            if gid != pr.grad_ids[i]:
                let_go.append(i)
                pr.grad_ids[i] = gid
        pr.let_go = let_go

    def _amsgrad(self, group: dict[str, Any]) -> bool:
        return False

    def _rebuild(self) -> _Prepared:
        # Every failure below is raised before the step writes anything.
        with torch.no_grad():
            return self._rebuild_unguarded()

    def _rebuild_unguarded(self) -> _Prepared:
        self._prepared_step = None
        if not isinstance(self.state, _State):
            self.state = _State(None, self.state)
        groups = self.param_groups
        pr = _Prepared()
        pr.groups, pr.group_dicts = groups, tuple(groups)
        pr.param_lists = tuple(g["params"] for g in groups)
        for k, g in enumerate(groups):
            self._check_group_options(g, f"param_groups[{k}]")
        pr.amsgrad = tuple(self._amsgrad(g) for g in groups)
        pr.amsgrad_keys = tuple(bool(g.get("amsgrad")) for g in groups)
        pr.all_params = [p for g in groups for p in g["params"]]
        grads: list[torch.Tensor] = []
        position = 0
        for k, g in enumerate(groups):
            for j, p in enumerate(g["params"]):
                grad = p.grad
                if grad is not None:
                    name = _param_name(k, j)
                    self._check_param(p, name)
                    state = self.state[p]
                    master = p.dtype in _LOW_PRECISION
                    self._adopt_state(state, p, master, pr.amsgrad[k], name)
                    pr.entries.append(_Entry(k, j, p, state, master, bool(_layout(p))))
                    pr.positions.append(position)
                    grads.append(grad)
                position += 1
        if not pr.entries:
            self._finish(pr)
            return pr
        pr.grad_arrays = [self._grad_array(e, g) for e, g in zip(pr.entries, grads)]
        pr.grad_objs, pr.grad_ids, pr.let_go = grads, list(map(id, grads)), list(range(len(grads)))

        # The step counts: one buffer, each state["step"] a 0-d view of it, so a step advances them all at once.
        counts = [_step_value(e.state["step"], f"state of {e.name}: 'step'") for e in pr.entries]
        buffer = torch.tensor(counts, dtype=_step_dtype())
        for i, e in enumerate(pr.entries):
            e.state["step"] = buffer[i]
        pr.buffer, pr.steps = buffer, buffer.numpy()

        masters, exp_avgs, exp_avg_sqs, maxes, models = [], [], [], [], []
        for e in pr.entries:
            s = e.state
            work = s["master_param"] if e.master else e.param
            masters.append(_view(work, e.flat, e.name))
            models.append(_view(e.param, e.flat, e.name) if e.master else None)
            exp_avgs.append(_moment_view(s, "exp_avg", e))
            exp_avg_sqs.append(_moment_view(s, "exp_avg_sq", e))
            maxes.append(_moment_view(s, "max_exp_avg_sq", e) if pr.amsgrad[e.k] else None)
        try:
            # No stochastic rounding here: its key, a param's position in the plan, would change with the
            # params that have gradients.
            pr.plan = _core.AdamPlan(masters, exp_avgs, exp_avg_sqs, maxes, models, [e.k for e in pr.entries],
                                     len(groups), False, 0)
        except (TypeError, ValueError) as err:
            raise type(err)(self._named(str(err), pr.entries)) from None
        pr.plan.steps = [int(c) for c in counts]
        pr.plan.set_step_counts(pr.steps)
        pr.params = [e.param for e in pr.entries]
        pr.ptrs = list(map(_data_ptr, pr.params))
        pr.all_present = len(pr.entries) == len(pr.all_params)
        pr.dtypes = [e.dtype for e in pr.entries]
        pr.fast_grads = not self._sparse_only and all(
            not e.master and not e.flat and e.dtype in _WORK_DTYPES for e in pr.entries)
        written: list[torch.Tensor] = [buffer]
        for e in pr.entries:
            written.append(e.param)
            written.extend(e.state[key] for key in _WRITTEN_TENSORS if key in e.state)
        pr.written = tuple(written)
        pr.buffer_version = buffer._version
        self._finish(pr)
        return pr

    def _finish(self, pr: _Prepared) -> None:
        pr.state_obj = self.state
        pr.generation = _generation[0]
        self._prepared_step = pr

    def _storage(self, p: torch.Tensor, master: bool) -> dict[str, Any]:
        """How each state tensor of ``p`` is stored: a dtype, or "int8" / "int4" for a moment in 8-bit / 4-bit
        state.

        The moments of a float32 working param (master-weighted ones included) of at least
        min_compressed_size elements are stored as state_dtype says, amsgrad's maximum as exp_avg_sq; the
        others, and the master copy, in the working dtype.
        """
        work = torch.float32 if master else p.dtype
        compressed = work is torch.float32 and p.numel() >= self.min_compressed_size
        kinds = {"float32": work, "bfloat16": torch.bfloat16, "int8": "int8", "int4": "int4"}
        storage: dict[str, Any] = {key: kinds[self.state_dtype[k]] if compressed else work
                                   for key, k in (("exp_avg", 0), ("exp_avg_sq", 1), ("max_exp_avg_sq", 1))}
        storage["master_param"] = work
        return storage

    def _map_for(self, key: str, bits: int) -> torch.Tensor:
        """The map that new ``bits``-bit state of moment ``key`` takes, one tensor of each kind for all params
        (as fastadam.Adam's): 8-bit, fastadam.dynamic_map, signed for exp_avg and unsigned for the others;
        4-bit (Li et al.), ``dynamic_map(True, bits=4)`` for exp_avg and ``linear_map(4)`` (no zero) for the
        others."""
        kind = (key == "exp_avg", bits)
        if kind not in self._quantization_maps:
            self._quantization_maps[kind] = torch.from_numpy(moment_map(*kind))
        return self._quantization_maps[kind]

    def _quantized_tensors(self, p: torch.Tensor, key: str, bits: int) -> tuple:
        """New (codes, absmax, map) of moment ``key`` of ``p`` in ``bits``-bit state, codes and absmax
        uninitialised: 8-bit codes laid out as ``p``, 4-bit ones a 1-D run of ``ceil(numel / 2)`` bytes in
        ``p``'s memory order (noted in _code_layouts)."""
        qmap = self._map_for(key, bits)
        if bits == 8:
            codes = torch.empty_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
        else:
            codes = torch.empty(-(-p.numel() // 2), dtype=torch.uint8)
            self._code_layouts[codes] = (tuple(p.shape), p.stride())
        absmax = torch.empty(-(-p.numel() // quantization_block(qmap.numpy())), dtype=torch.float32)
        return codes, absmax, qmap

    def _written_for(self, codes: Any) -> Optional[tuple]:
        """(shape, strides) of the param in whose memory order 4-bit ``codes`` were written, where this
        optimizer wrote, loaded (as a state dict's ``codes_strides`` says) or adopted them; None for codes it
        has not seen (put in by hand without ``codes_strides``), which are taken to follow their param's
        present memory order.

        1-D codes carry no layout of their own (8-bit codes carry their strides), so a param whose memory
        format changes between steps (``model.to(memory_format=torch.channels_last)``) would otherwise have
        its codes read in the wrong order; with this its moments are dequantized in the old order and
        quantized again in the new one, as 8-bit state laid out unlike its param is.
        """
        return self._code_layouts.get(codes) if isinstance(codes, torch.Tensor) else None

    def _adopt_state(self, s: dict, p: torch.Tensor, master: bool, amsgrad: bool, name: str) -> None:
        """Create the state of a param's first step, or check (and where needed lay out anew) what is there."""
        storage = self._storage(p, master)
        if len(s) == 0:
            s["step"] = torch.tensor(0.0, dtype=_step_dtype())
            for k, key in enumerate(_MOMENT_KEYS if amsgrad else _MOMENT_KEYS[:2]):
                if storage[key] in _CODE_BITS:  # a zero moment, as fastadam.Adam creates it
                    codes, absmax, qmap = self._quantized_tensors(p, key, _CODE_BITS[storage[key]])
                    zero = zero_state((p.numel(),), qmap.numpy())  # every value 0: the same codes in any order
                    codes.copy_(torch.from_numpy(zero.codes).reshape(codes.shape))
                    absmax.copy_(torch.from_numpy(zero.absmax))
                    s[key + "_codes"], s[key + "_absmax"], s[key + "_map"] = codes, absmax, qmap
                else:
                    s[key] = _staggered_zeros_like(p, storage[key], k)
        if "step" not in s:
            raise ValueError(f"the state of {name} has no 'step'")
        for key in _MOMENT_KEYS:
            if key not in s and not _has_quantized(s, key):
                if key == "max_exp_avg_sq" and not amsgrad:
                    continue
                raise ValueError(f"the state of {name} has no {key!r}" +
                                 (" (amsgrad was switched on after its first step)" if key == "max_exp_avg_sq"
                                  else ""))
        if master and "master_param" not in s:
            s["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        self._adopt_moments(s, p, storage, f"state[{name}]")

    def _adopt_moments(self, s: dict, p: torch.Tensor, storage: dict[str, Any], where: str,
                       relay_codes: bool = True) -> None:
        """Store each state tensor of ``s`` as ``storage`` says, laid out as ``p``; what already is stays.

        A state tensor put there by hand, loaded, or stored otherwise becomes the optimizer's own: a float
        tensor is copied into the storage dtype and the param's layout (float32 into bfloat16 rounds to
        nearest-even), or quantized into 8-bit or 4-bit state with this optimizer's map; quantized state of
        another storage (8-bit where 4-bit is wanted, or the other way, or into a float moment) is
        dequantized and stored as wanted, and so is quantized state laid out unlike the param (8-bit codes of
        other strides, 4-bit codes written for another memory format: see _written_for).  Quantized state
        that is already the param's is left to the core's checks.  Everything is checked before anything
        is replaced.

        A ``codes_strides`` entry (a state dict's: see _saved_code_strides) says which memory order the 4-bit
        codes of ``s`` were written in, and is let go of once noted.  Without ``relay_codes`` (on loading),
        4-bit codes kept as 4-bit are kept in that order, noted, and re-laid by the next step if the param's
        order still differs then: a model loaded and then converted (``model.to(memory_format=...)``) loses
        nothing to a re-quantization.
        """
        shape, stride = tuple(p.shape), p.stride()
        # A state dict's note of the strides the 4-bit codes were written for (copied in by load_state_dict, or
        # put in optimizer.state directly, as ZeroRedundancyOptimizer does) says more than _written_for.
        saved_strides = _saved_code_strides(s[_CODE_STRIDES], p, where) if _CODE_STRIDES in s else None
        convert: list[tuple[str, Optional[tuple]]] = []  # the quantized moments to dequantize (and where)
        layouts: dict[str, tuple] = {}  # the (shape, strides) each 4-bit moment kept as it is is noted with
        for key in _MOMENT_KEYS:
            if not _has_quantized(s, key):
                continue
            codes, bits = s.get(key + "_codes"), _stored_bits(s, key)
            written_for = None if bits == 8 else (shape, saved_strides) if saved_strides is not None \
                else self._written_for(codes)
            in_order = written_for is None or (written_for[0] == shape and _same_order(shape, written_for[1], stride))
            kept = storage[key] in _CODE_BITS and _CODE_BITS[storage[key]] == bits and \
                _is_plain(codes, torch.uint8, stride if bits == 8 else (1,)) and \
                (in_order or (not relay_codes and written_for[0] == shape))
            if bits == 4:
                layouts[key] = (shape, stride) if in_order else written_for
            if kept and key not in s and all(_is_plain(s.get(key + part), torch.float32, (1,))
                                             for part in ("_absmax", "_map")):
                continue  # as the step takes it (the core checks shapes and the map)
            _check_quantized(s, key, p, where)
            if written_for is not None and written_for[0] != shape:
                raise ValueError(f"{where}[{key + '_codes'!r}]: 4-bit codes written for a param of shape "
                                 f"{written_for[0]}, this one has shape {shape}")
            if not kept:
                convert.append((key, written_for))
        for key in _STATE_TENSORS:
            t = s.get(key)
            if key in s and (not isinstance(t, torch.Tensor) or t.shape != p.shape):
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {key!r} must be a tensor of shape {shape}, got {got}")

        # All checked: now change things.
        if _CODE_STRIDES in s:
            del s[_CODE_STRIDES]
        converted = {key for key, _ in convert}
        for key in _MOMENT_KEYS:
            if _has_quantized(s, key) and key not in converted:
                if key in layouts:
                    self._code_layouts[s[key + "_codes"]] = layouts[key]
                for part in ("_absmax", "_map"):
                    t = s[key + part]
                    if not _is_plain(t, torch.float32, (1,)):  # its values, in a contiguous tensor the step views
                        s[key + part] = torch.empty(t.shape, dtype=torch.float32).copy_(t.detach())
        for key, written_for in convert:
            values = _dequantized(s, key, p, written_for, where)
            for part in _QUANTIZED_PARTS:
                del s[key + part]
            s[key] = values
        for key in _STATE_TENSORS:
            if key not in s:
                continue
            want = storage[key]
            dtype = torch.float32 if want in _CODE_BITS else want
            t = s[key]
            if t.dtype is not dtype or t.device.type != "cpu" or t.layout is not torch.strided or \
                    t.stride() != stride or t.requires_grad:
                # Another dtype or layout: a tensor laid out as the param, holding its values, takes its place.
                fresh = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                with torch.no_grad():
                    fresh.copy_(t.detach())
                s[key] = t = fresh
            if want in _CODE_BITS:
                bits = _CODE_BITS[want]
                codes, absmax, qmap = self._quantized_tensors(p, key, bits)
                # 4-bit codes, being 1-D, are written from the values' flat memory, as 8-bit codes of a
                # channels_last param are.
                flat = bool(_layout(p)) or bits == 4
                values = _view(t, flat, where)
                _convert_moment(values, QuantizedState(_view(codes, flat, where), absmax.numpy(), qmap.numpy()),
                                values.shape)
                del s[key]
                s[key + "_codes"], s[key + "_absmax"], s[key + "_map"] = codes, absmax, qmap

    def _grad_array(self, e: _Entry, g: torch.Tensor) -> Any:
        """The gradient as the kernel reads it: an ndarray, or (indices, values) for a row-sparse one.

        Run for every new gradient tensor, so only what torch does not already guarantee is checked here
        (torch refuses a .grad of another shape or layout than sparse COO); the core checks the rest.
        """
        if g.is_sparse:
            return self._sparse_grad(e, g)
        if not g.is_cpu:
            raise ValueError(f"the grad of {e.name} is on {g.device}; fastadam.torch steps CPU tensors")
        if self._sparse_only:
            raise RuntimeError(f"SparseAdam does not support dense gradients, please consider Adam instead "
                               f"(the grad of {e.name} is dense)")
        if g.dtype not in e.grad_dtypes:
            raise TypeError(f"the grad of {e.name} is {g.dtype}, the param {e.dtype}")
        if not (g.stride() == e.stride if e.flat else g.is_contiguous()):
            # Autograd gives a grad the param's strides; one that differs is read from a copy laid out as the
            # param (a gradient is only read, so nothing is lost).
            g = torch.empty_like(e.param, dtype=g.dtype, memory_format=torch.preserve_format).copy_(g.detach())
        if g.requires_grad:
            g = g.detach()
        if e.flat:
            g = g.as_strided((g.numel(),), (1,))
        if g.dtype is torch.bfloat16:
            return _core.as_array(g, f"the grad of {e.name}")
        return g.numpy()

    def _sparse_grad(self, e: _Entry, g: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        p = e.param
        if e.master:
            raise TypeError(f"the grad of {e.name} is sparse, which is not supported for {p.dtype} params with "
                            "master weights")
        if g.shape != p.shape or g.sparse_dim() != 1:
            raise ValueError(f"the sparse grad of {e.name} must have the param's shape {tuple(p.shape)} and be "
                             f"sparse along its first dimension only (sparse_dim 1, as nn.Embedding's), got shape "
                             f"{tuple(g.shape)} with sparse_dim {g.sparse_dim()}")
        if g.dtype is not p.dtype:
            raise TypeError(f"the grad of {e.name} is {g.dtype}, the param {p.dtype}")
        if e.flat:
            raise ValueError(f"{e.name}: a sparse grad needs a C-contiguous param")
        # Repeated rows of an uncoalesced grad are summed by fastadam, in the order they appear.
        values = g._values().detach()
        if not values.is_contiguous():
            values = values.contiguous()
        return _view(g._indices()[0], False, f"the grad of {e.name}"), \
            _view(values, False, f"the grad of {e.name}")

    @staticmethod
    def _named(message: str, entries: list[_Entry]) -> str:
        """A message of the core, its list positions turned into the names of the params they stand for."""
        roles = {"grads": "the grad of {}", "exp_avgs": "state[{}]['exp_avg']",
                 "exp_avg_sqs": "state[{}]['exp_avg_sq']", "max_exp_avg_sqs": "state[{}]['max_exp_avg_sq']",
                 "model_params": "{}"}

        def name(match: re.Match) -> str:
            role, i, part = match.group(1), int(match.group(2)), match.group(3)
            if i >= len(entries):
                return match.group(0)
            e = entries[i]
            if role == "params":
                return (f"state[{e.name}]['master_param']" if e.master else e.name) + (part or "")
            if part and role in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):  # a tensor of 8-bit or 4-bit state
                return roles[role].format(e.name)[:-2] + "_" + part[1:] + "']"
            return roles[role].format(e.name) + (part or "")

        return re.sub(r"\b(params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|model_params)\[(\d+)\]"
                      r"(\.codes|\.absmax|\.map)?", name, message)


# The registries of torch.optim's global step hooks (register_optimizer_step_pre_hook); where a torch
# version keeps them elsewhere, a non-empty stand-in sends every step through the hooks' wrapper.
_GLOBAL_STEP_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {None: None})
_GLOBAL_STEP_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {None: None})
#: torch.optim's own wrapper, hooks and profiler range included, around the step.
_hooked_step = Optimizer.profile_hook_step(_FastAdamOptimizer._step)


def _step_dtype() -> torch.dtype:
    """The dtype of a step count tensor: torch.optim's choice (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_range(lr: Any, betas: Any, eps: Any, weight_decay: Any, strict: bool = False) -> tuple:
    """torch.optim's checks of the hyperparameters, with its messages; returns betas as a tuple."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not (0.0 < lr if strict else 0.0 <= lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 < eps if strict else 0.0 <= eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    betas = tuple(float(b) if isinstance(b, torch.Tensor) else b for b in betas)
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    return betas


class Adam(_FastAdamOptimizer):
    r"""Adam for PyTorch CPU tensors, a drop-in for :class:`torch.optim.Adam` stepped by fastadam's kernel.

    For each param with a gradient ``g``, with ``t`` its step count after
    this step (the formula of :func:`fastadam.adam_step`)::

        g  = g * (1 / grad_scale)                under torch.amp.GradScaler
        g  = -g                                  if maximize
        g  = g + weight_decay * p                if weight_decay and not decoupled_weight_decay
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g * g
        v' = max(v_max, v); v_max = v'           if amsgrad, else v' = v
        u  = lr / (1 - beta1**t) * m / (sqrt(v') / sqrt(1 - beta2**t) + eps)
        u  = u + (lr * weight_decay) * p         if weight_decay and decoupled_weight_decay (AdamW)
        p  = p - u

    The options, defaults and ``state_dict`` are ``torch.optim.Adam``'s.
    ``foreach`` and ``fused`` are accepted and kept in the groups (for
    checkpoints) but choose nothing: the step is always one fused pass.
    ``capturable=True`` and ``differentiable=True`` are refused.  ``lr`` may
    be a one-element tensor.  Beyond torch: a sparse COO gradient
    (``nn.Embedding(sparse=True)``) updates only its rows, with this formula
    (the lazy update); ``master_weights=True`` steps float16/bfloat16 params
    through float32 master copies (``state["master_param"]``) and float32
    moments; ``state_dtype="bfloat16"``, ``"int8"`` or ``"int4"`` (or a pair
    for ``exp_avg``, ``exp_avg_sq``; amsgrad's maximum follows ``exp_avg_sq``)
    keeps the moments of float32 params (master copies included) of at least
    ``min_compressed_size`` elements as bfloat16 tensors, or in 8-bit or 4-bit
    block-wise state: ``state[p]`` then holds ``exp_avg_codes``,
    ``exp_avg_absmax`` and ``exp_avg_map`` in place of ``exp_avg``, and so on.
    8-bit: codes uint8 of the param's shape and strides, one float32 absmax per
    block of 256 elements of the param's memory, a map of 256 float32 values
    (shared by the params); element ``j`` of the memory stands for
    ``map[codes[j]] * absmax[j // 256]``.  4-bit (Li et al., NeurIPS 2023): codes
    a 1-D uint8 tensor of ``ceil(numel / 2)`` bytes, element ``j`` of the
    param's memory in the low four bits of byte ``j // 2`` if ``j`` is even,
    the high four if odd; one absmax per block of 128 elements; a map of 16
    values; element ``j`` stands for ``map[code_j] * absmax[j // 128]`` (see
    :class:`fastadam.Adam`), and :meth:`state_dict` notes the strides of the
    param the codes were written for (``"codes_strides"``), so a checkpoint
    loads into any memory format (:meth:`load_state_dict` converts between
    the storages and memory orders); ``eps_before_bias_correction=True`` (also a group key) adds eps
    before the bias correction, as Keras and scikit-learn do (see
    :func:`fastadam.adam_step`); ``num_threads`` caps the threads of a step.

    Params must be dense CPU tensors (float32, float64; float16/bfloat16 with
    master weights), C-contiguous or channels_last.  Bitwise equal to
    :class:`fastadam.Adam` (and so to :func:`fastadam.reference.adam_step`)
    on the same data; against ``torch.optim.Adam`` within the ULPs stated in
    the README (the fastadam.torch section's "Agreement").
    """

    def __init__(self, params: Any, lr: Any = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False, master_weights: bool = False,
                 eps_before_bias_correction: bool = False, num_threads: Optional[int] = None,
                 state_dtype: Any = "float32", min_compressed_size: int = 4096) -> None:
        betas = _check_range(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        if eps_before_bias_correction:
            # Only when asked: a checkpoint of a default optimizer keeps torch.optim.Adam's group keys.
            defaults["eps_before_bias_correction"] = True
        self._check_group_options(defaults, type(self).__name__)
        super().__init__(params, defaults, master_weights, num_threads, state_dtype, min_compressed_size)

    def _amsgrad(self, group: dict[str, Any]) -> bool:
        return bool(group["amsgrad"])

    def _hyper(self, g: dict[str, Any]) -> dict[str, Any]:
        return g  # torch's keys are fastadam's; eps_before_bias_correction, when absent, is off


class AdamW(Adam):
    """AdamW for PyTorch CPU tensors, a drop-in for :class:`torch.optim.AdamW`: :class:`Adam` with
    ``decoupled_weight_decay=True`` (always, as in torch, also after loading a state dict) and
    ``weight_decay=1e-2`` by default.

    The decay is ``p - ((lr * weight_decay) * p + u)`` with ``u`` the Adam
    update: PyTorch's ``p * (1 - lr * weight_decay)`` without rounding the
    factor (see the README's "AdamW's decoupled decay").
    """

    def __init__(self, params: Any, lr: Any = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, master_weights: bool = False,
                 eps_before_bias_correction: bool = False, num_threads: Optional[int] = None,
                 state_dtype: Any = "float32", min_compressed_size: int = 4096) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         eps_before_bias_correction=eps_before_bias_correction, num_threads=num_threads,
                         state_dtype=state_dtype, min_compressed_size=min_compressed_size)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SparseAdam(_FastAdamOptimizer):
    r"""Lazy Adam for sparse gradients, a drop-in for :class:`torch.optim.SparseAdam`.

    Each param's gradient must be a sparse COO tensor sparse along the first
    dimension (``nn.Embedding(sparse=True)`` makes one); repeated rows are
    summed (fastadam coalesces them, in the order they appear), and only the
    rows present are updated -- the moments of the others are not decayed.
    For each such row ``r`` with summed gradient ``g`` and step ``t``
    (:func:`fastadam.sparse_adam_step`'s formula, eps before the bias
    correction as in torch)::

        g    = -g                                if maximize
        m[r] = beta1 * m[r] + (1 - beta1) * g
        v[r] = beta2 * v[r] + (1 - beta2) * g * g
        p[r] = p[r] - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m[r] / (sqrt(v[r]) + eps)

    Options, defaults, checks and ``state_dict`` format (``"step"`` an int)
    are torch's; a dense gradient raises RuntimeError, as there.
    ``state_dtype`` and ``min_compressed_size`` are :class:`Adam`'s; with
    8-bit (4-bit) state a row must hold a multiple of 256 (128) elements (a
    block never straddles rows), else the step raises ValueError and changes
    nothing.
    """

    _sparse_only = True

    def __init__(self, params: Any, lr: Any = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False, *, num_threads: Optional[int] = None, state_dtype: Any = "float32",
                 min_compressed_size: int = 4096) -> None:
        betas = _check_range(lr, betas, eps, 0.0, strict=True)
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults, False, num_threads, state_dtype, min_compressed_size)

    def _hyper(self, g: dict[str, Any]) -> dict[str, Any]:
        # No weight decay or amsgrad (absent keys are off); eps before the bias correction, as torch's.
        return {**g, "eps_before_bias_correction": True}

    def _saved_param_state(self, s: _ParamState, p: Optional[torch.Tensor]) -> dict:
        saved = super()._saved_param_state(s, p)
        if isinstance(saved.get("step"), torch.Tensor):
            saved["step"] = int(saved["step"])  # torch.optim.SparseAdam counts steps in a Python int
        return saved
