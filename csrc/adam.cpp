#include "adam.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>

#include "fpmode.hpp"
#include "launch.hpp"
#include "scratch.hpp"

namespace fastadam {
namespace {

std::string number(double x) {
    PyObject* f = PyFloat_FromDouble(x);
    PyObject* r = f ? PyObject_Repr(f) : nullptr;
    std::string s = r ? PyUnicode_AsUTF8(r) : std::to_string(x);
    Py_XDECREF(r);
    Py_XDECREF(f);
    return s;
}

void require(bool ok, const char* name, const char* rule, double value) {
    if (!ok) throw ArgValueError{std::string(name) + " must be " + rule + ", got " + number(value)};
}

template <class T>
AdamConstants<T> round_constants(const AdamHyper& h, double step_size, double inv_bias_correction2_sqrt) {
    return AdamConstants<T>{static_cast<T>(h.beta1),
                            static_cast<T>(1.0 - h.beta1),
                            static_cast<T>(h.beta2),
                            static_cast<T>(1.0 - h.beta2),
                            static_cast<T>(h.weight_decay),
                            static_cast<T>(h.lr * h.weight_decay),
                            static_cast<T>(step_size),
                            static_cast<T>(inv_bias_correction2_sqrt),
                            static_cast<T>(h.eps),
                            static_cast<T>(1.0),
                            static_cast<T>(h.maximize ? -0.0 : 0.0)};
}

constexpr const char* kNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};

std::int64_t check_step(PyObject* step_obj) {
    const std::int64_t step = to_int64(step_obj, "step");
    if (step < 1)
        throw ArgValueError{"step must be >= 1 (the number of this step, 1 on the first), got " +
                            std::to_string(step)};
    return step;
}

// The number of rows of a table and the elements per row.
void table_geometry(const CheckedArray& p, const ArgName& name, std::int64_t& rows, std::int64_t& row_size) {
    if (PyArray_NDIM(p.array) < 1)
        throw ArgValueError{name.str() + ": a row-sparse gradient needs a parameter with at least one axis"};
    rows = PyArray_DIM(p.array, 0);
    row_size = rows == 0 ? 0 : p.size / rows;
}

// values must have shape (len(indices),) + param.shape[1:] and param's dtype.
CheckedArray check_row_values(PyObject* values, const ArgName& values_name, PyObject* indices,
                              const ArgName& indices_name, const CheckedArray& p, const ArgName& p_name) {
    if (!PyArray_Check(indices))
        throw ArgTypeError{indices_name.str() + ": expected a numpy.ndarray of integers, got " +
                           Py_TYPE(indices)->tp_name};
    if (!PyArray_ISNOTSWAPPED(reinterpret_cast<PyArrayObject*>(indices)))
        throw ArgTypeError{indices_name.str() + ": indices in non-native byte order; pass indices.astype(int)"};
    const CheckedArray val = check_float_array(values, values_name, Access::read);
    if (val.dtype != p.dtype)
        throw ArgTypeError{values_name.str() + ": dtype " + dtype_name(val.dtype) + " does not match " +
                           p_name.str() + "'s dtype " + dtype_name(p.dtype)};
    auto* idx = reinterpret_cast<PyArrayObject*>(indices);
    const int nd = PyArray_NDIM(p.array);
    bool ok = PyArray_NDIM(val.array) == nd && PyArray_NDIM(idx) == 1 && PyArray_DIM(val.array, 0) == PyArray_DIM(idx, 0);
    for (int d = 1; ok && d < nd; ++d) ok = PyArray_DIM(val.array, d) == PyArray_DIM(p.array, d);
    if (!ok)
        throw ArgValueError{values_name.str() + ": shape must be (len(indices),) + " + p_name.str() +
                            ".shape[1:]" + " for 1-D indices"};
    return val;
}

// The rows of `table` that a coalesced row-sparse gradient names, as one
// gather tensor (see AdamTensor::rows).
AdamTensor gather_tensor(const AdamTensor& table, const RowCoalescer& coalescer, const RowCoalescer::Rows& rows,
                         std::int64_t row_size) {
    AdamTensor t = table;
    t.grad.data = nullptr;
    t.rows = coalescer.rows(rows.first);
    t.grad_rows = coalescer.grads(rows.first);
    t.row_size = row_size;
    t.size = row_size == 0 ? 0 : static_cast<std::int64_t>(rows.count) * row_size;
    if (t.size == 0) t.rows = nullptr;  // nothing to gather: an empty dense tensor
    return t;
}

}  // namespace

