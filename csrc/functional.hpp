// The functional entry points: fastadam.adam_step and the bandwidth probe.
// Each checks every argument, then launches the kernel once.
#pragma once

#include <Python.h>

#include "hyper.hpp"

namespace fastadam {

// fastadam.adam_step: params..max_exp_avg_sqs are arrays, or equal-length
// sequences of arrays (max_exp_avg_sqs is None unless amsgrad; model_params
// is None or the float16/bfloat16 copies of float32 params).  Returns false
// when the step was skipped.
// `rounding`: how bfloat16 moments are rounded (the key of params[i] from
// its list position i).
bool adam_step(PyObject* params, PyObject* grads, PyObject* exp_avgs, PyObject* exp_avg_sqs,
               PyObject* max_exp_avg_sqs, PyObject* step, const AdamHyper& hyper, PyObject* model_params,
               const LossScaling& scaling, const RoundingSeed& rounding, int num_threads);

// The probe over (a, b, c, d) lists: same access pattern as the step (and,
// when `exact`, its one division and square root per element), with b, c and
// d stored as the step's gradient and moments may be (bfloat16 beside float32).
void probe_step(PyObject* a, PyObject* b, PyObject* c, PyObject* d, PyObject* e, bool exact, int num_threads);

}  // namespace fastadam
