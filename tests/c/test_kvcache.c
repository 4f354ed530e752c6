/* test_kvcache.c -- the paged KV cache: init errors, reserve and length,
 * shared blocks after fork, copy on write, truncation, and failures that must
 * leave the pool and the sequences exactly as they were. */
#include <stdint.h>

#include "kvcache.h"
#include "test_rand.h"
#include "test_util.h"

/* Everything a failing call must not change. */
typedef struct {
    int32_t n_free, len;
    int32_t refcount[64], blocks[64];
} snapshot;

static snapshot take_snapshot(const lmd_kvseq *s) {
    snapshot snap;
    memset(&snap, 0, sizeof snap);
    const lmd_kvpool *p = s->pool;
    int32_t table = (s->max_len + p->block_size - 1) / p->block_size;
    snap.n_free = p->n_free;
    snap.len = s->len;
    memcpy(snap.refcount, p->refcount, (size_t)p->n_blocks * sizeof(int32_t));
    memcpy(snap.blocks, s->blocks, (size_t)table * sizeof(int32_t));
    return snap;
}

static int same_snapshot(const snapshot *a, const snapshot *b) { return memcmp(a, b, sizeof *a) == 0; }

/* The storage type of the pools these tests make: main runs them for each. */
static lmd_kv_dtype pool_dtype = LMD_KV_F32;

/* A value that names (layer, position, feature, k or v), so copies can be checked; for
 * f16 pools its bits (a f16 NaN or not, the cache only copies them) */
static float tag(int32_t layer, int32_t pos, int32_t j, int is_v) {
    return (float)(layer * 100000 + pos * 100 + j) + (is_v ? 0.5f : 0.0f);
}
static uint16_t tag_bits(int32_t layer, int32_t pos, int32_t j, int is_v) {
    return (uint16_t)(layer * 9001 + pos * 97 + j * 2 + is_v);
}

/* sets (checks) one stored element to (against) tag + salt in the pool's type */
static void set_tagged(const lmd_kvpool *p, void *at, int32_t l, int32_t t, int32_t j, int is_v, float salt) {
    if (p->dtype == LMD_KV_F16) {
        const uint16_t bits = (uint16_t)(tag_bits(l, t, j, is_v) + (uint16_t)salt);
        memcpy(at, &bits, sizeof bits);
    } else {
        const float value = tag(l, t, j, is_v) + salt;
        memcpy(at, &value, sizeof value);
    }
}
static int holds_tagged(const lmd_kvpool *p, const void *at, int32_t l, int32_t t, int32_t j, int is_v, float salt) {
    if (p->dtype == LMD_KV_F16) {
        uint16_t bits;
        memcpy(&bits, at, sizeof bits);
        return bits == (uint16_t)(tag_bits(l, t, j, is_v) + (uint16_t)salt);
    }
    float value;
    memcpy(&value, at, sizeof value);
    return value == tag(l, t, j, is_v) + salt;
}

/* Writes positions [from, to) of every layer with tag values offset by `salt`. */
static void write_positions(lmd_kvseq *s, int32_t from, int32_t to, float salt) {
    const lmd_kvpool *p = s->pool;
    for (int32_t l = 0; l < p->n_layers; l++)
        for (int32_t t = from; t < to; t++)
            for (int32_t j = 0; j < p->kv_dim; j++) {
                set_tagged(p, lmd_kvseq_key(s, l, t, j), l, t, j, 0, salt);
                set_tagged(p, lmd_kvseq_value(s, l, t, j), l, t, j, 1, salt);
            }
}

static int positions_hold(const lmd_kvseq *s, int32_t from, int32_t to, float salt) {
    const lmd_kvpool *p = s->pool;
    for (int32_t l = 0; l < p->n_layers; l++)
        for (int32_t t = from; t < to; t++)
            for (int32_t j = 0; j < p->kv_dim; j++)
                if (!holds_tagged(p, lmd_kvseq_key(s, l, t, j), l, t, j, 0, salt) ||
                    !holds_tagged(p, lmd_kvseq_value(s, l, t, j), l, t, j, 1, salt))
                    return 0;
    return 1;
}

/* Appends n positions (reserve + write + len), checking that it succeeds. */
static void append(lmd_kvseq *s, int32_t n, float salt) {
    lmd_error err;
    lmd_status st = lmd_kvseq_reserve(s, n, &err);
    if (st != LMD_OK) fprintf(stderr, "reserve failed: %s\n", err.msg);
    CHECK(st == LMD_OK);
    if (st != LMD_OK) return;
    write_positions(s, s->len, s->len + n, salt);
    s->len += n;
}

