#include "sparse.hpp"

#include <string>

#include "launch.hpp"
#include "scratch.hpp"

namespace fastadam {

void table_geometry(const CheckedArray& p, const ArgName& name, std::int64_t& rows, std::int64_t& row_size) {
    if (PyArray_NDIM(p.array) < 1)
        throw ArgValueError{name.str() + ": a row-sparse gradient needs a parameter with at least one axis"};
    rows = PyArray_DIM(p.array, 0);
    row_size = rows == 0 ? 0 : p.size / rows;
}

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

}  // namespace fastadam
