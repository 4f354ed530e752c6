/*
 * _core.c -- the CPython binding of the lmdecode C core, and the only file
 * that includes Python.h and NumPy.
 *
 * Each exported function follows one shape: parse arguments, convert arrays
 * with PyArray_FROM_OTF (which copies only when dtype or layout demand it, so
 * the caller's arrays are never written), check ndim/shape/dtype with
 * messages that name the argument, allocate outputs, release the GIL around
 * the core call only, map the core's status to an exception carrying the
 * core's message, and leave through a single `fail:` label.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lmdecode_ARRAY_API
#include <numpy/arrayobject.h>

#include "lmdecode.h"
#include "rng.h"

/* ------------------------------------------------------------------ */
/* status -> exception                                                  */
/* ------------------------------------------------------------------ */

static PyObject *raise_status(lmd_status st, const lmd_error *err) {
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case LMD_ERR_NOMEM: type = PyExc_MemoryError; break;
    case LMD_ERR_INVALID_ARG: type = PyExc_ValueError; break;
    case LMD_ERR_FORMAT: type = PyExc_ValueError; break;
    case LMD_ERR_CACHE_FULL: type = PyExc_ValueError; break;
    case LMD_ERR_UNSUPPORTED: type = PyExc_NotImplementedError; break;
    case LMD_ERR_IO: type = PyExc_OSError; break;
    default: break;
    }
    PyErr_SetString(type, err->msg[0] ? err->msg : "lmdecode core error");
    return NULL;
}

/* ------------------------------------------------------------------ */
/* build facts and threads                                              */
/* ------------------------------------------------------------------ */

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return Py_BuildValue("{s:O,s:s,s:i,s:s,s:i}", "openmp",
                         lmd_built_with_openmp() ? Py_True : Py_False, "vector_extensions",
                         lmd_vector_extensions(), "num_threads", lmd_get_num_threads(),
                         "core_version", LMD_VERSION_STRING, "vector_bytes", lmd_vector_bytes());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "n (=%ld) must be in [0, 4096] (0 restores the default)", n);
        return NULL;
    }
    lmd_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(lmd_get_num_threads());
}

/* rng_uniform(seed, stream, step, index) -> float: the documented generator, for reproduction. */
static PyObject *py_rng_uniform(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long seed, stream, step;
    int index = 0;
    if (!PyArg_ParseTuple(args, "KKK|i", &seed, &stream, &step, &index)) return NULL;
    if (index != 0 && index != 1) {
        PyErr_Format(PyExc_ValueError, "index (=%d) must be 0 or 1", index);
        return NULL;
    }
    return PyFloat_FromDouble(lmd_rng_uniform(seed, stream, step, index));
}

/* ------------------------------------------------------------------ */
/* module                                                               */
/* ------------------------------------------------------------------ */

static PyMethodDef core_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "Build facts: OpenMP, vector extensions, threads."},
    {"set_num_threads", py_set_num_threads, METH_O, "Threads for parallel loops (0 = default)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Threads for parallel loops."},
    {"rng_uniform", py_rng_uniform, METH_VARARGS, "Philox uniform of (seed, stream, step, index)."},
    /* sampling bindings */
    /* model bindings */
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "lmdecode._core", "C core of lmdecode.", -1, core_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) return NULL;
    /* model types are registered here */
    return m;
}
