#include "functional.hpp"

#include <string>
#include <vector>

#include "launch.hpp"
#include "param_state.hpp"
#include "scratch.hpp"

namespace fastadam {

bool adam_step(PyObject* params, PyObject* grads, PyObject* exp_avgs, PyObject* exp_avg_sqs,
               PyObject* max_exp_avg_sqs, PyObject* step_obj, const AdamHyper& hyper, PyObject* model_params,
               const LossScaling& scaling, const RoundingSeed& rounding, int num_threads) {
    const std::int64_t step = check_step(step_obj);
    const bool has_max = max_exp_avg_sqs != Py_None;
    const bool has_model = model_params != Py_None;
    if (hyper.amsgrad && !has_max) throw ArgValueError{"max_exp_avg_sqs is required when amsgrad=True"};
    if (!hyper.amsgrad && has_max) throw ArgValueError{"max_exp_avg_sqs is given but amsgrad=False"};

    const bool single = is_single_array(params);
    const ArrayList lists[] = {{params, kNames[0], single},
                               {grads, kNames[1], single},
                               {exp_avgs, kNames[2], single},
                               {exp_avg_sqs, kNames[3], single},
                               {has_max ? max_exp_avg_sqs : nullptr, kNames[4], single},
                               {has_model ? model_params : nullptr, kNames[5], single}};
    const std::size_t count = lists[0].size();
    for (std::size_t k = 1; k < 6; ++k)
        if (lists[k].size() != count && (k != 4 || has_max) && (k != 5 || has_model))
            throw ArgValueError{std::string(kNames[k]) + " has " +
                                std::to_string(lists[k].size()) + " arrays but params has " + std::to_string(count)};

    // Scratch reused between calls on this thread: no allocation once warm.
    // The lists hold their items until the call returns (ArrayList).
    struct Tag;
    const ScratchLease<std::vector<AdamTensor>, Tag> tensors;
    const ScratchLease<OverlapCheck, Tag> overlap;
    // The 8-bit states' code books, alive until the step returns.
    const ScratchLease<std::vector<std::shared_ptr<const Codebook>>, Tag> codebooks;
    tensors->clear();
    overlap->clear();
    codebooks->clear();

    AdamConstantsPair constants = make_constants(hyper, step);
    set_grad_scale(constants, scaling.grad_scale);
    const std::uint8_t variant = variant_of(hyper);
    for (std::size_t i = 0; i < count; ++i) {
        const ArgName p_name = lists[0].name(i);
        CheckedParam c = check_param_state({lists[0][i], p_name, lists[2][i], lists[2].name(i), lists[3][i],
                                            lists[3].name(i), has_max ? lists[4][i] : nullptr, lists[4].name(i),
                                            has_model ? lists[5][i] : nullptr, lists[5].name(i)},
                                           *overlap);
        PyArrayObject* grad_array = nullptr;
        c.tensor.grad.storage = check_grad(lists[1][i], lists[1].name(i), c.param, p_name, c.tensor.grad.data,
                                           grad_array);
        overlap->add(grad_array, lists[1].name(i), Access::read);
        c.tensor.constants = &constants;
        c.tensor.variant = variant;
        c.tensor.rounding = rounding_for(rounding, step, i);
        tensors->push_back(c.tensor);
        for (const CheckedMoment* m : {&c.exp_avg, &c.exp_avg_sq, &c.max_exp_avg_sq})
            if (m->codebook) codebooks->push_back(m->codebook);
    }
    overlap->check();
    return run_adam_step(tensors->data(), tensors->size(), num_threads, scaling.skip_if_nonfinite);
}

void probe_step(PyObject* a, PyObject* b, PyObject* c, PyObject* d, PyObject* e, bool exact, int num_threads) {
    const bool single = is_single_array(a);
    const bool has_e = e != Py_None;
    const ArrayList lists[] = {{a, "a", single}, {b, "b", single}, {c, "c", single}, {d, "d", single},
                               {has_e ? e : nullptr, "e", single}};
    const std::size_t count = lists[0].size();
    for (const auto& l : lists)
        if (l.size() != count && (&l != &lists[4] || has_e))
            throw ArgValueError{"probe: the lists must have equal lengths"};
    struct Tag;
    const ScratchLease<std::vector<ProbeTensor>, Tag> tensors;
    tensors->clear();
    for (std::size_t i = 0; i < count; ++i) {
        const CheckedArray x = check_float_array(lists[0][i], lists[0].name(i), Access::write);
        const void* b_data = nullptr;
        PyArrayObject* b_array = nullptr;
        const Storage b_storage = check_grad(lists[1][i], lists[1].name(i), x, lists[0].name(i), b_data, b_array);
        if (b_storage == Storage::float16) throw ArgTypeError{"probe: b must be float32, float64 or bfloat16"};
        // c and d as the step's moments: a's dtype, bfloat16 beside a float32 a, or both 8-bit state.
        const CheckedMoment c = check_moment(lists[2][i], lists[2].name(i), x, lists[0].name(i));
        const CheckedMoment d = check_moment(lists[3][i], lists[3].name(i), x, lists[0].name(i));
        if (c.stream.storage == Storage::block4 || d.stream.storage == Storage::block4)
            throw ArgTypeError{"probe: 4-bit state has no probe (8-bit state goes in both c and d)"};
        const bool block8 = c.stream.storage == Storage::block8;
        if (block8 != (d.stream.storage == Storage::block8) || (block8 && (b_storage != Storage::same || has_e)))
            throw ArgTypeError{"probe: 8-bit state goes in both c and d, beside a float32 b and no e"};
        ProbeTensor t{x.data, b_data, c.stream.data, d.stream.data, x.size, x.dtype};
        t.bf16_b = b_storage == Storage::bfloat16;
        t.bf16_c = c.stream.storage == Storage::bfloat16;
        t.bf16_d = d.stream.storage == Storage::bfloat16;
        t.block8 = block8;
        t.absmax_c = c.stream.absmax;
        t.absmax_d = d.stream.absmax;
        t.exact = exact;
        if (has_e) {
            Storage e_storage = Storage::same;
            PyArrayObject* e_array = check_16bit_array(lists[4][i], lists[4].name(i), Access::write, e_storage);
            if (!t.bf16_b || e_storage != Storage::bfloat16) throw ArgTypeError{"probe: e needs bfloat16 b and e"};
            check_same_shape(e_array, lists[4].name(i), x.array, lists[0].name(i));
            t.e = PyArray_DATA(e_array);
        }
        tensors->push_back(t);
    }
    run_probe(tensors->data(), tensors->size(), num_threads);
}

}  // namespace fastadam