AdamHyper check_hyper(PyObject* lr, PyObject* beta1, PyObject* beta2, PyObject* eps, PyObject* weight_decay,
                      PyObject* decoupled, PyObject* amsgrad, PyObject* maximize, PyObject* eps_before_bias_correction) {
    AdamHyper h{to_double(lr, "lr"),
                to_double(beta1, "betas[0]"),
                to_double(beta2, "betas[1]"),
                to_double(eps, "eps"),
                to_double(weight_decay, "weight_decay"),
                to_bool(decoupled, "decoupled_weight_decay"),
                to_bool(amsgrad, "amsgrad"),
                to_bool(maximize, "maximize"),
                to_bool(eps_before_bias_correction, "eps_before_bias_correction")};
    require(h.lr >= 0.0, "lr", ">= 0", h.lr);
    require(h.beta1 >= 0.0 && h.beta1 < 1.0, "betas[0]", "in [0, 1)", h.beta1);
    require(h.beta2 >= 0.0 && h.beta2 < 1.0, "betas[1]", "in [0, 1)", h.beta2);
    require(h.eps >= 0.0, "eps", ">= 0", h.eps);
    require(h.weight_decay >= 0.0, "weight_decay", ">= 0", h.weight_decay);
    return h;
}

AdamConstantsPair make_constants(const AdamHyper& h, std::int64_t step) {
    const DefaultFloatingPointMode fp_mode;  // the caller's rounding mode must not change a constant
    const double t = static_cast<double>(step);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, t);
    // sqrt(v) + eps is the kernel's sqrt(v) * 1 + eps: the multiplication by
    // one is exact, so one formula serves both placements of eps.
    const bool sparse = h.eps_before_bias_correction;
    const double step_size = sparse ? h.lr * std::sqrt(bias_correction2) / bias_correction1 : h.lr / bias_correction1;
    const double inv_bias_correction2_sqrt = sparse ? 1.0 : 1.0 / std::sqrt(bias_correction2);
    return {round_constants<float>(h, step_size, inv_bias_correction2_sqrt),
            round_constants<double>(h, step_size, inv_bias_correction2_sqrt)};
}

std::uint8_t variant_of(const AdamHyper& h) {
    unsigned v = 0;
    if (h.weight_decay != 0.0) v |= h.decoupled_weight_decay ? kDecoupledDecay : kL2WeightDecay;
    if (h.amsgrad) v |= kAmsgrad;
    return static_cast<std::uint8_t>(v);
}

namespace {

void set_grad_scale(AdamConstantsPair& constants, double grad_scale) {
    const double inv = grad_scale > 0.0 ? 1.0 / grad_scale : 1.0;
    constants.f32.inv_grad_scale = static_cast<float>(inv);
    constants.f64.inv_grad_scale = inv;
}

bool launch_step(const AdamTensor* tensors, std::size_t count, int num_threads, bool skip_if_nonfinite) {
    if (skip_if_nonfinite && any_nonfinite_grad(tensors, count, num_threads)) return false;
    run_adam(tensors, count, num_threads);
    return true;
}

}  // namespace

