// Checking NumPy arguments before anything is written.
//
// Every check reports the offending argument by name and list index
// ("exp_avgs[3]: ...") and throws before the kernel runs, so a failing call
// leaves every array exactly as it was.
#pragma once

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL fastadam_ARRAY_API
#include <Python.h>
#include <numpy/arrayobject.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernel_api.hpp"

namespace fastadam {

// Raised as TypeError / ValueError by the module's exception translator.
struct ArgTypeError {
    std::string message;
};
struct ArgValueError {
    std::string message;
};
// Raised as RuntimeError: a misuse of an object's state (an optimizer stepped
// from two threads at once, or re-entered from a callback).
struct UsageError {
    std::string message;
};
// The Python error indicator is already set and must reach the caller as it
// is: a KeyboardInterrupt raised inside a number's __float__ must not turn
// into a TypeError.
struct PythonErrorSet {};

// "params" or "params[3]"; built only when an error is reported.
struct ArgName {
    const char* name;
    std::ptrdiff_t index;  // -1: a single array, not a list item
    std::string str() const {
        return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
    }
};

// Whether `obj` offers the DLPack protocol (__dlpack__): a tensor of another
// library, which fastadam reads and updates where it lies (see as_array).
bool has_dlpack(PyObject* obj);

// `obj` as an ndarray, as a new reference: an ndarray is returned as it is;
// an object with __dlpack__ (a PyTorch CPU tensor, bfloat16 included) becomes
// an ndarray over the very same memory -- never a copy, which the step would
// update in vain -- that keeps the exporter's buffer alive.  The ndarray is
// read-only when the exporter says the memory is.  A tensor on another device
// than the CPU, or of a dtype NumPy cannot hold, is an error naming `name`.
// Any other object is returned as it is, for the caller's checks to name.
PyObject* as_array(PyObject* obj, const ArgName& name);

// A list argument, or a single array standing for a list of one.  It holds
// its own tuple of the items (the caller's tuple, or a snapshot of the
// caller's list): whatever the caller's list does meanwhile -- emptied by
// another thread while the GIL is released, or by a callback -- every item
// stays alive and in place until the call is over.  Items with __dlpack__
// are replaced, in that tuple, by ndarrays over their memory (as_array).
// A null `obj` is an absent list of no items.
class ArrayList {
   public:
    ArrayList(PyObject* obj, const char* name, bool single);
    ArrayList(const ArrayList&) = delete;
    ArrayList& operator=(const ArrayList&) = delete;
    ~ArrayList() {
        Py_XDECREF(items_);
        Py_XDECREF(held_);
    }
    std::size_t size() const { return size_; }
    PyObject* operator[](std::size_t i) const {
        return single_ ? obj_ : PyTuple_GET_ITEM(items_, static_cast<Py_ssize_t>(i));
    }
    ArgName name(std::size_t i) const { return {name_, single_ ? -1 : static_cast<std::ptrdiff_t>(i)}; }