/* Each block is held by as many of the given sequences as its refcount says, and n_free
 * counts the blocks no sequence holds. */
static int pool_consistent(const lmd_kvpool *p, lmd_kvseq *const *seqs, int n_seqs) {
    int32_t held[64] = {0}, free_blocks = 0;
    for (int i = 0; i < n_seqs; i++) {
        int32_t table = (seqs[i]->max_len + p->block_size - 1) / p->block_size;
        for (int32_t b = 0; b < table; b++)
            if (seqs[i]->blocks[b] >= 0) held[seqs[i]->blocks[b]]++;
    }
    for (int32_t b = 0; b < p->n_blocks; b++) {
        if (p->refcount[b] != held[b]) return 0;
        free_blocks += p->refcount[b] == 0;
    }
    return free_blocks == p->n_free;
}

static void test_init_errors(void) {
    lmd_kvpool *pool = (lmd_kvpool *)&pool; /* init must set it to NULL on failure */
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 0, 8, 4, 4, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG && pool == NULL);
    CHECK_MSG_CONTAINS(err, "n_layers (=0)");
    CHECK(lmd_kvpool_init(&pool, 2, -3, 1, 4, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "kv_dim (=-3)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 4, 0, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "block_size (=0)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 4, 4097, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "block_size (=4097)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 4, 4, 0, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "n_blocks (=0)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 4, 4, 4, (lmd_kv_dtype)7, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "dtype (=7)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 3, 4, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "head_size (=3) must be a positive divisor of kv_dim (=8)");
    CHECK(lmd_kvpool_init(&pool, 2, 8, 0, 4, 4, LMD_KV_F32, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "head_size (=0)");
    /* more memory than an address space holds: refused up front, not attempted */
    CHECK(lmd_kvpool_init(&pool, INT32_MAX, INT32_MAX, 1, 4096, INT32_MAX, LMD_KV_F32, &err) == LMD_ERR_NOMEM);
    CHECK_MSG_CONTAINS(err, "does not fit");
    CHECK(pool == NULL);
    /* 2^30 layers * 4096 positions * 2^22 features is 2^64 floats per block: the size
     * must not wrap around to a small allocation */
    CHECK(lmd_kvpool_init(&pool, 1 << 30, 1 << 22, 1, 4096, 1, LMD_KV_F32, &err) == LMD_ERR_NOMEM);
    CHECK(pool == NULL);
    CHECK(lmd_kvpool_init(&pool, 1 << 30, 1 << 22, 1, 4096, 1, LMD_KV_F16, &err) == LMD_ERR_NOMEM);
    CHECK(pool == NULL);
    lmd_kvpool_free(pool);

    CHECK(lmd_kvpool_init(&pool, 2, 8, 4, 4, 4, LMD_KV_F32, &err) == LMD_OK);
    CHECK(pool->n_free == 4 && pool->n_blocks == 4 && pool->block_size == 4);
    lmd_kvseq *seq = (lmd_kvseq *)&seq;
    CHECK(lmd_kvseq_init(&seq, pool, 0, &err) == LMD_ERR_INVALID_ARG && seq == NULL);
    CHECK_MSG_CONTAINS(err, "max_len (=0)");
    CHECK(lmd_kvseq_init(&seq, NULL, 8, &err) == LMD_ERR_INVALID_ARG && seq == NULL);
    CHECK_MSG_CONTAINS(err, "pool");
    CHECK(lmd_kvseq_init(&seq, pool, 10, &err) == LMD_OK);
    CHECK(seq->len == 0 && seq->max_len == 10 && seq->pool == pool);
    for (int i = 0; i < 3; i++) CHECK(seq->blocks[i] == -1);
    CHECK(pool->n_free == 4); /* an empty sequence holds no block */
    lmd_kvseq_free(seq);
    lmd_kvseq_free(NULL);
    lmd_kvpool_free(pool);
    lmd_kvpool_free(NULL);
}

static void test_reserve_and_len(void) {
    lmd_kvpool *pool;
    lmd_kvseq *s;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 3, 5, 5, 4, 8, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&s, pool, 20, &err) == LMD_OK);
    CHECK(lmd_kvseq_blocks_needed(s, 0) == 0);
    CHECK(lmd_kvseq_blocks_needed(s, 1) == 1);
    CHECK(lmd_kvseq_blocks_needed(s, 5) == 2);
    CHECK(lmd_kvseq_reserve(s, 0, &err) == LMD_OK && pool->n_free == 8);
    CHECK(lmd_kvseq_reserve(s, -1, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "n_new (=-1)");
    /* reserve makes room but does not change len */
    CHECK(lmd_kvseq_reserve(s, 5, &err) == LMD_OK);
    CHECK(s->len == 0 && pool->n_free == 6);
    CHECK(s->blocks[0] >= 0 && s->blocks[1] >= 0 && s->blocks[0] != s->blocks[1] && s->blocks[2] == -1);
    write_positions(s, 0, 5, 0.0f);
    s->len = 5;
    CHECK(positions_hold(s, 0, 5, 0.0f));
    /* room left in the last block costs nothing; crossing into the next takes one more */
    CHECK(lmd_kvseq_blocks_needed(s, 3) == 0);
    CHECK(lmd_kvseq_blocks_needed(s, 4) == 1);
    append(s, 3, 0.0f);
    CHECK(s->len == 8 && pool->n_free == 6);
    append(s, 9, 0.0f);
    CHECK(s->len == 17 && pool->n_free == 3);
    CHECK(positions_hold(s, 0, 17, 0.0f));
    /* absurd requests are answered without overflow */
    CHECK(lmd_kvseq_blocks_needed(s, INT32_MAX) > pool->n_free);
    CHECK(lmd_kvseq_reserve(s, INT32_MAX, &err) == LMD_ERR_CACHE_FULL);
    CHECK_MSG_CONTAINS(err, "context length 20");
    /* distinct blocks for distinct ranges */
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++) CHECK(s->blocks[i] != s->blocks[j]);
    CHECK(pool_consistent(pool, &s, 1));
    lmd_kvseq_free(s);
    CHECK(pool->n_free == 8);
    lmd_kvpool_free(pool);
}

