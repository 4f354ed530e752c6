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
#include "sampling.h"
#include "search.h"
#include "generate.h"
#include "decode.h"
#include "model.h"
#include "contrastive.h"
#include "speculative.h"
#include "pythread.h"

#include <time.h>

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
    case LMD_ERR_STOPPED: type = PyExc_KeyboardInterrupt; break; /* stop_on_signal sets its own */
    case LMD_ERR_INTERNAL: type = PyExc_RuntimeError; break;
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
    const char *bf16_kernel = lmd_bf16_uses_amx() ? "amx" : lmd_bf16_rounds_inputs() ? "avx512_bf16" : "f32";
    return Py_BuildValue("{s:O,s:s,s:i,s:s,s:i,s:s}", "openmp",
                         lmd_built_with_openmp() ? Py_True : Py_False, "vector_extensions",
                         lmd_vector_extensions(), "num_threads", lmd_get_num_threads(),
                         "core_version", LMD_VERSION_STRING, "vector_bytes", lmd_vector_bytes(),
                         "bf16_kernel", bf16_kernel);
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
/* sampling bindings                                                    */
/* ------------------------------------------------------------------ */

/* Sampler scratch is reused across calls: a free list of sets, one sampler
 * per thread each, grown when a call needs a larger vocabulary or more
 * threads. The list is only touched with the GIL held; a set is owned by one
 * call while the GIL is released. */
typedef struct sampler_set {
    struct sampler_set *next;
    lmd_sampler **samplers;
    int n;
    int32_t capacity;
} sampler_set;

static sampler_set *free_sampler_sets = NULL;

static void sampler_set_free(sampler_set *set) {
    if (set == NULL) return;
    for (int i = 0; i < set->n; i++) lmd_sampler_free(set->samplers[i]);
    free(set->samplers);
    free(set);
}

static sampler_set *sampler_set_acquire(int n_threads, int32_t vocab) {
    sampler_set *set = free_sampler_sets;
    if (set != NULL) free_sampler_sets = set->next;
    if (set != NULL && set->n >= n_threads && set->capacity >= vocab) return set;
    int n = set != NULL && set->n > n_threads ? set->n : n_threads;
    int32_t capacity = set != NULL && set->capacity > vocab ? set->capacity : vocab;
    sampler_set_free(set);
    set = calloc(1, sizeof *set);
    if (set == NULL) return (sampler_set *)PyErr_NoMemory();
    set->samplers = calloc((size_t)n, sizeof *set->samplers);
    if (set->samplers == NULL) {
        free(set);
        return (sampler_set *)PyErr_NoMemory();
    }
    set->n = n;
    set->capacity = capacity;
    for (int i = 0; i < n; i++) {
        lmd_error err;
        lmd_status st = lmd_sampler_init(&set->samplers[i], capacity, &err);
        if (st != LMD_OK) {
            sampler_set_free(set);
            return (sampler_set *)raise_status(st, &err);
        }
    }
    return set;
}

static void sampler_set_release(sampler_set *set) {
    set->next = free_sampler_sets;
    free_sampler_sets = set;
}

/* Converts obj (or None) to a C-contiguous array of the given type and ndim;
 * *out stays NULL for None. Never writes to the caller's array. */
static int as_array(PyObject *obj, int type, int ndim, const char *name, PyArrayObject **out) {
    *out = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyTypeNum_ISINTEGER(type)) {
        /* integers only: a list of floats would be truncated into ids silently (1.7 -> 1), and
         * an array of them fails NumPy's cast without naming the argument */
        PyArrayObject *probe = (PyArrayObject *)PyArray_FROM_O(obj);
        if (probe == NULL) return -1;
        const int integral = PyArray_SIZE(probe) == 0 || PyArray_ISINTEGER(probe);
        if (!integral)
            PyErr_Format(PyExc_TypeError, "%s must be integers, not %R", name, (PyObject *)PyArray_DESCR(probe));
        Py_DECREF(probe);
        if (!integral) return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(obj, type, NPY_ARRAY_IN_ARRAY);
    if (arr == NULL) return -1;
    if (PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), got %d", name, ndim,
                     PyArray_NDIM(arr));
        Py_DECREF(arr);
        return -1;
    }
    *out = arr;
    return 0;
}

/* A CSR list of per-row token ids: values (nnz,) and offsets (n_rows + 1,). */
static int check_offsets(PyArrayObject *offsets, PyArrayObject *values, npy_intp n_rows,
                         const char *name) {
    if (offsets == NULL) return 0;
    if (PyArray_DIM(offsets, 0) != n_rows + 1) {
        PyErr_Format(PyExc_ValueError, "%s offsets must have %zd entries, got %zd", name,
                     (Py_ssize_t)(n_rows + 1), (Py_ssize_t)PyArray_DIM(offsets, 0));
        return -1;
    }
    const int64_t *off = PyArray_DATA(offsets);
    npy_intp nnz = values ? PyArray_DIM(values, 0) : 0;
    if (off[0] != 0) {
        PyErr_Format(PyExc_ValueError, "%s offsets must start at 0", name);
        return -1;
    }
    for (npy_intp r = 0; r < n_rows; r++)
        if (off[r + 1] < off[r] || off[r + 1] > nnz || off[r + 1] - off[r] > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s offsets are not a valid partition of %zd values",
                         name, (Py_ssize_t)nnz);
            return -1;
        }
    return 0;
}

#define N_PARAM_COLUMNS 12

/* Out-of-range values saturate (NaN becomes INT32_MIN), so validation names a bad value. */
static int32_t saturate_int32(double x) {
    if (!(x >= (double)INT32_MIN)) return INT32_MIN;
    if (x >= (double)INT32_MAX) return INT32_MAX;
    return (int32_t)x;
}

static void params_from_row(const double *row, lmd_sampling_params *p) {
    p->temperature = row[0];
    p->top_k = saturate_int32(row[1]);
    p->top_p = row[2];
    p->min_p = row[3];
    p->typical_p = row[4];
    p->epsilon = row[5];
    p->eta = row[6];
    p->repetition_penalty = row[7];
    p->frequency_penalty = row[8];
    p->presence_penalty = row[9];
    p->no_repeat_ngram_size = saturate_int32(row[10]);
    p->min_tokens_to_keep = saturate_int32(row[11]);
}

/* params (R, 12) float64 -> R lmd_sampling_params (PyMem); R must be 1 or n_rows. */
static lmd_sampling_params *params_from_table(PyArrayObject *table, npy_intp n_rows,
                                              npy_intp *n_params) {
    *n_params = PyArray_DIM(table, 0);
    if (PyArray_DIM(table, 1) != N_PARAM_COLUMNS || (*n_params != 1 && *n_params != n_rows)) {
        PyErr_Format(PyExc_ValueError, "params must have shape (1, %d) or (%zd, %d)",
                     N_PARAM_COLUMNS, (Py_ssize_t)n_rows, N_PARAM_COLUMNS);
        return NULL;
    }
    lmd_sampling_params *out = PyMem_Malloc((size_t)*n_params * sizeof *out);
    if (out == NULL) return (lmd_sampling_params *)PyErr_NoMemory();
    for (npy_intp r = 0; r < *n_params; r++)
        params_from_row((const double *)PyArray_GETPTR2(table, r, 0), &out[r]);
    return out;
}

/* The per-row token lists of the sampling chain, as the Python layer hands them over. */
enum {
    ROW_CONTEXT, ROW_CONTEXT_OFFSETS, ROW_PROMPT_LEN, ROW_BIAS_IDS, ROW_BIAS_VALUES,
    ROW_BIAS_OFFSETS, ROW_ALLOWED_IDS, ROW_ALLOWED_OFFSETS, ROW_ALLOWED_ROWS, ROW_BANNED_IDS,
    ROW_BANNED_OFFSETS, N_ROW_ARRAYS
};
static const char *const row_array_names[N_ROW_ARRAYS] = {
    "context", "context_offsets", "prompt_len", "bias_ids", "bias_values", "bias_offsets",
    "allowed_ids", "allowed_offsets", "allowed_rows", "banned_ids", "banned_offsets"};
static const int row_array_types[N_ROW_ARRAYS] = {
    NPY_INT32, NPY_INT64, NPY_INT32, NPY_INT32, NPY_FLOAT32, NPY_INT64,
    NPY_INT32, NPY_INT64, NPY_BOOL,  NPY_INT32, NPY_INT64};

static void release_row_arrays(PyArrayObject **arrays) {
    for (int i = 0; i < N_ROW_ARRAYS; i++) Py_CLEAR(arrays[i]);
}

/* Converts and checks the row-input objects (None allowed) for n_rows rows. */
static int convert_row_arrays(PyObject *const *objects, npy_intp n_rows, PyArrayObject **arrays) {
    for (int i = 0; i < N_ROW_ARRAYS; i++)
        if (as_array(objects[i], row_array_types[i], 1, row_array_names[i], &arrays[i])) return -1;
    PyArrayObject **a = arrays;
    if ((a[ROW_CONTEXT] && !a[ROW_CONTEXT_OFFSETS]) ||
        (a[ROW_BIAS_IDS] && (!a[ROW_BIAS_VALUES] || !a[ROW_BIAS_OFFSETS])) ||
        (a[ROW_ALLOWED_IDS] && (!a[ROW_ALLOWED_OFFSETS] || !a[ROW_ALLOWED_ROWS])) ||
        (a[ROW_BANNED_IDS] && !a[ROW_BANNED_OFFSETS])) {
        PyErr_SetString(PyExc_ValueError, "token-id lists need their offsets");
        return -1;
    }
    if (check_offsets(a[ROW_CONTEXT_OFFSETS], a[ROW_CONTEXT], n_rows, "context") ||
        check_offsets(a[ROW_BIAS_OFFSETS], a[ROW_BIAS_IDS], n_rows, "bias") ||
        check_offsets(a[ROW_ALLOWED_OFFSETS], a[ROW_ALLOWED_IDS], n_rows, "allowed") ||
        check_offsets(a[ROW_BANNED_OFFSETS], a[ROW_BANNED_IDS], n_rows, "banned"))
        return -1;
    if (a[ROW_BIAS_IDS] && PyArray_DIM(a[ROW_BIAS_VALUES], 0) != PyArray_DIM(a[ROW_BIAS_IDS], 0)) {
        PyErr_SetString(PyExc_ValueError, "bias_values must match bias_ids in length");
        return -1;
    }
    if ((a[ROW_PROMPT_LEN] && PyArray_DIM(a[ROW_PROMPT_LEN], 0) != n_rows) ||
        (a[ROW_ALLOWED_ROWS] && PyArray_DIM(a[ROW_ALLOWED_ROWS], 0) != n_rows)) {
        PyErr_Format(PyExc_ValueError, "prompt_len and allowed_rows must have %zd entries",
                     (Py_ssize_t)n_rows);
        return -1;
    }
    return 0;
}

/* n_rows lmd_row_inputs pointing into the arrays (PyMem), or NULL with *none set
 * when no array is present (or on error, with an exception). */
static lmd_row_inputs *build_row_inputs(PyArrayObject *const *a, npy_intp n_rows, int *none) {
    *none = 1;
    for (int i = 0; i < N_ROW_ARRAYS; i++)
        if (a[i]) *none = 0;
    if (*none) return NULL;
    lmd_row_inputs *rows = PyMem_Calloc((size_t)(n_rows > 0 ? n_rows : 1), sizeof *rows);
    if (rows == NULL) return (lmd_row_inputs *)PyErr_NoMemory();
    for (npy_intp r = 0; r < n_rows; r++) {
        lmd_row_inputs *in = &rows[r];
        in->n_allowed = -1;
        if (a[ROW_CONTEXT]) {
            const int64_t *off = PyArray_DATA(a[ROW_CONTEXT_OFFSETS]);
            in->context = (const int32_t *)PyArray_DATA(a[ROW_CONTEXT]) + off[r];
            in->context_len = (int32_t)(off[r + 1] - off[r]);
        }
        if (a[ROW_PROMPT_LEN]) in->prompt_len = ((const int32_t *)PyArray_DATA(a[ROW_PROMPT_LEN]))[r];
        if (a[ROW_BIAS_IDS]) {
            const int64_t *off = PyArray_DATA(a[ROW_BIAS_OFFSETS]);
            in->bias_ids = (const int32_t *)PyArray_DATA(a[ROW_BIAS_IDS]) + off[r];
            in->bias_values = (const float *)PyArray_DATA(a[ROW_BIAS_VALUES]) + off[r];
            in->n_bias = (int32_t)(off[r + 1] - off[r]);
        }
        if (a[ROW_ALLOWED_IDS] && ((const npy_bool *)PyArray_DATA(a[ROW_ALLOWED_ROWS]))[r]) {
            const int64_t *off = PyArray_DATA(a[ROW_ALLOWED_OFFSETS]);
            in->allowed = (const int32_t *)PyArray_DATA(a[ROW_ALLOWED_IDS]) + off[r];
            in->n_allowed = (int32_t)(off[r + 1] - off[r]);
        }
        if (a[ROW_BANNED_IDS]) {
            const int64_t *off = PyArray_DATA(a[ROW_BANNED_OFFSETS]);
            in->banned = (const int32_t *)PyArray_DATA(a[ROW_BANNED_IDS]) + off[r];
            in->n_banned = (int32_t)(off[r + 1] - off[r]);
        }
    }
    return rows;
}

/* Raises the core's error, naming the row (or sequence) it came from. */
static PyObject *raise_row_status(lmd_status st, const lmd_error *err, int32_t row,
                                  const char *what) {
    if (row < 0) return raise_status(st, err);
    lmd_error prefixed;
    snprintf(prefixed.msg, sizeof prefixed.msg, "%s %d: %.200s", what, (int)row, err->msg);
    return raise_status(st, &prefixed);
}

/*
 * sample_rows(logits (B, V) float32, params (R, 12) float64 with R in {1, B}, *,
 *             context, context_offsets, prompt_len, bias_ids, bias_values, bias_offsets,
 *             allowed_ids, allowed_offsets, allowed_rows, banned_ids, banned_offsets,
 *             seeds (B,) uint64 or None, stream, step, want_logprobs, want_tokens,
 *             streams (B,) uint64 or None, steps (B,) uint64 or None)
 *   -> (logprobs (B, V) float32 or None, tokens (B,) int64 or None,
 *       token_logprobs (B,) float32 or None)
 * Column order of params is lmd_sampling_params' field order. The Python layer
 * (sampling.py) builds these arguments; this function re-checks their shapes.
 */
