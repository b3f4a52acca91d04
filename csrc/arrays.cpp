#include "arrays.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace fastadam {

ArrayList::ArrayList(PyObject* obj, const char* name, bool single) : obj_(obj), name_(name), single_(single) {
    if (single) {
        if (!PyArray_Check(obj))
            throw ArgTypeError{std::string(name) + ": expected a numpy.ndarray (as params is one), got " +
                               Py_TYPE(obj)->tp_name};
        return;
    }
    if (PyArray_Check(obj) || !(PyList_Check(obj) || PyTuple_Check(obj)))
        throw ArgTypeError{std::string(name) + ": expected a list or tuple of numpy arrays (as params is), got " +
                           Py_TYPE(obj)->tp_name};
    // The real items, not what an overridden __len__ or __getitem__ claims.
    if (PyTuple_Check(obj)) {
        Py_INCREF(obj);
        items_ = obj;
    } else {
        items_ = PyList_AsTuple(obj);
        if (items_ == nullptr) throw PythonErrorSet{};
    }
    size_ = static_cast<std::size_t>(PyTuple_GET_SIZE(items_));
}

void split_betas(PyObject* obj, PyObject*& beta1, PyObject*& beta2) {
    const bool is_list = PyList_Check(obj), is_tuple = PyTuple_Check(obj);
    const Py_ssize_t size = is_list ? PyList_GET_SIZE(obj) : is_tuple ? PyTuple_GET_SIZE(obj) : -1;
    if (size != 2)
        throw ArgTypeError{"betas: expected a pair (beta1, beta2), got " +
                           (size < 0 ? std::string(Py_TYPE(obj)->tp_name)
                                     : "a " + std::string(Py_TYPE(obj)->tp_name) + " of " + std::to_string(size))};
    PyObject* const* items = is_list ? &PyList_GET_ITEM(obj, 0) : &PyTuple_GET_ITEM(obj, 0);
    beta1 = items[0];
    beta2 = items[1];
    Py_INCREF(beta1);
    Py_INCREF(beta2);
}

const char* dtype_name(DType d) { return d == DType::float32 ? "float32" : "float64"; }

static std::string describe_dtype(PyArrayObject* a) {
    if (!PyArray_ISNOTSWAPPED(a)) {
        // str() of a swapped user dtype is just its kind (">V2" for bfloat16): name the scalar type.
        const char* type_name = PyArray_DESCR(a)->typeobj->tp_name;
        const char* dot = std::strrchr(type_name, '.');
        return std::string(dot ? dot + 1 : type_name) + " (non-native byte order)";
    }
    PyObject* s = PyObject_Str(reinterpret_cast<PyObject*>(PyArray_DESCR(a)));
    std::string out = s ? PyUnicode_AsUTF8(s) : "?";
    Py_XDECREF(s);
    if (s == nullptr) PyErr_Clear();
    return out;
}

CheckedArray check_float_array(PyObject* obj, const ArgName& name, Access access) {
    if (!PyArray_Check(obj))
        throw ArgTypeError{name.str() + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name};
    auto* a = reinterpret_cast<PyArrayObject*>(obj);
    const int type = PyArray_TYPE(a);
    if ((type != NPY_FLOAT32 && type != NPY_FLOAT64) || !PyArray_ISNOTSWAPPED(a))
        throw ArgTypeError{name.str() + ": dtype must be float32 or float64, got " + describe_dtype(a)};
    if (!PyArray_IS_C_CONTIGUOUS(a))
        throw ArgValueError{name.str() +
                            (access == Access::write
                                 ? ": must be C-contiguous (fastadam updates arrays in place and never works on a "
                                   "copy; pass np.ascontiguousarray(x) and keep that array)"
                                 : ": must be C-contiguous (fastadam reads it where it is, without a copy; pass "
                                   "np.ascontiguousarray(x))")};
    if (access == Access::write && !PyArray_ISWRITEABLE(a))
        throw ArgValueError{name.str() + ": array is read-only, but it is updated in place"};
    return {a, PyArray_DATA(a), static_cast<std::int64_t>(PyArray_SIZE(a)),
            type == NPY_FLOAT32 ? DType::float32 : DType::float64};
}