bool adam_step(PyObject* params, PyObject* grads, PyObject* exp_avgs, PyObject* exp_avg_sqs,
               PyObject* max_exp_avg_sqs, PyObject* step_obj, const AdamHyper& hyper, PyObject* model_params,
               const LossScaling& scaling, int num_threads) {
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
                               {has_model ? model_params : nullptr, "model_params", single}};
    const std::size_t count = lists[0].size();
    for (std::size_t k = 1; k < 6; ++k)
        if (lists[k].size() != count && (k != 4 || has_max) && (k != 5 || has_model))
            throw ArgValueError{std::string(k == 5 ? "model_params" : kNames[k]) + " has " +
                                std::to_string(lists[k].size()) + " arrays but params has " + std::to_string(count)};

    // Scratch reused between calls on this thread: no allocation once warm.
    // The lists hold their items until the call returns (ArrayList).
    struct Tag;
    const ScratchLease<std::vector<AdamTensor>, Tag> tensors;
    const ScratchLease<OverlapCheck, Tag> overlap;
    tensors->clear();
    overlap->clear();

    AdamConstantsPair constants = make_constants(hyper, step);
    set_grad_scale(constants, scaling.grad_scale);
    const std::uint8_t variant = variant_of(hyper);
    for (std::size_t i = 0; i < count; ++i) {
        const ArgName p_name = lists[0].name(i);
        const CheckedArray p = check_float_array(lists[0][i], p_name, Access::write);
        const void* grad = nullptr;
        PyArrayObject* grad_array = nullptr;
        const Storage grad_storage = check_grad(lists[1][i], lists[1].name(i), p, p_name, grad, grad_array);
        const CheckedArray m = check_float_array(lists[2][i], lists[2].name(i), Access::write);
        const CheckedArray v = check_float_array(lists[3][i], lists[3].name(i), Access::write);
        check_same_layout(m, lists[2].name(i), p, p_name);
        check_same_layout(v, lists[3].name(i), p, p_name);
        overlap->add(p, p_name, Access::write);
        overlap->add(grad_array, lists[1].name(i), Access::read);
        overlap->add(m, lists[2].name(i), Access::write);
        overlap->add(v, lists[3].name(i), Access::write);
        AdamTensor t;
        t.param.data = p.data;
        t.grad = {grad, grad_storage};
        t.exp_avg.data = m.data;
        t.exp_avg_sq.data = v.data;
        t.size = p.size;
        t.constants = &constants;
        t.dtype = p.dtype;
        t.variant = variant;
        if (has_max) {
            const CheckedArray x = check_float_array(lists[4][i], lists[4].name(i), Access::write);
            check_same_layout(x, lists[4].name(i), p, p_name);
            overlap->add(x, lists[4].name(i), Access::write);
            t.max_exp_avg_sq.data = x.data;
        }
        if (has_model) {
            if (p.dtype != DType::float32)
                throw ArgTypeError{p_name.str() + ": the master copy of a model param must be float32, got float64"};
            PyArrayObject* model = check_16bit_array(lists[5][i], lists[5].name(i), Access::write, t.model.storage);
            check_same_shape(model, lists[5].name(i), p.array, p_name);
            overlap->add(model, lists[5].name(i), Access::write);
            t.model.data = PyArray_DATA(model);
        }
        tensors->push_back(t);
    }
    overlap->check();
    return launch_step(tensors->data(), tensors->size(), num_threads, scaling.skip_if_nonfinite);
}

