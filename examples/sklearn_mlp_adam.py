"""scikit-learn's MLPClassifier(solver="adam"), its optimizer replaced by fastadam.

scikit-learn's Adam adds eps to sqrt(v) before the bias correction, which it
folds into the step size (as Keras and TensorFlow do):

    lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)
    p    = p - lr_t * m / (sqrt(v) + eps)

fastadam's default is PyTorch's placement, sqrt(v) / sqrt(1 - beta2**t) + eps;
``eps_before_bias_correction=True`` gives scikit-learn's.  Run it:

    python examples/sklearn_mlp_adam.py

It trains the same network on the handwritten digits twice, with stock
scikit-learn and with fastadam stepping the weights, and prints both loss
curves.  They agree to rounding: fastadam computes (1 - beta2) * g * g where
scikit-learn computes (1 - beta2) * g**2, an occasional last-bit difference.

scikit-learn has no public hook for its optimizer; this swaps the class that
MLPClassifier builds (sklearn.neural_network._multilayer_perceptron.AdamOptimizer,
a private name, checked to exist) for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

import fastadam


class FastAdamOptimizer:
    """The interface of scikit-learn's AdamOptimizer, stepping the weights with fastadam.Adam.

    scikit-learn hands over its coefs_ and intercepts_ arrays, and updates
    them only through ``update_params``: fastadam updates them in place.
    """

    def __init__(self, params: list[np.ndarray], learning_rate_init: float = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8) -> None:
        self.learning_rate_init = learning_rate_init
        self.learning_rate = float(learning_rate_init)
        self.optimizer = fastadam.Adam(params, lr=learning_rate_init, betas=(beta_1, beta_2), eps=epsilon,
                                       eps_before_bias_correction=True, num_threads=1)

    def update_params(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.optimizer.step(grads)

    def iteration_ends(self, time_step: int) -> None:
        pass

    def trigger_stopping(self, msg: str, verbose: bool) -> bool:
        if verbose:
            print(msg + " Stopping.")
        return True


@contextlib.contextmanager
def fastadam_in_sklearn() -> Iterator[None]:
    """Within the block, MLPClassifier/MLPRegressor(solver="adam") step with fastadam."""
    from sklearn.neural_network import _multilayer_perceptron as mlp

    if not hasattr(mlp, "AdamOptimizer"):
        raise RuntimeError("this scikit-learn version builds its Adam optimizer differently; "
                           "sklearn.neural_network._multilayer_perceptron.AdamOptimizer is gone")
    stock = mlp.AdamOptimizer
    mlp.AdamOptimizer = FastAdamOptimizer
    try:
        yield
    finally:
        mlp.AdamOptimizer = stock


def loss_curves(max_iter: int = 40, seed: int = 0) -> tuple[list[float], list[float]]:
    """The per-epoch training loss of stock scikit-learn and of fastadam, same data, init and batches."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0

    def fit() -> list[float]:
        clf = MLPClassifier(hidden_layer_sizes=(64,), solver="adam", max_iter=max_iter, random_state=seed,
                            tol=0.0, n_iter_no_change=max_iter + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        return list(clf.loss_curve_)

    stock = fit()
    with fastadam_in_sklearn():
        ours = fit()
    return stock, ours


def main() -> None:
    stock, ours = loss_curves()
    print(f"{'epoch':>5}  {'scikit-learn':>20}  {'fastadam':>20}  {'relative difference':>20}")
    for epoch, (a, b) in enumerate(zip(stock, ours), 1):
        print(f"{epoch:5d}  {a:20.16f}  {b:20.16f}  {abs(a - b) / abs(a):20.3e}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(stock, ours))
    print(f"largest relative difference over {len(stock)} epochs: {worst:.3e}")


if __name__ == "__main__":
    main()
