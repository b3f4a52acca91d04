# Type stub of fastadam's compiled module (csrc/module.cpp), written by hand.
#
# The functions take Python objects as they come (handles) and check them in
# C++, so their arguments are typed as what the Python layer passes: arrays,
# lists of arrays, or objects with __dlpack__.  tests/test_installation.py
# checks that this file names exactly what _core exports, with each
# function's parameter count; keep it in step with module.cpp.

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

# One array, a sequence of them, or (for a single parameter) any object
# with __dlpack__ that the core views as an ndarray.
_Arrays = Any
_OptionalArrays = Optional[Any]
_Betas = Sequence[float]

def adam_step(
    params: _Arrays,
    grads: _Arrays,
    exp_avgs: _Arrays,
    exp_avg_sqs: _Arrays,
    max_exp_avg_sqs: _OptionalArrays,
    step: Union[int, Sequence[int]],
    lr: float,
    betas: _Betas,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    eps_before_bias_correction: bool,
    model_params: _OptionalArrays,
    grad_scale: Optional[float],
    skip_if_nonfinite: bool,
    stochastic_rounding: bool,
    rounding_seed: int,
    num_threads: Optional[int],
    /,
) -> bool: ...

#: The hyperparameters of a param group, by the names the core reads them under.
HYPERPARAMETERS: tuple[str, ...]

def check_hyperparameters(group: Mapping[str, Any]) -> None: ...
def sparse_adam_step(
    param: Any,
    indices: Any,
    values: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    step: int,
    lr: float,
    betas: _Betas,
    eps: float,
    maximize: bool,
    num_threads: Optional[int],
    /,
) -> None: ...
def as_array(obj: Any, name: str) -> Any: ...
def probe_step(
    a: np.ndarray,
    b: np.ndarray,
    c: Union[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]],
    d: Union[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_threads: Optional[int] = None,
    e: Optional[np.ndarray] = None,
    exact: bool = False,
) -> None: ...
def quantize_blockwise(values: np.ndarray, state: tuple[np.ndarray, np.ndarray, np.ndarray],
                       num_threads: Optional[int] = None) -> None: ...
def dequantize_blockwise(state: tuple[np.ndarray, np.ndarray, np.ndarray], out: np.ndarray,
                         num_threads: Optional[int] = None) -> None: ...

class AdamPlan:
    """The optimizer's prepared step over its arrays (checked once, data pointers held)."""

    @property
    def steps(self) -> list[int]:
        """The steps each param has taken, in the plan's order."""
    @steps.setter
    def steps(self, steps: Sequence[int], /) -> None: ...
    @property
    def rounding_positions(self) -> list[tuple[int, int]]:
        """Per param, (the position its stochastic-rounding key is drawn for, the element index of its
        element 0 there): (i, 0) unless set; fastadam.distributed places a rank's pieces of params."""
    @rounding_positions.setter
    def rounding_positions(self, positions: Sequence[tuple[int, int]], /) -> None: ...
    def __init__(
        self,
        params: Sequence[np.ndarray],
        exp_avgs: Sequence[np.ndarray],
        exp_avg_sqs: Sequence[np.ndarray],
        max_exp_avg_sqs: Sequence[Optional[np.ndarray]],
        model_params: Sequence[Optional[np.ndarray]],
        group_of: Sequence[int],
        groups: int,
        stochastic_rounding: bool,
        rounding_seed: int,
        /,
    ) -> None: ...
    def set_step_counts(self, counts: Optional[np.ndarray], /) -> None:
        """A float32/float64 array of one count per param (or None): each step adds 1 to every count."""
    def step(
        self,
        grads: Sequence[Any],
        groups: list[Mapping[str, Any]],
        grad_scale: Optional[float],
        skip_if_nonfinite: bool,
        num_threads: Optional[int],
        /,
    ) -> bool: ...
    def __len__(self) -> int: ...

def config() -> dict[str, Any]: ...
def pool_stats() -> dict[str, int]: ...
def codebook_layout(map: np.ndarray) -> dict[str, int]: ...
def set_num_threads(n: Optional[int], /) -> None: ...
def get_num_threads() -> int: ...
