/*
 * kvcache.h -- paged key/value cache with shared prefixes.
 *
 * A pool owns fixed-size blocks of `block_size` positions; each block holds the
 * keys and values of those positions for every layer and kv head. Keys are kept
 * feature-major, (head_size, block_size) per kv head, so that one vector load gives a
 * feature of consecutive positions and attention scores are lanes of vector FMAs,
 * with no horizontal sums (model.c). Values are rows of a head's head_size features,
 * (block_size, head_size) per kv head, so that a head's values in a block are one
 * contiguous run (a decode after 2040 positions of the 110M Llama 8.7 -> 8.2 ms against
 * rows of all heads, kv_dim apart). The pool stores them layer by layer and kv head by
 * kv head, block after block: (n_layers, n_kv_heads, n_blocks, ...), and a sequence takes
 * the block after its last one where it can (sequences growing together each start a run
 * of their own: take_block in kvcache.c), so that a sequence's blocks lie end to end for
 * each head, and attention reads one
 * long run per head instead of a page-sized piece per block (stored block after block,
 * every 4 KB piece of a 110M Llama head's keys lay 576 kB from the next, and its decode's
 * attention after 2,048 positions read the cache at 13 GB/s; end to end, 28 GB/s, one Zen 4
 * thread's bandwidth). A sequence
 * is a table of block ids plus a length. Forking a sequence copies only its block
 * table and raises the blocks' reference counts, so a fork costs len/block_size
 * integers, not len * n_layers * kv_dim floats. A block shared by several
 * sequences is copied (at most block_size positions) by the first one that writes
 * into it. Keys and values are stored as float32 or, at half the memory, as IEEE
 * half precision (LMD_KV_F16, llama.cpp's default cache type), rounded to nearest
 * even when written and widened exactly when read.
 *
 *     lmd_kvpool *pool; lmd_kvseq *a, *b; lmd_error err;
 *     lmd_kvpool_init(&pool, n_layers, kv_dim, head_size, 16, 128, LMD_KV_F32, &err);  // 2048 positions
 *     lmd_kvseq_init(&a, pool, 2048, &err);
 *     lmd_kvseq_reserve(a, 10, &err);  // blocks for positions len .. len+9
 *     ... write through lmd_kvseq_key / lmd_kvseq_value ...
 *     a->len += 10;
 *     lmd_kvseq_fork(&b, a, &err);       // b shares a's 10 positions
 *     lmd_kvseq_truncate(a, 4, &err);    // rollback: a keeps positions 0..3
 *     lmd_kvseq_free(b); lmd_kvseq_free(a); lmd_kvpool_free(pool);
 *
 * Ownership and threads: a sequence borrows its pool, which must outlive it.
 * Sequences of one pool must not be used from two threads at once (the
 * Python binding holds a lock per pool). Every failing call leaves the pool
 * and the sequences as they were.
 */
#ifndef LMD_KVCACHE_H
#define LMD_KVCACHE_H

#include "lmdecode.h"

#include <stddef.h>
#include <stdint.h>

/* how keys and values are stored */
typedef enum {
    LMD_KV_F32 = 0, /* float */
    LMD_KV_F16 = 1  /* IEEE binary16 bits (uint16_t) */
} lmd_kv_dtype;

typedef struct lmd_kvpool {
    int32_t n_layers;
    int32_t kv_dim;     /* n_kv_heads * head_size */
    int32_t block_size; /* positions per block */
    int32_t n_blocks;
    lmd_kv_dtype dtype;
    size_t elem_bytes;  /* bytes per stored feature: 4 (f32) or 2 (f16) */
    int32_t head_size;  /* features per kv head (a divisor of kv_dim) */
    void *k;            /* (n_layers, kv_dim / head_size, n_blocks, head_size, block_size) elements */
    void *v;            /* (n_layers, kv_dim / head_size, n_blocks, block_size, head_size) elements */
    int32_t *refcount;  /* (n_blocks,): sequences whose table holds the block; 0 = free */
    int32_t n_free;     /* blocks whose refcount is 0 */
} lmd_kvpool;