void sparse_adam_step(PyObject* param_obj, PyObject* indices_obj, PyObject* values_obj, PyObject* exp_avg_obj,
                      PyObject* exp_avg_sq_obj, PyObject* step_obj, const AdamHyper& hyper, int num_threads) {
    const std::int64_t step = check_step(step_obj);
    const ArgName p_name{"param", -1}, m_name{"exp_avg", -1}, v_name{"exp_avg_sq", -1};
    const ArgName i_name{"indices", -1}, g_name{"values", -1};
    // Tensors with __dlpack__ as ndarrays over their memory, held until the call returns.
    const OwnedRef param_ref(as_array(param_obj, p_name)), indices_ref(as_array(indices_obj, i_name)),
        values_ref(as_array(values_obj, g_name)), exp_avg_ref(as_array(exp_avg_obj, m_name)),
        exp_avg_sq_ref(as_array(exp_avg_sq_obj, v_name));
    PyObject *param = param_ref.get(), *indices = indices_ref.get(), *values = values_ref.get(),
             *exp_avg = exp_avg_ref.get(), *exp_avg_sq = exp_avg_sq_ref.get();
    const CheckedArray p = check_float_array(param, p_name, Access::write);
    const CheckedArray m = check_float_array(exp_avg, m_name, Access::write);
    const CheckedArray v = check_float_array(exp_avg_sq, v_name, Access::write);
    check_same_layout(m, m_name, p, p_name);
    check_same_layout(v, v_name, p, p_name);
    std::int64_t rows = 0, row_size = 0;
    table_geometry(p, p_name, rows, row_size);
    const CheckedArray g = check_row_values(values, g_name, indices, i_name, p, p_name);

    struct Tag;
    const ScratchLease<OverlapCheck, Tag> overlap;
    overlap->clear();
    overlap->add(p, p_name, Access::write);
    overlap->add(m, m_name, Access::write);
    overlap->add(v, v_name, Access::write);
    overlap->add(g, g_name, Access::read);
    overlap->add(reinterpret_cast<PyArrayObject*>(indices), i_name, Access::read);
    overlap->check();

    const ScratchLease<RowCoalescer, Tag> coalescer;
    coalescer->clear();
    const auto unique = coalescer->add(reinterpret_cast<PyArrayObject*>(indices), i_name, rows, g.data, row_size, g.dtype);
    coalescer->sum_repeats(num_threads);

    const AdamConstantsPair constants = make_constants(hyper, step);
    AdamTensor table;
    table.param.data = p.data;
    table.exp_avg.data = m.data;
    table.exp_avg_sq.data = v.data;
    table.size = p.size;
    table.constants = &constants;
    table.dtype = p.dtype;
    table.variant = variant_of(hyper);
    const AdamTensor rows_of_table = gather_tensor(table, *coalescer, unique, row_size);
    run_adam(&rows_of_table, 1, num_threads);
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
        CheckedArray x[4];
        for (int k : {0, 2, 3}) {
            x[k] = check_float_array(lists[k][i], lists[k].name(i), Access::write);
            check_same_layout(x[k], lists[k].name(i), x[0], lists[0].name(i));
        }
        const void* b_data = nullptr;
        PyArrayObject* b_array = nullptr;
        const Storage b_storage = check_grad(lists[1][i], lists[1].name(i), x[0], lists[0].name(i), b_data, b_array);
        if (b_storage == Storage::float16) throw ArgTypeError{"probe: b must be float32, float64 or bfloat16"};
        ProbeTensor t{x[0].data, b_data, x[2].data, x[3].data, x[0].size, x[0].dtype};
        t.bf16_b = b_storage == Storage::bfloat16;
        t.exact = exact;
        if (has_e) {
            Storage e_storage = Storage::same;
            PyArrayObject* e_array = check_16bit_array(lists[4][i], lists[4].name(i), Access::write, e_storage);
            if (!t.bf16_b || e_storage != Storage::bfloat16) throw ArgTypeError{"probe: e needs bfloat16 b and e"};
            check_same_shape(e_array, lists[4].name(i), x[0].array, lists[0].name(i));
            t.e = PyArray_DATA(e_array);
        }
        tensors->push_back(t);
    }
    run_probe(tensors->data(), tensors->size(), num_threads);
}