static PyObject *py_sample_rows(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"logits", "params", "context", "context_offsets", "prompt_len",
                             "bias_ids", "bias_values", "bias_offsets", "allowed_ids",
                             "allowed_offsets", "allowed_rows", "banned_ids", "banned_offsets",
                             "seeds", "stream", "step", "want_logprobs", "want_tokens", "streams",
                             "steps", NULL};
    PyObject *logits_obj, *params_obj, *seeds_obj = Py_None, *streams_obj = Py_None,
             *steps_obj = Py_None;
    PyObject *row_objects[N_ROW_ARRAYS];
    for (int i = 0; i < N_ROW_ARRAYS; i++) row_objects[i] = Py_None;
    unsigned long long stream = 0, step = 0;
    int want_logprobs = 0, want_tokens = 1;
    PyArrayObject *logits = NULL, *params = NULL, *seeds = NULL, *streams = NULL, *steps = NULL;
    PyArrayObject *row_arrays[N_ROW_ARRAYS] = {NULL};
    PyArrayObject *out_logprobs = NULL, *out_tokens = NULL, *out_token_logprobs = NULL;
    int32_t *tokens32 = NULL;
    double *coins = NULL;
    lmd_sampling_params *row_params = NULL;
    lmd_row_inputs *row_inputs = NULL;
    sampler_set *set = NULL;
    PyObject *result = NULL;

    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OO|$OOOOOOOOOOOOKKppOO", kwlist, &logits_obj, &params_obj,
            &row_objects[ROW_CONTEXT], &row_objects[ROW_CONTEXT_OFFSETS],
            &row_objects[ROW_PROMPT_LEN], &row_objects[ROW_BIAS_IDS], &row_objects[ROW_BIAS_VALUES],
            &row_objects[ROW_BIAS_OFFSETS], &row_objects[ROW_ALLOWED_IDS],
            &row_objects[ROW_ALLOWED_OFFSETS], &row_objects[ROW_ALLOWED_ROWS],
            &row_objects[ROW_BANNED_IDS], &row_objects[ROW_BANNED_OFFSETS], &seeds_obj, &stream,
            &step, &want_logprobs, &want_tokens, &streams_obj, &steps_obj))
        return NULL;
    if (as_array(logits_obj, NPY_FLOAT32, 2, "logits", &logits) ||
        as_array(params_obj, NPY_FLOAT64, 2, "params", &params) ||
        as_array(seeds_obj, NPY_UINT64, 1, "seeds", &seeds) ||
        as_array(streams_obj, NPY_UINT64, 1, "streams", &streams) ||
        as_array(steps_obj, NPY_UINT64, 1, "steps", &steps))
        goto fail;
    if (logits == NULL || params == NULL) {
        PyErr_SetString(PyExc_TypeError, "logits and params must not be None");
        goto fail;
    }
    npy_intp n_rows = PyArray_DIM(logits, 0), vocab = PyArray_DIM(logits, 1), n_params;
    if (vocab < 1 || vocab > INT32_MAX || n_rows > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "logits must have between 1 and %d columns, got %zd",
                     INT32_MAX, (Py_ssize_t)vocab);
        goto fail;
    }
    if ((seeds && PyArray_DIM(seeds, 0) != n_rows) || (streams && PyArray_DIM(streams, 0) != n_rows) ||
        (steps && PyArray_DIM(steps, 0) != n_rows)) {
        PyErr_Format(PyExc_ValueError, "seeds, streams and steps must have %zd entries",
                     (Py_ssize_t)n_rows);
        goto fail;
    }
    if (convert_row_arrays(row_objects, n_rows, row_arrays)) goto fail;
    if ((row_params = params_from_table(params, n_rows, &n_params)) == NULL) goto fail;
    int no_inputs;
    row_inputs = build_row_inputs(row_arrays, n_rows, &no_inputs);
    if (row_inputs == NULL && !no_inputs) goto fail;

    if (want_logprobs) {
        npy_intp dims[2] = {n_rows, vocab};
        out_logprobs = (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_FLOAT32, 0);
        if (out_logprobs == NULL) goto fail;
    }
    if (want_tokens) {
        npy_intp dims[1] = {n_rows};
        out_tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
        out_token_logprobs = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_FLOAT32, 0);
        tokens32 = PyMem_Malloc((size_t)(n_rows > 0 ? n_rows : 1) * sizeof *tokens32);
        if (out_tokens == NULL || out_token_logprobs == NULL) goto fail;
        if (tokens32 == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    if (seeds) {
        coins = PyMem_Malloc((size_t)(n_rows > 0 ? n_rows : 1) * sizeof *coins);
        if (coins == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        const uint64_t *seed = PyArray_DATA(seeds);
        const uint64_t *row_stream = streams ? PyArray_DATA(streams) : NULL;
        const uint64_t *row_step = steps ? PyArray_DATA(steps) : NULL;
        for (npy_intp r = 0; r < n_rows; r++)
            coins[r] = lmd_rng_uniform(seed[r], row_stream ? row_stream[r] : stream,
                                       row_step ? row_step[r] : step, 0);
    }
    set = sampler_set_acquire(lmd_get_num_threads(), (int32_t)vocab);
    if (set == NULL) goto fail;

    lmd_error err = {{0}};
    int32_t failed_row = -1;
    lmd_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_sample_rows(set->samplers, set->n, row_params, (int32_t)n_params, row_inputs,
                         PyArray_DATA(logits), (int64_t)vocab, (int32_t)n_rows, (int32_t)vocab, coins,
                         out_logprobs ? PyArray_DATA(out_logprobs) : NULL,
                         want_tokens ? tokens32 : NULL,
                         want_tokens ? PyArray_DATA(out_token_logprobs) : NULL, &failed_row, &err);
    Py_END_ALLOW_THREADS;
    sampler_set_release(set);
    set = NULL;
    if (st != LMD_OK) {
        raise_row_status(st, &err, failed_row, "row");
        goto fail;
    }
    if (want_tokens) {
        int64_t *tokens64 = PyArray_DATA(out_tokens);
        for (npy_intp r = 0; r < n_rows; r++) tokens64[r] = tokens32[r];
    }
    result = Py_BuildValue("(OOO)", out_logprobs ? (PyObject *)out_logprobs : Py_None,
                           out_tokens ? (PyObject *)out_tokens : Py_None,
                           out_token_logprobs ? (PyObject *)out_token_logprobs : Py_None);
fail:
    if (set) sampler_set_release(set);
    PyMem_Free(tokens32);
    PyMem_Free(coins);
    PyMem_Free(row_params);
    PyMem_Free(row_inputs);
    Py_XDECREF(out_logprobs);
    Py_XDECREF(out_tokens);
    Py_XDECREF(out_token_logprobs);
    Py_XDECREF(logits);
    Py_XDECREF(params);
    Py_XDECREF(seeds);
    Py_XDECREF(streams);
    Py_XDECREF(steps);
    release_row_arrays(row_arrays);
    return result;
}

/*
 * target_logprobs(logits (T, V) float32, targets (T,) int32) -> ((T,) float32, (T,) bool):
 * log softmax(logits[t])[targets[t]], as sample_rows' logprobs hold it at temperature 1
 * (lmd_target_logprobs), without a (T, V) result, and whether each target has its row's
 * largest logit. ValueError names the failing row.
 */
static PyObject *py_target_logprobs(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *logits_obj, *targets_obj, *result = NULL;
    PyArrayObject *logits = NULL, *targets = NULL, *out = NULL, *is_max = NULL;
    if (!PyArg_ParseTuple(args, "OO", &logits_obj, &targets_obj)) return NULL;
    if (as_array(logits_obj, NPY_FLOAT32, 2, "logits", &logits) ||
        as_array(targets_obj, NPY_INT32, 1, "targets", &targets))
        goto fail;
    if (logits == NULL || targets == NULL) {
        PyErr_SetString(PyExc_TypeError, "logits and targets must not be None");
        goto fail;
    }
    const npy_intp n_rows = PyArray_DIM(logits, 0), vocab = PyArray_DIM(logits, 1);
    if (vocab < 1 || vocab > INT32_MAX || n_rows > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "logits must have between 1 and %d columns, got %zd", INT32_MAX,
                     (Py_ssize_t)vocab);
        goto fail;
    }
    if (PyArray_DIM(targets, 0) != n_rows) {
        PyErr_Format(PyExc_ValueError, "targets must have %zd entries (one per row of logits), got %zd",
                     (Py_ssize_t)n_rows, (Py_ssize_t)PyArray_DIM(targets, 0));
        goto fail;
    }
    npy_intp dims[1] = {n_rows};
    if ((out = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_FLOAT32, 0)) == NULL ||
        (is_max = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_BOOL, 0)) == NULL)
        goto fail;
    lmd_error err = {{0}};
    int32_t failed_row = -1;
    lmd_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_target_logprobs(PyArray_DATA(logits), (int64_t)vocab, (int32_t)n_rows, (int32_t)vocab,
                             PyArray_DATA(targets), PyArray_DATA(out), PyArray_DATA(is_max), &failed_row, &err);
    Py_END_ALLOW_THREADS;
    if (st != LMD_OK) {
        raise_row_status(st, &err, failed_row, "row");
        goto fail;
    }
    result = Py_BuildValue("(OO)", out, is_max);
fail:
    Py_XDECREF(out);
    Py_XDECREF(is_max);
    Py_XDECREF(logits);
    Py_XDECREF(targets);
    return result;
}

/* validate_params(params (R, 12) float64) -> None; ValueError naming the first bad field. */
static PyObject *py_validate_params(PyObject *self, PyObject *arg) {
    (void)self;
    PyArrayObject *params = NULL;
    if (as_array(arg, NPY_FLOAT64, 2, "params", &params)) return NULL;
    if (params == NULL || PyArray_DIM(params, 1) != N_PARAM_COLUMNS) {
        PyErr_Format(PyExc_ValueError, "params must have %d columns", N_PARAM_COLUMNS);
        Py_XDECREF(params);
        return NULL;
    }
    for (npy_intp r = 0; r < PyArray_DIM(params, 0); r++) {
        lmd_sampling_params p;
        lmd_error err;
        params_from_row((const double *)PyArray_GETPTR2(params, r, 0), &p);
        lmd_status st = lmd_sampling_params_validate(&p, &err);
        if (st != LMD_OK) {
            if (PyArray_DIM(params, 0) > 1) {
                lmd_error prefixed;
                snprintf(prefixed.msg, sizeof prefixed.msg, "row %d: %.200s", (int)r, err.msg);
                err = prefixed;
            }
            Py_DECREF(params);
            return raise_status(st, &err);
        }
    }
    Py_DECREF(params);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* beam search binding                                                  */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    lmd_beam_search *search;
    int32_t num_beams, vocab;
    PyThread_type_lock lock; /* keeps two Python threads off one search */
} BeamSearchObject;

static void BeamSearch_dealloc(BeamSearchObject *self) {
    lmd_beam_search_free(self->search);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* BeamSearch(num_beams, vocab, max_new_tokens, num_return_sequences, length_penalty,
 *            early_stopping (0 heuristic, 1 true, 2 never), eos_ids (sequence of int), *,
 *            dynamic_allowed=False (True: set_allowed may constrain the next step),
 *            prompt=None (int32 (n,): the context of the two processors after it),
 *            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0) */
static int BeamSearch_init(BeamSearchObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"num_beams", "vocab", "max_new_tokens", "num_return_sequences",
                             "length_penalty", "early_stopping", "eos_ids", "dynamic_allowed",
                             "prompt", "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", NULL};
    int num_beams, vocab, max_new_tokens, num_return, early_stopping, dynamic_allowed = 0;
    int no_repeat_ngram_size = 0, min_new_tokens = 0;
    double length_penalty, repetition_penalty = 1.0;
    PyObject *eos_obj, *prompt_obj = NULL;
    PyArrayObject *eos = NULL, *prompt = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiiidiO|$pOdii", kwlist, &num_beams, &vocab,
                                     &max_new_tokens, &num_return, &length_penalty,
                                     &early_stopping, &eos_obj, &dynamic_allowed, &prompt_obj,
                                     &repetition_penalty, &no_repeat_ngram_size, &min_new_tokens))
        return -1;
    if (as_array(eos_obj, NPY_INT32, 1, "eos_ids", &eos) || as_array(prompt_obj, NPY_INT32, 1, "prompt", &prompt)) {
        Py_XDECREF(eos);
        return -1;
    }
    lmd_beam_config config = {num_beams, vocab, max_new_tokens, num_return, length_penalty,
                              (lmd_early_stopping)early_stopping,
                              eos ? (const int32_t *)PyArray_DATA(eos) : NULL,
                              eos ? (int32_t)PyArray_DIM(eos, 0) : 0, dynamic_allowed,
                              repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                              prompt ? (const int32_t *)PyArray_DATA(prompt) : NULL,
                              prompt ? (int32_t)PyArray_DIM(prompt, 0) : 0};
    lmd_error err;
    lmd_beam_search *search = NULL;
    lmd_status st = lmd_beam_search_init(&search, &config, &err);
    Py_XDECREF(eos);
    Py_XDECREF(prompt);
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    lmd_beam_search_free(self->search);
    self->search = search;
    self->num_beams = num_beams;
    self->vocab = vocab;
    if (self->lock == NULL && (self->lock = PyThread_allocate_lock()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* step(logits (num_beams, vocab) float32) -> (parents int64 (num_beams,), tokens int64 (num_beams,)) */
static PyObject *BeamSearch_step(BeamSearchObject *self, PyObject *arg) {
    PyArrayObject *logits = NULL, *parents = NULL, *tokens = NULL;
    int32_t *parents32 = NULL, *tokens32 = NULL;
    PyObject *result = NULL;
    if (self->search == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "BeamSearch is not initialized");
        return NULL;
    }
    if (as_array(arg, NPY_FLOAT32, 2, "logits", &logits)) return NULL;
    if (logits == NULL || PyArray_DIM(logits, 0) != self->num_beams ||
        PyArray_DIM(logits, 1) != self->vocab) {
        PyErr_Format(PyExc_ValueError, "logits must have shape (%d, %d)", (int)self->num_beams,
                     (int)self->vocab);
        goto fail;
    }
    npy_intp dims[1] = {self->num_beams};
    parents = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    parents32 = PyMem_Malloc((size_t)self->num_beams * sizeof(int32_t));
    tokens32 = PyMem_Malloc((size_t)self->num_beams * sizeof(int32_t));
    if (parents == NULL || tokens == NULL) goto fail;
    if (parents32 == NULL || tokens32 == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    lmd_error err;
    lmd_status st;
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "this BeamSearch is in use by another thread");
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_beam_search_step(self->search, PyArray_DATA(logits), parents32, tokens32, &err);
    Py_END_ALLOW_THREADS;
    PyThread_release_lock(self->lock);
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto fail;
    }
    for (int32_t j = 0; j < self->num_beams; j++) {
        ((int64_t *)PyArray_DATA(parents))[j] = parents32[j];
        ((int64_t *)PyArray_DATA(tokens))[j] = tokens32[j];
    }
    result = Py_BuildValue("(OO)", parents, tokens);
fail:
    PyMem_Free(parents32);
    PyMem_Free(tokens32);
    Py_XDECREF(logits);
    Py_XDECREF(parents);
    Py_XDECREF(tokens);
    return result;
}