/* The layout attention's speed rests on (kvcache.h): in a fresh pool a sequence takes its
 * blocks in increasing order, and each layer's kv head keeps its blocks end to end, so the
 * keys and the values of one head over consecutive blocks are one run in memory; every
 * position, layer and feature still has an element of its own (tags written, then read). */
static void test_heads_lie_end_to_end(void) {
    lmd_kvpool *pool;
    lmd_kvseq *s;
    lmd_error err;
    const int32_t n_layers = 2, head_size = 3, kv_dim = 6, block_size = 4;
    CHECK(lmd_kvpool_init(&pool, n_layers, kv_dim, head_size, block_size, 5, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&s, pool, 20, &err) == LMD_OK);
    append(s, 13, 0.0f); /* four blocks, the last partly filled */
    const ptrdiff_t chunk = (ptrdiff_t)head_size * block_size * (ptrdiff_t)pool->elem_bytes;
    int contiguous = 1;
    for (int32_t l = 0; l < n_layers; l++)
        for (int32_t j = 0; j < kv_dim; j++)
            for (int32_t t = 0; t + block_size < 13; t++) {
                contiguous &= (char *)lmd_kvseq_key(s, l, t + block_size, j) - (char *)lmd_kvseq_key(s, l, t, j) == chunk;
                contiguous &= (char *)lmd_kvseq_value(s, l, t + block_size, j) - (char *)lmd_kvseq_value(s, l, t, j) ==
                              chunk;
            }
    CHECK(contiguous);
    CHECK(positions_hold(s, 0, 13, 0.0f));
    lmd_kvseq_free(s);
    lmd_kvpool_free(pool);
}

/* Sequences that grow together each keep a run of consecutive blocks (take_block): the
 * second one starts in the middle of the free blocks, leaving the first room to grow. */
static void test_sequences_growing_together_keep_runs(void) {
    lmd_kvpool *pool;
    lmd_kvseq *a, *b;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 2, 4, 2, 4, 16, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&a, pool, 40, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&b, pool, 40, &err) == LMD_OK);
    for (int round = 0; round < 5; round++) { /* a block each per round */
        append(a, 4, 0.0f);
        append(b, 4, 1.0f);
    }
    int runs = a->blocks[0] == 0 && b->blocks[0] == 8;
    for (int i = 1; i < 5; i++) runs &= a->blocks[i] == a->blocks[i - 1] + 1 && b->blocks[i] == b->blocks[i - 1] + 1;
    CHECK(runs);
    CHECK(positions_hold(a, 0, 20, 0.0f) && positions_hold(b, 0, 20, 1.0f));
    lmd_kvseq *both[2] = {a, b};
    CHECK(pool_consistent(pool, both, 2));
    lmd_kvseq_free(a);
    lmd_kvseq_free(b);
    CHECK(pool->n_free == 16);
    lmd_kvpool_free(pool);
}

