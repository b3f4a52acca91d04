"""fastadam: the Adam/AdamW optimizer step on NumPy arrays in one vectorized, multi-threaded pass.

>>> import numpy as np, fastadam
>>> p = np.ones(4, np.float32); g = np.full(4, 0.5, np.float32)
>>> m, v = np.zeros_like(p), np.zeros_like(p)
>>> fastadam.adam_step(p, g, m, v, step=1, lr=0.1)
True
>>> p
array([0.9, 0.9, 0.9, 0.9], dtype=float32)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version
from typing import Any, Optional

from . import _core, reference
from ._functional import RowSparseGrad, adam_step, dequantize_blockwise, quantize_blockwise, sparse_adam_step
from ._optim import Adam, AdamW, SparseAdam
from .reference import QuantizedState, dynamic_map, linear_map

try:
    __version__ = _version("fastadam")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Adam",
    "AdamW",
    "QuantizedState",
    "RowSparseGrad",
    "SparseAdam",
    "adam_step",
    "config",
    "dequantize_blockwise",
    "dynamic_map",
    "get_num_threads",
    "linear_map",
    "quantize_blockwise",
    "reference",
    "set_num_threads",
    "show_config",
    "sparse_adam_step",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # fastadam.torch imports PyTorch, so it is loaded on first use, not with fastadam.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config() -> dict[str, Any]:
    """The build and runtime configuration.

    Keys: ``version``; ``isa``, the instruction-set level the kernel runs
    (chosen at import: the best the CPU supports, or ``FASTADAM_ISA``);
    ``available_isas``, the levels this CPU can run; ``vector_bits``;
    ``openmp``; ``num_threads``, the threads a call uses by default;
    ``max_threads``, the most threads a call runs on (the processors this
    process may use: larger counts are capped to it); ``fork_safe``, whether
    steps in a forked child work (a fork handler is registered);
    ``num_threads_override``, the value of :func:`set_num_threads` or None;
    ``parallel_threshold_elements``, per dtype, the element count under
    which a call runs on the calling thread; ``compiler``.
    """
    return {"version": __version__, **_core.config()}


def show_config() -> None:
    """Print :func:`config`, one ``key: value`` line each (like ``np.show_runtime()``)."""
    for key, value in config().items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:>28}: {value}")


def set_num_threads(n: Optional[int]) -> None:
    """Use at most ``n`` threads in later calls; ``None`` follows OpenMP's own setting again."""
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads a call uses when it does not pass ``num_threads``.

    Every call runs on at most ``config()["max_threads"]`` threads, the
    processors this process may use: more never speed up a memory-bound step.
    """
    return _core.get_num_threads()