/* hypotheses() -> list of (tokens int64, token_logprobs float32, score, logprob), best first */
static PyObject *BeamSearch_hypotheses(BeamSearchObject *self, PyObject *noargs) {
    (void)noargs;
    if (self->search == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "BeamSearch is not initialized");
        return NULL;
    }
    int32_t n = lmd_beam_search_n_hypotheses(self->search);
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (int32_t rank = 0; rank < n; rank++) {
        int32_t length;
        float score, logprob;
        lmd_error err;
        lmd_beam_search_hypothesis(self->search, rank, NULL, NULL, &length, &score, &logprob, &err);
        npy_intp dims[1] = {length};
        PyArrayObject *tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
        PyArrayObject *lps = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_FLOAT32, 0);
        int32_t *tokens32 = PyMem_Malloc((size_t)(length > 0 ? length : 1) * sizeof(int32_t));
        PyObject *item = NULL;
        if (tokens && lps && tokens32) {
            lmd_beam_search_hypothesis(self->search, rank, tokens32, PyArray_DATA(lps), NULL, NULL,
                                       NULL, &err);
            for (int32_t i = 0; i < length; i++) ((int64_t *)PyArray_DATA(tokens))[i] = tokens32[i];
            item = Py_BuildValue("(OOdd)", tokens, lps, (double)score, (double)logprob);
        } else if (tokens32 == NULL) {
            PyErr_NoMemory();
        }
        PyMem_Free(tokens32);
        Py_XDECREF(tokens);
        Py_XDECREF(lps);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* An allowed-token list argument (Generator.set_allowed, BeamSearch.set_allowed): None gives
 * *ids NULL and *n_ids -1, else an int32 1-D array of at most INT32_MAX ids. 0, or -1 with an
 * exception. */
static int allowed_ids_arg(PyObject *obj, PyArrayObject **ids, int32_t *n_ids) {
    if (as_array(obj, NPY_INT32, 1, "allowed token ids", ids)) return -1;
    if (*ids != NULL && PyArray_DIM(*ids, 0) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many allowed tokens");
        Py_CLEAR(*ids);
        return -1;
    }
    *n_ids = *ids != NULL ? (int32_t)PyArray_DIM(*ids, 0) : -1;
    return 0;
}

/* Sets beam's allowed tokens for the next step from ids (None or int32-convertible 1-D);
 * the caller holds the search's lock. 0, or -1 with an exception. */
static int beam_set_allowed(lmd_beam_search *search, long beam, PyObject *ids_obj) {
    PyArrayObject *ids = NULL;
    int32_t n_ids;
    if (allowed_ids_arg(ids_obj, &ids, &n_ids)) return -1;
    lmd_error err;
    lmd_status st = lmd_beam_search_set_allowed(search, (int32_t)beam, ids ? PyArray_DATA(ids) : NULL, n_ids, &err);
    Py_XDECREF(ids);
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    return 0;
}

/* set_allowed(beam, ids int32 (m,) or None): the only tokens running beam `beam` may take at
 * the next step (None: any); needs BeamSearch(..., dynamic_allowed=True) */
static PyObject *BeamSearch_set_allowed(BeamSearchObject *self, PyObject *args) {
    long beam;
    PyObject *ids_obj;
    if (!PyArg_ParseTuple(args, "lO", &beam, &ids_obj)) return NULL;
    if (self->search == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "BeamSearch is not initialized");
        return NULL;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "this BeamSearch is in use by another thread");
        return NULL;
    }
    int failed = beam_set_allowed(self->search, beam, ids_obj);
    PyThread_release_lock(self->lock);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyObject *BeamSearch_get_done(BeamSearchObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->search == NULL || lmd_beam_search_done(self->search));
}

static PyObject *BeamSearch_get_length(BeamSearchObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->search ? lmd_beam_search_length(self->search) : 0);
}

static PyMethodDef BeamSearch_methods[] = {
    {"step", (PyCFunction)BeamSearch_step, METH_O, "Advance by one token given the beams' logits."},
    {"hypotheses", (PyCFunction)BeamSearch_hypotheses, METH_NOARGS, "Finished hypotheses, best first."},
    {"set_allowed", (PyCFunction)BeamSearch_set_allowed, METH_VARARGS,
     "set_allowed(beam, ids or None): the only tokens the beam may take at the next step."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef BeamSearch_getset[] = {
    {"done", (getter)BeamSearch_get_done, NULL, "True once the search has ended.", NULL},
    {"length", (getter)BeamSearch_get_length, NULL, "Tokens generated by the running beams.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BeamSearchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.BeamSearch",
    .tp_basicsize = sizeof(BeamSearchObject),
    .tp_dealloc = (destructor)BeamSearch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Beam search state machine (transformers semantics); see search.h.",
    .tp_methods = BeamSearch_methods,
    .tp_getset = BeamSearch_getset,
    .tp_init = (initproc)BeamSearch_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ */
/* generator binding                                                    */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    lmd_generator *gen;
    int32_t vocab, n_seqs, n_top;
    PyThread_type_lock lock; /* keeps two Python threads off one generator */
} GeneratorObject;

static void Generator_dealloc(GeneratorObject *self) {
    lmd_generator_free(self->gen);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * Generator(vocab, params (R, 12), seed, prompts int32, prompt_offsets int64 (n + 1,), *,
 *           max_new_tokens, min_new_tokens=0, stop_ids=None, stop_bytes=None,
 *           stop_offsets=None, token_bytes=None, token_offsets=None, n_top_logprobs=0,
 *           bias_ids..., allowed..., banned... (as sample_rows, one row per sequence),
 *           dynamic_allowed=False (True: set_allowed may replace a sequence's allowed list),
 *           strip_space_bos=-1 (a BOS id: in a sequence whose prompt is it and tokens without
 *           text, the first new piece with text loses its leading space))
 */
static int Generator_init(GeneratorObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"vocab", "params", "seed", "prompts", "prompt_offsets",
                             "max_new_tokens", "min_new_tokens", "stop_ids", "stop_bytes",
                             "stop_offsets", "token_bytes", "token_offsets", "n_top_logprobs",
                             "bias_ids", "bias_values", "bias_offsets", "allowed_ids",
                             "allowed_offsets", "allowed_rows", "banned_ids", "banned_offsets",
                             "dynamic_allowed", "strip_space_bos", NULL};
    int vocab, max_new = 0, min_new = 0, n_top = 0, dynamic_allowed = 0, strip_space_bos = -1;
    unsigned long long seed;
    PyObject *params_obj, *prompts_obj, *prompt_off_obj, *stop_ids_obj = Py_None,
             *stop_bytes_obj = Py_None, *stop_off_obj = Py_None, *token_bytes_obj = Py_None,
             *token_off_obj = Py_None;
    PyObject *row_objects[N_ROW_ARRAYS];
    for (int i = 0; i < N_ROW_ARRAYS; i++) row_objects[i] = Py_None;
    PyArrayObject *params = NULL, *prompts = NULL, *prompt_off = NULL, *stop_ids = NULL,
                  *stop_bytes = NULL, *stop_off = NULL, *token_bytes = NULL, *token_off = NULL;
    PyArrayObject *row_arrays[N_ROW_ARRAYS] = {NULL};
    lmd_sampling_params *row_params = NULL;
    lmd_row_inputs *constraints = NULL;
    int status = -1;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "iOKOO|$iiOOOOOiOOOOOOOOpi", kwlist, &vocab, &params_obj, &seed,
            &prompts_obj, &prompt_off_obj, &max_new, &min_new, &stop_ids_obj, &stop_bytes_obj,
            &stop_off_obj, &token_bytes_obj, &token_off_obj, &n_top, &row_objects[ROW_BIAS_IDS],
            &row_objects[ROW_BIAS_VALUES], &row_objects[ROW_BIAS_OFFSETS],
            &row_objects[ROW_ALLOWED_IDS], &row_objects[ROW_ALLOWED_OFFSETS],
            &row_objects[ROW_ALLOWED_ROWS], &row_objects[ROW_BANNED_IDS],
            &row_objects[ROW_BANNED_OFFSETS], &dynamic_allowed, &strip_space_bos))
        return -1;
    if (as_array(params_obj, NPY_FLOAT64, 2, "params", &params) ||
        as_array(prompts_obj, NPY_INT32, 1, "prompts", &prompts) ||
        as_array(prompt_off_obj, NPY_INT64, 1, "prompt_offsets", &prompt_off) ||
        as_array(stop_ids_obj, NPY_INT32, 1, "stop_ids", &stop_ids) ||
        as_array(stop_bytes_obj, NPY_UINT8, 1, "stop_bytes", &stop_bytes) ||
        as_array(stop_off_obj, NPY_INT64, 1, "stop_offsets", &stop_off) ||
        as_array(token_bytes_obj, NPY_UINT8, 1, "token_bytes", &token_bytes) ||
        as_array(token_off_obj, NPY_INT64, 1, "token_offsets", &token_off))
        goto done;
    if (params == NULL || prompts == NULL || prompt_off == NULL || PyArray_DIM(prompt_off, 0) < 2) {
        PyErr_SetString(PyExc_ValueError, "params, prompts and prompt_offsets are required");
        goto done;
    }
    npy_intp n_seqs = PyArray_DIM(prompt_off, 0) - 1, n_params;
    if (check_offsets(prompt_off, prompts, n_seqs, "prompt") ||
        check_offsets(stop_off, stop_bytes, stop_off ? PyArray_DIM(stop_off, 0) - 1 : 0, "stop") ||
        check_offsets(token_off, token_bytes, token_off ? PyArray_DIM(token_off, 0) - 1 : 0, "token"))
        goto done;
    if (token_off && PyArray_DIM(token_off, 0) != (npy_intp)vocab + 1) {
        PyErr_Format(PyExc_ValueError, "token_offsets must have vocab + 1 (=%d) entries", vocab + 1);
        goto done;
    }
    if (convert_row_arrays(row_objects, n_seqs, row_arrays)) goto done;
    if ((row_params = params_from_table(params, n_seqs, &n_params)) == NULL) goto done;
    int no_constraints;
    constraints = build_row_inputs(row_arrays, n_seqs, &no_constraints);
    if (constraints == NULL && !no_constraints) goto done;
    lmd_generate_config config = {
        .n_seqs = (int32_t)n_seqs, .vocab = vocab, .max_new_tokens = max_new,
        .min_new_tokens = min_new, .params = row_params, .n_params = (int32_t)n_params,
        .seed = seed, .prompts = PyArray_DATA(prompts), .prompt_offsets = PyArray_DATA(prompt_off),
        .constraints = constraints,
        .stop_ids = stop_ids ? PyArray_DATA(stop_ids) : NULL,
        .n_stop_ids = stop_ids ? (int32_t)PyArray_DIM(stop_ids, 0) : 0,
        .stop_strings = stop_bytes ? PyArray_DATA(stop_bytes) : NULL,
        .stop_offsets = stop_off ? PyArray_DATA(stop_off) : NULL,
        .n_stop_strings = stop_off ? (int32_t)PyArray_DIM(stop_off, 0) - 1 : 0,
        .token_bytes = token_bytes ? PyArray_DATA(token_bytes) : NULL,
        .token_offsets = token_off ? PyArray_DATA(token_off) : NULL,
        .n_top_logprobs = n_top, .dynamic_allowed = dynamic_allowed,
        .strip_space_after_bos = strip_space_bos >= 0, .bos_id = strip_space_bos};
    lmd_error err;
    lmd_generator *gen = NULL;
    lmd_status st = lmd_generator_init(&gen, &config, &err);
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto done;
    }
    lmd_generator_free(self->gen);
    self->gen = gen;
    self->vocab = vocab;
    self->n_seqs = (int32_t)n_seqs;
    self->n_top = n_top;
    if (self->lock == NULL && (self->lock = PyThread_allocate_lock()) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    status = 0;
done:
    PyMem_Free(row_params);
    PyMem_Free(constraints);
    Py_XDECREF(params);
    Py_XDECREF(prompts);
    Py_XDECREF(prompt_off);
    Py_XDECREF(stop_ids);
    Py_XDECREF(stop_bytes);
    Py_XDECREF(stop_off);
    Py_XDECREF(token_bytes);
    Py_XDECREF(token_off);
    release_row_arrays(row_arrays);
    return status;
}

static int generator_ready(GeneratorObject *self) {
    if (self->gen == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Generator is not initialized");
        return 0;
    }
    return 1;
}

/* running() -> int64 array of the sequences that still need logits, ascending */
static PyObject *Generator_running(GeneratorObject *self, PyObject *noargs) {
    (void)noargs;
    if (!generator_ready(self)) return NULL;
    npy_intp dims[1] = {lmd_generator_running(self->gen, NULL)};
    PyArrayObject *out = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    int32_t *ids = PyMem_Malloc((size_t)(self->n_seqs) * sizeof *ids);
    if (out == NULL || ids == NULL) {
        Py_XDECREF(out);
        PyMem_Free(ids);
        return out == NULL ? NULL : PyErr_NoMemory();
    }
    lmd_generator_running(self->gen, ids);
    for (npy_intp i = 0; i < dims[0]; i++) ((int64_t *)PyArray_DATA(out))[i] = ids[i];
    PyMem_Free(ids);
    return (PyObject *)out;
}

/* step(logits (n_running, vocab) float32) -> tokens int64 (n_running,) */
/* step(logits (R, V), scores=None) -> tokens int64 (R,): draws from scores when given (else
 * from logits); the reported log-probs are always those of logits */
static PyObject *Generator_step(GeneratorObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"logits", "scores", NULL};
    PyObject *logits_obj, *scores_obj = Py_None;
    PyArrayObject *logits = NULL, *scores = NULL, *tokens = NULL;
    int32_t *tokens32 = NULL;
    sampler_set *set = NULL;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", kwlist, &logits_obj, &scores_obj)) return NULL;
    if (!generator_ready(self)) return NULL;
    int32_t running = lmd_generator_running(self->gen, NULL);
    if (as_array(logits_obj, NPY_FLOAT32, 2, "logits", &logits)) return NULL;
    if (logits == NULL || PyArray_DIM(logits, 0) != running || PyArray_DIM(logits, 1) != self->vocab) {
        PyErr_Format(PyExc_ValueError, "logits must have shape (%d, %d): one row per running sequence",
                     (int)running, (int)self->vocab);
        goto fail;
    }
    if (as_array(scores_obj, NPY_FLOAT32, 2, "scores", &scores)) goto fail;
    if (scores != NULL && (PyArray_DIM(scores, 0) != running || PyArray_DIM(scores, 1) != self->vocab)) {
        PyErr_Format(PyExc_ValueError, "scores must have shape (%d, %d), as logits", (int)running, (int)self->vocab);
        goto fail;
    }
    npy_intp dims[1] = {running};
    tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    tokens32 = PyMem_Malloc((size_t)(running > 0 ? running : 1) * sizeof *tokens32);
    if (tokens == NULL) goto fail;
    if (tokens32 == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if ((set = sampler_set_acquire(lmd_get_num_threads(), self->vocab)) == NULL) goto fail;
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "this Generator is in use by another thread");
        goto fail;
    }
    lmd_error err;
    lmd_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_generator_step_scored(self->gen, set->samplers, set->n, PyArray_DATA(scores ? scores : logits),
                                   PyArray_DATA(logits), tokens32, &err);
    Py_END_ALLOW_THREADS;
    PyThread_release_lock(self->lock);
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto fail;
    }
    for (int32_t i = 0; i < running; i++) ((int64_t *)PyArray_DATA(tokens))[i] = tokens32[i];
    result = (PyObject *)tokens;
    tokens = NULL;
fail:
    if (set) sampler_set_release(set);
    PyMem_Free(tokens32);
    Py_XDECREF(logits);
    Py_XDECREF(scores);
    Py_XDECREF(tokens);
    return result;
}

// 0 if k names one of the generator's sequences, else -1 with an IndexError
static int check_sequence(const GeneratorObject *self, long k) {
    if (k >= 0 && k < self->n_seqs) return 0;
    PyErr_Format(PyExc_IndexError, "sequence (=%ld) must be in [0, %d)", k, (int)self->n_seqs);
    return -1;
}