   private:
    PyObject* obj_;
    PyObject* items_ = nullptr;  // a tuple (strong reference)
    PyObject* held_ = nullptr;   // a single item converted from __dlpack__ (strong reference)
    std::size_t size_ = 1;
    const char* name_;
    bool single_;
};

// Whether a params-like argument is one array (rather than a sequence): an
// ndarray, or a tensor with __dlpack__.
inline bool is_single_array(PyObject* obj) {
    return PyArray_Check(obj) != 0 || (!PyList_Check(obj) && !PyTuple_Check(obj) && has_dlpack(obj));
}

// A strong reference released at the end of a scope.
struct OwnedRef {
    PyObject* obj;
    explicit OwnedRef(PyObject* o) : obj(o) {}
    OwnedRef(const OwnedRef&) = delete;
    OwnedRef& operator=(const OwnedRef&) = delete;
    ~OwnedRef() { Py_XDECREF(obj); }
    PyObject* get() const { return obj; }
};

enum class Access { read, write };

// The checked array: data pointer, element count and dtype.
struct CheckedArray {
    PyArrayObject* array;
    void* data;
    std::int64_t size;
    DType dtype;
};

// betas, a list or tuple of two (any subclass, whatever its __len__ says),
// as two strong references.
void split_betas(PyObject* obj, PyObject*& beta1, PyObject*& beta2);

// An ndarray of float32/float64 in native byte order, C-contiguous, and
// writeable when `access` is write.
CheckedArray check_float_array(PyObject* obj, const ArgName& name, Access access);

// `other` has the dtype and shape of `param` (whose name is `param_name`).
void check_same_layout(const CheckedArray& other, const ArgName& name, const CheckedArray& param,
                       const ArgName& param_name);
void check_same_shape(PyArrayObject* other, const ArgName& name, PyArrayObject* param, const ArgName& param_name);

// A float16 or bfloat16 (ml_dtypes) array, C-contiguous, writeable when
// `access` is write; its storage is returned in `storage`.
PyArrayObject* check_16bit_array(PyObject* obj, const ArgName& name, Access access, Storage& storage);

// A gradient for `param`: the param's dtype, or float16 / bfloat16 when the
// param is float32 (mixed precision); returns its storage.
Storage check_grad(PyObject* obj, const ArgName& name, const CheckedArray& param, const ArgName& param_name,
                   const void*& data, PyArrayObject*& array);

// A checked moment: its stream (for the kernel) and its arrays.
struct CheckedMoment {
    Stream stream;
    PyArrayObject* array;   // the values, or the codes of block8 state
    PyArrayObject* absmax;  // block8: one float32 per block (written), else null
    PyArrayObject* map;     // block8: the codes' 256 values (read), else null
    std::shared_ptr<const Codebook> codebook;  // block8: the map's (stream.codebook points into it)
};

// The code book of an 8-bit state's map (a float32 array of 256 values,
// already checked for dtype and shape): its values must be finite, strictly
// ascending and hold 0.0, or ArgValueError names `name`.
std::shared_ptr<const Codebook> checked_codebook(PyArrayObject* map, const std::string& name);

// A moment of `param` (exp_avg, exp_avg_sq or max_exp_avg_sq), written in
// place: an array of the param's dtype, or beside a float32 param a
// bfloat16 array, or 8-bit block-wise state -- a (codes, absmax, map)
// tuple (fastadam.QuantizedState): uint8 codes of the param's shape, a
// float32 absmax per block of kQuantBlock elements, and a float32 map of
// 256 finite, strictly ascending values holding 0.
CheckedMoment check_moment(PyObject* obj, const ArgName& name, const CheckedArray& param, const ArgName& param_name);

// 8-bit block-wise state (a (codes, absmax, map) tuple, as check_moment takes
// it) for float32 `values` of its shape; codes and absmax writeable when
// `access` is write.
CheckedMoment check_quantized_state(PyObject* obj, const ArgName& name, const CheckedArray& values,
                                    const ArgName& values_name, Access access);

// Detects arrays that share memory where one of them is written.  Intervals
// are collected, then check() sorts and sweeps them in O(n log n).
class OverlapCheck {
   public:
    void clear() { spans_.clear(); }
    void add(const CheckedArray& a, const ArgName& name, Access access);
    void add(PyArrayObject* a, const ArgName& name, Access access);  // any dtype, its whole extent
    void check();  // throws ArgValueError naming both arrays

   private:
    struct Span {
        std::uintptr_t begin, end;
        ArgName name;
        Access access;
    };
    std::vector<Span> spans_;
};

// A Python number as a finite double, or an error naming the argument.  A
// TypeError of the conversion becomes the named one; any other exception the
// object raises (KeyboardInterrupt, MemoryError, ...) propagates unchanged.
double to_double(PyObject* obj, const char* name);
bool to_bool(PyObject* obj, const char* name);
std::int64_t to_int64(PyObject* obj, const char* name);

const char* dtype_name(DType d);
// An array's dtype for a message: "float32", "bfloat16", or a swapped one's scalar type and byte order.
std::string describe_dtype(PyArrayObject* a);

}  // namespace fastadam
