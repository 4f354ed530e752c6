/* kvcache.c -- paged key/value cache (contract in kvcache.h). */
#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

lmd_status lmd_kvpool_init(lmd_kvpool **out, int32_t n_layers, int32_t kv_dim, int32_t head_size,
                           int32_t block_size, int32_t n_blocks, lmd_kv_dtype dtype, lmd_error *err) {
    *out = NULL;
    if (n_layers < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_layers (=%d) must be >= 1", n_layers);
    if (kv_dim < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "kv_dim (=%d) must be >= 1", kv_dim);
    if (head_size < 1 || kv_dim % head_size != 0)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "head_size (=%d) must be a positive divisor of kv_dim (=%d)",
                        head_size, kv_dim);
    if (block_size < 1 || block_size > 4096)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "block_size (=%d) must be in [1, 4096]", block_size);
    if (n_blocks < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_blocks (=%d) must be >= 1", n_blocks);
    if (dtype != LMD_KV_F32 && dtype != LMD_KV_F16)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "dtype (=%d) is not a KV cache type", (int)dtype);
    const size_t elem_bytes = dtype == LMD_KV_F16 ? sizeof(uint16_t) : sizeof(float);
    /* divide instead of multiplying, so that the check itself cannot wrap around (with room
     * to round the pool up to whole pages) */
    const size_t page = 4096;
    if ((size_t)kv_dim > (SIZE_MAX - page) / elem_bytes / (size_t)n_blocks / (size_t)n_layers / (size_t)block_size)
        return lmd_fail(err, LMD_ERR_NOMEM,
                        "a KV pool of %d blocks of %d layers x %d positions x %d features does not fit in memory",
                        n_blocks, n_layers, block_size, kv_dim);
    size_t bytes_per_block = (size_t)n_layers * block_size * kv_dim * elem_bytes;
    lmd_kvpool *p = calloc(1, sizeof *p);
    if (p == NULL) return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating a KV pool");
    p->n_layers = n_layers;
    p->kv_dim = kv_dim;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    p->dtype = dtype;
    p->elem_bytes = elem_bytes;
    p->head_size = head_size;
    /* malloc, not calloc: pages become resident only as positions are written (each layer's
     * kv head as its blocks fill; where transparent huge pages are always on, 2 MB at a time,
     * so a pool larger than its use may be resident whole, as llama.cpp's cache is). Whole pages:
     * with the pool 64 bytes into a page (aligned_alloc(64, ...) of a large size), decoding a
     * token after 2040 positions of a 12-layer f16 cache took 8.5 ms instead of 7.0 (f32:
     * 8.7 -> 8.5; the 110M Llama q8_0, one thread). */
    const size_t pool_bytes = (bytes_per_block * n_blocks + page - 1) / page * page;
    p->k = aligned_alloc(page, pool_bytes);
    p->v = aligned_alloc(page, pool_bytes);
    p->refcount = calloc((size_t)n_blocks, sizeof(int32_t));
    if (p->k == NULL || p->v == NULL || p->refcount == NULL) {
        lmd_kvpool_free(p);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating a KV pool of %d blocks (%zu bytes)",
                        n_blocks, 2 * bytes_per_block * n_blocks);
    }
    p->n_free = n_blocks;
    *out = p;
    return LMD_OK;
}

void lmd_kvpool_free(lmd_kvpool *pool) {
    if (pool == NULL) return;
    free(pool->k);
    free(pool->v);
    free(pool->refcount);
    free(pool);
}

/* A free block for a sequence whose previous block is `after` (-1: none). Attention reads a
 * kv head's keys block after block, and blocks that lie end to end read as one run (kvcache.h),
 * so: the block right after `after` when it is free; else the start of the longest run of free
 * blocks when nothing precedes it, or its middle, leaving the sequence before the run room to
 * grow. Sequences that grow together (a batch, n samples, beams) so each get a run of their own;
 * taken in turn from a stack of free blocks (the earlier allocator), four sequences decoding
 * 1,008 positions each had their blocks interleaved, and a step of their four tokens took
 * 44.4 ms against 35.3 with a run each (the 110M Llama, one thread). The caller has checked
 * that a block is free. */
static int32_t take_block(lmd_kvpool *p, int32_t after) {
    const int32_t *ref = p->refcount;
    int32_t id = after + 1;
    if (after < 0 || id >= p->n_blocks || ref[id] != 0) {
        int32_t best_start = 0, best_len = 0;
        for (int32_t start = 0; start < p->n_blocks;) {
            if (ref[start] != 0) {
                start++;
                continue;
            }
            int32_t end = start + 1;
            while (end < p->n_blocks && ref[end] == 0) end++;
            if (end - start > best_len) best_start = start, best_len = end - start;
            start = end;
        }
        id = best_start == 0 ? 0 : best_start + best_len / 2;
    }
    p->refcount[id] = 1;
    p->n_free--;
    return id;
}

static void release_block(lmd_kvpool *p, int32_t id) {
    if (--p->refcount[id] == 0) p->n_free++;
}

static int32_t table_size(const lmd_kvpool *p, int32_t max_len) {
    return (int32_t)(((int64_t)max_len + p->block_size - 1) / p->block_size);
}

static int32_t blocks_in_use(const lmd_kvpool *p, int32_t len) {
    return (int32_t)(((int64_t)len + p->block_size - 1) / p->block_size);
}