// the sequence number `arg` of a ready generator in *k: 0, or -1 with an exception
static int sequence_arg(GeneratorObject *self, PyObject *arg, long *k) {
    if (!generator_ready(self)) return -1;
    *k = PyLong_AsLong(arg);
    if (*k == -1 && PyErr_Occurred()) return -1;
    return check_sequence(self, *k);
}

// sequence k's tokens (prompt + generated,) as a new int64 array, or NULL with an exception
static PyArrayObject *sequence_tokens(lmd_generator *gen, int32_t k) {
    int32_t length;
    const int32_t *all = lmd_generator_tokens(gen, k, &length);
    npy_intp dims[1] = {length};
    PyArrayObject *tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    if (tokens != NULL)
        for (int32_t i = 0; i < length; i++) ((int64_t *)PyArray_DATA(tokens))[i] = all[i];
    return tokens;
}

/* tokens(k) -> int64 (prompt + generated,): what a step function or a constraint reads each step,
 * without result()'s log-prob arrays */
static PyObject *Generator_tokens(GeneratorObject *self, PyObject *arg) {
    long k;
    if (sequence_arg(self, arg, &k)) return NULL;
    return (PyObject *)sequence_tokens(self->gen, (int32_t)k);
}

/* result(k) -> (all tokens int64 (prompt + generated), prompt length, token_logprobs float32 (t,),
 *               top_ids int64 (t, n_top), top_logprobs float32 (t, n_top),
 *               finish reason None/"stop"/"length", stop string byte offset or -1) */
static PyObject *Generator_result(GeneratorObject *self, PyObject *arg) {
    long k;
    if (sequence_arg(self, arg, &k)) return NULL;
    const int32_t t = lmd_generator_generated(self->gen, (int32_t)k);
    npy_intp dims_t[1] = {t}, dims_top[2] = {t, self->n_top};
    PyArrayObject *tokens = sequence_tokens(self->gen, (int32_t)k);
    PyArrayObject *lps = (PyArrayObject *)PyArray_EMPTY(1, dims_t, NPY_FLOAT32, 0);
    PyArrayObject *top_ids = (PyArrayObject *)PyArray_EMPTY(2, dims_top, NPY_INT64, 0);
    PyArrayObject *top_lps = (PyArrayObject *)PyArray_EMPTY(2, dims_top, NPY_FLOAT32, 0);
    PyObject *result = NULL;
    if (tokens && lps && top_ids && top_lps) {
        memcpy(PyArray_DATA(lps), lmd_generator_token_logprobs(self->gen, (int32_t)k),
               (size_t)t * sizeof(float));
        const int32_t *ids = lmd_generator_top_ids(self->gen, (int32_t)k);
        for (int64_t i = 0; i < (int64_t)t * self->n_top; i++)
            ((int64_t *)PyArray_DATA(top_ids))[i] = ids[i];
        memcpy(PyArray_DATA(top_lps), lmd_generator_top_logprobs(self->gen, (int32_t)k),
               (size_t)t * self->n_top * sizeof(float));
        lmd_finish_reason reason = lmd_generator_finish_reason(self->gen, (int32_t)k);
        const char *name = reason == LMD_FINISH_STOP ? "stop" : reason == LMD_FINISH_LENGTH ? "length" : NULL;
        result = Py_BuildValue("(OiOOOzL)", tokens, (int)lmd_generator_prompt_length(self->gen, (int32_t)k),
                               lps, top_ids, top_lps, name,
                               (long long)lmd_generator_stop_offset(self->gen, (int32_t)k));
    }
    Py_XDECREF(tokens);
    Py_XDECREF(lps);
    Py_XDECREF(top_ids);
    Py_XDECREF(top_lps);
    return result;
}

/* logprobs_at(k, i) -> (log-prob float of sequence k's generated token i, top_ids int64 (n_top,),
 *                      top_logprobs float32 (n_top,)): what a stream reports of each new token,
 *                      without result()'s arrays of the whole sequence */
static PyObject *Generator_logprobs_at(GeneratorObject *self, PyObject *args) {
    long k, i;
    if (!PyArg_ParseTuple(args, "ll", &k, &i)) return NULL;
    if (!generator_ready(self) || check_sequence(self, k)) return NULL;
    const int32_t t = lmd_generator_generated(self->gen, (int32_t)k);
    if (i < 0 || i >= t) {
        PyErr_Format(PyExc_IndexError, "token (=%ld) must be in [0, %d), the tokens sequence %ld generated", i,
                     (int)t, k);
        return NULL;
    }
    npy_intp dims_top[1] = {self->n_top};
    PyArrayObject *top_ids = (PyArrayObject *)PyArray_EMPTY(1, dims_top, NPY_INT64, 0);
    PyArrayObject *top_lps = (PyArrayObject *)PyArray_EMPTY(1, dims_top, NPY_FLOAT32, 0);
    PyObject *result = NULL;
    if (top_ids && top_lps) {
        if (self->n_top > 0) { /* without top log-probs the generator keeps no arrays of them */
            const int32_t *ids = lmd_generator_top_ids(self->gen, (int32_t)k) + (int64_t)i * self->n_top;
            for (int32_t j = 0; j < self->n_top; j++) ((int64_t *)PyArray_DATA(top_ids))[j] = ids[j];
            memcpy(PyArray_DATA(top_lps), lmd_generator_top_logprobs(self->gen, (int32_t)k) + (int64_t)i * self->n_top,
                   (size_t)self->n_top * sizeof(float));
        }
        result = Py_BuildValue("(dOO)", (double)lmd_generator_token_logprobs(self->gen, (int32_t)k)[i], top_ids, top_lps);
    }
    Py_XDECREF(top_ids);
    Py_XDECREF(top_lps);
    return result;
}

/* set_allowed(k, ids int32 (m,) or None): running sequence k may draw only ids from its next
 * step on (None: any token); needs Generator(..., dynamic_allowed=True) */
static PyObject *Generator_set_allowed(GeneratorObject *self, PyObject *args) {
    long k;
    PyObject *ids_obj;
    PyArrayObject *ids = NULL;
    if (!PyArg_ParseTuple(args, "lO", &k, &ids_obj)) return NULL;
    if (!generator_ready(self) || check_sequence(self, k)) return NULL;
    int32_t n_ids;
    if (allowed_ids_arg(ids_obj, &ids, &n_ids)) return NULL;
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_XDECREF(ids);
        PyErr_SetString(PyExc_RuntimeError, "this Generator is in use by another thread");
        return NULL;
    }
    lmd_error err;
    lmd_status st = lmd_generator_set_allowed(self->gen, (int32_t)k, ids ? PyArray_DATA(ids) : NULL, n_ids, &err);
    PyThread_release_lock(self->lock);
    Py_XDECREF(ids);
    if (st != LMD_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* masked(k, row float32 (V,)) -> a copy of row with -inf on the tokens running sequence k may
 * not draw at its next step (lmd_generator_mask_row) */
static PyObject *Generator_masked(GeneratorObject *self, PyObject *args) {
    long k;
    PyObject *row_obj;
    if (!PyArg_ParseTuple(args, "lO", &k, &row_obj)) return NULL;
    if (!generator_ready(self)) return NULL;
    if (k < 0 || k >= self->n_seqs || lmd_generator_finish_reason(self->gen, (int32_t)k) != LMD_RUNNING) {
        PyErr_Format(PyExc_IndexError, "sequence (=%ld) is not a running sequence of [0, %d)", k, (int)self->n_seqs);
        return NULL;
    }
    PyArrayObject *row = (PyArrayObject *)PyArray_FROM_OTF(row_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
    if (row == NULL) return NULL;
    if (PyArray_NDIM(row) != 1 || PyArray_DIM(row, 0) != self->vocab) {
        PyErr_Format(PyExc_ValueError, "row must have shape (%d,)", (int)self->vocab);
        Py_DECREF(row);
        return NULL;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_DECREF(row);
        PyErr_SetString(PyExc_RuntimeError, "this Generator is in use by another thread");
        return NULL;
    }
    lmd_generator_mask_row(self->gen, (int32_t)k, PyArray_DATA(row));
    PyThread_release_lock(self->lock);
    return (PyObject *)row;
}

static PyObject *Generator_get_done(GeneratorObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->gen == NULL || lmd_generator_running(self->gen, NULL) == 0);
}

static PyMethodDef Generator_methods[] = {
    {"running", (PyCFunction)Generator_running, METH_NOARGS, "Sequences that still need logits."},
    {"step", (PyCFunction)(void (*)(void))Generator_step, METH_VARARGS | METH_KEYWORDS,
     "Append one sampled token to every running sequence."},
    {"result", (PyCFunction)Generator_result, METH_O, "Tokens, log-probs and finish reason of one sequence."},
    {"tokens", (PyCFunction)Generator_tokens, METH_O, "tokens(k): sequence k's prompt and generated tokens (int64)."},
    {"logprobs_at", (PyCFunction)Generator_logprobs_at, METH_VARARGS,
     "logprobs_at(k, i): log-prob, top ids and top log-probs of sequence k's generated token i."},
    {"masked", (PyCFunction)Generator_masked, METH_VARARGS,
     "masked(k, row): a copy of row with -inf on the tokens sequence k may not draw next."},
    {"set_allowed", (PyCFunction)Generator_set_allowed, METH_VARARGS,
     "set_allowed(k, ids or None): the only tokens sequence k may draw from its next step on."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Generator_getset[] = {
    {"done", (getter)Generator_get_done, NULL, "True once every sequence has finished.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GeneratorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.Generator",
    .tp_basicsize = sizeof(GeneratorObject),
    .tp_dealloc = (destructor)Generator_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sampling-loop state machine (see generate.h).",
    .tp_methods = Generator_methods,
    .tp_getset = Generator_getset,
    .tp_init = (initproc)Generator_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ */
/* model bindings                                                       */
/* ------------------------------------------------------------------ */
/*
 * Three types wrap the engine: Model (an lmd_model and the dict of arrays whose
 * memory it borrows), KVPool (an lmd_kvpool) and KVSeq (an lmd_kvseq of a pool).
 * A lock per Model and per KVPool keeps two Python threads off one run state or
 * one pool; locks are taken with the GIL released so a waiting thread never
 * blocks the one that holds the lock. The Python layer (model.py) documents the
 * public API.
 */

/* Takes lock; waits with the GIL released if another thread holds it. */
static void engine_lock(PyThread_type_lock lock) {
    if (PyThread_acquire_lock(lock, NOWAIT_LOCK)) return;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    Py_END_ALLOW_THREADS
}

typedef struct {
    PyObject_HEAD
    lmd_model *model;
    PyObject *tensors; /* dict name -> ndarray: keeps the borrowed weights alive */
    PyThread_type_lock lock;
} EngineModelObject;

typedef struct {
    PyObject_HEAD
    lmd_kvpool *pool;
    PyThread_type_lock lock;
} EngineKVPoolObject;

typedef struct {
    PyObject_HEAD
    lmd_kvseq *seq;
    EngineKVPoolObject *pool; /* strong reference: the pool outlives its sequences */
} EngineKVSeqObject;

static PyTypeObject EngineModelType;
static PyTypeObject EngineKVPoolType;
static PyTypeObject EngineKVSeqType;

/* config[key] as an int32 into *out; 0 on error with an exception set. */
static int config_int(PyObject *config, const char *key, int32_t *out) {
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "config is missing '%s'", key);
        return 0;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return 0;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "config['%s'] (=%ld) does not fit in int32", key, x);
        return 0;
    }
    *out = (int32_t)x;
    return 1;
}

static int config_float(PyObject *config, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "config is missing '%s'", key);
        return 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return 0;
    *out = (float)x;
    return 1;
}

/* config[key] must be one of two strings; *out = 0 or 1. */
static int config_choice(PyObject *config, const char *key, const char *zero, const char *one, int *out) {
    PyObject *v = PyDict_GetItemString(config, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "config is missing '%s'", key);
        return 0;
    }
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (s != NULL && strcmp(s, zero) == 0) *out = 0;
    else if (s != NULL && strcmp(s, one) == 0) *out = 1;
    else {
        PyErr_Format(PyExc_ValueError, "config['%s'] (=%R) must be '%s' or '%s'", key, v, zero, one);
        return 0;
    }
    return 1;
}

/* tensors[name] as a weight matrix: float32 (f32), uint16 (bf16 bits) or uint8 rows of
 * 34-byte q8_0 blocks, 2-D and C-contiguous. Missing -> data NULL (the core reports it). */
static int tensor_matrix(PyObject *tensors, const char *name, lmd_matrix *out) {
    memset(out, 0, sizeof *out);
    PyObject *v = PyDict_GetItemString(tensors, name);
    if (v == NULL) return 1;
    if (!PyArray_Check(v)) {
        PyErr_Format(PyExc_TypeError, "tensor '%s' must be a numpy array, not %.100s", name, Py_TYPE(v)->tp_name);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)v;
    if (PyArray_NDIM(a) != 2 || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' must be a 2-D C-contiguous aligned array (ndim=%d)", name,
                     PyArray_NDIM(a));
        return 0;
    }
    npy_intp rows = PyArray_DIM(a, 0), cols = PyArray_DIM(a, 1);
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: out->dtype = LMD_F32; out->cols = cols; break;
    case NPY_UINT16: out->dtype = LMD_BF16; out->cols = cols; break;
    case NPY_HALF: out->dtype = LMD_F16; out->cols = cols; break;
    case NPY_VOID: /* q4_0 / q4_1 storage: one 18- or 20-byte item per block (loaders.py) */
        if (PyArray_ITEMSIZE(a) != LMD_Q4_0_BLOCK_BYTES && PyArray_ITEMSIZE(a) != LMD_Q4_1_BLOCK_BYTES) {
            PyErr_Format(PyExc_TypeError, "tensor '%s' has items of %d bytes; q4_0 storage has 18, q4_1 20", name,
                         (int)PyArray_ITEMSIZE(a));
            return 0;
        }
        out->dtype = PyArray_ITEMSIZE(a) == LMD_Q4_0_BLOCK_BYTES ? LMD_Q4_0 : LMD_Q4_1;
        out->cols = cols * LMD_Q8_0_BLOCK;
        break;
    case NPY_UINT8:
        if (cols % LMD_Q8_0_BLOCK_BYTES != 0) {
            PyErr_Format(PyExc_ValueError, "q8_0 tensor '%s' has %zd bytes per row, not a multiple of %d", name,
                         (Py_ssize_t)cols, LMD_Q8_0_BLOCK_BYTES);
            return 0;
        }
        out->dtype = LMD_Q8_0;
        out->cols = cols / LMD_Q8_0_BLOCK_BYTES * LMD_Q8_0_BLOCK;
        break;
    default:
        PyErr_Format(PyExc_TypeError,
                     "tensor '%s' has dtype %R; expected float32, float16, uint16 (bf16), uint8 (q8_0) or V18 / V20 "
                     "(q4_0 / q4_1)",
                     name, (PyObject *)PyArray_DESCR(a));
        return 0;
    }
    out->rows = rows;
    out->data = PyArray_DATA(a);
    return 1;
}

