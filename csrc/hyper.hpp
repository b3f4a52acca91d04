// The hyperparameters of a step: converted and range-checked, then turned
// into the kernel's constants (computed in double, rounded once per dtype).
#pragma once

#include <Python.h>

#include <cstdint>

#include "kernel_api.hpp"

namespace fastadam {

struct AdamHyper {
    double lr, beta1, beta2, eps, weight_decay;
    bool decoupled_weight_decay, amsgrad, maximize;
    // Where eps enters the denominator.  false (Adam, PyTorch's Adam and
    // AdamW): sqrt(v) / sqrt(1 - beta2^t) + eps.  true (the "eps hat" of
    // Kingma & Ba's section 2, as Keras, TensorFlow, scikit-learn and
    // torch.optim.SparseAdam place it): sqrt(v) + eps, with the step size
    // lr * sqrt(1 - beta2^t) / (1 - beta1^t) instead.  Both are the same
    // kernel formula with other constants (see make_constants).
    bool eps_before_bias_correction;
};

// The hyperparameters as a param group's keys, in this order: the only
// place their names are spelled (Python reads them as _core.HYPERPARAMETERS).
inline constexpr const char* kHyperparameterNames[] = {
    "lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize",
    "eps_before_bias_correction"};
// Those a group may leave out, and their values then: all but lr, betas, eps.
inline constexpr int kFirstOptionalHyperparameter = 3;

// The hyperparameters of a param group (a mapping; torch's groups hold
// other keys too), converted and range-checked, named in errors.
AdamHyper hyper_from_group(PyObject* group);

// Converts and range-checks the hyperparameters (names them in errors).
AdamHyper check_hyper(PyObject* lr, PyObject* beta1, PyObject* beta2, PyObject* eps, PyObject* weight_decay,
                      PyObject* decoupled, PyObject* amsgrad, PyObject* maximize, PyObject* eps_before_bias_correction);

// The number of a step, counted from 1.
std::int64_t check_step(PyObject* step);

// The constants of step t, computed in double and rounded once to each dtype.
AdamConstantsPair make_constants(const AdamHyper& h, std::int64_t step);
std::uint8_t variant_of(const AdamHyper& h);

// Loss scaling: gradients are multiplied by 1 / grad_scale (0: no scaling);
// with skip_if_nonfinite, a step whose scaled gradients hold a NaN or inf is
// skipped whole, before anything is written.
struct LossScaling {
    double grad_scale = 0.0;
    bool skip_if_nonfinite = false;
};

// Sets the constants' 1 / grad_scale (1 without loss scaling).
void set_grad_scale(AdamConstantsPair& constants, double grad_scale);

// Stochastic rounding of bfloat16 moments, on when a seed is given: the key
// of parameter `index` at step `step` (splitmix64 of seed, step and index,
// chained; fastadam.reference derives the same).
struct RoundingSeed {
    bool on = false;
    std::uint64_t seed = 0;
};
RoundingSeed check_rounding(PyObject* stochastic_rounding, PyObject* rounding_seed);
StochasticRounding rounding_for(const RoundingSeed& seed, std::int64_t step, std::uint64_t index);

}  // namespace fastadam
