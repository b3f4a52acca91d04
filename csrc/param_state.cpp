#include "param_state.hpp"

#include <string>

namespace fastadam {
namespace {

bool given(PyObject* obj) { return obj != nullptr && obj != Py_None; }

std::string dtype_name_of(PyArrayObject* a) {
    PyObject* s = PyObject_Str(reinterpret_cast<PyObject*>(PyArray_DESCR(a)));
    std::string out = s != nullptr ? PyUnicode_AsUTF8(s) : "?";
    Py_XDECREF(s);
    PyErr_Clear();
    return out;
}

}  // namespace

CheckedParam check_param_state(const ParamArgs& a, OverlapCheck& overlap) {
    CheckedParam c{};
    AdamTensor& t = c.tensor;
    c.param = check_float_array(a.param, a.param_name, Access::write);
    t.exp_avg.storage = check_moment(a.exp_avg, a.exp_avg_name, c.param, a.param_name, c.exp_avg);
    t.exp_avg_sq.storage = check_moment(a.exp_avg_sq, a.exp_avg_sq_name, c.param, a.param_name, c.exp_avg_sq);
    overlap.add(c.param, a.param_name, Access::write);
    overlap.add(c.exp_avg, a.exp_avg_name, Access::write);
    overlap.add(c.exp_avg_sq, a.exp_avg_sq_name, Access::write);

    t.param.data = c.param.data;
    t.exp_avg.data = PyArray_DATA(c.exp_avg);
    t.exp_avg_sq.data = PyArray_DATA(c.exp_avg_sq);
    t.size = c.param.size;
    t.dtype = c.param.dtype;
    if (given(a.max_exp_avg_sq)) {
        t.max_exp_avg_sq.storage =
            check_moment(a.max_exp_avg_sq, a.max_exp_avg_sq_name, c.param, a.param_name, c.max_exp_avg_sq);
        // The maximum of exp_avg_sq's values, in the same storage: each is exactly one of them.
        if (t.max_exp_avg_sq.storage != t.exp_avg_sq.storage)
            throw ArgTypeError{a.max_exp_avg_sq_name.str() + ": must be stored as " + a.exp_avg_sq_name.str() +
                               " is (" + dtype_name_of(c.exp_avg_sq) + "), got " + dtype_name_of(c.max_exp_avg_sq)};
        overlap.add(c.max_exp_avg_sq, a.max_exp_avg_sq_name, Access::write);
        t.max_exp_avg_sq.data = PyArray_DATA(c.max_exp_avg_sq);
    }
    if (given(a.model)) {
        if (c.param.dtype != DType::float32)
            throw ArgTypeError{a.param_name.str() + ": the master copy of a model param must be float32, got " +
                               dtype_name(c.param.dtype)};
        c.model = check_16bit_array(a.model, a.model_name, Access::write, t.model.storage);
        check_same_shape(c.model, a.model_name, c.param.array, a.param_name);
        overlap.add(c.model, a.model_name, Access::write);
        t.model.data = PyArray_DATA(c.model);
    }
    return c;
}

}  // namespace fastadam