lmd_status lmd_kvseq_init(lmd_kvseq **out, lmd_kvpool *pool, int32_t max_len, lmd_error *err) {
    *out = NULL;
    if (pool == NULL) return lmd_fail(err, LMD_ERR_INVALID_ARG, "pool is NULL");
    if (max_len < 1) return lmd_fail(err, LMD_ERR_INVALID_ARG, "max_len (=%d) must be >= 1", max_len);
    lmd_kvseq *s = calloc(1, sizeof *s);
    int32_t n = table_size(pool, max_len);
    int32_t *blocks = malloc((size_t)n * sizeof(int32_t));
    if (s == NULL || blocks == NULL) {
        free(s);
        free(blocks);
        return lmd_fail(err, LMD_ERR_NOMEM, "out of memory allocating a KV sequence");
    }
    for (int32_t i = 0; i < n; i++) blocks[i] = -1;
    s->pool = pool;
    s->max_len = max_len;
    s->len = 0;
    s->blocks = blocks;
    *out = s;
    return LMD_OK;
}

void lmd_kvseq_free(lmd_kvseq *seq) {
    if (seq == NULL) return;
    if (seq->blocks != NULL && seq->pool != NULL) {
        int32_t n = table_size(seq->pool, seq->max_len);
        for (int32_t i = 0; i < n; i++)
            if (seq->blocks[i] >= 0) release_block(seq->pool, seq->blocks[i]);
    }
    free(seq->blocks);
    free(seq);
}

lmd_status lmd_kvseq_fork(lmd_kvseq **out, const lmd_kvseq *src, lmd_error *err) {
    lmd_status st = lmd_kvseq_init(out, src->pool, src->max_len, err);
    if (st != LMD_OK) return st;
    lmd_kvseq *s = *out;
    int32_t used = blocks_in_use(src->pool, src->len);
    for (int32_t i = 0; i < used; i++) {
        s->blocks[i] = src->blocks[i];
        src->pool->refcount[s->blocks[i]]++;
    }
    s->len = src->len;
    return LMD_OK;
}

lmd_status lmd_kvseq_truncate(lmd_kvseq *seq, int32_t len, lmd_error *err) {
    if (len < 0 || len > seq->len)
        return lmd_fail(err, LMD_ERR_INVALID_ARG, "length (=%d) must be in [0, %d] (the cached positions)",
                        len, seq->len);
    int32_t keep = blocks_in_use(seq->pool, len);
    int32_t n = table_size(seq->pool, seq->max_len);
    for (int32_t i = keep; i < n; i++)
        if (seq->blocks[i] >= 0) {
            release_block(seq->pool, seq->blocks[i]);
            seq->blocks[i] = -1;
        }
    seq->len = len;
    return LMD_OK;
}

/* True if writing position seq->len would touch a partly filled block that another sequence holds. */
static int last_block_shared(const lmd_kvseq *seq) {
    const lmd_kvpool *p = seq->pool;
    if (seq->len % p->block_size == 0) return 0;
    return p->refcount[seq->blocks[seq->len / p->block_size]] > 1;
}

int32_t lmd_kvseq_blocks_needed(const lmd_kvseq *seq, int32_t n_new) {
    if (n_new <= 0) return 0;
    const lmd_kvpool *p = seq->pool;
    /* blocks an earlier reserve took for positions not yet filled are already there */
    int64_t last = ((int64_t)seq->len + n_new + p->block_size - 1) / p->block_size;
    int64_t table = table_size(p, seq->max_len), stop = last < table ? last : table;
    int64_t needed = last - stop + last_block_shared(seq);
    for (int64_t i = blocks_in_use(p, seq->len); i < stop; i++) needed += seq->blocks[i] < 0;
    return needed < INT32_MAX ? (int32_t)needed : INT32_MAX;
}

lmd_status lmd_kvseq_reserve(lmd_kvseq *seq, int32_t n_new, lmd_error *err) {
    lmd_kvpool *p = seq->pool;
    if (n_new < 0) return lmd_fail(err, LMD_ERR_INVALID_ARG, "n_new (=%d) must be >= 0", n_new);
    if ((int64_t)seq->len + n_new > seq->max_len)
        return lmd_fail(err, LMD_ERR_CACHE_FULL,
                        "%d cached + %d new positions exceed the context length %d", seq->len, n_new,
                        seq->max_len);
    int32_t needed = lmd_kvseq_blocks_needed(seq, n_new);
    if (needed > p->n_free)
        return lmd_fail(err, LMD_ERR_CACHE_FULL,
                        "the KV pool has %d free blocks of %d positions but %d are needed", p->n_free,
                        p->block_size, needed);
    if (n_new == 0) return LMD_OK;
    if (last_block_shared(seq)) {
        /* copy on write: each layer's and kv head's filled key columns and value rows */
        int32_t idx = seq->len / p->block_size;
        int32_t old = seq->blocks[idx];
        int32_t fresh = take_block(p, idx > 0 ? seq->blocks[idx - 1] : -1);
        const size_t filled = (size_t)(seq->len % p->block_size), e = p->elem_bytes;
        char *k = p->k, *v = p->v;
        for (int32_t l = 0; l < p->n_layers; l++)
            for (int32_t h = 0; h < p->kv_dim / p->head_size; h++) {
                const size_t src = lmd_kvpool_chunk_offset(p, l, h, old), dst = lmd_kvpool_chunk_offset(p, l, h, fresh);
                for (int32_t j = 0; j < p->head_size; j++)
                    memcpy(k + dst + (size_t)j * p->block_size * e, k + src + (size_t)j * p->block_size * e, filled * e);
                memcpy(v + dst, v + src, filled * p->head_size * e);
            }
        release_block(p, old);
        seq->blocks[idx] = fresh;
    }
    int32_t first = blocks_in_use(p, seq->len), last = blocks_in_use(p, seq->len + n_new);
    for (int32_t i = first; i < last; i++)
        if (seq->blocks[i] < 0) seq->blocks[i] = take_block(p, i > 0 ? seq->blocks[i - 1] : -1);
    return LMD_OK;
}