/* tensors[name] as float32 of `length` elements (any shape, C-contiguous); NULL if missing. */
static int tensor_vector(PyObject *tensors, const char *name, npy_intp length, const float **out) {
    *out = NULL;
    PyObject *v = PyDict_GetItemString(tensors, name);
    if (v == NULL) return 1;
    if (!PyArray_Check(v) || PyArray_TYPE((PyArrayObject *)v) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "tensor '%s' must be a float32 numpy array", name);
        return 0;
    }
    if (!PyArray_IS_C_CONTIGUOUS((PyArrayObject *)v) || !PyArray_ISALIGNED((PyArrayObject *)v)) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' must be a C-contiguous aligned array", name);
        return 0;
    }
    if (PyArray_SIZE((PyArrayObject *)v) != length) {
        PyErr_Format(PyExc_ValueError, "tensor '%s' has %zd elements but the config needs %zd", name,
                     (Py_ssize_t)PyArray_SIZE((PyArrayObject *)v), (Py_ssize_t)length);
        return 0;
    }
    *out = PyArray_DATA((PyArrayObject *)v);
    return 1;
}

// whether the model multiplies its own copy of w (model.h: matrix_copies)
static int is_copied(const lmd_model *model, const lmd_matrix *w) {
    const char *data = w->data, *start = model->matrix_copies;
    return start != NULL && data >= start && data < start + model->matrix_copy_bytes;
}

// removes from kept (name -> array) the matrices the model now multiplies in its own copies;
// 0, or -1 with an exception
static int drop_copied_sources(PyObject *kept, const lmd_model *model) {
    const lmd_weights *w = &model->weights;
    if (is_copied(model, &w->output) && PyDict_DelItemString(kept, "output") < 0) return -1;
    if (is_copied(model, &w->token_embedding) && PyDict_DelItemString(kept, "token_embedding") < 0) return -1;
    for (int32_t l = 0; l < model->config.n_layers; l++) {
        for (int i = 0; i < lmd_layer_matrix_count(&model->config); i++) {
            char name[64];
            snprintf(name, sizeof name, "layers.%d.%s", l, lmd_layer_matrix_names[i]);
            if (is_copied(model, lmd_layer_matrix(&w->layers[l], i)) && PyDict_DelItemString(kept, name) < 0)
                return -1;
        }
    }
    return 0;
}

/* Model(config: dict, tensors: dict, max_batch: int) */
static int EngineModel_init(EngineModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "tensors", "max_batch", NULL};
    PyObject *config, *tensors;
    int max_batch = 256;
    lmd_config cfg;
    lmd_weights w;
    lmd_layer_weights *layers = NULL;
    lmd_model *model = NULL;
    lmd_error err = {{0}};
    lmd_status st;
    int arch = 0, layout = 0;
    memset(&cfg, 0, sizeof cfg);
    memset(&w, 0, sizeof w);
    if (self->model != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|i", kwlist, &PyDict_Type, &config, &PyDict_Type,
                                     &tensors, &max_batch))
        return -1;
    if (!config_choice(config, "arch", "llama", "gpt2", &arch) ||
        !config_choice(config, "rope_layout", "adjacent", "half", &layout) ||
        !config_int(config, "vocab_size", &cfg.vocab_size) || !config_int(config, "dim", &cfg.dim) ||
        !config_int(config, "hidden_dim", &cfg.hidden_dim) || !config_int(config, "n_layers", &cfg.n_layers) ||
        !config_int(config, "n_heads", &cfg.n_heads) || !config_int(config, "n_kv_heads", &cfg.n_kv_heads) ||
        !config_int(config, "head_dim", &cfg.head_dim) ||
        !config_int(config, "context_length", &cfg.context_length) ||
        !config_float(config, "norm_eps", &cfg.norm_eps) || !config_float(config, "rope_theta", &cfg.rope_theta))
        goto fail;
    cfg.arch = (lmd_arch)arch;
    cfg.rope_layout = (lmd_rope_layout)layout;
    if (cfg.n_layers < 1 || cfg.n_layers > 100000) {
        PyErr_Format(PyExc_ValueError, "config['n_layers'] (=%d) must be in [1, 100000]", cfg.n_layers);
        goto fail;
    }
    {
        const npy_intp D = cfg.dim, Q = (npy_intp)cfg.n_heads * cfg.head_dim,
                       K = (npy_intp)cfg.n_kv_heads * cfg.head_dim, H = cfg.hidden_dim;
        if (!tensor_matrix(tensors, "token_embedding", &w.token_embedding) ||
            !tensor_matrix(tensors, "output", &w.output) ||
            !tensor_vector(tensors, "position_embedding", (npy_intp)cfg.context_length * D, &w.position_embedding) ||
            !tensor_vector(tensors, "rope_freq_factors", (npy_intp)(cfg.head_dim / 2), &w.rope_freq_factors) ||
            !tensor_vector(tensors, "final_norm", D, &w.final_norm) ||
            !tensor_vector(tensors, "final_norm_bias", D, &w.final_norm_bias))
            goto fail;
        layers = PyMem_Calloc((size_t)cfg.n_layers, sizeof *layers);
        if (layers == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        for (int32_t l = 0; l < cfg.n_layers; l++) {
            lmd_layer_weights *lw = &layers[l];
            char name[64];
#define VECTOR(field, length)                                                                          \
    snprintf(name, sizeof name, "layers.%d." #field, l);                                               \
    if (!tensor_vector(tensors, name, length, &lw->field)) goto fail
            for (int i = 0; i < LMD_LAYER_MATRICES; i++) {
                snprintf(name, sizeof name, "layers.%d.%s", l, lmd_layer_matrix_names[i]);
                if (!tensor_matrix(tensors, name, lmd_layer_matrix(lw, i))) goto fail;
            }
            VECTOR(attn_norm, D);
            VECTOR(attn_norm_bias, D);
            VECTOR(ffn_norm, D);
            VECTOR(ffn_norm_bias, D);
            VECTOR(bq, Q);
            VECTOR(bk, K);
            VECTOR(bv, K);
            VECTOR(bo, D);
            VECTOR(b_up, H);
            VECTOR(b_down, D);
#undef VECTOR
        }
    }
    w.layers = layers;
    Py_BEGIN_ALLOW_THREADS
    st = lmd_model_init(&model, &cfg, &w, max_batch, &err);
    Py_END_ALLOW_THREADS
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto fail;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* keep alive only what the model still borrows: not the matrices it copied */
    PyObject *kept = PyDict_Copy(tensors);
    if (kept == NULL || drop_copied_sources(kept, model) < 0) {
        Py_XDECREF(kept);
        goto fail;
    }
    PyMem_Free(layers);
    self->model = model;
    self->tensors = kept;
    return 0;
fail:
    PyMem_Free(layers);
    lmd_model_free(model);
    return -1;
}

static void EngineModel_dealloc(EngineModelObject *self) {
    lmd_model_free(self->model);
    if (self->lock != NULL) PyThread_free_lock(self->lock);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* KVPool(n_layers, kv_dim, head_size, block_size, n_blocks, kv_dtype="f32"): kv_dtype "f32" or "f16" */
static int EngineKVPool_init(EngineKVPoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n_layers", "kv_dim", "head_size", "block_size", "n_blocks", "kv_dtype", NULL};
    int n_layers, kv_dim, head_size, block_size, n_blocks;
    const char *kv_dtype = "f32";
    lmd_kv_dtype dtype;
    lmd_error err = {{0}};
    lmd_status st;
    lmd_kvpool *pool = NULL;
    if (self->pool != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVPool is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiii|s", kwlist, &n_layers, &kv_dim, &head_size, &block_size,
                                     &n_blocks, &kv_dtype))
        return -1;
    if (strcmp(kv_dtype, "f32") == 0) {
        dtype = LMD_KV_F32;
    } else if (strcmp(kv_dtype, "f16") == 0) {
        dtype = LMD_KV_F16;
    } else {
        PyErr_Format(PyExc_ValueError, "kv_dtype (='%s') must be 'f32' or 'f16'", kv_dtype);
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    st = lmd_kvpool_init(&pool, n_layers, kv_dim, head_size, block_size, n_blocks, dtype, &err);
    Py_END_ALLOW_THREADS
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        lmd_kvpool_free(pool);
        PyErr_NoMemory();
        return -1;
    }
    self->pool = pool;
    return 0;
}

static void EngineKVPool_dealloc(EngineKVPoolObject *self) {
    lmd_kvpool_free(self->pool);
    if (self->lock != NULL) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *EngineKVPool_get_free_blocks(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->pool ? self->pool->n_free : 0);
}

static PyObject *EngineModel_get_panel_bytes(EngineModelObject *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->model ? self->model->panel_bytes : 0);
}

static PyObject *EngineKVPool_get_n_blocks(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->pool ? self->pool->n_blocks : 0);
}

static PyObject *EngineKVPool_get_block_size(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->pool ? self->pool->block_size : 0);
}

static PyObject *EngineKVPool_get_kv_dtype(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(self->pool && self->pool->dtype == LMD_KV_F16 ? "f16" : "f32");
}

/* KVSeq(pool, max_len) */
static int EngineKVSeq_init(EngineKVSeqObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"pool", "max_len", NULL};
    EngineKVPoolObject *pool;
    int max_len;
    lmd_error err = {{0}};
    lmd_status st;
    if (self->seq != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVSeq is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i", kwlist, &EngineKVPoolType, &pool, &max_len)) return -1;
    if (pool->pool == NULL) {
        PyErr_SetString(PyExc_ValueError, "pool is not initialised");
        return -1;
    }
    st = lmd_kvseq_init(&self->seq, pool->pool, max_len, &err);
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    Py_INCREF(pool);
    self->pool = pool;
    return 0;
}

static void EngineKVSeq_dealloc(EngineKVSeqObject *self) {
    if (self->seq != NULL) {
        engine_lock(self->pool->lock);
        lmd_kvseq_free(self->seq);
        PyThread_release_lock(self->pool->lock);
    }
    Py_XDECREF(self->pool);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *EngineKVSeq_get_len(EngineKVSeqObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->seq ? self->seq->len : 0);
}

static PyObject *EngineKVSeq_get_max_len(EngineKVSeqObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->seq ? self->seq->max_len : 0);
}

static PyObject *EngineKVSeq_get_pool(EngineKVSeqObject *self, void *closure) {
    (void)closure;
    if (self->pool == NULL) Py_RETURN_NONE;
    Py_INCREF(self->pool);
    return (PyObject *)self->pool;
}

static PyObject *EngineKVSeq_truncate(EngineKVSeqObject *self, PyObject *arg) {
    lmd_error err = {{0}};
    lmd_status st;
    if (self->seq == NULL) {
        PyErr_SetString(PyExc_ValueError, "KVSeq is not initialised");
        return NULL;
    }
    int overflow;
    long length = PyLong_AsLongAndOverflow(arg, &overflow);
    if (length == -1 && PyErr_Occurred()) return NULL;
    if (overflow || length < 0 || length > self->seq->len) { /* overflow: beyond a C long, either way */
        PyErr_Format(PyExc_ValueError, "length (=%S) must be in [0, %d] (the cached positions)", arg,
                     self->seq->len);
        return NULL;
    }
    engine_lock(self->pool->lock);
    st = lmd_kvseq_truncate(self->seq, (int32_t)length, &err);
    PyThread_release_lock(self->pool->lock);
    if (st != LMD_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *EngineKVSeq_fork(EngineKVSeqObject *self, PyObject *noargs) {
    (void)noargs;
    lmd_error err = {{0}};
    lmd_status st;
    if (self->seq == NULL) {
        PyErr_SetString(PyExc_ValueError, "KVSeq is not initialised");
        return NULL;
    }
    EngineKVSeqObject *child = (EngineKVSeqObject *)EngineKVSeqType.tp_alloc(&EngineKVSeqType, 0);
    if (child == NULL) return NULL;
    engine_lock(self->pool->lock);
    st = lmd_kvseq_fork(&child->seq, self->seq, &err);
    PyThread_release_lock(self->pool->lock);
    if (st != LMD_OK) {
        Py_DECREF(child);
        return raise_status(st, &err);
    }
    Py_INCREF(self->pool);
    child->pool = self->pool;
    return (PyObject *)child;
}

/* model_forward(model, seqs, tokens, token_seq, logit_index, out=None) -> float32 (n_logits, vocab):
 * a new array, or out (a C-contiguous, writable float32 array of that shape) filled */
static PyObject *py_model_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"model", "seqs", "tokens", "token_seq", "logit_index", "out", NULL};
    EngineModelObject *model;
    PyObject *seqs_arg, *tokens_arg, *token_seq_arg, *logit_index_arg, *out_arg = Py_None;
    PyObject *seqs_fast = NULL;
    PyArrayObject *tokens = NULL, *token_seq = NULL, *logit_index = NULL, *logits = NULL;
    lmd_kvseq **seq_ptrs = NULL;
    EngineKVPoolObject *pool = NULL;
    lmd_error err = {{0}};
    lmd_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOO|O", kwlist, &EngineModelType, &model, &seqs_arg,
                                     &tokens_arg, &token_seq_arg, &logit_index_arg, &out_arg))
        return NULL;
    if (model->model == NULL) {
        PyErr_SetString(PyExc_ValueError, "model is not initialised");
        return NULL;
    }
    seqs_fast = PySequence_Fast(seqs_arg, "seqs must be a sequence of KVSeq");
    if (seqs_fast == NULL) goto fail;
    Py_ssize_t n_seqs = PySequence_Fast_GET_SIZE(seqs_fast);
    if (n_seqs < 1 || n_seqs > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "seqs must hold at least one cache (got %zd)", n_seqs);
        goto fail;
    }
    seq_ptrs = PyMem_Calloc((size_t)n_seqs, sizeof *seq_ptrs);
    if (seq_ptrs == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n_seqs; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seqs_fast, i);
        if (!PyObject_TypeCheck(item, &EngineKVSeqType) || ((EngineKVSeqObject *)item)->seq == NULL) {
            PyErr_Format(PyExc_TypeError, "seqs[%zd] must be an initialised KVSeq, not %.100s", i,
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        EngineKVSeqObject *s = (EngineKVSeqObject *)item;
        if (pool == NULL) pool = s->pool;
        else if (s->pool != pool) {
            PyErr_Format(PyExc_ValueError, "seqs[%zd] belongs to a different cache pool than seqs[0]", i);
            goto fail;
        }
        seq_ptrs[i] = s->seq;
    }
    tokens = (PyArrayObject *)PyArray_FROM_OTF(tokens_arg, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (tokens == NULL) goto fail;
    token_seq = (PyArrayObject *)PyArray_FROM_OTF(token_seq_arg, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (token_seq == NULL) goto fail;
    logit_index = (PyArrayObject *)PyArray_FROM_OTF(logit_index_arg, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (logit_index == NULL) goto fail;
    if (PyArray_NDIM(tokens) != 1 || PyArray_DIM(tokens, 0) < 1 || PyArray_DIM(tokens, 0) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "tokens must be a non-empty 1-D array of token ids (ndim=%d)",
                     PyArray_NDIM(tokens));
        goto fail;
    }
    if (PyArray_NDIM(token_seq) != 1 || PyArray_DIM(token_seq, 0) != PyArray_DIM(tokens, 0)) {
        PyErr_Format(PyExc_ValueError, "token_seq must be 1-D with one entry per token (%zd)",
                     (Py_ssize_t)PyArray_DIM(tokens, 0));
        goto fail;
    }
    if (PyArray_NDIM(logit_index) != 1 || PyArray_DIM(logit_index, 0) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "logit_index must be a 1-D array of token indices");
        goto fail;
    }
    {
        npy_intp dims[2] = {PyArray_DIM(logit_index, 0), model->model->config.vocab_size};
        if (out_arg == Py_None) {
            logits = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
            if (logits == NULL) goto fail;
        } else {
            if (!PyArray_Check(out_arg)) {
                PyErr_Format(PyExc_TypeError, "out must be a NumPy array, not %.100s", Py_TYPE(out_arg)->tp_name);
                goto fail;
            }
            logits = (PyArrayObject *)out_arg;
            if (PyArray_TYPE(logits) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(logits) ||
                !PyArray_ISWRITEABLE(logits) || !PyArray_ISALIGNED(logits) || PyArray_NDIM(logits) != 2 ||
                PyArray_DIM(logits, 0) != dims[0] || PyArray_DIM(logits, 1) != dims[1]) {
                PyErr_Format(PyExc_ValueError,
                             "out must be a writable, C-contiguous float32 array of shape (%zd, %zd)",
                             (Py_ssize_t)dims[0], (Py_ssize_t)dims[1]);
                logits = NULL;
                goto fail;
            }
            Py_INCREF(logits);
        }
    }
    engine_lock(model->lock);
    engine_lock(pool->lock);
    Py_BEGIN_ALLOW_THREADS
    st = lmd_model_forward(model->model, seq_ptrs, (int32_t)n_seqs, PyArray_DATA(tokens), PyArray_DATA(token_seq),
                           (int32_t)PyArray_DIM(tokens, 0), PyArray_DATA(logit_index),
                           (int32_t)PyArray_DIM(logit_index, 0), PyArray_DATA(logits), &err);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(pool->lock);
    PyThread_release_lock(model->lock);
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto fail;
    }
    Py_DECREF(seqs_fast);
    Py_DECREF(tokens);
    Py_DECREF(token_seq);
    Py_DECREF(logit_index);
    PyMem_Free(seq_ptrs);
    return (PyObject *)logits;
fail:
    Py_XDECREF(seqs_fast);
    Py_XDECREF(tokens);
    Py_XDECREF(token_seq);
    Py_XDECREF(logit_index);
    Py_XDECREF(logits);
    PyMem_Free(seq_ptrs);
    return NULL;
}

