// The Adam entry points: argument checking and conversion from Python
// objects, host-side constants, then one launch of the kernel.
#pragma once

#include <Python.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "kernel_api.hpp"
#include "rows.hpp"

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

// Converts and range-checks the hyperparameters (names them in errors).
AdamHyper check_hyper(PyObject* lr, PyObject* beta1, PyObject* beta2, PyObject* eps, PyObject* weight_decay,
                      PyObject* decoupled, PyObject* amsgrad, PyObject* maximize, PyObject* eps_before_bias_correction);

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

// fastadam.adam_step: params..max_exp_avg_sqs are arrays, or equal-length
// sequences of arrays (max_exp_avg_sqs is None unless amsgrad; model_params
// is None or the float16/bfloat16 copies of float32 params).  Returns false
// when the step was skipped.
bool adam_step(PyObject* params, PyObject* grads, PyObject* exp_avgs, PyObject* exp_avg_sqs,
               PyObject* max_exp_avg_sqs, PyObject* step, const AdamHyper& hyper, PyObject* model_params,
               const LossScaling& scaling, int num_threads);

// fastadam.sparse_adam_step: torch.optim.SparseAdam's lazy update of the rows
// of `param` named by `indices` (repeats summed first).
void sparse_adam_step(PyObject* param, PyObject* indices, PyObject* values, PyObject* exp_avg, PyObject* exp_avg_sq,
                      PyObject* step, const AdamHyper& hyper, int num_threads);

// The probe over (a, b, c, d) lists: same access pattern as the step (and,
// when `exact`, its one division and square root per element).
void probe_step(PyObject* a, PyObject* b, PyObject* c, PyObject* d, PyObject* e, bool exact, int num_threads);

// The prepared step of fastadam.Adam: params and state are checked once, when
// the optimizer is built; each step checks only the gradients and the
// hyperparameters of each group.
class AdamPlan {
   public:
    // group_of[i] is the param group of params[i]; max_exp_avg_sqs[i] is None
    // for params whose group does not use amsgrad.
    // model_params[i] is None, or the float16/bfloat16 copy that params[i]
    // (then a float32 master) is rounded into after each step.
    AdamPlan(PyObject* params, PyObject* exp_avgs, PyObject* exp_avg_sqs, PyObject* max_exp_avg_sqs,
             PyObject* model_params, std::vector<std::int64_t> group_of, std::int64_t group_count);
    ~AdamPlan();
    AdamPlan(const AdamPlan&) = delete;
    AdamPlan& operator=(const AdamPlan&) = delete;

    // grads: one per param, an array or an (indices, values) row-sparse
    // gradient, which updates only those rows (the lazy update).
    // groups: one (lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
    // maximize, eps_before_bias_correction) tuple per group.
    bool step(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads);

    std::size_t size() const { return tensors_.size(); }
    const std::vector<std::int64_t>& steps() const { return steps_; }
    void set_steps(const std::vector<std::int64_t>& steps);

   private:
    bool step_unguarded(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads);
    void check_not_written(std::uintptr_t begin, std::size_t bytes, const ArgName& name) const;
    // Keeps a reference to an array the step writes, and what the plan
    // assumed of it, for the per-step checks and the aliasing check.
    void hold_written(PyArrayObject* a, std::size_t tensor, const char* role);
    // Each array the plan points into still has the data pointer, dtype,
    // size and layout it had when the plan was built, and is writeable.
    void check_written_unchanged() const;

    // An array the step writes, as the plan saw it.  NumPy lets a user
    // reassign .dtype, .shape or .strides in place; a kernel working from the
    // old pointers and sizes would then read or write outside the array.
    struct HeldArray {
        PyArrayObject* array;
        void* data;
        npy_intp nbytes;
        PyArray_Descr* descr;  // held: compared by identity, then by value
        std::size_t tensor;
        const char* role;  // "params", "exp_avg", ... for the message
    };

    std::vector<PyObject*> owned_;      // strong references to every array we point into
    std::vector<AdamTensor> tensors_;   // grad pointers are filled in by each step
    std::vector<std::int64_t> steps_;   // steps taken by each param
    std::vector<std::int64_t> group_of_;
    std::vector<bool> has_max_;
    std::vector<PyArrayObject*> params_;  // for the grads' layout checks
    std::vector<HeldArray> written_;
    std::atomic<bool> busy_{false};     // a step is running (from another thread, or re-entered)
    struct Span {
        std::uintptr_t begin, end;
        std::size_t tensor;
    };
    std::vector<Span> written_spans_;   // sorted; a gradient may overlap none
    std::vector<AdamHyper> hyper_;      // per group, scratch for each step
    std::vector<AdamConstantsPair> constants_;  // per tensor, scratch for each step
    std::int64_t group_count_;
};

}  // namespace fastadam