/* Reserving more than is then written (a speculative step that accepts fewer tokens), or
 * reserving twice, must not lose blocks: every block comes back when the sequence goes. */
static void test_reserve_twice_keeps_every_block(void) {
    lmd_kvpool *pool;
    lmd_kvseq *s;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 1, 2, 1, 4, 6, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&s, pool, 24, &err) == LMD_OK);
    CHECK(lmd_kvseq_reserve(s, 10, &err) == LMD_OK); /* blocks for positions 0..9 */
    write_positions(s, 0, 5, 0.0f);
    s->len = 5;                                      /* only 5 accepted */
    CHECK(lmd_kvseq_reserve(s, 6, &err) == LMD_OK);  /* positions 5..10: three blocks in all */
    write_positions(s, 5, 11, 0.0f);
    s->len = 11;
    CHECK(positions_hold(s, 0, 11, 0.0f));
    CHECK(pool->n_free == 3);
    CHECK(lmd_kvseq_reserve(s, 1, &err) == LMD_OK);
    CHECK(lmd_kvseq_reserve(s, 1, &err) == LMD_OK); /* the same position again */
    CHECK(pool->n_free == 3);
    CHECK(pool_consistent(pool, &s, 1));
    lmd_kvseq_free(s);
    CHECK(pool->n_free == 6);
    lmd_kvpool_free(pool);
}

static void test_fork_shares_blocks(void) {
    lmd_kvpool *pool;
    lmd_kvseq *a, *b, *c;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 2, 3, 1, 4, 10, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&a, pool, 16, &err) == LMD_OK);
    append(a, 6, 0.0f);
    CHECK(pool->n_free == 8);
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK);
    CHECK(b->len == 6 && b->max_len == 16 && b->pool == pool);
    CHECK(pool->n_free == 8); /* a fork takes no block */
    for (int i = 0; i < 2; i++) {
        CHECK(b->blocks[i] == a->blocks[i]);
        CHECK(pool->refcount[a->blocks[i]] == 2);
    }
    CHECK(b->blocks[2] == -1 && b->blocks[3] == -1);
    CHECK(positions_hold(b, 0, 6, 0.0f));
    CHECK(lmd_kvseq_fork(&c, b, &err) == LMD_OK);
    CHECK(pool->refcount[a->blocks[0]] == 3 && pool->refcount[a->blocks[1]] == 3);
    lmd_kvseq *all[3] = {a, b, c};
    CHECK(pool_consistent(pool, all, 3));
    /* freeing the original leaves the forks their data */
    lmd_kvseq_free(a);
    CHECK(pool->n_free == 8 && pool->refcount[b->blocks[0]] == 2);
    CHECK(positions_hold(c, 0, 6, 0.0f));
    lmd_kvseq_free(b);
    lmd_kvseq_free(c);
    CHECK(pool->n_free == 10);
    /* forking an empty sequence */
    CHECK(lmd_kvseq_init(&a, pool, 5, &err) == LMD_OK);
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK);
    CHECK(b->len == 0 && b->max_len == 5 && pool->n_free == 10);
    lmd_kvseq_free(a);
    lmd_kvseq_free(b);
    lmd_kvpool_free(pool);
}