/* quantize_q8_0(x: float32 (rows, cols)) -> uint8 (rows, cols / 32 * 34), the engine's q8_0
 * storage (llama.cpp's blocks, packed in groups of 16 rows: ops.h). ValueError with the core's
 * message naming the row and columns for non-finite values and for a block whose fp16 scale
 * would be infinite. */
static PyObject *py_quantize_q8_0(PyObject *self, PyObject *arg) {
    (void)self;
    PyArrayObject *x = NULL, *out = NULL;
    lmd_error err = {{0}};
    lmd_status st = LMD_OK;
    x = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (x == NULL) goto fail;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) % LMD_Q8_0_BLOCK != 0) {
        PyErr_Format(PyExc_ValueError, "x must be 2-D with a multiple of 32 columns (ndim=%d)", PyArray_NDIM(x));
        goto fail;
    }
    {
        npy_intp rows = PyArray_DIM(x, 0), cols = PyArray_DIM(x, 1);
        npy_intp dims[2] = {rows, cols / LMD_Q8_0_BLOCK * LMD_Q8_0_BLOCK_BYTES};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_UINT8);
        if (out == NULL) goto fail;
        const float *src = PyArray_DATA(x);
        uint8_t *dst = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        st = lmd_quantize_matrix_q8_0(dst, src, (int64_t)rows, (int64_t)cols, &err);
        Py_END_ALLOW_THREADS
    }
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto fail;
    }
    Py_DECREF(x);
    return (PyObject *)out;
fail:
    Py_XDECREF(x);
    Py_XDECREF(out);
    return NULL;
}

// a 2-D uint8 array of q8_0 blocks (rows, n_blocks * 34), or NULL with an exception naming `what`
static PyArrayObject *q8_0_blocks_arg(PyObject *arg, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_UINT8, NPY_ARRAY_IN_ARRAY);
    if (a == NULL) return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 1) % LMD_Q8_0_BLOCK_BYTES != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D uint8 with a multiple of 34 bytes per row (ndim=%d)", what,
                     PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* pack_q8_0(blocks: uint8 (rows, cols / 32 * 34) in llama.cpp's row-major layout) -> the same
 * blocks packed as the engine stores them (a new array of the same shape) */
static PyObject *py_pack_q8_0(PyObject *self, PyObject *arg) {
    (void)self;
    PyArrayObject *blocks = q8_0_blocks_arg(arg, "blocks");
    if (blocks == NULL) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(blocks), NPY_UINT8);
    if (out != NULL) {
        const int64_t rows = PyArray_DIM(blocks, 0), cols = PyArray_DIM(blocks, 1) / LMD_Q8_0_BLOCK_BYTES * LMD_Q8_0_BLOCK;
        const uint8_t *src = PyArray_DATA(blocks);
        uint8_t *dst = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        lmd_pack_q8_0(dst, src, rows, cols);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(blocks);
    return (PyObject *)out;
}

// every row of the packed matrix w (its bytes in `packed`, a reference this call takes over)
// as float32 (rows, cols)
static PyObject *dequantized_rows(PyArrayObject *packed, lmd_matrix w) {
    npy_intp dims[2] = {(npy_intp)w.rows, (npy_intp)w.cols};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out != NULL) {
        float *dst = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        for (int64_t r = 0; r < w.rows; r++) lmd_matrix_row(dst + r * w.cols, &w, r);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(packed);
    return (PyObject *)out;
}

/* dequantize_q8_0(packed: uint8 (rows, cols / 32 * 34) as the engine stores it) -> float32 (rows, cols) */
static PyObject *py_dequantize_q8_0(PyObject *self, PyObject *arg) {
    (void)self;
    PyArrayObject *packed = q8_0_blocks_arg(arg, "packed");
    if (packed == NULL) return NULL;
    return dequantized_rows(packed, (lmd_matrix){PyArray_DATA(packed), LMD_Q8_0, PyArray_DIM(packed, 0),
                                                 PyArray_DIM(packed, 1) / LMD_Q8_0_BLOCK_BYTES * LMD_Q8_0_BLOCK});
}

// "q4_0" or "q4_1" -> *dtype, 0; or -1 with a ValueError
static int q4_kind(const char *kind, lmd_dtype *dtype) {
    if (strcmp(kind, "q4_0") == 0 || strcmp(kind, "q4_1") == 0) {
        *dtype = kind[3] == '1' ? LMD_Q4_1 : LMD_Q4_0;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "kind (=%.20s) must be 'q4_0' or 'q4_1'", kind);
    return -1;
}

static int64_t q4_bytes(lmd_dtype dtype) { return dtype == LMD_Q4_1 ? LMD_Q4_1_BLOCK_BYTES : LMD_Q4_0_BLOCK_BYTES; }

// a 2-D uint8 array of (rows, n_blocks * block bytes) of `kind`, or NULL with an exception naming `what`
static PyArrayObject *q4_blocks_arg(PyObject *arg, lmd_dtype dtype, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_UINT8, NPY_ARRAY_IN_ARRAY);
    if (a == NULL) return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 1) % q4_bytes(dtype) != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D uint8 with a multiple of %d bytes per row (ndim=%d)", what,
                     (int)q4_bytes(dtype), PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* quantize_q4(x: float32 (rows, cols), kind "q4_0" | "q4_1") -> uint8 (rows, cols / 32 * 18 or
 * 20), the engine's storage of llama.cpp's quantizer's blocks. ValueError as quantize_q8_0's
 * for non-finite values and fp16 scales or minimums that would be infinite. */
static PyObject *py_quantize_q4(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *x_obj;
    const char *kind;
    if (!PyArg_ParseTuple(args, "Os", &x_obj, &kind)) return NULL;
    lmd_dtype dtype;
    if (q4_kind(kind, &dtype)) return NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(x_obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY), *out = NULL;
    if (x == NULL) return NULL;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) % LMD_Q8_0_BLOCK != 0) {
        PyErr_Format(PyExc_ValueError, "x must be 2-D with a multiple of 32 columns (ndim=%d)", PyArray_NDIM(x));
        Py_DECREF(x);
        return NULL;
    }
    const npy_intp rows = PyArray_DIM(x, 0), cols = PyArray_DIM(x, 1);
    npy_intp dims[2] = {rows, cols / LMD_Q8_0_BLOCK * q4_bytes(dtype)};
    out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_UINT8);
    lmd_error err = {{0}};
    lmd_status st = LMD_OK;
    if (out != NULL) {
        const float *src = PyArray_DATA(x);
        uint8_t *dst = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        st = lmd_quantize_matrix_q4(dst, src, (int64_t)rows, (int64_t)cols, dtype, &err);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(x);
    if (st != LMD_OK) {
        Py_DECREF(out);
        return raise_status(st, &err);
    }
    return (PyObject *)out;
}

// the (blocks, kind) arguments of pack_q4 and dequantize_q4: the uint8 blocks array (a new
// reference) and *dtype, or NULL with an exception naming `what`
static PyArrayObject *q4_blocks_call(PyObject *args, const char *what, lmd_dtype *dtype) {
    PyObject *blocks_obj;
    const char *kind;
    if (!PyArg_ParseTuple(args, "Os", &blocks_obj, &kind) || q4_kind(kind, dtype)) return NULL;
    return q4_blocks_arg(blocks_obj, *dtype, what);
}

/* pack_q4(blocks: uint8 (rows, cols / 32 * 18 or 20) in llama.cpp's row-major layout, kind) ->
 * the same blocks as the engine stores them (a new array of the same shape) */
static PyObject *py_pack_q4(PyObject *self, PyObject *args) {
    (void)self;
    lmd_dtype dtype;
    PyArrayObject *blocks = q4_blocks_call(args, "blocks", &dtype);
    if (blocks == NULL) return NULL;
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(blocks), NPY_UINT8);
    if (out != NULL) {
        const int64_t rows = PyArray_DIM(blocks, 0), cols = PyArray_DIM(blocks, 1) / q4_bytes(dtype) * LMD_Q8_0_BLOCK;
        const uint8_t *src = PyArray_DATA(blocks);
        uint8_t *dst = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS
        lmd_pack_q4(dst, src, rows, cols, dtype);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(blocks);
    return (PyObject *)out;
}

/* dequantize_q4(packed: uint8 (rows, cols / 32 * 18 or 20) as the engine stores it, kind) ->
 * float32 (rows, cols) */
static PyObject *py_dequantize_q4(PyObject *self, PyObject *args) {
    (void)self;
    lmd_dtype dtype;
    PyArrayObject *packed = q4_blocks_call(args, "packed", &dtype);
    if (packed == NULL) return NULL;
    return dequantized_rows(packed, (lmd_matrix){PyArray_DATA(packed), dtype, PyArray_DIM(packed, 0),
                                                 PyArray_DIM(packed, 1) / q4_bytes(dtype) * LMD_Q8_0_BLOCK});
}

static PyObject *EngineModel_get_borrowed(EngineModelObject *self, void *closure) {
    (void)closure;
    if (self->tensors == NULL) return PyFrozenSet_New(NULL);
    return PyFrozenSet_New(self->tensors);
}

