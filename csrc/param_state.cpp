#include "param_state.hpp"

#include <string>

namespace fastadam {
namespace {

bool given(PyObject* obj) { return obj != nullptr && obj != Py_None; }

std::string storage_name(const CheckedMoment& m) {
    if (m.stream.storage == Storage::block8) return "8-bit";
    if (m.stream.storage == Storage::block4) return "4-bit";
    return describe_dtype(m.array);
}

void add_moment(OverlapCheck& overlap, const CheckedMoment& m, const ArgName& name) {
    overlap.add(m.array, name, Access::write);
    if (m.absmax != nullptr) overlap.add(m.absmax, name, Access::write);
    if (m.map != nullptr) overlap.add(m.map, name, Access::read);
}

}  // namespace

CheckedParam check_param_state(const ParamArgs& a, OverlapCheck& overlap) {
    CheckedParam c{};
    AdamTensor& t = c.tensor;
    c.param = check_float_array(a.param, a.param_name, Access::write);
    c.exp_avg = check_moment(a.exp_avg, a.exp_avg_name, c.param, a.param_name);
    c.exp_avg_sq = check_moment(a.exp_avg_sq, a.exp_avg_sq_name, c.param, a.param_name);
    overlap.add(c.param, a.param_name, Access::write);
    add_moment(overlap, c.exp_avg, a.exp_avg_name);
    add_moment(overlap, c.exp_avg_sq, a.exp_avg_sq_name);

    t.param.data = c.param.data;
    t.exp_avg = c.exp_avg.stream;
    t.exp_avg_sq = c.exp_avg_sq.stream;
    t.size = c.param.size;
    t.dtype = c.param.dtype;
    if (given(a.max_exp_avg_sq)) {
        c.max_exp_avg_sq = check_moment(a.max_exp_avg_sq, a.max_exp_avg_sq_name, c.param, a.param_name);
        // The maximum of exp_avg_sq's values, in the same storage.
        if (c.max_exp_avg_sq.stream.storage != t.exp_avg_sq.storage)
            throw ArgTypeError{a.max_exp_avg_sq_name.str() + ": must be stored as " + a.exp_avg_sq_name.str() +
                               " is (" + storage_name(c.exp_avg_sq) + "), got " + storage_name(c.max_exp_avg_sq)};
        add_moment(overlap, c.max_exp_avg_sq, a.max_exp_avg_sq_name);
        t.max_exp_avg_sq = c.max_exp_avg_sq.stream;
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
