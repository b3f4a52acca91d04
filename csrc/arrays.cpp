#include "arrays.hpp"

#include "codebook.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace fastadam {

ArrayList::ArrayList(PyObject* obj, const char* name, bool single) : obj_(obj), name_(name), single_(single) {
    if (obj == nullptr) {
        single_ = false;
        size_ = 0;
        return;
    }
    if (single) {
        // An array, or a moment's 8-bit state: a (codes, absmax, map) tuple, which check_moment reads.
        if (PyArray_Check(obj) || (PyTuple_Check(obj) && PyTuple_GET_SIZE(obj) == 3)) return;
        if (!has_dlpack(obj))
            throw ArgTypeError{std::string(name) + ": expected a numpy.ndarray (as params is one), got " +
                               Py_TYPE(obj)->tp_name};
        held_ = as_array(obj, ArgName{name, -1});
        obj_ = held_;
        return;
    }
    if (PyArray_Check(obj) || !(PyList_Check(obj) || PyTuple_Check(obj)))
        throw ArgTypeError{std::string(name) + ": expected a list or tuple of numpy arrays (as params is), got " +
                           Py_TYPE(obj)->tp_name};
    // The real items, not what an overridden __len__ or __getitem__ claims.
    bool own_tuple = false;
    if (PyTuple_Check(obj)) {
        Py_INCREF(obj);
        items_ = obj;
    } else {
        items_ = PyList_AsTuple(obj);
        if (items_ == nullptr) throw PythonErrorSet{};
        own_tuple = true;
    }
    size_ = static_cast<std::size_t>(PyTuple_GET_SIZE(items_));
    try {
        for (std::size_t i = 0; i < size_; ++i) {
            PyObject* item = PyTuple_GET_ITEM(items_, static_cast<Py_ssize_t>(i));
            if (PyArray_Check(item) || !has_dlpack(item)) continue;
            if (!own_tuple) {  // the caller's tuple is not ours to change
                PyObject* copy = PyTuple_GetSlice(items_, 0, PyTuple_GET_SIZE(items_));
                if (copy == nullptr) throw PythonErrorSet{};
                Py_DECREF(items_);
                items_ = copy;
                own_tuple = true;
            }
            PyObject* array = as_array(item, ArgName{name, static_cast<std::ptrdiff_t>(i)});
            PyTuple_SET_ITEM(items_, static_cast<Py_ssize_t>(i), array);
            Py_DECREF(item);
        }
    } catch (...) {
        Py_CLEAR(items_);
        throw;
    }
}

// -- DLPack -------------------------------------------------------------------------------------------------
//
// The structures of the DLPack ABI (dlpack.h, versions 0.x and 1.x), as the
// exporter lays them out in the capsule.

namespace {

struct DLDevice {
    std::int32_t device_type;
    std::int32_t device_id;
};
struct DLDataType {
    std::uint8_t code;
    std::uint8_t bits;
    std::uint16_t lanes;
};
struct DLTensor {
    void* data;
    DLDevice device;
    std::int32_t ndim;
    DLDataType dtype;
    std::int64_t* shape;
    std::int64_t* strides;  // in elements; null: C-contiguous
    std::uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
};
struct DLManagedTensorVersioned {
    std::uint32_t major, minor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensorVersioned*);
    std::uint64_t flags;
    DLTensor dl_tensor;
};
constexpr std::uint64_t kDLReadOnly = 1u << 0;
constexpr std::uint64_t kDLIsCopied = 1u << 1;
enum : std::uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

// Device types whose memory is the host's: CPU, and pinned host memory of CUDA and ROCm.
bool is_host_device(long type) { return type == 1 || type == 3 || type == 11; }

std::string device_text(long type) {
    const char* known = type == 2 ? "CUDA" : type == 4 ? "OpenCL" : type == 7 ? "Vulkan" : type == 8 ? "Metal"
                      : type == 10 ? "ROCm" : type == 13 ? "CUDA managed" : type == 14 ? "oneAPI" : nullptr;
    return "DLPack device type " + std::to_string(type) + (known ? std::string(" (") + known + ")" : "");
}

[[noreturn]] void device_error(const ArgName& name, long type) {
    throw ArgValueError{name.str() + ": the tensor is on " + device_text(type) +
                        ", not the CPU; fastadam updates CPU memory in place (a CPU copy's update would be lost)"};
}

