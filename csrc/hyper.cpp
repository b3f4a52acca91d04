#include "hyper.hpp"

#include <cmath>
#include <new>
#include <string>

#include "arrays.hpp"
#include "fpmode.hpp"

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

}  // namespace

std::int64_t check_step(PyObject* step_obj) {
    const std::int64_t step = to_int64(step_obj, "step");
    if (step < 1)
        throw ArgValueError{"step must be >= 1 (the number of this step, 1 on the first), got " +
                            std::to_string(step)};
    return step;
}

AdamHyper hyper_from_group(PyObject* group) {
    if (!PyMapping_Check(group) || PyUnicode_Check(group))
        throw ArgTypeError{std::string("expected a param-group dict, got ") + Py_TYPE(group)->tp_name};
    constexpr int count = static_cast<int>(sizeof kHyperparameterNames / sizeof kHyperparameterNames[0]);
    // Every value is held before any is converted: a value's __float__ may
    // change the group, or drop the last other reference to a value.
    struct Held {
        PyObject* values[count + 3] = {};
        ~Held() {
            for (PyObject* o : values) Py_XDECREF(o);
        }
    } held;
    // The names as interned str, made once: a step reads every group's values, and building the keys from C
    // strings each time cost more than the rest of a one-tensor step's Python layer.
    static PyObject* const* const keys = [] {
        static PyObject* made[count];
        for (int k = 0; k < count; ++k) made[k] = PyUnicode_InternFromString(kHyperparameterNames[k]);
        return made;
    }();
    PyObject** v = held.values;
    const bool plain_dict = PyDict_CheckExact(group);  // a subclass may define __missing__ or __getitem__
    for (int k = 0; k < count; ++k) {
        if (keys[k] == nullptr) throw std::bad_alloc{};  // (the names could not be made)
        if (plain_dict) {
            v[k] = PyDict_GetItemWithError(group, keys[k]);  // borrowed
            if (v[k] != nullptr) {
                Py_INCREF(v[k]);
                continue;
            }
            if (PyErr_Occurred()) throw PythonErrorSet{};  // a key's __eq__ raised
        } else {
            v[k] = PyObject_GetItem(group, keys[k]);
            if (v[k] != nullptr) continue;
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) throw PythonErrorSet{};
            PyErr_Clear();
        }
        if (k < kFirstOptionalHyperparameter)
            throw ArgValueError{std::string("the group has no '") + kHyperparameterNames[k] + "'"};
        // The defaults of the optional ones: no weight decay, and every flag off.
        v[k] = k == kFirstOptionalHyperparameter ? PyFloat_FromDouble(0.0) : (Py_INCREF(Py_False), Py_False);
        if (v[k] == nullptr) throw PythonErrorSet{};
    }
    split_betas(v[1], v[count], v[count + 1]);
    return check_hyper(v[0], v[count], v[count + 1], v[2], v[3], v[4], v[5], v[6], v[7]);
}

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

std::uint64_t splitmix64(std::uint64_t x) {
    std::uint64_t z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

}  // namespace

RoundingSeed check_rounding(PyObject* stochastic_rounding, PyObject* rounding_seed) {
    RoundingSeed r;
    r.on = to_bool(stochastic_rounding, "stochastic_rounding");
    const std::int64_t seed = to_int64(rounding_seed, "rounding_seed");
    if (seed < 0) throw ArgValueError{"rounding_seed must be >= 0, got " + std::to_string(seed)};
    r.seed = static_cast<std::uint64_t>(seed);
    return r;
}

StochasticRounding rounding_for(const RoundingSeed& seed, std::int64_t step, std::uint64_t index) {
    StochasticRounding r;
    if (!seed.on) return r;
    const std::uint64_t key =
        splitmix64(splitmix64(splitmix64(seed.seed) ^ static_cast<std::uint64_t>(step)) ^ index);
    r.on = true;
    r.key_low = static_cast<std::uint32_t>(key);
    r.key_high = static_cast<std::uint32_t>(key >> 32);
    return r;
}

void set_grad_scale(AdamConstantsPair& constants, double grad_scale) {
    const double inv = grad_scale > 0.0 ? 1.0 / grad_scale : 1.0;
    constants.f32.inv_grad_scale = static_cast<float>(inv);
    constants.f64.inv_grad_scale = inv;
}

}  // namespace fastadam
