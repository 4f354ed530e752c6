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
#include "model.h"

#include "pythread.h"

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
        PyErr_Format(PyExc_TypeError, "tensor '%s' has dtype %R; expected float32, uint16 (bf16) or uint8 (q8_0)",
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
    if (!PyArray_Check(v) || PyArray_TYPE((PyArrayObject *)v) != NPY_FLOAT32 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)v) || !PyArray_ISALIGNED((PyArrayObject *)v)) {
        PyErr_Format(PyExc_TypeError, "tensor '%s' must be a C-contiguous float32 numpy array", name);
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
#define MATRIX(field)                                                                                  \
    snprintf(name, sizeof name, "layers.%d." #field, l);                                               \
    if (!tensor_matrix(tensors, name, &lw->field)) goto fail
#define VECTOR(field, length)                                                                          \
    snprintf(name, sizeof name, "layers.%d." #field, l);                                               \
    if (!tensor_vector(tensors, name, length, &lw->field)) goto fail
            MATRIX(wq);
            MATRIX(wk);
            MATRIX(wv);
            MATRIX(wo);
            MATRIX(w_gate);
            MATRIX(w_up);
            MATRIX(w_down);
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
#undef MATRIX
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
    PyMem_Free(layers);
    self->model = model;
    Py_INCREF(tensors);
    self->tensors = tensors;
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

/* KVPool(n_layers, kv_dim, block_size, n_blocks) */
static int EngineKVPool_init(EngineKVPoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n_layers", "kv_dim", "block_size", "n_blocks", NULL};
    int n_layers, kv_dim, block_size, n_blocks;
    lmd_error err = {{0}};
    lmd_status st;
    lmd_kvpool *pool = NULL;
    if (self->pool != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVPool is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiii", kwlist, &n_layers, &kv_dim, &block_size, &n_blocks))
        return -1;
    Py_BEGIN_ALLOW_THREADS
    st = lmd_kvpool_init(&pool, n_layers, kv_dim, block_size, n_blocks, &err);
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

static PyObject *EngineKVPool_get_n_blocks(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->pool ? self->pool->n_blocks : 0);
}

static PyObject *EngineKVPool_get_block_size(EngineKVPoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->pool ? self->pool->block_size : 0);
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
    long length = PyLong_AsLong(arg);
    if (length == -1 && PyErr_Occurred()) return NULL;
    if (length < 0 || length > self->seq->len) {
        PyErr_Format(PyExc_ValueError, "length (=%ld) must be in [0, %d] (the cached positions)", length,
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

/* model_forward(model, seqs, tokens, token_seq, logit_index) -> float32 (n_logits, vocab) */
static PyObject *py_model_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"model", "seqs", "tokens", "token_seq", "logit_index", NULL};
    EngineModelObject *model;
    PyObject *seqs_arg, *tokens_arg, *token_seq_arg, *logit_index_arg;
    PyObject *seqs_fast = NULL;
    PyArrayObject *tokens = NULL, *token_seq = NULL, *logit_index = NULL, *logits = NULL;
    lmd_kvseq **seq_ptrs = NULL;
    EngineKVPoolObject *pool = NULL;
    lmd_error err = {{0}};
    lmd_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOO", kwlist, &EngineModelType, &model, &seqs_arg,
                                     &tokens_arg, &token_seq_arg, &logit_index_arg))
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
        logits = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (logits == NULL) goto fail;
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

/* quantize_q8_0(x: float32 (rows, cols)) -> uint8 (rows, cols / 32 * 34), llama.cpp's block layout */
static PyObject *py_quantize_q8_0(PyObject *self, PyObject *arg) {
    (void)self;
    PyArrayObject *x = NULL, *out = NULL;
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
        lmd_quantize_q8_0(dst, src, (int64_t)rows * cols);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(x);
    return (PyObject *)out;
fail:
    Py_XDECREF(x);
    Py_XDECREF(out);
    return NULL;
}

static PyGetSetDef EngineKVPool_getset[] = {
    {"free_blocks", (getter)EngineKVPool_get_free_blocks, NULL, "blocks no sequence holds", NULL},
    {"n_blocks", (getter)EngineKVPool_get_n_blocks, NULL, "blocks in the pool", NULL},
    {"block_size", (getter)EngineKVPool_get_block_size, NULL, "positions per block", NULL},
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
/* module                                                               */
/* ------------------------------------------------------------------ */

static PyMethodDef core_methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "Build facts: OpenMP, vector extensions, threads."},
    {"set_num_threads", py_set_num_threads, METH_O, "Threads for parallel loops (0 = default)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Threads for parallel loops."},
    {"rng_uniform", py_rng_uniform, METH_VARARGS, "Philox uniform of (seed, stream, step, index)."},
    /* sampling bindings */
    /* model bindings */
    {"model_forward", (PyCFunction)(void (*)(void))py_model_forward, METH_VARARGS | METH_KEYWORDS,
     "model_forward(model, seqs, tokens, token_seq, logit_index) -> logits (n_logits, vocab)."},
    {"quantize_q8_0", py_quantize_q8_0, METH_O, "float32 (rows, cols) -> q8_0 blocks uint8 (rows, cols/32*34)."},
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
    if (register_model_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
