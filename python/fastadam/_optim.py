"""The stateful optimizers: fastadam.Adam and fastadam.AdamW."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from . import _core
from ._functional import RowSparseGrad

_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")
def _is_16bit_float(a: np.ndarray) -> bool:
    """float16, or ml_dtypes' bfloat16 (NumPy has no bfloat16 of its own)."""
    return a.dtype == np.float16 or (a.dtype.itemsize == 2 and a.dtype.name == "bfloat16")

ParamsOrGroups = Union[Iterable[np.ndarray], Iterable[dict]]


def _check_group_hyperparameters(group: dict, where: str) -> None:
    """Raise the core's error for a bad hyperparameter, prefixed with the group."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    probe = np.zeros(0, np.float32)
    try:
        # A zero-size step checks every hyperparameter and writes nothing.
        _core.adam_step(probe, probe, probe, probe, probe if group["amsgrad"] else None, 1, group["lr"], betas,
                        group["eps"], group["weight_decay"], group["decoupled_weight_decay"], group["amsgrad"],
                        group["maximize"], None, None, False, None)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


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

    Parameters
    ----------
    params
        A list of arrays (float32/float64, C-contiguous, writeable), or a list
        of param-group dicts ``{"params": [...], "lr": ..., ...}`` whose keys
        override the defaults below for that group.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As in ``torch.optim.Adam``; ``decoupled_weight_decay=True`` is AdamW.
    num_threads
        The most threads a step uses (default: OpenMP's setting).
    master_weights
        For float16 / bfloat16 params (bfloat16 from ``ml_dtypes``): keep a
        float32 master copy of each (``state[i]["master_param"]``) and float32
        moments; each step updates the master and, in the same pass, writes it
        rounded to nearest-even into the param.  Without it such params are
        refused.

    Examples
    --------
    >>> opt = fastadam.Adam([W, b], lr=1e-3)
    >>> opt.step([dW, db])                       # gradients in the order of the params
    >>> opt.param_groups[0]["lr"] = 5e-4         # schedules change hyperparameters between steps
    """


    #: Where eps enters: after the bias correction (Adam) or before it (torch.optim.SparseAdam).
    _sparse_adam_eps = False

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, num_threads: Optional[int] = None,
                 master_weights: bool = False) -> None:
        self.master_weights = master_weights
        self.defaults: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                             decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                                             maximize=maximize)
        self.num_threads = num_threads
        items = list(params)
        if not items:
            raise ValueError("params: the optimizer got an empty parameter list")
        groups_in = items if isinstance(items[0], dict) else [{"params": items}]

        self.param_groups: list[dict[str, Any]] = []
        for k, g in enumerate(groups_in):
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"params[{k}]: expected a param-group dict with a 'params' key")
            unknown = set(g) - {"params", *_HYPERPARAMETERS}
            if unknown:
                raise ValueError(f"param_groups[{k}]: unknown option(s) {sorted(unknown)}")
            group = {**self.defaults, **g}
            group["params"] = [g["params"]] if isinstance(g["params"], np.ndarray) else list(g["params"])
            group["betas"] = tuple(group["betas"]) if isinstance(group["betas"], (tuple, list)) else group["betas"]
            if not group["params"]:
                raise ValueError(f"param_groups[{k}]: empty parameter list")
            _check_group_hyperparameters(group, f"param_groups[{k}]")
            self.param_groups.append(group)

        self._params: list[np.ndarray] = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(self._params):
            if not isinstance(p, np.ndarray):
                raise TypeError(f"params[{i}]: expected a numpy.ndarray, got {type(p).__name__}")
        group_of = [k for k, g in enumerate(self.param_groups) for _ in g["params"]]
        # Zero-initialised state in the parameter's dtype (float32 with a
        # master copy); the core checks dtypes, contiguity, writeability and
        # aliasing of all of it at once.
        self.state: list[dict[str, np.ndarray]] = []
        for i, (p, k) in enumerate(zip(self._params, group_of)):
            s: dict[str, np.ndarray] = {}
            if _is_16bit_float(p):
                if not master_weights:
                    raise TypeError(f"params[{i}]: dtype {p.dtype} needs master_weights=True "
                                    "(a float32 master copy is kept and rounded into it)")
                s["master_param"] = np.ascontiguousarray(p, dtype=np.float32)
            work_dtype = np.float32 if "master_param" in s else p.dtype
            s["exp_avg"] = np.zeros(p.shape, work_dtype)
            s["exp_avg_sq"] = np.zeros(p.shape, work_dtype)
            if self.param_groups[k]["amsgrad"]:
                s["max_exp_avg_sq"] = np.zeros(p.shape, work_dtype)
            self.state.append(s)
        self._plan = _core.AdamPlan([s.get("master_param", p) for s, p in zip(self.state, self._params)],
                                    [s["exp_avg"] for s in self.state], [s["exp_avg_sq"] for s in self.state],
                                    [s.get("max_exp_avg_sq") for s in self.state],
                                    [p if "master_param" in s else None for s, p in zip(self.state, self._params)],
                                    group_of, len(self.param_groups), self._sparse_adam_eps)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for k, g in enumerate(self.param_groups):
            opts = ", ".join(f"{key}={g[key]!r}" for key in _HYPERPARAMETERS)
            lines.append(f"  param_groups[{k}]: {len(g['params'])} arrays, {opts}")
        return "\n".join(lines) + "\n)"

    @property
    def steps(self) -> list[int]:
        """The number of steps taken by each parameter array, in the order of all params."""
        return list(self._plan.steps)

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
        no step count changes (like ``torch.amp.GradScaler``).  Only the gradients and
        the groups' current hyperparameters are checked; a bad one raises
        before anything is written.
        """
        hyper = []
        for k, g in enumerate(self.param_groups):
            betas = g["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise TypeError(f"param_groups[{k}]: betas must be a pair (beta1, beta2), got {betas!r}")
            hyper.append((g["lr"], betas[0], betas[1], g["eps"], g["weight_decay"], g["decoupled_weight_decay"],
                          g["amsgrad"], g["maximize"]))
        return self._plan.step(grads, hyper, grad_scale, skip_if_nonfinite, self.num_threads)

    # -- saving and restoring --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the optimizer: copies of the state arrays, the step counts and the groups.

        ``{"state": {i: {"step": int, "exp_avg": array, "exp_avg_sq": array[, "max_exp_avg_sq": array]
        [, "master_param": array]}},
        "param_groups": [{hyperparameters..., "params": [indices]}]}`` with ``i``
        the position of the parameter across all groups, as in PyTorch.  The
        parameters themselves are not included.
        """
        steps = self._plan.steps
        state = {i: {"step": int(steps[i]), **{key: a.copy() for key, a in s.items()}}
                 for i, s in enumerate(self.state)}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{key: g[key] for key in _HYPERPARAMETERS}, "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of an optimizer over parameters of the same shapes).

        Everything is checked before anything is changed; resuming then gives
        the bitwise-identical trajectory of an uninterrupted run.
        """
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for k, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param_groups[{k}]: state_dict has {len(saved['params'])} params, "
                                 f"this optimizer {len(mine['params'])}")
            merged = {**mine, **{key: saved[key] for key in _HYPERPARAMETERS if key in saved}}
            merged["betas"] = tuple(merged["betas"])
            _check_group_hyperparameters(merged, f"state_dict param_groups[{k}]")
            if bool(merged["amsgrad"]) != bool(mine["amsgrad"]):
                raise ValueError(f"param_groups[{k}]: amsgrad differs from this optimizer's")
        steps = []
        for i, mine in enumerate(self.state):
            saved = state.get(i, state.get(str(i)))
            if saved is None:
                raise ValueError(f"state_dict has no state for params[{i}]")
            if set(saved) - {"step"} != set(mine):
                raise ValueError(f"state[{i}]: expected keys {sorted({'step', *mine})}, got {sorted(saved)}")
            for key, a in mine.items():
                src = np.asarray(saved[key])
                if src.shape != a.shape or src.dtype != a.dtype:
                    raise ValueError(f"state[{i}][{key!r}]: expected {a.dtype}{a.shape}, got {src.dtype}{src.shape}")
            step = int(saved["step"])
            if step < 0:
                raise ValueError(f"state[{i}]['step'] must be >= 0, got {step}")
            steps.append(step)
        # All checked: now change things.
        for saved, mine in zip(groups, self.param_groups):
            for key in _HYPERPARAMETERS:
                if key in saved:
                    mine[key] = tuple(saved[key]) if key == "betas" else saved[key]
        for i, mine in enumerate(self.state):
            saved = state.get(i, state.get(str(i)))
            for key, a in mine.items():
                np.copyto(a, saved[key])
            if "master_param" in mine:  # the model copy follows its restored master
                self._params[i][...] = mine["master_param"].astype(self._params[i].dtype)
        self._plan.steps = steps

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`state_dict` to an ``.npz`` file (arrays, plus the groups as JSON; no pickle)."""
        sd = self.state_dict()
        arrays = {f"state/{i}/{key}": a for i, s in sd["state"].items() for key, a in s.items() if key != "step"}
        arrays["steps"] = np.array([s["step"] for s in sd["state"].values()], dtype=np.int64)
        arrays["param_groups"] = np.array(json.dumps(sd["param_groups"]))
        np.savez(path, **arrays)

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Restore from a file written by :meth:`save` (loaded with ``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as f:
            groups = json.loads(str(f["param_groups"][()]))
            steps = f["steps"]
            state = {}
            for i in range(len(self.state)):
                s = {key[len(f"state/{i}/"):]: f[key] for key in f.files if key.startswith(f"state/{i}/")}
                if i < len(steps):
                    s["step"] = int(steps[i])
                state[i] = s
        self.load_state_dict({"state": state, "param_groups": groups})


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), like ``torch.optim.AdamW``.

    Each step first shrinks the parameters, ``p = p * (1 - lr * weight_decay)``,
    then applies the Adam update; ``weight_decay`` defaults to 1e-2.
    """

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 num_threads: Optional[int] = None, master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, num_threads=num_threads, master_weights=master_weights)


class SparseAdam(Adam):
    """Lazy Adam for embedding tables, like ``torch.optim.SparseAdam``.

    Each step takes one :class:`fastadam.RowSparseGrad` per parameter and
    updates only the rows it names (repeats summed), leaving the moments of
    the other rows undecayed; see :func:`fastadam.sparse_adam_step` for the
    formula, which adds eps before the bias correction as PyTorch's
    SparseAdam does.  A dense array is also accepted, as a gradient for every
    row.
    """

    _sparse_adam_eps = True

    def __init__(self, params: ParamsOrGroups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, maximize: bool = False, num_threads: Optional[int] = None) -> None:
        super().__init__(params, lr, betas, eps, maximize=maximize, num_threads=num_threads)