static std::string describe_shape(PyArrayObject* a) {
    const int nd = PyArray_NDIM(a);
    std::string s = "(";
    for (int d = 0; d < nd; ++d) s += (d > 0 ? ", " : "") + std::to_string(PyArray_DIM(a, d));
    return s + (nd == 1 ? ",)" : ")");
}

void check_same_shape(PyArrayObject* other, const ArgName& name, PyArrayObject* param, const ArgName& param_name) {
    const int nd = PyArray_NDIM(param);
    const bool same_shape =
        PyArray_NDIM(other) == nd && std::equal(PyArray_DIMS(param), PyArray_DIMS(param) + nd, PyArray_DIMS(other));
    if (!same_shape)
        throw ArgValueError{name.str() + ": shape " + describe_shape(other) + " does not match " + param_name.str() +
                            "'s shape " + describe_shape(param)};
}

void check_same_layout(const CheckedArray& other, const ArgName& name, const CheckedArray& param,
                       const ArgName& param_name) {
    if (other.dtype != param.dtype)
        throw ArgTypeError{name.str() + ": dtype " + dtype_name(other.dtype) + " does not match " +
                           param_name.str() + "'s dtype " + dtype_name(param.dtype)};
    check_same_shape(other.array, name, param.array, param_name);
}

// float16, or ml_dtypes' bfloat16 (a user dtype, recognised by its scalar type).
static bool storage_of(PyArrayObject* a, Storage& storage) {
    if (PyArray_TYPE(a) == NPY_FLOAT16 && PyArray_ISNOTSWAPPED(a)) {
        storage = Storage::float16;
        return true;
    }
    const char* type_name = PyArray_DESCR(a)->typeobj->tp_name;
    const char* dot = std::strrchr(type_name, '.');
    if (PyArray_ITEMSIZE(a) == 2 && PyArray_ISNOTSWAPPED(a) && std::strcmp(dot ? dot + 1 : type_name, "bfloat16") == 0) {
        storage = Storage::bfloat16;
        return true;
    }
    return false;
}

PyArrayObject* check_16bit_array(PyObject* obj, const ArgName& name, Access access, Storage& storage) {
    if (!PyArray_Check(obj))
        throw ArgTypeError{name.str() + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name};
    auto* a = reinterpret_cast<PyArrayObject*>(obj);
    if (!storage_of(a, storage))
        throw ArgTypeError{name.str() + ": dtype must be float16 or bfloat16, got " + describe_dtype(a)};
    if (!PyArray_IS_C_CONTIGUOUS(a))
        throw ArgValueError{name.str() + ": must be C-contiguous (fastadam never works on a copy)"};
    if (access == Access::write && !PyArray_ISWRITEABLE(a))
        throw ArgValueError{name.str() + ": array is read-only, but it is updated in place"};
    return a;
}

Storage check_grad(PyObject* obj, const ArgName& name, const CheckedArray& param, const ArgName& param_name,
                   const void*& data, PyArrayObject*& array) {
    Storage storage = Storage::same;
    if (PyArray_Check(obj) && param.dtype == DType::float32 &&
        storage_of(reinterpret_cast<PyArrayObject*>(obj), storage)) {
        array = check_16bit_array(obj, name, Access::read, storage);
        check_same_shape(array, name, param.array, param_name);
    } else {
        const CheckedArray g = check_float_array(obj, name, Access::read);
        check_same_layout(g, name, param, param_name);
        array = g.array;
    }
    data = PyArray_DATA(array);
    return storage;
}

void OverlapCheck::add(const CheckedArray& a, const ArgName& name, Access access) {
    if (a.size == 0) return;
    const auto begin = reinterpret_cast<std::uintptr_t>(a.data);
    const auto bytes = static_cast<std::uintptr_t>(a.size) * (a.dtype == DType::float32 ? 4u : 8u);
    spans_.push_back({begin, begin + bytes, name, access});
}