static void test_copy_on_write(void) {
    lmd_kvpool *pool;
    lmd_kvseq *a, *b;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 3, 4, 2, 4, 10, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&a, pool, 16, &err) == LMD_OK);
    append(a, 6, 0.0f); /* block 0 full, block 1 holds positions 4, 5 */
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK);
    const int32_t shared_full = a->blocks[0], shared_last = a->blocks[1];
    /* b writes into the shared, partly filled block: it gets its own copy */
    CHECK(lmd_kvseq_blocks_needed(b, 1) == 1);
    CHECK(lmd_kvseq_blocks_needed(b, 3) == 2); /* the copy + the block for positions 8.. */
    CHECK(lmd_kvseq_reserve(b, 1, &err) == LMD_OK);
    CHECK(pool->n_free == 7);
    CHECK(b->blocks[0] == shared_full && b->blocks[1] != shared_last && a->blocks[1] == shared_last);
    CHECK(pool->refcount[shared_full] == 2 && pool->refcount[shared_last] == 1);
    CHECK(pool->refcount[b->blocks[1]] == 1);
    CHECK(positions_hold(b, 0, 6, 0.0f)); /* the filled part was copied, every layer */
    write_positions(b, 6, 7, 1000.0f);
    b->len = 7;
    /* overwrite b's copies of positions 4, 5 too: a must not see any of it */
    write_positions(b, 4, 6, 2000.0f);
    CHECK(positions_hold(a, 0, 6, 0.0f));
    CHECK(positions_hold(b, 0, 4, 0.0f) && positions_hold(b, 4, 6, 2000.0f));
    /* a's last block is now its own: appending needs no copy */
    CHECK(lmd_kvseq_blocks_needed(a, 2) == 0);
    append(a, 2, 3000.0f);
    CHECK(a->blocks[1] == shared_last && pool->n_free == 7);
    CHECK(positions_hold(a, 0, 6, 0.0f) && positions_hold(a, 6, 8, 3000.0f));
    CHECK(positions_hold(b, 6, 7, 1000.0f));
    lmd_kvseq *both[2] = {a, b};
    CHECK(pool_consistent(pool, both, 2));
    lmd_kvseq_free(b);

    /* a shared block that is full is never copied: the next position starts a new block */
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK); /* a->len == 8 */
    CHECK(lmd_kvseq_blocks_needed(b, 1) == 1);
    append(b, 1, 4000.0f);
    CHECK(b->blocks[0] == a->blocks[0] && b->blocks[1] == a->blocks[1]);
    CHECK(pool->refcount[a->blocks[1]] == 2);
    CHECK(positions_hold(a, 6, 8, 3000.0f) && positions_hold(b, 8, 9, 4000.0f));
    lmd_kvseq_free(a);
    lmd_kvseq_free(b);
    CHECK(pool->n_free == 10);
    lmd_kvpool_free(pool);
}

static void test_truncate(void) {
    lmd_kvpool *pool;
    lmd_kvseq *a, *b;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 2, 2, 1, 4, 8, pool_dtype, &err) == LMD_OK);
    CHECK(lmd_kvseq_init(&a, pool, 32, &err) == LMD_OK);
    append(a, 10, 0.0f); /* 3 blocks */
    CHECK(pool->n_free == 5);
    /* bad lengths: an error naming the range, nothing changed */
    snapshot before = take_snapshot(a);
    CHECK(lmd_kvseq_truncate(a, 11, &err) == LMD_ERR_INVALID_ARG);
    CHECK_MSG_CONTAINS(err, "length (=11)");
    CHECK_MSG_CONTAINS(err, "[0, 10]");
    CHECK(lmd_kvseq_truncate(a, -1, &err) == LMD_ERR_INVALID_ARG);
    snapshot after = take_snapshot(a);
    CHECK(same_snapshot(&before, &after));
    /* truncating to the current length is a no-op */
    CHECK(lmd_kvseq_truncate(a, 10, &err) == LMD_OK && a->len == 10 && pool->n_free == 5);
    /* into the middle of a block: the block stays, the ones after go back to the pool */
    CHECK(lmd_kvseq_truncate(a, 5, &err) == LMD_OK);
    CHECK(a->len == 5 && pool->n_free == 6 && a->blocks[1] >= 0 && a->blocks[2] == -1);
    CHECK(positions_hold(a, 0, 5, 0.0f));
    /* re-decoding after a truncation writes new data in place */
    append(a, 3, 500.0f);
    CHECK(a->len == 8 && positions_hold(a, 0, 5, 0.0f) && positions_hold(a, 5, 8, 500.0f));
    CHECK(pool->n_free == 6);

    /* blocks another sequence holds are not freed, only released */
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK);
    CHECK(lmd_kvseq_truncate(a, 0, &err) == LMD_OK);
    CHECK(a->len == 0 && a->blocks[0] == -1 && a->blocks[1] == -1);
    CHECK(pool->n_free == 6); /* b still holds both */
    CHECK(pool->refcount[b->blocks[0]] == 1 && pool->refcount[b->blocks[1]] == 1);
    CHECK(positions_hold(b, 0, 5, 0.0f) && positions_hold(b, 5, 8, 500.0f));
    CHECK(lmd_kvseq_truncate(b, 3, &err) == LMD_OK);
    CHECK(pool->n_free == 7);
    lmd_kvseq *both[2] = {a, b};
    CHECK(pool_consistent(pool, both, 2));
    CHECK(lmd_kvseq_truncate(b, 0, &err) == LMD_OK);
    CHECK(pool->n_free == 8);
    lmd_kvseq_free(b);
    /* truncate a fork back into the shared partial block, then write: copy on write */
    append(a, 6, 0.0f);
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK);
    CHECK(lmd_kvseq_truncate(b, 5, &err) == LMD_OK);
    CHECK(b->blocks[1] == a->blocks[1]);
    append(b, 1, 700.0f);
    CHECK(b->blocks[1] != a->blocks[1]);
    CHECK(positions_hold(a, 0, 6, 0.0f));
    CHECK(positions_hold(b, 0, 5, 0.0f) && positions_hold(b, 5, 6, 700.0f));
    lmd_kvseq_free(a);
    lmd_kvseq_free(b);
    CHECK(pool->n_free == 8);
    lmd_kvpool_free(pool);
}