AdamPlan::AdamPlan(PyObject* params, PyObject* exp_avgs, PyObject* exp_avg_sqs, PyObject* max_exp_avg_sqs,
                   PyObject* model_params, std::vector<std::int64_t> group_of, std::int64_t group_count)
    : group_of_(std::move(group_of)), group_count_(group_count) {
    const ArrayList p_list(params, kNames[0], false), m_list(exp_avgs, kNames[2], false),
        v_list(exp_avg_sqs, kNames[3], false), x_list(max_exp_avg_sqs, kNames[4], false),
        model_list(model_params, "model_params", false);
    const std::size_t count = p_list.size();
    if (m_list.size() != count || v_list.size() != count || x_list.size() != count ||
        model_list.size() != count || group_of_.size() != count)
        throw ArgValueError{"AdamPlan: params, state lists and group indices must have equal lengths"};
    OverlapCheck overlap;
    try {
        for (std::size_t i = 0; i < count; ++i) {
            if (group_of_[i] < 0 || group_of_[i] >= group_count)
                throw ArgValueError{"AdamPlan: group index out of range"};
            const CheckedArray p = check_float_array(p_list[i], p_list.name(i), Access::write);
            const CheckedArray m = check_float_array(m_list[i], m_list.name(i), Access::write);
            const CheckedArray v = check_float_array(v_list[i], v_list.name(i), Access::write);
            check_same_layout(m, m_list.name(i), p, p_list.name(i));
            check_same_layout(v, v_list.name(i), p, p_list.name(i));
            overlap.add(p, p_list.name(i), Access::write);
            overlap.add(m, m_list.name(i), Access::write);
            overlap.add(v, v_list.name(i), Access::write);
            void* max_data = nullptr;
            CheckedArray x{};
            const bool has_max = x_list[i] != Py_None;
            if (has_max) {
                x = check_float_array(x_list[i], x_list.name(i), Access::write);
                check_same_layout(x, x_list.name(i), p, p_list.name(i));
                overlap.add(x, x_list.name(i), Access::write);
                max_data = x.data;
            }
            hold_written(p.array, i, model_list[i] != Py_None ? "master_param" : "params");
            hold_written(m.array, i, "exp_avg");
            hold_written(v.array, i, "exp_avg_sq");
            if (has_max) hold_written(x.array, i, "max_exp_avg_sq");
            params_.push_back(p.array);
            has_max_.push_back(has_max);
            AdamTensor t;
            t.param.data = p.data;
            t.exp_avg.data = m.data;
            t.exp_avg_sq.data = v.data;
            t.max_exp_avg_sq.data = max_data;
            t.size = p.size;
            t.dtype = p.dtype;
            tensors_.push_back(t);
            if (model_list[i] != Py_None) {
                if (p.dtype != DType::float32)
                    throw ArgTypeError{p_list.name(i).str() + ": the master copy of a model param must be float32"};
                PyArrayObject* model = check_16bit_array(model_list[i], model_list.name(i), Access::write,
                                                         tensors_.back().model.storage);
                check_same_shape(model, model_list.name(i), p.array, p_list.name(i));
                overlap.add(model, model_list.name(i), Access::write);
                hold_written(model, i, "params");
                tensors_.back().model.data = PyArray_DATA(model);
            }
        }
        overlap.check();
    } catch (...) {
        for (PyObject* o : owned_) Py_DECREF(o);
        owned_.clear();
        for (const HeldArray& h : written_) Py_DECREF(h.descr);
        written_.clear();
        throw;
    }
    std::sort(written_spans_.begin(), written_spans_.end(),
              [](const Span& a, const Span& b) { return a.begin < b.begin; });
    steps_.assign(count, 0);
    constants_.resize(count);
    hyper_.resize(static_cast<std::size_t>(group_count));
}

void AdamPlan::hold_written(PyArrayObject* a, std::size_t tensor, const char* role) {
    Py_INCREF(a);
    owned_.push_back(reinterpret_cast<PyObject*>(a));
    Py_INCREF(PyArray_DESCR(a));
    written_.push_back({a, PyArray_DATA(a), PyArray_NBYTES(a), PyArray_DESCR(a), tensor, role});
    if (PyArray_SIZE(a) > 0) {
        const auto b = reinterpret_cast<std::uintptr_t>(PyArray_DATA(a));
        written_spans_.push_back({b, b + static_cast<std::uintptr_t>(PyArray_NBYTES(a)), tensor});
    }
}

AdamPlan::~AdamPlan() {
    for (const HeldArray& h : written_) Py_DECREF(h.descr);
    for (PyObject* o : owned_) Py_DECREF(o);
}

void AdamPlan::check_written_unchanged() const {
    for (const HeldArray& h : written_) {
        PyArrayObject* a = h.array;
        const char* change = nullptr;
        if (PyArray_DATA(a) != h.data)
            change = "its data buffer was replaced";
        else if (PyArray_DESCR(a) != h.descr && !PyArray_EquivTypes(PyArray_DESCR(a), h.descr))
            change = "its dtype was changed";
        else if (PyArray_NBYTES(a) != h.nbytes || !PyArray_IS_C_CONTIGUOUS(a))
            change = "its shape or strides were changed";
        else if (!PyArray_ISWRITEABLE(a))
            change = "it became read-only";
        if (change == nullptr) continue;
        const std::string index = "[" + std::to_string(h.tensor) + "]";
        const std::string what = std::string(h.role) == "params" ? "params" + index
                                                                  : std::string("the ") + h.role + " of params" + index;
        throw ArgValueError{what + " changed after the optimizer was built (" + change +
                            "); the optimizer updates the arrays it was built with, in place: build a new one"};
    }
}

