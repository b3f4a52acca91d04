#include "param_state.hpp"

#include <string>

namespace fastadam {
namespace {

bool given(PyObject* obj) { return obj != nullptr && obj != Py_None; }

}  // namespace

CheckedParam check_param_state(const ParamArgs& a, OverlapCheck& overlap) {
    CheckedParam c{};
    c.param = check_float_array(a.param, a.param_name, Access::write);
    c.exp_avg = check_float_array(a.exp_avg, a.exp_avg_name, Access::write);
    c.exp_avg_sq = check_float_array(a.exp_avg_sq, a.exp_avg_sq_name, Access::write);
    check_same_layout(c.exp_avg, a.exp_avg_name, c.param, a.param_name);
    check_same_layout(c.exp_avg_sq, a.exp_avg_sq_name, c.param, a.param_name);
    overlap.add(c.param, a.param_name, Access::write);
    overlap.add(c.exp_avg, a.exp_avg_name, Access::write);
    overlap.add(c.exp_avg_sq, a.exp_avg_sq_name, Access::write);

    AdamTensor& t = c.tensor;
    t.param.data = c.param.data;
    t.exp_avg.data = c.exp_avg.data;
    t.exp_avg_sq.data = c.exp_avg_sq.data;
    t.size = c.param.size;
    t.dtype = c.param.dtype;
    if (given(a.max_exp_avg_sq)) {
        c.max_exp_avg_sq = check_float_array(a.max_exp_avg_sq, a.max_exp_avg_sq_name, Access::write);
        check_same_layout(c.max_exp_avg_sq, a.max_exp_avg_sq_name, c.param, a.param_name);
        overlap.add(c.max_exp_avg_sq, a.max_exp_avg_sq_name, Access::write);
        t.max_exp_avg_sq.data = c.max_exp_avg_sq.data;
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
