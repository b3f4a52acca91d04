// fastadam._core: the Python bindings.  They only convert arguments and
// translate errors; checking lives in arrays.cpp, hyper.cpp, param_state.cpp,
// functional.cpp, sparse.cpp and plan.cpp, the math in kernels/, the
// threading in parallel.cpp.
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL fastadam_ARRAY_API
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <numpy/arrayobject.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>

#include "arrays.hpp"
#include "dispatch.hpp"
#include "functional.hpp"
#include "hyper.hpp"
#include "launch.hpp"
#include "parallel.hpp"
#include "plan.hpp"
#include "quantize.hpp"
#include "sparse.hpp"

namespace py = pybind11;
using namespace fastadam;

namespace {

int to_num_threads(py::handle obj) {
    if (obj.is_none()) return 0;
    const std::int64_t n = to_int64(obj.ptr(), "num_threads");
    if (n < 1) throw ArgValueError{"num_threads must be None or >= 1, got " + std::to_string(n)};
    return static_cast<int>(std::min<std::int64_t>(n, 1 << 16));
}

LossScaling to_loss_scaling(py::handle grad_scale, py::handle skip_if_nonfinite) {
    LossScaling scaling;
    if (!grad_scale.is_none()) {
        scaling.grad_scale = to_double(grad_scale.ptr(), "grad_scale");
        if (!(scaling.grad_scale > 0.0))
            throw ArgValueError{"grad_scale must be None or > 0, got " + std::to_string(scaling.grad_scale)};
    }
    scaling.skip_if_nonfinite = to_bool(skip_if_nonfinite.ptr(), "skip_if_nonfinite");
    return scaling;
}

// betas as a pair of numbers, held: converting beta1 runs its __float__,
// which could empty the list that holds beta2.
struct Betas {
    py::object beta1, beta2;
    explicit Betas(py::handle betas) {
        PyObject *first, *second;
        split_betas(betas.ptr(), first, second);
        beta1 = py::reinterpret_steal<py::object>(first);
        beta2 = py::reinterpret_steal<py::object>(second);
    }
};

py::dict runtime_config() {
    py::dict d;
    d["isa"] = kernels().isa_name;
    d["available_isas"] = available_isas();
    d["vector_bits"] = kernels().vector_bytes * 8;
    d["openmp"] = have_openmp();
    d["num_threads"] = default_num_threads();
    d["max_threads"] = max_threads();
    d["fork_safe"] = fork_handler_registered();
    d["num_threads_override"] = num_threads_override() > 0 ? py::object(py::int_(num_threads_override()))
                                                            : py::object(py::none());
    py::dict threshold;
    threshold["float32"] = kMinParallelElementsFloat32;
    threshold["float64"] = kMinParallelElementsFloat64;
    d["parallel_threshold_elements"] = threshold;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    if (_import_array() < 0) throw py::error_already_set();
    const char* requested = std::getenv("FASTADAM_ISA");
    select_isa(requested != nullptr ? requested : "");

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ArgTypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.message.c_str());
        } catch (const ArgValueError& e) {
            PyErr_SetString(PyExc_ValueError, e.message.c_str());
        } catch (const UsageError& e) {
            PyErr_SetString(PyExc_RuntimeError, e.message.c_str());
        } catch (const PythonErrorSet&) {
            // The error indicator already holds the exception to raise.
        }
    });

    m.doc() = "fastadam's compiled core; use the functions of the fastadam package instead.";

    m.def(
        "adam_step",
        [](py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
           py::handle max_exp_avg_sqs, py::handle step, py::handle lr, py::handle betas, py::handle eps,
           py::handle weight_decay, py::handle decoupled, py::handle amsgrad, py::handle maximize,
           py::handle eps_before_bias_correction, py::handle model_params, py::handle grad_scale,
           py::handle skip_if_nonfinite, py::handle stochastic_rounding, py::handle rounding_seed,
           py::handle num_threads) {
            const Betas b(betas);
            const AdamHyper h = check_hyper(lr.ptr(), b.beta1.ptr(), b.beta2.ptr(), eps.ptr(), weight_decay.ptr(),
                                            decoupled.ptr(), amsgrad.ptr(), maximize.ptr(),
                                            eps_before_bias_correction.ptr());
            return adam_step(params.ptr(), grads.ptr(), exp_avgs.ptr(), exp_avg_sqs.ptr(), max_exp_avg_sqs.ptr(),
                             step.ptr(), h, model_params.ptr(), to_loss_scaling(grad_scale, skip_if_nonfinite),
                             check_rounding(stochastic_rounding.ptr(), rounding_seed.ptr()),
                             to_num_threads(num_threads));
        },
        "Positional core of fastadam.adam_step.");

    py::tuple names(std::size(kHyperparameterNames));
    for (std::size_t k = 0; k < names.size(); ++k) names[k] = py::str(kHyperparameterNames[k]);
    m.attr("HYPERPARAMETERS") = names;
    m.def(
        "check_hyperparameters", [](py::handle group) { hyper_from_group(group.ptr()); }, py::arg("group"),
        "Raise the error a step would for the hyperparameters of a param group (a dict keyed by\n"
        "HYPERPARAMETERS; all but lr, betas and eps may be left out).");

    m.def(
        "sparse_adam_step",
        [](py::handle param, py::handle indices, py::handle values, py::handle exp_avg, py::handle exp_avg_sq,
           py::handle step, py::handle lr, py::handle betas, py::handle eps, py::handle maximize,
           py::handle num_threads) {
            const Betas b(betas);
            const AdamHyper h = check_hyper(lr.ptr(), b.beta1.ptr(), b.beta2.ptr(), eps.ptr(), py::float_(0.0).ptr(), Py_False,
                                            Py_False, maximize.ptr(), Py_True);
            sparse_adam_step(param.ptr(), indices.ptr(), values.ptr(), exp_avg.ptr(), exp_avg_sq.ptr(), step.ptr(),
                             h, to_num_threads(num_threads));
        },
        "Positional core of fastadam.sparse_adam_step.");

    m.def(
        "as_array",
        [](py::handle obj, const std::string& name) {
            return py::reinterpret_steal<py::object>(as_array(obj.ptr(), ArgName{name.c_str(), -1}));
        },
        py::arg("obj"), py::arg("name"),
        "obj as an ndarray: an object with __dlpack__ (a CPU tensor, bfloat16 included) as an ndarray over the\n"
        "same memory, never a copy; anything else as it is.  Errors name the argument `name`.");

    m.def(
        "probe_step",
        [](py::handle a, py::handle b, py::handle c, py::handle d, py::handle num_threads, py::handle e,
           bool exact) {
            probe_step(a.ptr(), b.ptr(), c.ptr(), d.ptr(), e.ptr(), exact, to_num_threads(num_threads));
        },
        py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("num_threads") = py::none(),
        py::arg("e") = py::none(), py::arg("exact") = false,
        "The bandwidth probe: a = a/2 + b, c = c/2 + b, d = d/2 + b*b in one pass (the step's memory traffic).\n"
        "With float32 a, c, d and a bfloat16 b (and optionally a bfloat16 e, which receives a), the traffic of\n"
        "the mixed-precision step.  Beside a float32 a, c and/or d may be bfloat16 (the bfloat16 moments'\n"
        "traffic): read exactly, computed in float32, stored rounded to nearest-even.  With exact=True, the same\n"
        "traffic and exactly the step's correctly rounded division and square root per element:\n"
        "c' = c/2 + b, d' = d/2 + b*b, a = a - c' / (sqrt(d') + 1e-8), then c = c', d = d' (a uses c' and d' in\n"
        "float32, before a bfloat16 c or d is rounded).  c and d may both be 8-bit state ((codes, absmax, map)\n"
        "beside a float32 a and b: the 8-bit step's traffic): each code is read as a float and replaced by the\n"
        "second byte of its new value's bits, and each absmax x becomes x/2 + 1/2.");

    m.def(
        "quantize_blockwise",
        [](py::handle values, py::handle state, py::handle num_threads) {
            quantize_blockwise(values.ptr(), state.ptr(), to_num_threads(num_threads));
        },
        py::arg("values"), py::arg("state"), py::arg("num_threads") = py::none(),
        "float32 values into 8-bit block-wise state (codes, absmax, map), as the step stores its moments.");
    m.def(
        "dequantize_blockwise",
        [](py::handle state, py::handle out, py::handle num_threads) {
            dequantize_blockwise(state.ptr(), out.ptr(), to_num_threads(num_threads));
        },
        py::arg("state"), py::arg("out"), py::arg("num_threads") = py::none(),
        "8-bit block-wise state into the float32 array out: map[code] * absmax, as the step reads its moments.");

    py::class_<AdamPlan>(m, "AdamPlan")
        .def(py::init([](py::handle params, py::handle exp_avgs, py::handle exp_avg_sqs,
                         py::handle max_exp_avg_sqs, py::handle model_params, std::vector<std::int64_t> group_of,
                         std::int64_t groups, py::handle stochastic_rounding, py::handle rounding_seed) {
            return new AdamPlan(params.ptr(), exp_avgs.ptr(), exp_avg_sqs.ptr(), max_exp_avg_sqs.ptr(),
                                model_params.ptr(), std::move(group_of), groups,
                                check_rounding(stochastic_rounding.ptr(), rounding_seed.ptr()));
        }))
        .def("step",
             [](AdamPlan& plan, py::handle grads, py::handle groups, py::handle grad_scale,
                py::handle skip_if_nonfinite, py::handle num_threads) {
                 return plan.step(grads.ptr(), groups.ptr(), to_loss_scaling(grad_scale, skip_if_nonfinite),
                                  to_num_threads(num_threads));
             })
        .def_property("steps", &AdamPlan::steps, &AdamPlan::set_steps)
        .def_property("rounding_positions", &AdamPlan::rounding_positions, &AdamPlan::set_rounding_positions)
        .def("set_step_counts", [](AdamPlan& plan, py::handle counts) { plan.set_step_counts(counts.ptr()); })
        .def("__len__", &AdamPlan::size);

    m.def("config", &runtime_config, "The build and runtime configuration as a dict.");
    m.def(
        "codebook_layout",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> map) {
            if (map.ndim() != 1 || (map.shape(0) != 256 && map.shape(0) != 16))
                throw ArgValueError{"map: expected 256 values (8-bit codes) or 16 (4-bit), got " +
                                    std::to_string(map.size())};
            const auto book = checked_codebook(reinterpret_cast<PyArrayObject*>(map.ptr()), "map");
            py::dict d;
            d["buckets"] = book->buckets;  // per sign; 0: the kernels search the map
            d["mantissa_bits"] = book->buckets > 0 ? 23 - book->shift : 0;
            d["table_bytes"] = 2 * book->buckets * static_cast<int>(sizeof book->bucket[0]);
            d["zero_code"] = static_cast<int>(book->zero_code);  // the code nearest 0: NaN/inf and zero blocks
            d["linear"] = book->linear16;  // the 4-bit linear map: codes by arithmetic, not compares
            return d;
        },
        py::arg("map"),
        "How the kernels find the nearest code of an 8-bit map's values: a table of buckets (its size), or a "
        "search (buckets 0); a 16-value (4-bit) map is compared in registers (buckets 0).");
    m.def(
        "pool_stats",
        [] {
            const PoolStats s = pool_stats();
            py::dict d;
            d["parallel_calls"] = s.parallel_calls;
            d["rested_calls"] = s.rested_calls;
            d["caller_chunks"] = s.caller_chunks;
            d["worker_chunks"] = s.worker_chunks;
            return d;
        },
        "What the thread pool has done in this process: calls run with workers, calls the pool kept on the "
        "caller alone (its workers had not paid for themselves lately), and the chunks callers and workers ran.");
    m.def(
        "set_num_threads",
        [](py::handle n) { set_num_threads(n.is_none() ? 0 : to_num_threads(n)); },
        "Threads for later calls; None follows OpenMP (OMP_NUM_THREADS, threadpoolctl).");
    m.def("get_num_threads", &default_num_threads,
          "Threads a call uses when it does not name a count (at most max_threads of them run).");
}