// After a failed call into the exporter: a BufferError, TypeError, ValueError
// or RuntimeError (PyTorch's refusals: "Can't export tensors that require
// gradient", ...) is raised again, of the same type, with the argument's name
// in front; any other exception (KeyboardInterrupt, MemoryError, an
// exporter's own type) propagates unchanged.
[[noreturn]] void exporter_error(const ArgName& name, const char* what) {
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    const bool named = type == PyExc_BufferError || type == PyExc_TypeError || type == PyExc_ValueError ||
                       type == PyExc_RuntimeError;
    if (!named) {
        PyErr_Restore(type, value, trace);
        throw PythonErrorSet{};
    }
    PyErr_NormalizeException(&type, &value, &trace);
    PyObject* text = value != nullptr ? PyObject_Str(value) : nullptr;
    if (text != nullptr)
        PyErr_Format(type, "%s: %s failed: %U", name.str().c_str(), what, text);
    else  // str() of the error failed: that error is raised
        Py_CLEAR(value);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    throw PythonErrorSet{};
}

// The device the exporter names, before anything is exported; -1 if it has no __dlpack_device__.
long dlpack_device(PyObject* obj, const ArgName& name) {
    static PyObject* const method = PyUnicode_InternFromString("__dlpack_device__");
    if (PyObject_HasAttr(reinterpret_cast<PyObject*>(Py_TYPE(obj)), method) != 1) return -1;
    PyObject* device = PyObject_CallMethodNoArgs(obj, method);
    if (device == nullptr) exporter_error(name, "__dlpack_device__()");
    long type = -1;
    if (PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2) type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
    Py_DECREF(device);
    if (type == -1 && PyErr_Occurred()) exporter_error(name, "__dlpack_device__()");
    if (type < 0) throw ArgValueError{name.str() + ": __dlpack_device__() did not return (device_type, device_id)"};
    return type;
}

// obj.__dlpack__(max_version=(1, 0), copy=False): a versioned capsule that
// says whether the memory is read-only, and never a copy.  An exporter that
// predates these keywords raises TypeError; it is asked again without them.
PyObject* export_dlpack(PyObject* obj, const ArgName& name) {
    static PyObject* const method = PyUnicode_InternFromString("__dlpack__");
    static PyObject* const kwargs = Py_BuildValue("{s:(ii),s:O}", "max_version", 1, 0, "copy", Py_False);
    if (kwargs == nullptr) throw PythonErrorSet{};
    PyObject* bound = PyObject_GetAttr(obj, method);
    if (bound == nullptr) exporter_error(name, "__dlpack__");
    PyObject* empty = PyTuple_New(0);
    PyObject* capsule = empty ? PyObject_Call(bound, empty, kwargs) : nullptr;
    if (capsule == nullptr && empty != nullptr && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        capsule = PyObject_CallNoArgs(bound);
    }
    Py_XDECREF(empty);
    Py_DECREF(bound);
    if (capsule == nullptr) exporter_error(name, "__dlpack__()");
    return capsule;
}

PyArray_Descr* bfloat16_descr(const ArgName& name) {
    static PyArray_Descr* descr = nullptr;  // one reference kept for the life of the process
    if (descr == nullptr) {
        PyObject* module = PyImport_ImportModule("ml_dtypes");
        if (module == nullptr) {
            if (!PyErr_ExceptionMatches(PyExc_ImportError)) throw PythonErrorSet{};
            PyErr_Clear();
            throw ArgTypeError{name.str() + ": a bfloat16 tensor is read as an ml_dtypes.bfloat16 array, and "
                                            "ml_dtypes is not installed (pip install ml_dtypes)"};
        }
        PyObject* type = PyObject_GetAttrString(module, "bfloat16");
        Py_DECREF(module);
        PyArray_Descr* d = nullptr;
        const int ok = type != nullptr && PyArray_DescrConverter(type, &d);
        Py_XDECREF(type);
        if (!ok) throw PythonErrorSet{};
        descr = d;
    }
    Py_INCREF(descr);
    return descr;
}