static PyGetSetDef EngineModel_getset[] = {
    {"panel_bytes", (getter)EngineModel_get_panel_bytes, NULL,
     "bytes of the model's own copies of its f32, bf16 and f16 matrices, in panels", NULL},
    {"borrowed", (getter)EngineModel_get_borrowed, NULL,
     "names of the tensors the model reads in place (the weight matrices, which it copies, are not among them)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef EngineKVPool_getset[] = {
    {"free_blocks", (getter)EngineKVPool_get_free_blocks, NULL, "blocks no sequence holds", NULL},
    {"n_blocks", (getter)EngineKVPool_get_n_blocks, NULL, "blocks in the pool", NULL},
    {"block_size", (getter)EngineKVPool_get_block_size, NULL, "positions per block", NULL},
    {"kv_dtype", (getter)EngineKVPool_get_kv_dtype, NULL, "how keys and values are stored: 'f32' or 'f16'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef EngineKVSeq_getset[] = {
    {"len", (getter)EngineKVSeq_get_len, NULL, "cached positions", NULL},
    {"max_len", (getter)EngineKVSeq_get_max_len, NULL, "positions the sequence may hold", NULL},
    {"pool", (getter)EngineKVSeq_get_pool, NULL, "the KVPool holding the blocks", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef EngineKVSeq_methods[] = {
    {"truncate", (PyCFunction)EngineKVSeq_truncate, METH_O, "Keep the first n positions."},
    {"fork", (PyCFunction)EngineKVSeq_fork, METH_NOARGS, "A new sequence sharing this one's positions."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.Model",
    .tp_basicsize = sizeof(EngineModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config, tensors, max_batch=256): the C engine over borrowed weight arrays.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EngineModel_init,
    .tp_dealloc = (destructor)EngineModel_dealloc,
    .tp_getset = EngineModel_getset,
};

static PyTypeObject EngineKVPoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.KVPool",
    .tp_basicsize = sizeof(EngineKVPoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KVPool(n_layers, kv_dim, block_size, n_blocks): paged key/value storage.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EngineKVPool_init,
    .tp_dealloc = (destructor)EngineKVPool_dealloc,
    .tp_getset = EngineKVPool_getset,
};

static PyTypeObject EngineKVSeqType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.KVSeq",
    .tp_basicsize = sizeof(EngineKVSeqObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KVSeq(pool, max_len): one sequence's cached positions.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EngineKVSeq_init,
    .tp_dealloc = (destructor)EngineKVSeq_dealloc,
    .tp_getset = EngineKVSeq_getset,
    .tp_methods = EngineKVSeq_methods,
};

/* Registers Model, KVPool and KVSeq in the module; -1 on error. */
static int register_model_types(PyObject *m) {
    PyTypeObject *types[] = {&EngineModelType, &EngineKVPoolType, &EngineKVSeqType};
    const char *names[] = {"Model", "KVPool", "KVSeq"};
    for (int i = 0; i < 3; i++) {
        if (PyType_Ready(types[i]) < 0) return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* decoding-loop bindings: generate and beam search over a Model in C   */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    lmd_decode_run *run;
    EngineModelObject *model;    /* strong references: the run borrows them */
    EngineKVPoolObject *pool;
    GeneratorObject *generator;
    EngineModelObject *amateur; /* contrastive decoding, or NULL */
    EngineKVPoolObject *amateur_pool;
    PyObject *given_caches;     /* list of the KVSeq objects use_cache gave the run (it borrows them) */
} ModelDecoderObject;

static void ModelDecoder_dealloc(ModelDecoderObject *self) {
    lmd_decode_run_free(self->run); /* frees its sequences before the pool can go */
    Py_XDECREF(self->given_caches);
    Py_XDECREF(self->model);
    Py_XDECREF(self->pool);
    Py_XDECREF(self->generator);
    Py_XDECREF(self->amateur);
    Py_XDECREF(self->amateur_pool);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ModelDecoder(model: Model, pool: KVPool, generator: Generator, amateur: Model = None,
 *              amateur_pool: KVPool = None, alpha=0.1, amateur_temperature=1.0) */
static int ModelDecoder_init(ModelDecoderObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"model", "pool", "generator", "amateur", "amateur_pool", "alpha", "amateur_temperature", NULL};
    EngineModelObject *model, *amateur = NULL;
    EngineKVPoolObject *pool, *amateur_pool = NULL;
    GeneratorObject *generator;
    double alpha = 0.1, amateur_temperature = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!|O!O!dd", kwlist, &EngineModelType, &model,
                                     &EngineKVPoolType, &pool, &GeneratorType, &generator, &EngineModelType, &amateur,
                                     &EngineKVPoolType, &amateur_pool, &alpha, &amateur_temperature))
        return -1;
    if (model->model == NULL || pool->pool == NULL || generator->gen == NULL ||
        (amateur != NULL && (amateur->model == NULL || amateur_pool == NULL || amateur_pool->pool == NULL))) {
        PyErr_SetString(PyExc_ValueError, "model, pool and generator (and an amateur's pool) must be initialized");
        return -1;
    }
    lmd_error err;
    lmd_decode_run *run = NULL;
    lmd_status st = lmd_decode_run_init(&run, model->model, pool->pool, generator->gen, &err);
    if (st == LMD_OK && amateur != NULL &&
        (st = lmd_decode_run_set_amateur(run, amateur->model, amateur_pool->pool, alpha, amateur_temperature, &err)) !=
            LMD_OK)
        lmd_decode_run_free(run);
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    lmd_decode_run_free(self->run);
    self->run = run;
    Py_CLEAR(self->given_caches); /* the old run's */
    Py_INCREF(model);
    Py_INCREF(pool);
    Py_INCREF(generator);
    Py_XSETREF(self->model, model);
    Py_XSETREF(self->pool, pool);
    Py_XSETREF(self->generator, generator);
    Py_XINCREF(amateur);
    Py_XINCREF(amateur_pool);
    Py_XSETREF(self->amateur, amateur);
    Py_XSETREF(self->amateur_pool, amateur_pool);
    return 0;
}

/* An lmd_stop_check for a C loop running with the GIL released: at most every
 * SIGNAL_CHECK_MS it takes the GIL back and runs the interpreter's signal handlers (in the
 * main thread), so Ctrl-C stops a long generation or beam search. A handler's exception
 * (KeyboardInterrupt) stops the loop and stays set for the binding to return. The engine's
 * locks are held meanwhile: a signal handler must not call into the same model. */
enum { SIGNAL_CHECK_MS = 20 };
typedef struct {
    struct timespec last;
    int raised;
} signal_check;

static int stop_on_signal(void *ctx) {
    signal_check *check = ctx;
    struct timespec now;
    timespec_get(&now, TIME_UTC);
    /* wall clock (C11's timespec_get): enough to space the checks */
    const double ms =
        (double)(now.tv_sec - check->last.tv_sec) * 1e3 + (double)(now.tv_nsec - check->last.tv_nsec) * 1e-6;
    if (ms < SIGNAL_CHECK_MS) return 0;
    check->last = now;
    PyGILState_STATE gil = PyGILState_Ensure();
    check->raised = PyErr_CheckSignals() < 0;
    PyGILState_Release(gil);
    return check->raised;
}

/* (ids int64 (n,), tokens int64 (n,)): the (sequence, token) pairs a C loop appended last */
static PyObject *appended_tokens(const int32_t *ids, const int32_t *tokens, int32_t n) {
    npy_intp dims[1] = {n};
    PyObject *result = NULL;
    PyArrayObject *ids_out = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    PyArrayObject *tokens_out = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
    if (ids_out && tokens_out) {
        for (int32_t i = 0; i < n; i++) {
            ((int64_t *)PyArray_DATA(ids_out))[i] = ids[i];
            ((int64_t *)PyArray_DATA(tokens_out))[i] = tokens[i];
        }
        result = Py_BuildValue("(OO)", ids_out, tokens_out);
    }
    Py_XDECREF(ids_out);
    Py_XDECREF(tokens_out);
    return result;
}

/* The C decoding loops' calling convention (lmd_decode_run_steps, lmd_speculative_run_rounds),
 * with the run as void * so that one runner below serves both. */
typedef lmd_status (*c_loop_fn)(void *run, lmd_sampler *const *samplers, int n_samplers, int32_t max_calls,
                                int32_t *last_ids, int32_t *last_tokens, int32_t *n_last, lmd_stop_check stop,
                                void *stop_ctx, lmd_error *err);

static lmd_status decode_run_steps(void *run, lmd_sampler *const *samplers, int n_samplers, int32_t max_calls,
                                   int32_t *last_ids, int32_t *last_tokens, int32_t *n_last, lmd_stop_check stop,
                                   void *stop_ctx, lmd_error *err) {
    return lmd_decode_run_steps(run, samplers, n_samplers, max_calls, last_ids, last_tokens, n_last, stop, stop_ctx,
                                err);
}

static lmd_status speculative_run_rounds(void *run, lmd_sampler *const *samplers, int n_samplers, int32_t max_calls,
                                         int32_t *last_ids, int32_t *last_tokens, int32_t *n_last,
                                         lmd_stop_check stop, void *stop_ctx, lmd_error *err) {
    return lmd_speculative_run_rounds(run, samplers, n_samplers, max_calls, last_ids, last_tokens, n_last, stop,
                                      stop_ctx, err);
}

/* Runs up to `arg` (an int, named `what` in errors) steps or rounds of a C loop over the
 * generator, one model and pool, and optionally a second model and pool (an amateur or a
 * draft; NULL otherwise), with the GIL released and Ctrl-C checked. The locks of the models
 * and pools are held meanwhile, a model used twice (drafting for itself) locked once.
 * capacity: the (sequence, token) pairs one step may append. Returns (ids int64, tokens
 * int64) of the pairs the last step appended. */
static PyObject *run_c_loop(c_loop_fn loop, void *run, PyObject *arg, const char *what, GeneratorObject *generator,
                            EngineModelObject *model, EngineKVPoolObject *pool, EngineModelObject *second_model,
                            EngineKVPoolObject *second_pool, size_t capacity) {
    long max_calls = PyLong_AsLong(arg);
    if (max_calls == -1 && PyErr_Occurred()) return NULL;
    if (max_calls < 1 || max_calls > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s (=%ld) must be in [1, 2^31)", what, max_calls);
        return NULL;
    }
    int32_t n_last = 0;
    int32_t *ids = PyMem_Malloc(capacity * sizeof *ids), *tokens = PyMem_Malloc(capacity * sizeof *tokens);
    sampler_set *set = NULL;
    PyObject *result = NULL;
    if (ids == NULL || tokens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((set = sampler_set_acquire(lmd_get_num_threads(), generator->vocab)) == NULL) goto done;
    if (!PyThread_acquire_lock(generator->lock, NOWAIT_LOCK)) {
        PyErr_SetString(PyExc_RuntimeError, "this Generator is in use by another thread");
        goto done;
    }
    const int second_lock = second_model != NULL && second_model != model;
    engine_lock(model->lock);
    if (second_lock) engine_lock(second_model->lock);
    engine_lock(pool->lock);
    if (second_pool) engine_lock(second_pool->lock);
    lmd_error err;
    lmd_status st;
    signal_check check = {{0, 0}, 0};
    timespec_get(&check.last, TIME_UTC);
    Py_BEGIN_ALLOW_THREADS;
    st = loop(run, set->samplers, set->n, (int32_t)max_calls, ids, tokens, &n_last, stop_on_signal, &check, &err);
    Py_END_ALLOW_THREADS;
    if (second_pool) PyThread_release_lock(second_pool->lock);
    PyThread_release_lock(pool->lock);
    if (second_lock) PyThread_release_lock(second_model->lock);
    PyThread_release_lock(model->lock);
    PyThread_release_lock(generator->lock);
    if (st == LMD_ERR_STOPPED && check.raised) goto done; /* KeyboardInterrupt (or the handler's) */
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto done;
    }
    result = appended_tokens(ids, tokens, n_last);
done:
    if (set) sampler_set_release(set);
    PyMem_Free(ids);
    PyMem_Free(tokens);
    return result;
}

/* steps(max_steps) -> (ids int64, tokens int64) of the last step that ran */
static PyObject *ModelDecoder_steps(ModelDecoderObject *self, PyObject *arg) {
    if (self->run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ModelDecoder is not initialized");
        return NULL;
    }
    return run_c_loop(decode_run_steps, self->run, arg, "max_steps", self->generator, self->model, self->pool,
                      self->amateur, self->amateur_pool, (size_t)self->generator->n_seqs);
}

/* use_cache(k, cache: KVSeq): sequence k decodes in `cache` (lmd_decode_run_use_cache), which
 * holds the first cache.len tokens of its prompt and is left holding all its tokens but the
 * last; the decoder keeps a reference to it */
static PyObject *ModelDecoder_use_cache(ModelDecoderObject *self, PyObject *args) {
    int k;
    EngineKVSeqObject *cache;
    if (!PyArg_ParseTuple(args, "iO!", &k, &EngineKVSeqType, &cache)) return NULL;
    if (self->run == NULL || cache->seq == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ModelDecoder and cache must be initialized");
        return NULL;
    }
    if (cache->pool != self->pool) {
        PyErr_SetString(PyExc_ValueError, "the cache must belong to the decoder's pool");
        return NULL;
    }
    if (self->given_caches == NULL && (self->given_caches = PyList_New(0)) == NULL) return NULL;
    engine_lock(self->pool->lock);
    lmd_error err;
    lmd_status st = lmd_decode_run_use_cache(self->run, k, cache->seq, &err);
    PyThread_release_lock(self->pool->lock);
    if (st != LMD_OK) return raise_status(st, &err);
    if (PyList_Append(self->given_caches, (PyObject *)cache) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef ModelDecoder_methods[] = {
    {"steps", (PyCFunction)ModelDecoder_steps, METH_O, "Run up to max_steps decoding steps in C."},
    {"use_cache", (PyCFunction)ModelDecoder_use_cache, METH_VARARGS,
     "use_cache(k, cache): sequence k decodes in a KVSeq of the decoder's pool that holds a prefix of its prompt."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ModelDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.ModelDecoder",
    .tp_basicsize = sizeof(ModelDecoderObject),
    .tp_dealloc = (destructor)ModelDecoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ModelDecoder(model, pool, generator): the generation loop over a model, in C.",
    .tp_methods = ModelDecoder_methods,
    .tp_init = (initproc)ModelDecoder_init,
    .tp_new = PyType_GenericNew,
};

/* An lmd_beam_hook for model_beam_search's constraint: takes the GIL and sets every running
 * beam's allowed tokens to constraint(search, beam, generated tokens int64) (None or an int32
 * array; the Python caller validates). A Python exception ends the search and stays set. The
 * model's lock is let go meanwhile, so that the function may call the same model (between
 * steps the search keeps nothing in the model's scratch; its cache pool is its own and stays
 * locked). */
typedef struct {
    PyObject *constraint;
    PyThread_type_lock model_lock;
    int raised;
} beam_constraint;

static lmd_status constrain_beams(void *ctx, int32_t search, lmd_beam_search *bs, lmd_error *err) {
    beam_constraint *c = ctx;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyThread_release_lock(c->model_lock);
    const int32_t n = lmd_beam_search_length(bs);
    npy_intp dims[1] = {n};
    for (int32_t b = 0; b < lmd_beam_search_width(bs) && !c->raised; b++) {
        PyArrayObject *tokens = (PyArrayObject *)PyArray_EMPTY(1, dims, NPY_INT64, 0);
        PyObject *allowed = NULL;
        if (tokens != NULL) {
            const int32_t *generated = lmd_beam_search_tokens(bs, b);
            for (int32_t i = 0; i < n; i++) ((int64_t *)PyArray_DATA(tokens))[i] = generated[i];
            allowed = PyObject_CallFunction(c->constraint, "iiO", (int)search, (int)b, (PyObject *)tokens);
        }
        c->raised = allowed == NULL || beam_set_allowed(bs, b, allowed) < 0;
        Py_XDECREF(allowed);
        Py_XDECREF(tokens);
    }
    engine_lock(c->model_lock);
    PyGILState_Release(gil);
    return c->raised ? lmd_fail(err, LMD_ERR_STOPPED, "the constraint function raised") : LMD_OK;
}

/* model_beam_search(model, pool, searches, prompts, constraint=None) -> peak KV blocks held:
 * searches a list of distinct BeamSearch, prompts a list as long of int32 token arrays, all
 * run together; constraint(search, beam, generated int64) -> allowed int32 or None, before
 * every step of every search */
static PyObject *py_model_beam_search(PyObject *self, PyObject *args) {
    (void)self;
    EngineModelObject *model;
    EngineKVPoolObject *pool;
    PyObject *searches_obj, *prompts_obj, *constraint_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!O!|O", &EngineModelType, &model, &EngineKVPoolType, &pool, &PyList_Type,
                          &searches_obj, &PyList_Type, &prompts_obj, &constraint_obj))
        return NULL;
    if (constraint_obj != Py_None && !PyCallable_Check(constraint_obj)) {
        PyErr_SetString(PyExc_TypeError, "constraint must be callable or None");
        return NULL;
    }
    if (model->model == NULL || pool->pool == NULL) {
        PyErr_SetString(PyExc_ValueError, "model and pool must be initialized");
        return NULL;
    }
    const Py_ssize_t S = PyList_GET_SIZE(searches_obj);
    if (S < 1 || S > INT32_MAX / 2 || PyList_GET_SIZE(prompts_obj) != S) {
        PyErr_Format(PyExc_ValueError, "searches (%zd) and prompts (%zd) must be non-empty lists of one length", S,
                     PyList_GET_SIZE(prompts_obj));
        return NULL;
    }
    lmd_beam_search **searches = PyMem_Calloc((size_t)S, sizeof *searches);
    BeamSearchObject **locked = PyMem_Calloc((size_t)S, sizeof *locked);
    PyArrayObject **prompts = PyMem_Calloc((size_t)S, sizeof *prompts);
    const int32_t **prompt_data = PyMem_Calloc((size_t)S, sizeof *prompt_data);
    int32_t *prompt_lens = PyMem_Calloc((size_t)S, sizeof *prompt_lens);
    Py_ssize_t n_locked = 0;
    if (!searches || !locked || !prompts || !prompt_data || !prompt_lens) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t s = 0; s < S; s++) {
        PyObject *search = PyList_GET_ITEM(searches_obj, s);
        if (!PyObject_TypeCheck(search, &BeamSearchType) || ((BeamSearchObject *)search)->search == NULL) {
            PyErr_Format(PyExc_TypeError, "searches[%zd] must be an initialized BeamSearch", s);
            goto done;
        }
        searches[s] = ((BeamSearchObject *)search)->search;
        if (as_array(PyList_GET_ITEM(prompts_obj, s), NPY_INT32, 1, "prompt", &prompts[s])) goto done;
        if (prompts[s] == NULL) {
            PyErr_SetString(PyExc_TypeError, "a prompt must not be None");
            goto done;
        }
        if (PyArray_DIM(prompts[s], 0) > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a prompt holds more than 2^31 tokens");
            goto done;
        }
        prompt_data[s] = PyArray_DATA(prompts[s]);
        prompt_lens[s] = (int32_t)PyArray_DIM(prompts[s], 0);
    }
    for (; n_locked < S; n_locked++) {
        BeamSearchObject *search = (BeamSearchObject *)PyList_GET_ITEM(searches_obj, n_locked);
        if (!PyThread_acquire_lock(search->lock, NOWAIT_LOCK)) {
            PyErr_SetString(PyExc_RuntimeError, "a BeamSearch is in use by another thread (or given twice)");
            goto done;
        }
        Py_INCREF(search); /* held, whatever the constraint does to the list */
        locked[n_locked] = search;
    }
    engine_lock(model->lock);
    engine_lock(pool->lock);
    lmd_error err;
    lmd_status st;
    int32_t peak = 0;
    signal_check check = {{0, 0}, 0};
    beam_constraint constraint = {constraint_obj, model->lock, 0};
    timespec_get(&check.last, TIME_UTC);
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_decode_beam_searches(model->model, pool->pool, searches, (int32_t)S, prompt_data, prompt_lens, &peak,
                                  constraint_obj != Py_None ? constrain_beams : NULL, &constraint, stop_on_signal,
                                  &check, &err);
    Py_END_ALLOW_THREADS;
    PyThread_release_lock(pool->lock);
    PyThread_release_lock(model->lock);
    /* KeyboardInterrupt (or the handler's), or the constraint's exception */
    if (st == LMD_ERR_STOPPED && (check.raised || constraint.raised)) goto done;
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto done;
    }
    result = PyLong_FromLong(peak);
done:
    for (Py_ssize_t s = 0; s < n_locked; s++) {
        PyThread_release_lock(locked[s]->lock);
        Py_DECREF(locked[s]);
    }
    for (Py_ssize_t s = 0; prompts != NULL && s < S; s++) Py_XDECREF(prompts[s]);
    PyMem_Free(searches);
    PyMem_Free(locked);
    PyMem_Free(prompts);
    PyMem_Free(prompt_data);
    PyMem_Free(prompt_lens);
    return result;
}

/* ------------------------------------------------------------------ */
/* speculative decoding                                                 */
/* ------------------------------------------------------------------ */

/* speculative_verify(draft_tokens int32 (k,), draft_logprobs f32 (k, V), target_logprobs f32
 * (k or k + 1, V), coins f64 (k, 2)) -> (n_accepted, residual_token or -1) */
static PyObject *py_speculative_verify(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *objects[4];
    PyArrayObject *tokens = NULL, *draft = NULL, *target = NULL, *coins = NULL;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOO", &objects[0], &objects[1], &objects[2], &objects[3])) return NULL;
    if (as_array(objects[0], NPY_INT32, 1, "draft_tokens", &tokens) || as_array(objects[1], NPY_FLOAT32, 2, "draft_logprobs", &draft) ||
        as_array(objects[2], NPY_FLOAT32, 2, "target_logprobs", &target) || as_array(objects[3], NPY_FLOAT64, 2, "coins", &coins))
        goto done;
    if (!tokens || !draft || !target || !coins) {
        PyErr_SetString(PyExc_TypeError, "speculative_verify: no argument may be None");
        goto done;
    }
    const npy_intp k = PyArray_DIM(tokens, 0), V = PyArray_DIM(draft, 1);
    if (PyArray_DIM(draft, 0) != k || PyArray_DIM(target, 1) != V || PyArray_DIM(target, 0) < k ||
        PyArray_DIM(coins, 0) != k || PyArray_DIM(coins, 1) != 2 || V < 1 || V > INT32_MAX || k > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "speculative_verify: shapes disagree (draft_tokens (%zd,), draft_logprobs (%zd, %zd), "
                     "target_logprobs (%zd, %zd), coins (%zd, %zd))",
                     (Py_ssize_t)k, (Py_ssize_t)PyArray_DIM(draft, 0), (Py_ssize_t)V, (Py_ssize_t)PyArray_DIM(target, 0),
                     (Py_ssize_t)PyArray_DIM(target, 1), (Py_ssize_t)PyArray_DIM(coins, 0), (Py_ssize_t)PyArray_DIM(coins, 1));
        goto done;
    }
    lmd_error err;
    int32_t kept = 0, residual = -1;
    lmd_status st;
    Py_BEGIN_ALLOW_THREADS;
    st = lmd_speculative_verify(PyArray_DATA(tokens), (int32_t)k, PyArray_DATA(draft), PyArray_DATA(target), (int32_t)V,
                                PyArray_DATA(coins), &kept, &residual, &err);
    Py_END_ALLOW_THREADS;
    if (st != LMD_OK) {
        raise_status(st, &err);
        goto done;
    }
    result = Py_BuildValue("(ii)", (int)kept, (int)residual);
done:
    Py_XDECREF(tokens);
    Py_XDECREF(draft);
    Py_XDECREF(target);
    Py_XDECREF(coins);
    return result;
}

/* contrastive_scores(expert f32 (R, V), amateur f32 (R, V), alpha, amateur_temperature) -> f32 (R, V) */
static PyObject *py_contrastive_scores(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *expert_obj, *amateur_obj;
    double alpha, temperature;
    PyArrayObject *expert = NULL, *amateur = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OOdd", &expert_obj, &amateur_obj, &alpha, &temperature)) return NULL;
    if (as_array(expert_obj, NPY_FLOAT32, 2, "expert_logits", &expert) ||
        as_array(amateur_obj, NPY_FLOAT32, 2, "amateur_logits", &amateur))
        goto fail;
    if (!expert || !amateur || PyArray_DIM(expert, 0) != PyArray_DIM(amateur, 0) ||
        PyArray_DIM(expert, 1) != PyArray_DIM(amateur, 1) || PyArray_DIM(expert, 1) < 1 ||
        PyArray_DIM(expert, 1) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "expert_logits and amateur_logits must have one shape (rows, vocab >= 1)");
        goto fail;
    }
    out = (PyArrayObject *)PyArray_EMPTY(2, PyArray_DIMS(expert), NPY_FLOAT32, 0);
    if (out == NULL) goto fail;
    const npy_intp R = PyArray_DIM(expert, 0), V = PyArray_DIM(expert, 1);
    for (npy_intp r = 0; r < R; r++) {
        lmd_error err;
        lmd_status st = lmd_contrastive_scores((const float *)PyArray_DATA(expert) + r * V,
                                               (const float *)PyArray_DATA(amateur) + r * V, (int32_t)V, alpha,
                                               temperature, (float *)PyArray_DATA(out) + r * V, &err);
        if (st != LMD_OK) {
            if (R > 1) PyErr_Format(PyExc_ValueError, "row %zd: %s", (Py_ssize_t)r, err.msg);
            else raise_status(st, &err);
            goto fail;
        }
    }
    Py_DECREF(expert);
    Py_DECREF(amateur);
    return (PyObject *)out;
fail:
    Py_XDECREF(expert);
    Py_XDECREF(amateur);
    Py_XDECREF(out);
    return NULL;
}

typedef struct {
    PyObject_HEAD
    lmd_speculative_run *run;
    EngineModelObject *target, *draft; /* strong references: the run borrows them */
    EngineKVPoolObject *target_pool, *draft_pool;
    GeneratorObject *generator;
    int32_t n_draft;
} SpeculativeDecoderObject;

static void SpeculativeDecoder_dealloc(SpeculativeDecoderObject *self) {
    lmd_speculative_run_free(self->run); /* frees its sequences before the pools can go */
    Py_XDECREF(self->target);
    Py_XDECREF(self->draft);
    Py_XDECREF(self->target_pool);
    Py_XDECREF(self->draft_pool);
    Py_XDECREF(self->generator);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* SpeculativeDecoder(target: Model, target_pool: KVPool, draft: Model, draft_pool: KVPool,
 *                    generator: Generator, n_draft: int) */
static int SpeculativeDecoder_init(SpeculativeDecoderObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"target", "target_pool", "draft", "draft_pool", "generator", "n_draft", NULL};
    EngineModelObject *target, *draft;
    EngineKVPoolObject *target_pool, *draft_pool;
    GeneratorObject *generator;
    int n_draft;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!O!O!i", kwlist, &EngineModelType, &target, &EngineKVPoolType,
                                     &target_pool, &EngineModelType, &draft, &EngineKVPoolType, &draft_pool,
                                     &GeneratorType, &generator, &n_draft))
        return -1;
    if (target->model == NULL || draft->model == NULL || target_pool->pool == NULL || draft_pool->pool == NULL ||
        generator->gen == NULL) {
        PyErr_SetString(PyExc_ValueError, "models, pools and generator must be initialized");
        return -1;
    }
    lmd_error err;
    lmd_speculative_run *run = NULL;
    lmd_status st = lmd_speculative_run_init(&run, target->model, target_pool->pool, draft->model, draft_pool->pool,
                                             generator->gen, n_draft, &err);
    if (st != LMD_OK) {
        raise_status(st, &err);
        return -1;
    }
    lmd_speculative_run_free(self->run);
    self->run = run;
    self->n_draft = n_draft;
    Py_INCREF(target);
    Py_INCREF(draft);
    Py_INCREF(target_pool);
    Py_INCREF(draft_pool);
    Py_INCREF(generator);
    Py_XSETREF(self->target, target);
    Py_XSETREF(self->draft, draft);
    Py_XSETREF(self->target_pool, target_pool);
    Py_XSETREF(self->draft_pool, draft_pool);
    Py_XSETREF(self->generator, generator);
    return 0;
}