typedef struct lmd_kvseq {
    lmd_kvpool *pool; /* borrowed */
    int32_t max_len;  /* positions this sequence may hold (the model's context length) */
    int32_t len;      /* positions filled, in [0, max_len] */
    int32_t *blocks;  /* (ceil(max_len / block_size),): block of each position range, -1 if none */
    int32_t pending;  /* scratch for lmd_model_forward: new positions of the current call */
} lmd_kvseq;

lmd_status lmd_kvpool_init(lmd_kvpool **out, int32_t n_layers, int32_t kv_dim, int32_t head_size,
                           int32_t block_size, int32_t n_blocks, lmd_kv_dtype dtype, lmd_error *err);
/* Safe on NULL and on a half-built pool. Sequences of the pool must be freed first. */
void lmd_kvpool_free(lmd_kvpool *pool);

/* An empty sequence that may grow to max_len positions. */
lmd_status lmd_kvseq_init(lmd_kvseq **out, lmd_kvpool *pool, int32_t max_len, lmd_error *err);
/* Releases the sequence's blocks; safe on NULL. */
void lmd_kvseq_free(lmd_kvseq *seq);
/* A new sequence holding the same positions as src, sharing its blocks. */
lmd_status lmd_kvseq_fork(lmd_kvseq **out, const lmd_kvseq *src, lmd_error *err);
/* Keeps positions [0, len); len must be in [0, seq->len]. Frees blocks no sequence holds. */
lmd_status lmd_kvseq_truncate(lmd_kvseq *seq, int32_t len, lmd_error *err);

/* Free blocks that lmd_kvseq_reserve(seq, n_new) would take. */
int32_t lmd_kvseq_blocks_needed(const lmd_kvseq *seq, int32_t n_new);
/* Makes positions [len, len + n_new) writable and private to seq (copying a shared,
 * partly filled last block); seq->len is not changed. LMD_ERR_CACHE_FULL if
 * len + n_new > max_len or the pool lacks blocks. */
lmd_status lmd_kvseq_reserve(lmd_kvseq *seq, int32_t n_new, lmd_error *err);

/* Byte offset of kv head `head`'s (head_size, block_size) elements of layer in block
 * `block`, in p->k and in p->v alike. */
static inline size_t lmd_kvpool_chunk_offset(const lmd_kvpool *p, int32_t layer, int32_t head, int32_t block) {
    const size_t heads = (size_t)(p->kv_dim / p->head_size);
    return (((size_t)layer * heads + (size_t)head) * (size_t)p->n_blocks + (size_t)block) * (size_t)p->head_size *
           (size_t)p->block_size * p->elem_bytes;
}
/* Feature j of the key of position pos (< len after reserve) in layer; the next feature
 * of the same kv head is block_size elements further, and position pos + 1 (in the same
 * block) one element further. */
static inline void *lmd_kvseq_key(const lmd_kvseq *seq, int32_t layer, int32_t pos, int32_t j) {
    const lmd_kvpool *p = seq->pool;
    const int32_t block = seq->blocks[pos / p->block_size];
    const size_t within = (size_t)(j % p->head_size) * (size_t)p->block_size + (size_t)(pos % p->block_size);
    return (char *)p->k + lmd_kvpool_chunk_offset(p, layer, j / p->head_size, block) + within * p->elem_bytes;
}
/* Feature j of the value of position pos (< len after reserve) in layer; the features of
 * one kv head are consecutive, and the same head's features of position pos + 1 (in the
 * same block) head_size elements further. */
static inline void *lmd_kvseq_value(const lmd_kvseq *seq, int32_t layer, int32_t pos, int32_t j) {
    const lmd_kvpool *p = seq->pool;
    const int32_t block = seq->blocks[pos / p->block_size];
    const size_t within = (size_t)(pos % p->block_size) * (size_t)p->head_size + (size_t)(j % p->head_size);
    return (char *)p->v + lmd_kvpool_chunk_offset(p, layer, j / p->head_size, block) + within * p->elem_bytes;
}

#endif /* LMD_KVCACHE_H */
