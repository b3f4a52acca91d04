// The checks of one parameter's arrays -- the param, its moments, the
// amsgrad maximum and the model copy -- written once, for fastadam.adam_step
// and for the optimizer's plan alike.
#pragma once

#include "arrays.hpp"

namespace fastadam {

// The per-parameter arguments of fastadam.adam_step, by position, as errors name them.
inline constexpr const char* kNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                         "model_params"};

// One parameter's arrays as given; max_exp_avg_sq and model may be null or
// None (absent).  The names are for errors ("exp_avgs[3]").
struct ParamArgs {
    PyObject* param;
    ArgName param_name;
    PyObject* exp_avg;
    ArgName exp_avg_name;
    PyObject* exp_avg_sq;
    ArgName exp_avg_sq_name;
    PyObject* max_exp_avg_sq;
    ArgName max_exp_avg_sq_name;
    PyObject* model;
    ArgName model_name;
};

// The checked arrays, and the tensor of their streams (no gradient and no
// constants yet).  max_exp_avg_sq.array and model are null when absent.
struct CheckedParam {
    AdamTensor tensor;
    CheckedArray param;
    CheckedMoment exp_avg, exp_avg_sq, max_exp_avg_sq;
    PyArrayObject* model;
};

// The param a float32/float64 array, writeable, C-contiguous, in native
// byte order; the moments of its shape, in its dtype or (beside a float32
// param) bfloat16 or 8-bit (see check_moment), the amsgrad maximum stored as
// exp_avg_sq is; a model copy
// only for a float32 param (its master), float16 or bfloat16 of the param's
// shape.  Every array is registered with `overlap` as written.
CheckedParam check_param_state(const ParamArgs& args, OverlapCheck& overlap);

}  // namespace fastadam
