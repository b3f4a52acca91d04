#include "plan.hpp"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>

#include "launch.hpp"
#include "param_state.hpp"
#include "scratch.hpp"
#include "sparse.hpp"

namespace fastadam {

AdamPlan::AdamPlan(PyObject* params, PyObject* exp_avgs, PyObject* exp_avg_sqs, PyObject* max_exp_avg_sqs,
                   PyObject* model_params, std::vector<std::int64_t> group_of, std::int64_t group_count,
                   const RoundingSeed& rounding)
    : group_of_(std::move(group_of)), group_count_(group_count), rounding_(rounding) {
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
            const bool has_model = model_list[i] != Py_None;
            const CheckedParam c = check_param_state({p_list[i], p_list.name(i), m_list[i], m_list.name(i), v_list[i],
                                                      v_list.name(i), x_list[i], x_list.name(i), model_list[i],
                                                      model_list.name(i)},
                                                     overlap);
            hold_written(c.param.array, i, has_model ? "master_param" : "params");
            hold_moment(c.exp_avg, i, "exp_avg", &AdamTensor::exp_avg);
            hold_moment(c.exp_avg_sq, i, "exp_avg_sq", &AdamTensor::exp_avg_sq);
            if (c.max_exp_avg_sq.array != nullptr)
                hold_moment(c.max_exp_avg_sq, i, "max_exp_avg_sq", &AdamTensor::max_exp_avg_sq);
            if (has_model) hold_written(c.model, i, "params");
            params_.push_back(c.param.array);
            has_max_.push_back(c.max_exp_avg_sq.array != nullptr);
            tensors_.push_back(c.tensor);
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
    rounding_keys_.resize(count);
    for (std::size_t i = 0; i < count; ++i) rounding_keys_[i] = i;
    constants_.resize(count);
    hyper_.resize(static_cast<std::size_t>(group_count));
}

void AdamPlan::hold_moment(const CheckedMoment& m, std::size_t tensor, const char* role,
                           Stream AdamTensor::*stream) {
    hold_written(m.array, tensor, role);
    if (m.absmax != nullptr) hold_written(m.absmax, tensor, role);
    if (m.map != nullptr) {
        hold_written(m.map, tensor, role, false);
        codebooks_.push_back({tensor, stream, m.map, m.codebook, role});
    }
}

void AdamPlan::refresh_codebooks() {
    // An optimizer's tensors share a map or two: each map is compared once a
    // step, and the tensors after its first holder take that holder's book.
    checked_maps_.clear();
    for (HeldCodebook& h : codebooks_) {
        const auto first = std::find_if(checked_maps_.begin(), checked_maps_.end(),
                                        [&h](const HeldCodebook* c) { return c->map == h.map; });
        if (first != checked_maps_.end()) {
            if (h.book != (*first)->book) {
                h.book = (*first)->book;
                (tensors_[h.tensor].*h.stream).codebook = h.book.get();
            }
            continue;
        }
        checked_maps_.push_back(&h);
        if (std::memcmp(PyArray_DATA(h.map), h.book->value, sizeof(float) * h.book->count) == 0) continue;
        h.book = checked_codebook(h.map, std::string("the ") + h.role + " map of params[" +
                                             std::to_string(h.tensor) + "] (changed since the last step)");
        (tensors_[h.tensor].*h.stream).codebook = h.book.get();
    }
}

void AdamPlan::hold_written(PyArrayObject* a, std::size_t tensor, const char* role, bool written) {
    Py_INCREF(a);
    owned_.push_back(reinterpret_cast<PyObject*>(a));
    Py_INCREF(PyArray_DESCR(a));
    written_.push_back({a, PyArray_DATA(a), PyArray_NBYTES(a), PyArray_DESCR(a), tensor, role, written});
    if (written && PyArray_SIZE(a) > 0) {
        const auto b = reinterpret_cast<std::uintptr_t>(PyArray_DATA(a));
        written_spans_.push_back({b, b + static_cast<std::uintptr_t>(PyArray_NBYTES(a)), tensor});
    }
}

AdamPlan::~AdamPlan() {
    release_step_counts();
    for (const HeldArray& h : written_) Py_DECREF(h.descr);
    for (PyObject* o : owned_) Py_DECREF(o);
}

void AdamPlan::release_step_counts() {
    for (const HeldArray& h : step_counts_) {
        Py_DECREF(h.descr);
        Py_DECREF(reinterpret_cast<PyObject*>(h.array));
    }
    step_counts_.clear();
}

void AdamPlan::set_step_counts(PyObject* counts) {
    if (busy_.load()) throw UsageError{"step_counts cannot be set while the optimizer is stepping"};
    if (counts == Py_None) {
        release_step_counts();
        return;
    }
    const CheckedArray c = check_float_array(counts, ArgName{"step_counts", -1}, Access::write);
    if (PyArray_NDIM(c.array) != 1 || static_cast<std::size_t>(c.size) != tensors_.size())
        throw ArgValueError{"step_counts: expected a 1-d array of " + std::to_string(tensors_.size()) +
                            " counts (one per param), got " + std::to_string(c.size) + " elements in " +
                            std::to_string(PyArray_NDIM(c.array)) + " dimensions"};
    release_step_counts();
    Py_INCREF(counts);
    Py_INCREF(PyArray_DESCR(c.array));
    step_counts_.push_back({c.array, c.data, PyArray_NBYTES(c.array), PyArray_DESCR(c.array), 0, "step_counts",
                            true});
}

// How a held array differs from what the plan saw (null: it does not).
const char* AdamPlan::change_of(const HeldArray& h) {
    PyArrayObject* a = h.array;
    if (PyArray_DATA(a) != h.data) return "its data buffer was replaced";
    if (PyArray_DESCR(a) != h.descr && !PyArray_EquivTypes(PyArray_DESCR(a), h.descr)) return "its dtype was changed";
    if (PyArray_NBYTES(a) != h.nbytes || !PyArray_IS_C_CONTIGUOUS(a)) return "its shape or strides were changed";
    if (h.written && !PyArray_ISWRITEABLE(a)) return "it became read-only";
    return nullptr;
}

void AdamPlan::check_written_unchanged() const {
    for (const HeldArray& h : step_counts_)
        if (change_of(h) != nullptr)
            throw ArgValueError{"step_counts changed after they were set (its data, dtype, shape, strides or "
                                "writeability): set them again"};
    for (const HeldArray& h : written_) {
        const char* const change = change_of(h);
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

std::vector<std::pair<std::int64_t, std::int64_t>> AdamPlan::rounding_positions() const {
    std::vector<std::pair<std::int64_t, std::int64_t>> out(tensors_.size());
    for (std::size_t i = 0; i < tensors_.size(); ++i)
        out[i] = {static_cast<std::int64_t>(rounding_keys_[i]),
                  static_cast<std::int64_t>(tensors_[i].rounding.first_element)};
    return out;
}

void AdamPlan::set_rounding_positions(const std::vector<std::pair<std::int64_t, std::int64_t>>& positions) {
    if (busy_.load()) throw UsageError{"rounding_positions cannot be set while the optimizer is stepping"};
    if (positions.size() != tensors_.size())
        throw ArgValueError{"rounding_positions: expected " + std::to_string(tensors_.size()) + " pairs, got " +
                            std::to_string(positions.size())};
    for (std::size_t i = 0; i < positions.size(); ++i)
        if (positions[i].first < 0 || positions[i].second < 0)
            throw ArgValueError{"rounding_positions[" + std::to_string(i) + "]: both must be >= 0"};
    for (std::size_t i = 0; i < positions.size(); ++i) {
        rounding_keys_[i] = static_cast<std::uint64_t>(positions[i].first);
        tensors_[i].rounding.first_element = static_cast<std::uint64_t>(positions[i].second);
    }
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
    // The hyperparameters of every group, read from the groups by name and
    // checked first (inside the busy flag: a number's __float__ may call back).
    if (!PyList_Check(groups) || PyList_GET_SIZE(groups) != group_count_)
        throw ArgValueError{"AdamPlan.step: expected a list of one param group per group"};
    for (std::int64_t k = 0; k < group_count_; ++k) {
        PyObject* item = PyList_GET_ITEM(groups, k);
        Py_INCREF(item);
        const OwnedRef group(item);  // the list may change while a value converts
        try {
            hyper_[static_cast<std::size_t>(k)] = hyper_from_group(group.get());
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
    refresh_codebooks();
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
            // A row must be whole quantization blocks, so that updating some rows leaves the others' blocks be.
            const bool block8 = tensors_[i].exp_avg.storage == Storage::block8 ||
                                tensors_[i].exp_avg_sq.storage == Storage::block8;
            const bool block4 = tensors_[i].exp_avg.storage == Storage::block4 ||
                                tensors_[i].exp_avg_sq.storage == Storage::block4;
            const std::int64_t block = block8 ? kQuantBlock : kQuantBlock4;
            if ((block8 || block4) && row_size % block != 0)
                throw ArgValueError{where + ": a row-sparse gradient needs rows of a multiple of " +
                                    std::to_string(block) + " elements with " + (block8 ? "8" : "4") +
                                    "-bit state (a quantization block must not straddle rows); " + p_name.str() +
                                    "'s rows hold " + std::to_string(row_size)};
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
        const std::uint64_t first_element = tensors_[i].rounding.first_element;
        tensors_[i].rounding = rounding_for(rounding_, t, rounding_keys_[i]);
        tensors_[i].rounding.first_element = first_element;
    }
    // g_list holds the gradients while the GIL may be released.
    if (!any_sparse) {
        if (!run_adam_step(tensors_.data(), tensors_.size(), num_threads, scaling.skip_if_nonfinite)) return false;
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
        if (!run_adam_step(jobs->data(), jobs->size(), num_threads, scaling.skip_if_nonfinite)) return false;
    }
    for (auto& s : steps_) ++s;
    for (const HeldArray& h : step_counts_) {  // checked unchanged above, before anything was written
        if (PyArray_TYPE(h.array) == NPY_FLOAT32) {
            auto* c = static_cast<float*>(h.data);
            for (std::size_t i = 0; i < steps_.size(); ++i) c[i] += 1.0f;
        } else {
            auto* c = static_cast<double*>(h.data);
            for (std::size_t i = 0; i < steps_.size(); ++i) c[i] += 1.0;
        }
    }
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