// The NumPy dtype of a DLPack dtype (new reference); the float and integer
// types fastadam reads (integers: row indices), and bfloat16.
PyArray_Descr* descr_of(const DLDataType& t, const ArgName& name) {
    int type = -1;
    if (t.lanes == 1) {
        if (t.code == kDLFloat) type = t.bits == 16 ? NPY_FLOAT16 : t.bits == 32 ? NPY_FLOAT32 : t.bits == 64 ? NPY_FLOAT64 : -1;
        if (t.code == kDLInt) type = t.bits == 8 ? NPY_INT8 : t.bits == 16 ? NPY_INT16 : t.bits == 32 ? NPY_INT32
                                   : t.bits == 64 ? NPY_INT64 : -1;
        if (t.code == kDLUInt) type = t.bits == 8 ? NPY_UINT8 : t.bits == 16 ? NPY_UINT16 : t.bits == 32 ? NPY_UINT32
                                    : t.bits == 64 ? NPY_UINT64 : -1;
        if (t.code == kDLBfloat && t.bits == 16) return bfloat16_descr(name);
    }
    if (type < 0)
        throw ArgTypeError{name.str() + ": DLPack dtype (code " + std::to_string(t.code) + ", " +
                           std::to_string(t.bits) + " bits, " + std::to_string(t.lanes) +
                           " lanes) is not one fastadam reads (float16/32/64, bfloat16, integers)"};
    return PyArray_DescrFromType(type);
}

template <class Managed>
void release_managed(PyObject* owner, const char* owner_name) {
    auto* managed = static_cast<Managed*>(PyCapsule_GetPointer(owner, owner_name));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}
constexpr const char* kOwnerName = "fastadam.dltensor_owner";
constexpr const char* kVersionedOwnerName = "fastadam.dltensor_versioned_owner";
void release_unversioned(PyObject* owner) { release_managed<DLManagedTensor>(owner, kOwnerName); }
void release_versioned(PyObject* owner) { release_managed<DLManagedTensorVersioned>(owner, kVersionedOwnerName); }

}  // namespace

bool has_dlpack(PyObject* obj) {
    static PyObject* const method = PyUnicode_InternFromString("__dlpack__");
    return PyObject_HasAttr(reinterpret_cast<PyObject*>(Py_TYPE(obj)), method) == 1;
}