void AdamPlan::set_steps(const std::vector<std::int64_t>& steps) {
    if (busy_.load()) throw UsageError{"steps cannot be set while the optimizer is stepping"};
    if (steps.size() != steps_.size())
        throw ArgValueError{"steps: expected " + std::to_string(steps_.size()) + " values, got " +
                            std::to_string(steps.size())};
    for (std::size_t i = 0; i < steps.size(); ++i)
        if (steps[i] < 0) throw ArgValueError{"steps[" + std::to_string(i) + "] must be >= 0"};
    steps_ = steps;
}

bool AdamPlan::step(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads) {
    // The plan's constants and gradient pointers are rewritten by every step:
    // a second step running at the same time would tear the first one.
    if (busy_.exchange(true))
        throw UsageError{"the optimizer is already stepping (called from two threads at once, or re-entered "
                         "from a callback); an optimizer takes one step at a time"};
    struct Release {
        std::atomic<bool>& busy;
        ~Release() { busy.store(false); }
    } release{busy_};
    return step_unguarded(grads, groups, scaling, num_threads);
}

bool AdamPlan::step_unguarded(PyObject* grads, PyObject* groups, const LossScaling& scaling, int num_threads) {
    // The hyperparameters of every group, checked first.
    if (!PyList_Check(groups) || PyList_GET_SIZE(groups) != group_count_)
        throw ArgValueError{"AdamPlan.step: expected a list of one hyperparameter tuple per group"};
    for (std::int64_t k = 0; k < group_count_; ++k) {
        PyObject* t = PyList_GET_ITEM(groups, k);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 9)
            throw ArgValueError{"AdamPlan.step: malformed hyperparameter tuple"};
        PyObject* const* f = &PyTuple_GET_ITEM(t, 0);
        try {
            hyper_[static_cast<std::size_t>(k)] = check_hyper(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]);
        } catch (ArgValueError& e) {
            e.message = "param_groups[" + std::to_string(k) + "]: " + e.message;
            throw;
        } catch (ArgTypeError& e) {
            e.message = "param_groups[" + std::to_string(k) + "]: " + e.message;
            throw;
        }
    }

    // Then the gradients: a list in the order of all params.
    if (PyArray_Check(grads) || !(PyList_Check(grads) || PyTuple_Check(grads)))
        throw ArgTypeError{std::string("grads: expected a list of arrays, one per parameter, got ") +
                           Py_TYPE(grads)->tp_name};
    const ArrayList g_list(grads, kNames[1], false);
    if (g_list.size() != tensors_.size())
        throw ArgValueError{"grads has " + std::to_string(g_list.size()) + " arrays but the optimizer has " +
                            std::to_string(tensors_.size()) + " params"};
    check_written_unchanged();
    for (std::size_t i = 0; i < steps_.size(); ++i)
        if (steps_[i] == std::numeric_limits<std::int64_t>::max())
            throw ArgValueError{"params[" + std::to_string(i) + "] has taken 2^63-1 steps, the most a step count holds"};
    // Row-sparse gradients: coalesced here, into the coalescer's own scratch.
    struct Tag;
    const ScratchLease<RowCoalescer, Tag> coalescer;
    const ScratchLease<std::vector<RowCoalescer::Rows>, Tag> sparse_rows;  // per param; count == SIZE_MAX: dense
    coalescer->clear();
    sparse_rows->assign(tensors_.size(), RowCoalescer::Rows{0, SIZE_MAX});
    bool any_sparse = false;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
        const auto& h = hyper_[static_cast<std::size_t>(group_of_[i])];
        if (h.amsgrad && !has_max_[i])
            throw ArgValueError{"param_groups[" + std::to_string(group_of_[i]) +
                                "]: amsgrad was switched on after the optimizer was built"};
        const ArgName p_name{"params", static_cast<std::ptrdiff_t>(i)};
        const CheckedArray p{params_[i], PyArray_DATA(params_[i]), PyArray_SIZE(params_[i]), tensors_[i].dtype};
        PyObject* item = g_list[i];
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
            // (indices, values): a RowSparseGrad
            const std::string where = g_list.name(i).str();
            const std::string i_str = where + ".indices", v_str = where + ".values";
            const ArgName i_name{i_str.c_str(), -1}, v_name{v_str.c_str(), -1};
            PyObject* indices = PyTuple_GET_ITEM(item, 0);
            if (tensors_[i].model.data != nullptr)
                throw ArgTypeError{where + ": row-sparse gradients are not supported for params with a "
                                           "float16/bfloat16 model copy"};
            const CheckedArray val = check_row_values(PyTuple_GET_ITEM(item, 1), v_name, indices, i_name, p, p_name);
            check_not_written(reinterpret_cast<std::uintptr_t>(val.data),
                              static_cast<std::size_t>(PyArray_NBYTES(val.array)), v_name);
            std::int64_t rows = 0, row_size = 0;
            table_geometry(p, p_name, rows, row_size);
            (*sparse_rows)[i] = coalescer->add(reinterpret_cast<PyArrayObject*>(indices), i_name, rows, val.data,
                                           row_size, val.dtype);
            tensors_[i].grad.storage = Storage::same;
            any_sparse = true;
            continue;
        }
        PyArrayObject* g_array = nullptr;
        tensors_[i].grad.storage = check_grad(item, g_list.name(i), p, p_name, tensors_[i].grad.data, g_array);
        check_not_written(reinterpret_cast<std::uintptr_t>(PyArray_DATA(g_array)),
                          static_cast<std::size_t>(PyArray_NBYTES(g_array)), g_list.name(i));
    }

    // Constants per (group, step), reusing the previous tensor's when equal.
    std::size_t last = SIZE_MAX;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
        const auto& h = hyper_[static_cast<std::size_t>(group_of_[i])];
        const std::int64_t t = steps_[i] + 1;
        if (last != SIZE_MAX && group_of_[last] == group_of_[i] && steps_[last] == steps_[i]) {
            tensors_[i].constants = tensors_[last].constants;
        } else {
            constants_[i] = make_constants(h, t);
            set_grad_scale(constants_[i], scaling.grad_scale);
            tensors_[i].constants = &constants_[i];
            last = i;
        }
        tensors_[i].variant = variant_of(h);
    }
    // g_list holds the gradients while the GIL may be released.
    if (!any_sparse) {
        if (!launch_step(tensors_.data(), tensors_.size(), num_threads, scaling.skip_if_nonfinite)) return false;
    } else {
        // Dense params as they are; a sparse one as the gather of its present rows.
        coalescer->sum_repeats(num_threads);
        const ScratchLease<std::vector<AdamTensor>, Tag> jobs;
        jobs->clear();
        for (std::size_t i = 0; i < tensors_.size(); ++i) {
            if ((*sparse_rows)[i].count == SIZE_MAX) {
                jobs->push_back(tensors_[i]);
                continue;
            }
            const std::int64_t rows = PyArray_DIM(params_[i], 0);
            const std::int64_t row_size = rows == 0 ? 0 : tensors_[i].size / rows;
            jobs->push_back(gather_tensor(tensors_[i], *coalescer, (*sparse_rows)[i], row_size));
        }
        if (!launch_step(jobs->data(), jobs->size(), num_threads, scaling.skip_if_nonfinite)) return false;
    }
    for (auto& s : steps_) ++s;
    return true;
}

void AdamPlan::check_not_written(std::uintptr_t begin, std::size_t bytes, const ArgName& name) const {
    if (bytes == 0) return;
    // The first written span starting at or after the end is past it; spans
    // are disjoint, so only the last one starting before the end can overlap.
    const std::uintptr_t end = begin + bytes;
    auto it = std::lower_bound(written_spans_.begin(), written_spans_.end(), end,
                               [](const Span& s, std::uintptr_t x) { return s.begin < x; });
    if (it != written_spans_.begin() && std::prev(it)->end > begin)
        throw ArgValueError{name.str() + " shares memory with the parameter or state of params[" +
                            std::to_string(std::prev(it)->tensor) + "]"};
}

}  // namespace fastadam