static void test_cache_full_changes_nothing(void) {
    lmd_kvpool *pool;
    lmd_kvseq *a, *b;
    lmd_error err;
    CHECK(lmd_kvpool_init(&pool, 2, 3, 3, 4, 3, pool_dtype, &err) == LMD_OK);
    /* the sequence's own limit */
    CHECK(lmd_kvseq_init(&a, pool, 7, &err) == LMD_OK);
    append(a, 5, 0.0f);
    snapshot before = take_snapshot(a);
    CHECK(lmd_kvseq_reserve(a, 3, &err) == LMD_ERR_CACHE_FULL);
    CHECK_MSG_CONTAINS(err, "context length 7");
    CHECK(lmd_kvseq_blocks_needed(a, 2) == 0);
    snapshot after = take_snapshot(a);
    CHECK(same_snapshot(&before, &after));
    CHECK(positions_hold(a, 0, 5, 0.0f));
    lmd_kvseq_free(a);

    /* the pool's blocks: 3 blocks of 4 positions, a holds 2 */
    CHECK(lmd_kvseq_init(&a, pool, 100, &err) == LMD_OK);
    append(a, 6, 0.0f);
    before = take_snapshot(a);
    CHECK(lmd_kvseq_reserve(a, 7, &err) == LMD_ERR_CACHE_FULL); /* needs 2, 1 free */
    CHECK_MSG_CONTAINS(err, "1 free blocks");
    after = take_snapshot(a);
    CHECK(same_snapshot(&before, &after));
    append(a, 6, 0.0f); /* exactly fills the pool */
    CHECK(pool->n_free == 0);
    before = take_snapshot(a);
    CHECK(lmd_kvseq_reserve(a, 1, &err) == LMD_ERR_CACHE_FULL);
    after = take_snapshot(a);
    CHECK(same_snapshot(&before, &after));
    CHECK(lmd_kvseq_truncate(a, 6, &err) == LMD_OK && pool->n_free == 1);

    /* copy on write with no block to copy into: b's write fails, a and b unchanged */
    lmd_kvseq *c;
    CHECK(lmd_kvseq_fork(&b, a, &err) == LMD_OK); /* shares a's partly filled block 1 */
    CHECK(lmd_kvseq_init(&c, pool, 4, &err) == LMD_OK);
    append(c, 1, 0.0f); /* takes the last free block */
    CHECK(pool->n_free == 0);
    snapshot before_a = take_snapshot(a), before_b = take_snapshot(b);
    CHECK(lmd_kvseq_blocks_needed(b, 1) == 1);
    CHECK(lmd_kvseq_reserve(b, 1, &err) == LMD_ERR_CACHE_FULL);
    CHECK_MSG_CONTAINS(err, "0 free blocks");
    snapshot after_a = take_snapshot(a), after_b = take_snapshot(b);
    CHECK(same_snapshot(&before_a, &after_a) && same_snapshot(&before_b, &after_b));
    CHECK(positions_hold(a, 0, 6, 0.0f) && positions_hold(b, 0, 6, 0.0f));
    lmd_kvseq *all[3] = {a, b, c};
    CHECK(pool_consistent(pool, all, 3));
    /* once a block is free, the same call succeeds */
    lmd_kvseq_free(c);
    append(b, 1, 100.0f);
    CHECK(b->blocks[1] != a->blocks[1] && pool->n_free == 0);
    CHECK(positions_hold(a, 0, 6, 0.0f) && positions_hold(b, 0, 6, 0.0f) &&
          positions_hold(b, 6, 7, 100.0f));
    lmd_kvseq_free(b);
    lmd_kvseq_free(a);
    CHECK(pool->n_free == 3);
    lmd_kvpool_free(pool);
}