PyObject* as_array(PyObject* obj, const ArgName& name) {
    if (PyArray_Check(obj) || !has_dlpack(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    const long device = dlpack_device(obj, name);
    if (device >= 0 && !is_host_device(device)) device_error(name, device);

    PyObject* capsule = export_dlpack(obj, name);
    // Until the capsule is renamed "used_...", the exporter's own capsule
    // destructor frees the tensor: every error before that only drops it.
    try {
        const bool versioned = PyCapsule_IsValid(capsule, "dltensor_versioned") != 0;
        if (!versioned && PyCapsule_IsValid(capsule, "dltensor") == 0)
            throw ArgValueError{name.str() + ": __dlpack__() did not return an unused DLPack capsule"};
        void* managed = PyCapsule_GetPointer(capsule, versioned ? "dltensor_versioned" : "dltensor");
        if (managed == nullptr) throw PythonErrorSet{};
        const DLTensor* t = nullptr;
        std::uint64_t flags = 0;
        if (versioned) {
            auto* m = static_cast<DLManagedTensorVersioned*>(managed);
            if (m->major != 1)
                throw ArgValueError{name.str() + ": DLPack " + std::to_string(m->major) + "." +
                                    std::to_string(m->minor) + " capsule; fastadam reads DLPack 1.x"};
            t = &m->dl_tensor;
            flags = m->flags;
        } else {
            t = &static_cast<DLManagedTensor*>(managed)->dl_tensor;
        }
        if (!is_host_device(t->device.device_type)) device_error(name, t->device.device_type);
        if (flags & kDLIsCopied)
            throw ArgValueError{name.str() + ": the exporter made a copy for __dlpack__(copy=False); fastadam "
                                             "updates arrays in place and never works on a copy"};
        if (t->ndim < 0 || t->ndim > NPY_MAXDIMS || (t->ndim > 0 && t->shape == nullptr))
            throw ArgValueError{name.str() + ": malformed DLPack tensor (ndim " + std::to_string(t->ndim) + ")"};
        npy_intp dims[NPY_MAXDIMS], strides[NPY_MAXDIMS];
        npy_intp size = 1;
        for (int d = 0; d < t->ndim; ++d) {
            if (t->shape[d] < 0) throw ArgValueError{name.str() + ": malformed DLPack tensor (negative extent)"};
            dims[d] = static_cast<npy_intp>(t->shape[d]);
            size *= dims[d];
        }
        PyArray_Descr* descr = descr_of(t->dtype, name);
        const npy_intp itemsize = PyDataType_ELSIZE(descr);
        if (t->strides != nullptr)
            for (int d = 0; d < t->ndim; ++d) strides[d] = static_cast<npy_intp>(t->strides[d]) * itemsize;
        char* data = static_cast<char*>(t->data);
        if (data == nullptr && size > 0) {
            Py_DECREF(descr);
            throw ArgValueError{name.str() + ": malformed DLPack tensor (no data)"};
        }
        if (data != nullptr) data += t->byte_offset;
        // An empty tensor may have no data pointer; NumPy then allocates its own (empty) buffer.
        const int array_flags = (flags & kDLReadOnly) ? 0 : NPY_ARRAY_WRITEABLE;
        PyObject* array = PyArray_NewFromDescr(&PyArray_Type, descr, t->ndim, dims,
                                               t->strides != nullptr ? strides : nullptr, data, array_flags, nullptr);
        if (array == nullptr) throw PythonErrorSet{};
        // From here on the tensor is ours to release: the array's base does it.
        PyCapsule_SetName(capsule, versioned ? "used_dltensor_versioned" : "used_dltensor");
        PyObject* owner = PyCapsule_New(managed, versioned ? kVersionedOwnerName : kOwnerName,
                                        versioned ? release_versioned : release_unversioned);
        if (owner == nullptr) {
            Py_DECREF(array);
            if (versioned) {
                auto* m = static_cast<DLManagedTensorVersioned*>(managed);
                if (m->deleter) m->deleter(m);
            } else {
                auto* m = static_cast<DLManagedTensor*>(managed);
                if (m->deleter) m->deleter(m);
            }
            throw PythonErrorSet{};
        }
        if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(array), owner) < 0) {  // owner released
            Py_DECREF(array);
            throw PythonErrorSet{};
        }
        Py_DECREF(capsule);
        return array;
    } catch (...) {
        Py_DECREF(capsule);
        throw;
    }
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

std::string describe_dtype(PyArrayObject* a) {
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

namespace {

// A C-contiguous ndarray of `type` in native byte order, writeable when written.
PyArrayObject* check_plain_array(PyObject* obj, const std::string& name, int type, const char* type_name,
                                 Access access) {
    if (!PyArray_Check(obj))
        throw ArgTypeError{name + ": expected a numpy.ndarray, got " + Py_TYPE(obj)->tp_name};
    auto* a = reinterpret_cast<PyArrayObject*>(obj);
    if (PyArray_TYPE(a) != type || !PyArray_ISNOTSWAPPED(a))
        throw ArgTypeError{name + ": dtype must be " + type_name + ", got " + describe_dtype(a)};
    if (!PyArray_IS_C_CONTIGUOUS(a))
        throw ArgValueError{name + ": must be C-contiguous (fastadam never works on a copy)"};
    if (access == Access::write && !PyArray_ISWRITEABLE(a))
        throw ArgValueError{name + ": array is read-only, but it is updated in place"};
    return a;
}

}  // namespace

std::shared_ptr<const Codebook> checked_codebook(PyArrayObject* map_array, const std::string& name) {
    const auto* map = static_cast<const float*>(PyArray_DATA(map_array));
    const int count = static_cast<int>(PyArray_SIZE(map_array));
    bool zero = false;
    for (int k = 0; k < count; ++k) {
        if (!std::isfinite(map[k]) || (k > 0 && !(map[k - 1] < map[k])))
            throw ArgValueError{name + ": must hold " + std::to_string(count) +
                                " finite values in strictly ascending order (at " + std::to_string(k) + ")"};
        zero = zero || map[k] == 0.0f;
    }
    if (count == 256 && !zero) throw ArgValueError{name + ": must hold 0.0 (the code of a zero moment)"};
    return codebook_for(map, count);
}

namespace {

// 8-bit state (a map of 256 values) or 4-bit state (16 values): the map's
// length says which, so it is checked first (its values last).
CheckedMoment check_block8(PyObject* obj, const ArgName& name, const CheckedArray& param, const ArgName& param_name,
                           Access access) {
    const std::string where = name.str();
    PyObject* const* items = &PyTuple_GET_ITEM(obj, 0);
    CheckedMoment m{};
    m.map = check_plain_array(items[2], where + ".map", NPY_FLOAT32, "float32", Access::read);
    if (PyArray_NDIM(m.map) != 1 || (PyArray_DIM(m.map, 0) != 256 && PyArray_DIM(m.map, 0) != 16))
        throw ArgValueError{where + ".map: expected 256 values (8-bit codes) or 16 (4-bit), got shape " +
                            describe_shape(m.map)};
    const bool four = PyArray_DIM(m.map, 0) == 16;
    if (param.dtype != DType::float32)
        throw ArgTypeError{where + (four ? ": 4-bit" : ": 8-bit") + " state needs a float32 param, and " +
                           param_name.str() + " is " + dtype_name(param.dtype)};
    m.array = check_plain_array(items[0], where + ".codes", NPY_UBYTE, "uint8", access);
    if (!four) {
        check_same_shape(m.array, ArgName{(where + ".codes").c_str(), -1}, param.array, param_name);
    } else if (PyArray_NDIM(m.array) != 1 || PyArray_DIM(m.array, 0) != (param.size + 1) / 2) {
        throw ArgValueError{where + ".codes: expected shape (" + std::to_string((param.size + 1) / 2) +
                            ",) (4-bit codes, two per byte, of the " + std::to_string(param.size) + " elements of " +
                            param_name.str() + "), got shape " + describe_shape(m.array)};
    }
    m.absmax = check_plain_array(items[1], where + ".absmax", NPY_FLOAT32, "float32", access);
    const std::int64_t block = four ? kQuantBlock4 : kQuantBlock;
    const std::int64_t blocks = (param.size + block - 1) / block;
    if (PyArray_NDIM(m.absmax) != 1 || PyArray_DIM(m.absmax, 0) != blocks)
        throw ArgValueError{where + ".absmax: expected " + std::to_string(blocks) + " values (one per block of " +
                            std::to_string(block) + " elements of " + param_name.str() + "), got shape " +
                            describe_shape(m.absmax)};
    m.codebook = checked_codebook(m.map, where + ".map");
    m.stream = {PyArray_DATA(m.array), four ? Storage::block4 : Storage::block8,
                static_cast<float*>(PyArray_DATA(m.absmax)), m.codebook.get()};
    return m;
}

}  // namespace

CheckedMoment check_moment(PyObject* obj, const ArgName& name, const CheckedArray& param, const ArgName& param_name) {
    if (PyTuple_Check(obj) && PyTuple_GET_SIZE(obj) == 3) return check_block8(obj, name, param, param_name, Access::write);
    CheckedMoment m{};
    Storage storage = Storage::same;
    if (PyArray_Check(obj) && storage_of(reinterpret_cast<PyArrayObject*>(obj), storage)) {
        if (storage != Storage::bfloat16)
            throw ArgTypeError{name.str() + ": a moment may be float32, float64 or bfloat16, not float16 (whose "
                                            "range, 6e-8 to 65504, cannot hold a squared gradient)"};
        if (param.dtype != DType::float32)
            throw ArgTypeError{name.str() + ": a bfloat16 moment needs a float32 param, and " + param_name.str() +
                               " is " + dtype_name(param.dtype)};
        m.array = check_16bit_array(obj, name, Access::write, storage);
        check_same_shape(m.array, name, param.array, param_name);
    } else {
        const CheckedArray c = check_float_array(obj, name, Access::write);
        check_same_layout(c, name, param, param_name);
        m.array = c.array;
    }
    m.stream.data = PyArray_DATA(m.array);
    m.stream.storage = storage;
    return m;
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

CheckedMoment check_quantized_state(PyObject* obj, const ArgName& name, const CheckedArray& values,
                                    const ArgName& values_name, Access access) {
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 3)
        throw ArgTypeError{name.str() + ": expected a fastadam.QuantizedState (codes, absmax, map), got " +
                           Py_TYPE(obj)->tp_name};
    return check_block8(obj, name, values, values_name, access);
}

}  // namespace fastadam
