"""The functional API: one in-place step over arrays the caller owns."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import _core

#: An ndarray, or any object with ``__dlpack__`` (a PyTorch CPU tensor), or a sequence of them.
ArrayOrList = Union[np.ndarray, Any, Sequence[Any]]


def adam_step(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList, exp_avg_sqs: ArrayOrList, *,
              step: int, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
              max_exp_avg_sqs: Optional[ArrayOrList] = None, maximize: bool = False,
              eps_before_bias_correction: bool = False,
              model_params: Optional[ArrayOrList] = None, grad_scale: Optional[float] = None,
              skip_if_nonfinite: bool = False, stochastic_rounding: bool = False, rounding_seed: int = 0,
              num_threads: Optional[int] = None) -> bool:
    r"""Apply one Adam (or AdamW) step in place, in a single pass over memory.

    For every element, with ``t = step`` (1 on the first step)::

        g  = g * (1 / grad_scale)                if grad_scale (loss scaling)
        g  = -g                                  if maximize
        g  = g + weight_decay * p                if weight_decay and not decoupled_weight_decay
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g * g
        v' = max(v_max, v); v_max = v'           if amsgrad, else v' = v
        u  = lr / (1 - beta1**t) * m / (sqrt(v') / sqrt(1 - beta2**t) + eps)
        u  = lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v') + eps)
                                                 instead, if eps_before_bias_correction
        u  = u + (lr * weight_decay) * p         if weight_decay and decoupled_weight_decay (AdamW)
        p  = p - u

    This matches ``torch.optim.Adam`` / ``AdamW`` option for option (AdamW's
    decay ``p * (1 - lr * weight_decay)`` is computed without rounding the
    factor, so it stays accurate for tiny ``lr * weight_decay``), and is
    bitwise equal to :func:`fastadam.reference.adam_step` in the same dtype.

    Parameters
    ----------
    params, grads, exp_avgs, exp_avg_sqs
        One array each, or equal-length sequences of arrays.  Each parameter's
        four arrays share a dtype (float32 or float64) and a shape, are
        C-contiguous, and do not share memory; ``params``, ``exp_avgs`` and
        ``exp_avg_sqs`` are updated in place (never a copy).  An array may be
        any object with ``__dlpack__`` -- a PyTorch CPU tensor (detached),
        bfloat16 included -- which is read and updated where it lies, as an
        ndarray over its memory; a tensor on another device, or memory its
        exporter marks read-only where the step writes, is an error.  (PyTorch
        does not see such a write in a tensor's version counter:
        :mod:`fastadam.torch` bumps it, or call
        ``torch.autograd.graph.increment_version``.)
    step
        The number of this step, counted from 1; it sets the bias corrections.
    max_exp_avg_sqs
        The running maximum of ``exp_avg_sqs``; required with ``amsgrad=True``.
    eps_before_bias_correction
        Add eps to ``sqrt(v')`` before the bias correction, which then moves
        into the step size: the form of Keras, TensorFlow, scikit-learn's
        ``MLPClassifier(solver="adam")`` and ``torch.optim.SparseAdam`` (the
        "epsilon hat" of Kingma & Ba's section 2).  The two forms differ only
        while ``sqrt(v')`` is not much larger than eps: the default's
        effective eps is ``eps * sqrt(1 - beta2**t)``, smaller in early steps.
    model_params
        Mixed precision: float16 or bfloat16 (``ml_dtypes.bfloat16``) copies of
        the parameters, one per param.  ``params`` are then the float32 master
        weights; in the same pass, each updated master value is rounded to
        nearest-even into the model copy.  The gradients of float32 params may
        be float16 or bfloat16 too.
    grad_scale
        Loss scaling: the gradients are multiplied by ``1 / grad_scale`` (rounded
        once to the dtype) before anything else, as ``torch.amp.GradScaler``
        unscales them.
    stochastic_rounding, rounding_seed
        How bfloat16 moments (``exp_avgs``/``exp_avg_sqs`` of a float32 param
        may be ``ml_dtypes.bfloat16`` arrays) are rounded after the float32
        update: to nearest-even by default; stochastically -- up with
        probability equal to the value's distance from the bfloat16 below, in
        units of its last place -- with random bits from a counter-based hash
        of (``rounding_seed``, ``step``, the param's list position, the
        element's index), so the result depends on no thread count and a
        resumed run repeats an uninterrupted one (see
        :func:`fastadam.reference.stochastic_round_bfloat16`).
    skip_if_nonfinite
        First check every (scaled) gradient; if one holds a NaN or an inf, skip
        the whole step -- no array changes -- and return False.  This reads the
        gradients twice.
    num_threads
        The most threads to use; by default OpenMP's setting (``OMP_NUM_THREADS``,
        ``threadpoolctl``) or :func:`fastadam.set_num_threads`, and never more
        than the processors this process may use.  Calls with fewer than ~32k
        elements in all run on the calling thread.

    Returns
    -------
    bool
        True if the step was applied, False if ``skip_if_nonfinite`` skipped it.

    Raises
    ------
    TypeError, ValueError
        For a bad argument, named in the message with its list index.  Every
        check happens before the first write: a failing call changes nothing.
    """
    return _core.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr, betas, eps,
                           weight_decay, decoupled_weight_decay, amsgrad, maximize, eps_before_bias_correction,
                           model_params, grad_scale, skip_if_nonfinite, stochastic_rounding, rounding_seed,
                           num_threads)


class RowSparseGrad(NamedTuple):
    """A row-sparse gradient: ``values[i]`` is the gradient of row ``indices[i]`` of a parameter.

    ``indices`` is a 1-D integer array of row numbers into the parameter's
    first axis (repeats allowed: they are summed, as PyTorch coalesces a sparse
    gradient); ``values`` has shape ``(len(indices),) + param.shape[1:]`` and
    the parameter's dtype.  Pass one to :meth:`fastadam.Adam.step` in place of
    a dense gradient to update only those rows (the "lazy" update), or to
    :class:`fastadam.SparseAdam`.
    """

    indices: np.ndarray
    values: np.ndarray


def sparse_adam_step(param: np.ndarray, indices: np.ndarray, values: np.ndarray, exp_avg: np.ndarray,
                     exp_avg_sq: np.ndarray, *, step: int, lr: float = 1e-3,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, maximize: bool = False,
                     num_threads: Optional[int] = None) -> None:
    r"""One lazy Adam step on the rows of ``param`` named by ``indices``, like ``torch.optim.SparseAdam``.

    Repeated indices are first summed, in the order they appear.  Then for
    each row ``r`` present, with ``g`` its summed gradient and ``t = step``::

        g = -g                                       if maximize
        m[r] = beta1 * m[r] + (1 - beta1) * g
        v[r] = beta2 * v[r] + (1 - beta2) * g * g
        p[r] = p[r] - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m[r] / (sqrt(v[r]) + eps)

    Rows not in ``indices`` are untouched: their moments are not decayed.
    Each argument may also be an object with ``__dlpack__`` (a PyTorch CPU
    tensor), used in place as in :func:`adam_step`.
    Note that eps is added before the bias correction here, as in PyTorch's
    SparseAdam (Adam adds it after).  The cost follows the number of indices,
    not the size of the table.  Bitwise equal to
    :func:`fastadam.reference.sparse_adam_step`.

    Raises TypeError / ValueError before anything is written for a bad
    argument, naming the first out-of-range or negative index.
    """
    _core.sparse_adam_step(param, indices, values, exp_avg, exp_avg_sq, step, lr, betas, eps, maximize,
                           num_threads)


def quantize_blockwise(values: np.ndarray, state: Any, *, num_threads: Optional[int] = None) -> None:
    """Store float32 ``values`` into the 8-bit or 4-bit block-wise ``state`` in place, as the step stores a
    moment.

    ``state`` is a :class:`fastadam.QuantizedState` ``(codes, absmax, map)``: with a map of 256 values,
    codes of ``values``' shape and blocks of 256; with a map of 16, ``ceil(size / 2)`` codes (two per byte)
    and blocks of 128.  Each block of consecutive elements (of the flat array) gets ``absmax`` = its largest
    finite ``|x|``, and each element the code of the map value nearest to ``x / absmax`` (the float32
    quotient), a tie going to the lower code; a NaN or inf element gets the code of the value nearest 0.0.
    Bitwise equal to :func:`fastadam.reference.quantize_blockwise`, and multi-threaded: this is how float32
    moments become quantized state.
    """
    _core.quantize_blockwise(values, state, num_threads)


def dequantize_blockwise(state: Any, out: Optional[np.ndarray] = None, *,
                         num_threads: Optional[int] = None) -> np.ndarray:
    """The float32 values of the 8-bit or 4-bit block-wise ``state``: ``map[code] * absmax`` of its block.

    Written into ``out`` (float32, the values' shape) when given, else into a new array, which is returned
    -- of the codes' shape for 8-bit state; 4-bit state, whose codes are packed, needs ``out``.  Bitwise
    equal to :func:`fastadam.reference.dequantize_blockwise`.
    """
    if out is None:
        codes, qmap = getattr(state, "codes", None), getattr(state, "map", None)
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"state: expected a fastadam.QuantizedState (codes, absmax, map), got "
                            f"{type(state).__name__}")
        if isinstance(qmap, np.ndarray) and qmap.size == 16:
            raise ValueError("out: 4-bit state needs out (float32, the values' shape): its codes are packed")
        out = np.empty(codes.shape, np.float32)
    _core.dequantize_blockwise(state, out, num_threads)
    return out
