// The prepared step of fastadam.Adam (and fastadam.torch): params and state
// are checked once, when the optimizer is built; each step checks only the
// gradients and the hyperparameters of each group.
#pragma once

#include <Python.h>

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "arrays.hpp"
#include "hyper.hpp"

namespace fastadam {

class AdamPlan {
   public:
    // group_of[i] is the param group of params[i]; max_exp_avg_sqs[i] is None
    // for params whose group does not use amsgrad.
    // model_params[i] is None, or the float16/bfloat16 copy that params[i]
    // (then a float32 master) is rounded into after each step.
    // rounding: how bfloat16 moments are rounded at every step (the key of
    // params[i] from i and its step count).
    AdamPlan(PyObject* params, PyObject* exp_avgs, PyObject* exp_avg_sqs, PyObject* max_exp_avg_sqs,
             PyObject* model_params, std::vector<std::int64_t> group_of, std::int64_t group_count,
             const RoundingSeed& rounding);
    ~AdamPlan();
    AdamPlan(const AdamPlan&) = delete;
    AdamPlan& operator=(const AdamPlan&) = delete;

    // grads: one per param, an array or an (indices, values) row-sparse
    // gradient, which updates only those rows (the lazy update).
    // groups: one mapping per group (a param group), its hyperparameters
    // under the names of kHyperparameterNames (see hyper_from_group).
    bool step(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads);

    std::size_t size() const { return tensors_.size(); }
    const std::vector<std::int64_t>& steps() const { return steps_; }
    void set_steps(const std::vector<std::int64_t>& steps);
    // Per tensor, (the param position its stochastic-rounding key is drawn
    // for, the element index of its element 0 in that param): (i, 0) unless
    // set -- fastadam.distributed sets them for the pieces of params a rank
    // steps, so that their bits are those of the whole params.
    std::vector<std::pair<std::int64_t, std::int64_t>> rounding_positions() const;
    void set_rounding_positions(const std::vector<std::pair<std::int64_t, std::int64_t>>& positions);
    // A float32 or float64 array of one count per param (fastadam.torch's
    // state["step"] tensors are views of it), or None: each step that runs
    // adds 1 to every count in the array's dtype -- what NumPy's `counts += 1`
    // after the step did, in the same call as the step.
    void set_step_counts(PyObject* counts);

   private:
    bool step_unguarded(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads);
    void check_not_written(std::uintptr_t begin, std::size_t bytes, const ArgName& name) const;
    // Keeps a reference to an array the step writes, and what the plan
    // assumed of it, for the per-step checks and the aliasing check.
    // (`written` false: an array the step only reads, such as an 8-bit map.)
    void hold_written(PyArrayObject* a, std::size_t tensor, const char* role, bool written = true);
    void hold_moment(const CheckedMoment& m, std::size_t tensor, const char* role, Stream AdamTensor::*stream);
    // A map the user changed in place since the last step is checked again
    // and gets its own code book (the kernels read the book, not the map).
    void refresh_codebooks();
    // Each array the plan points into still has the data pointer, dtype,
    // size and layout it had when the plan was built, and is writeable.
    void check_written_unchanged() const;
    void release_step_counts();

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
        bool written;
    };
    static const char* change_of(const HeldArray& h);

    std::vector<PyObject*> owned_;      // strong references to every array we point into
    std::vector<AdamTensor> tensors_;   // grad pointers are filled in by each step
    std::vector<std::int64_t> steps_;   // steps taken by each param
    std::vector<std::uint64_t> rounding_keys_;  // the param position of each tensor's rounding key
    std::vector<std::int64_t> group_of_;
    std::vector<bool> has_max_;
    std::vector<PyArrayObject*> params_;  // for the grads' layout checks
    std::vector<HeldArray> written_;
    struct HeldCodebook {
        std::size_t tensor;
        Stream AdamTensor::*stream;
        PyArrayObject* map;  // held in written_
        std::shared_ptr<const Codebook> book;
        const char* role;
    };
    std::vector<HeldCodebook> codebooks_;
    std::vector<const HeldCodebook*> checked_maps_;  // refresh_codebooks' scratch: the first holder of each map
    std::vector<HeldArray> step_counts_;  // none or one: the array of set_step_counts
    std::atomic<bool> busy_{false};     // a step is running (from another thread, or re-entered)
    struct Span {
        std::uintptr_t begin, end;
        std::size_t tensor;
    };
    std::vector<Span> written_spans_;   // sorted; a gradient may overlap none
    std::vector<AdamHyper> hyper_;      // per group, scratch for each step
    std::vector<AdamConstantsPair> constants_;  // per tensor, scratch for each step
    std::int64_t group_count_;
    RoundingSeed rounding_;
};

}  // namespace fastadam