/* rounds(max_rounds) -> (ids int64, tokens int64): the tokens the last round appended, in order */
static PyObject *SpeculativeDecoder_rounds(SpeculativeDecoderObject *self, PyObject *arg) {
    if (self->run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SpeculativeDecoder is not initialized");
        return NULL;
    }
    return run_c_loop(speculative_run_rounds, self->run, arg, "max_rounds", self->generator, self->target,
                      self->target_pool, self->draft, self->draft_pool,
                      (size_t)self->generator->n_seqs * (size_t)(self->n_draft + 1));
}

/* counts(k) -> (draft tokens proposed, draft tokens kept) for sequence k */
static PyObject *SpeculativeDecoder_counts(SpeculativeDecoderObject *self, PyObject *arg) {
    if (self->run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SpeculativeDecoder is not initialized");
        return NULL;
    }
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    if (k < 0 || k >= self->generator->n_seqs) {
        PyErr_Format(PyExc_IndexError, "sequence %ld is outside [0, %d)", k, (int)self->generator->n_seqs);
        return NULL;
    }
    int64_t proposed, kept;
    lmd_speculative_run_counts(self->run, (int32_t)k, &proposed, &kept);
    return Py_BuildValue("(LL)", (long long)proposed, (long long)kept);
}

static PyMethodDef SpeculativeDecoder_methods[] = {
    {"rounds", (PyCFunction)SpeculativeDecoder_rounds, METH_O, "Run up to max_rounds draft-and-verify rounds in C."},
    {"counts", (PyCFunction)SpeculativeDecoder_counts, METH_O, "(proposed, kept) draft tokens of sequence k."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SpeculativeDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmdecode._core.SpeculativeDecoder",
    .tp_basicsize = sizeof(SpeculativeDecoderObject),
    .tp_dealloc = (destructor)SpeculativeDecoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SpeculativeDecoder(target, target_pool, draft, draft_pool, generator, n_draft): speculative decoding in C.",
    .tp_methods = SpeculativeDecoder_methods,
    .tp_init = (initproc)SpeculativeDecoder_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------ */
/* module                                                               */
/* ------------------------------------------------------------------ */

static PyMethodDef core_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "Build facts: OpenMP, vector extensions, threads."},
    {"set_num_threads", py_set_num_threads, METH_O, "Threads for parallel loops (0 = default)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Threads for parallel loops."},
    {"rng_uniform", py_rng_uniform, METH_VARARGS, "Philox uniform of (seed, stream, step, index)."},
    /* sampling bindings */
    {"sample_rows", (PyCFunction)(void (*)(void))py_sample_rows, METH_VARARGS | METH_KEYWORDS,
     "Process and sample rows of logits (see sampling.py)."},
    {"validate_params", py_validate_params, METH_O, "Check a (R, 12) parameter table."},
    {"target_logprobs", py_target_logprobs, METH_VARARGS,
     "target_logprobs(logits (T, V), targets (T,)) -> (log softmax(logits[t])[targets[t]] (T,) float32, "
     "whether each target has its row's largest logit (T,) bool)."},
    /* model bindings */
    {"model_forward", (PyCFunction)(void (*)(void))py_model_forward, METH_VARARGS | METH_KEYWORDS,
     "model_forward(model, seqs, tokens, token_seq, logit_index, out=None) -> logits (n_logits, vocab)."},
    {"quantize_q8_0", py_quantize_q8_0, METH_O, "float32 (rows, cols) -> q8_0 storage uint8 (rows, cols/32*34)."},
    {"pack_q8_0", py_pack_q8_0, METH_O, "llama.cpp q8_0 blocks uint8 (rows, cols/32*34) -> q8_0 storage."},
    {"dequantize_q8_0", py_dequantize_q8_0, METH_O, "q8_0 storage uint8 (rows, cols/32*34) -> float32 (rows, cols)."},
    {"quantize_q4", py_quantize_q4, METH_VARARGS,
     "quantize_q4(x, kind): float32 (rows, cols) -> q4_0 / q4_1 storage uint8 (rows, cols/32*18 or 20)."},
    {"pack_q4", py_pack_q4, METH_VARARGS,
     "pack_q4(blocks, kind): llama.cpp q4_0 / q4_1 blocks uint8 (rows, cols/32*18 or 20) -> the engine's storage."},
    {"dequantize_q4", py_dequantize_q4, METH_VARARGS,
     "dequantize_q4(packed, kind): q4_0 / q4_1 storage uint8 (rows, cols/32*18 or 20) -> float32 (rows, cols)."},
    /* decoding-loop bindings */
    {"model_beam_search", py_model_beam_search, METH_VARARGS,
     "model_beam_search(model, pool, searches, prompts, constraint=None) -> peak KV blocks: whole searches in C,\n"
     "all of them in one batched forward per step."},
    {"contrastive_scores", py_contrastive_scores, METH_VARARGS,
     "contrastive_scores(expert (R, V), amateur (R, V), alpha, amateur_temperature) -> scores (R, V) float32."},
    {"speculative_verify", py_speculative_verify, METH_VARARGS,
     "speculative_verify(draft_tokens (k,), draft_logprobs (k, V), target_logprobs (k[+1], V), coins (k, 2)) -> (n_accepted, residual_token)."},
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
    if (PyType_Ready(&BeamSearchType) < 0 ||
        PyModule_AddObjectRef(m, "BeamSearch", (PyObject *)&BeamSearchType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&GeneratorType) < 0 ||
        PyModule_AddObjectRef(m, "Generator", (PyObject *)&GeneratorType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* model types are registered here */
    if (register_model_types(m) < 0 || PyType_Ready(&ModelDecoderType) < 0 ||
        PyModule_AddObjectRef(m, "ModelDecoder", (PyObject *)&ModelDecoderType) < 0 ||
        PyType_Ready(&SpeculativeDecoderType) < 0 ||
        PyModule_AddObjectRef(m, "SpeculativeDecoder", (PyObject *)&SpeculativeDecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *stream_bit = PyLong_FromUnsignedLongLong(LMD_SPECULATIVE_STREAM);
    if (stream_bit == NULL || PyModule_AddObject(m, "SPECULATIVE_STREAM", stream_bit) < 0) {
        Py_XDECREF(stream_bit);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