void OverlapCheck::add(PyArrayObject* a, const ArgName& name, Access access) {
    if (PyArray_SIZE(a) == 0) return;
    // The bytes between the lowest and the highest element, whatever the strides.
    npy_intp lo = 0, hi = 0;
    for (int d = 0; d < PyArray_NDIM(a); ++d) {
        const npy_intp extent = (PyArray_DIM(a, d) - 1) * PyArray_STRIDE(a, d);
        (extent < 0 ? lo : hi) += extent;
    }
    const auto base = reinterpret_cast<std::uintptr_t>(PyArray_DATA(a));
    spans_.push_back({base + lo, base + hi + static_cast<std::uintptr_t>(PyArray_ITEMSIZE(a)), name, access});
}

void OverlapCheck::check() {
    if (spans_.size() < 2) return;
    std::sort(spans_.begin(), spans_.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
    // Sorted by start, a span overlaps an earlier one exactly when it starts
    // before that one's end; track the furthest-reaching written and any span.
    const Span* furthest_any = &spans_[0];
    const Span* furthest_written = spans_[0].access == Access::write ? &spans_[0] : nullptr;
    for (std::size_t i = 1; i < spans_.size(); ++i) {
        const Span& s = spans_[i];
        const Span* clash = nullptr;
        if (furthest_written != nullptr && s.begin < furthest_written->end)
            clash = furthest_written;
        else if (s.access == Access::write && s.begin < furthest_any->end)
            clash = furthest_any;
        if (clash != nullptr)
            throw ArgValueError{s.name.str() + " shares memory with " + clash->name.str() +
                                "; every array written by the step must be a separate buffer"};
        if (s.end > furthest_any->end) furthest_any = &s;
        if (s.access == Access::write && (furthest_written == nullptr || s.end > furthest_written->end))
            furthest_written = &s;
    }
}

namespace {

// After a failed conversion: a TypeError is replaced by `replacement`; any
// other exception stays set and propagates.
template <class Error>
[[noreturn]] void rethrow_conversion_error(Error replacement) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        throw replacement;
    }
    throw PythonErrorSet{};
}

}  // namespace

double to_double(PyObject* obj, const char* name) {
    if (PyBool_Check(obj) || PyComplex_Check(obj) || !PyNumber_Check(obj))
        throw ArgTypeError{std::string(name) + ": expected a real number, got " + Py_TYPE(obj)->tp_name};
    const double x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred())
        rethrow_conversion_error(
            ArgTypeError{std::string(name) + ": expected a real number, got " + Py_TYPE(obj)->tp_name});
    if (!std::isfinite(x)) throw ArgValueError{std::string(name) + " must be finite, got " + std::to_string(x)};
    return x;
}

bool to_bool(PyObject* obj, const char* name) {
    if (obj == Py_True) return true;
    if (obj == Py_False) return false;
    if (!(PyLong_Check(obj) || PyArray_IsScalar(obj, Bool)))
        throw ArgTypeError{std::string(name) + ": expected a bool, got " + Py_TYPE(obj)->tp_name};
    const int truth = PyObject_IsTrue(obj);
    if (truth < 0)
        rethrow_conversion_error(ArgTypeError{std::string(name) + ": expected a bool, got " + Py_TYPE(obj)->tp_name});
    return truth != 0;
}

std::int64_t to_int64(PyObject* obj, const char* name) {
    if (PyBool_Check(obj) || PyFloat_Check(obj) || PyArray_IsScalar(obj, Floating))
        throw ArgTypeError{std::string(name) + ": expected an integer, got " + Py_TYPE(obj)->tp_name};
    PyObject* index = PyNumber_Index(obj);
    if (index == nullptr)
        rethrow_conversion_error(ArgTypeError{std::string(name) + ": expected an integer, got " + Py_TYPE(obj)->tp_name});
    const long long v = PyLong_AsLongLong(index);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw PythonErrorSet{};
        PyErr_Clear();
        throw ArgValueError{std::string(name) + ": integer out of range (a 64-bit signed integer is expected)"};
    }
    return v;
}

}  // namespace fastadam