/* ---- random operations against a shadow ---------------------------------------------- */

/* A shadow of what each live sequence holds: the write (stamp) each position came from.
 * Every element is written with a code of (stamp, layer, position, feature, k or v), so a
 * block handed to two sequences, a copy-on-write that copied too little or into the wrong
 * block, or a write into a block another sequence still holds shows up as a wrong code in
 * one of them. */
#define SHADOW_SEQS 6
#define SHADOW_MAX_LEN 40

typedef struct {
    lmd_kvseq *seq; /* NULL: a free slot */
    int32_t stamp[SHADOW_MAX_LEN];
} shadow_seq;

static uint32_t stamp_code(int32_t stamp, int32_t l, int32_t t, int32_t j, int is_v) {
    uint64_t z = ((((uint64_t)stamp * 4 + (uint64_t)l) * 64 + (uint64_t)t) * 64 + (uint64_t)j) * 2 + (uint64_t)is_v;
    z = (z ^ (z >> 31)) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(z >> 32);
}

/* the code as the pool stores it: its low 16 bits (f16 pools copy bits, never convert), or
 * its low 24 bits as an exactly representable float */
static void put_code(const lmd_kvpool *p, void *at, uint32_t code) {
    if (p->dtype == LMD_KV_F16) {
        const uint16_t bits = (uint16_t)code;
        memcpy(at, &bits, sizeof bits);
    } else {
        const float value = (float)(code & 0xffffffu);
        memcpy(at, &value, sizeof value);
    }
}
static int has_code(const lmd_kvpool *p, const void *at, uint32_t code) {
    if (p->dtype == LMD_KV_F16) {
        uint16_t bits;
        memcpy(&bits, at, sizeof bits);
        return bits == (uint16_t)code;
    }
    float value;
    memcpy(&value, at, sizeof value);
    return value == (float)(code & 0xffffffu);
}

static void write_stamped(shadow_seq *s, int32_t from, int32_t to, int32_t stamp) {
    const lmd_kvpool *p = s->seq->pool;
    for (int32_t t = from; t < to; t++) {
        for (int32_t l = 0; l < p->n_layers; l++)
            for (int32_t j = 0; j < p->kv_dim; j++) {
                put_code(p, lmd_kvseq_key(s->seq, l, t, j), stamp_code(stamp, l, t, j, 0));
                put_code(p, lmd_kvseq_value(s->seq, l, t, j), stamp_code(stamp, l, t, j, 1));
            }
        s->stamp[t] = stamp;
    }
}

static int holds_its_stamps(const shadow_seq *s) {
    const lmd_kvpool *p = s->seq->pool;
    for (int32_t t = 0; t < s->seq->len; t++)
        for (int32_t l = 0; l < p->n_layers; l++)
            for (int32_t j = 0; j < p->kv_dim; j++)
                if (!has_code(p, lmd_kvseq_key(s->seq, l, t, j), stamp_code(s->stamp[t], l, t, j, 0)) ||
                    !has_code(p, lmd_kvseq_value(s->seq, l, t, j), stamp_code(s->stamp[t], l, t, j, 1)))
                    return 0;
    return 1;
}

/* Thousands of random creations, forks, appends (reserve, write, len), reserves alone,
 * truncations and frees on a pool small enough to run out often: after each, every block's
 * refcount is the number of tables holding it, n_free counts the rest, every live sequence
 * reads back exactly what was written into its positions (its own writes and those it
 * forked), a successful reserve took exactly lmd_kvseq_blocks_needed blocks, and a refused
 * one (past the context length, or more blocks than are free) changed nothing. */
static void test_random_operations_match_a_shadow(void) {
    lmd_kvpool *pool;
    lmd_error err;
    test_rng rng = {20261202u + (uint64_t)pool_dtype};
    const int32_t block_size = 4, n_blocks = 14;
    CHECK(lmd_kvpool_init(&pool, 2, 6, 3, block_size, n_blocks, pool_dtype, &err) == LMD_OK);
    shadow_seq shadow[SHADOW_SEQS];
    memset(shadow, 0, sizeof shadow);
    int32_t next_stamp = 1, failures = 0, refused = 0, copies_on_write = 0;
    for (int step = 0; step < 4000 && failures == 0; step++) {
        shadow_seq *s = &shadow[test_rand_below(&rng, SHADOW_SEQS)];
        const int op = test_rand_below(&rng, 10);
        if (s->seq == NULL) {
            if (op < 4) { /* a new sequence */
                failures += lmd_kvseq_init(&s->seq, pool, 1 + test_rand_below(&rng, SHADOW_MAX_LEN), &err) != LMD_OK;
            } else { /* a fork of a live one, if any */
                const shadow_seq *src = &shadow[test_rand_below(&rng, SHADOW_SEQS)];
                if (src->seq != NULL) {
                    failures += lmd_kvseq_fork(&s->seq, src->seq, &err) != LMD_OK;
                    memcpy(s->stamp, src->stamp, sizeof s->stamp);
                }
            }
        } else if (op < 5) { /* append (op 4: reserve only, as a speculative step that keeps none) */
            const int32_t n = 1 + test_rand_below(&rng, 2 * block_size + 1);
            const int32_t needed = lmd_kvseq_blocks_needed(s->seq, n), free_before = pool->n_free;
            const int fits = s->seq->len + n <= s->seq->max_len && needed <= free_before;
            const int shared_last = s->seq->len % block_size != 0 &&
                                    pool->refcount[s->seq->blocks[s->seq->len / block_size]] > 1;
            const snapshot before = take_snapshot(s->seq);
            const lmd_status st = lmd_kvseq_reserve(s->seq, n, &err);
            if (!fits) {
                const snapshot after = take_snapshot(s->seq);
                failures += st != LMD_ERR_CACHE_FULL || !same_snapshot(&before, &after);
                refused++;
            } else if (st != LMD_OK || pool->n_free != free_before - needed) {
                failures++;
            } else {
                copies_on_write += shared_last;
                if (op < 4) {
                    write_stamped(s, s->seq->len, s->seq->len + n, next_stamp++);
                    s->seq->len += n;
                }
            }
        } else if (op < 8) { /* truncate, sometimes to a length it does not have */
            const int32_t len = test_rand_below(&rng, s->seq->len + 2);
            const snapshot before = take_snapshot(s->seq);
            const lmd_status st = lmd_kvseq_truncate(s->seq, len, &err);
            if (len > s->seq->len) {
                const snapshot after = take_snapshot(s->seq);
                failures += st != LMD_ERR_INVALID_ARG || !same_snapshot(&before, &after);
            } else {
                failures += st != LMD_OK || s->seq->len != len;
            }
        } else { /* free */
            lmd_kvseq_free(s->seq);
            s->seq = NULL;
        }
        lmd_kvseq *live[SHADOW_SEQS];
        int n_live = 0;
        for (int i = 0; i < SHADOW_SEQS; i++)
            if (shadow[i].seq != NULL) {
                live[n_live++] = shadow[i].seq;
                failures += !holds_its_stamps(&shadow[i]);
            }
        failures += !pool_consistent(pool, live, n_live);
        if (failures) fprintf(stderr, "random kv operations: first failure at step %d (op %d)\n", step, op);
    }
    CHECK(failures == 0);
    /* the run went through the cases it is for */
    CHECK(refused > 100 && copies_on_write > 50);
    for (int i = 0; i < SHADOW_SEQS; i++) lmd_kvseq_free(shadow[i].seq);
    CHECK(pool->n_free == n_blocks);
    lmd_kvpool_free(pool);
}

int main(void) {
    test_init_errors();
    const lmd_kv_dtype dtypes[] = {LMD_KV_F32, LMD_KV_F16};
    for (int i = 0; i < 2; i++) {
        pool_dtype = dtypes[i];
        test_reserve_and_len();
        test_heads_lie_end_to_end();
        test_sequences_growing_together_keep_runs();
        test_reserve_twice_keeps_every_block();
        test_fork_shares_blocks();
        test_copy_on_write();
        test_truncate();
        test_cache_full_changes_nothing();
        test_random_operations_match_a_shadow();
    }
    return test_report("test_kvcache");
}
