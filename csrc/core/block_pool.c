/*
 * block_pool.c - the KV-cache block pool under the Python BlockManager
 * (mechanism only; admission policy such as the watermark lives in Python).
 *
 * Layout
 *   Two sides, device (side[0], ids [0, num_blocks)) and host (side[1], ids
 *   [0, num_cpu_blocks), the swap space). Per block: refcount, the token ids it
 *   holds (tokens[block * block_size + offset], -1 = unknown), its chain hash and
 *   its parent's chain hash, flags (HASHED: full with a valid hash; CACHED:
 *   registered in the prefix-cache index, device side only).
 *   Sequences live in slots (bp_seq) found through an open-addressing index
 *   id -> slot; each owns a persistent, growable int32 block table, so a batch
 *   of padded block tables is a gather of rows (memcpy), never a rebuild.
 *
 * Algorithm
 *   - Free list: a LIFO stack of block ids per side, O(1) take and release.
 *   - Prefix cache: full device blocks are indexed by hash = H(parent hash,
 *     token ids) in an open-addressing table (linear probing, backward-shift
 *     deletion, capacity >= 2 * num_blocks so it never grows). A lookup is
 *     confirmed by comparing the parent hash and the tokens, so a false hit
 *     needs a 64-bit collision of two different prefixes and identical tokens.
 *     Only one block per hash is indexed; a duplicate full block stays private.
 *   - Eviction: a cached block whose refcount drops to 0 joins a doubly linked
 *     LRU list instead of the free list; a fresh block is taken from the free
 *     list first, then from the LRU head (dropping its index entry). A freed
 *     sequence releases its blocks last-first, so its deepest blocks are
 *     evicted before the prefixes other prompts are likelier to share.
 *   - Copy-on-write: appending to a sequence whose partly filled last block is
 *     shared (refcount > 1) first moves the sequence to a fresh block and
 *     reports the (src, dst) pair; full blocks are never written again.
 *   - Atomicity: every mutating call first validates ids, lengths, memory
 *     (capacities are grown before anything changes) and block counts --
 *     simulating the refcount drops of earlier sequences in a batch so the count
 *     is exact -- and only then mutates, so a failure leaves the pool untouched.
 *   - Duplicate ids in a batch and distinct blocks in a swap are found with
 *     epoch stamps (no clearing between calls).
 */
#include <stdlib.h>
#include <string.h>

#include "pf_error.h"

#define BP_NONE (-1)
#define BP_HASHED 1u
#define BP_CACHED 2u
/* The parent hash of a sequence's first block. */
#define BP_ROOT_HASH 0x6a09e667f3bcc909ULL

typedef struct bp_side {
    int32_t n;
    int32_t *ref;          /* [n] */
    int32_t *free_stack;   /* [n]; free_stack[nfree - 1] is taken next */
    int32_t nfree;
    int32_t *tokens;       /* [n * block_size] */
    uint64_t *hash;        /* [n] chain hash (valid with BP_HASHED) */
    uint64_t *parent_hash; /* [n] */
    uint8_t *flags;        /* [n] */
    uint32_t *mark;        /* [n] epoch stamps for swaps */
    int32_t *remap;        /* [n] swap scratch: this block's copy on the other side */
} bp_side;

typedef struct bp_seq {
    int64_t id;
    int64_t len;       /* tokens */
    int32_t *blocks;   /* [cap] block table; nblocks = ceil(len / block_size) used */
    int32_t nblocks, cap;
    int32_t on_host;   /* swapped out: blocks are host ids */
    uint32_t mark;     /* epoch stamp for duplicate detection */
} bp_seq;

struct pf_block_pool {
    int32_t block_size;
    int32_t caching;
    bp_side side[2];
    /* evictable device blocks, least recently released at the head */
    int32_t *lru_prev, *lru_next; /* [num_blocks] */
    int32_t lru_head, lru_tail, nevict;
    int32_t ncached;
    /* prefix-cache index: chain hash -> device block */
    uint64_t *ht_key;
    int32_t *ht_val; /* BP_NONE = empty slot */
    uint64_t ht_mask;
    /* sequences */
    bp_seq *seqs;
    int32_t seq_cap, nseqs;
    int32_t *slot_free; /* [seq_cap] stack of unused slots */
    int32_t nslot_free;
    int64_t *id_key;    /* id index: seq id -> slot */
    int32_t *id_val;
    uint64_t id_mask;
    uint32_t seq_epoch, blk_epoch;
    int32_t *scratch;   /* per-call scratch (hit blocks, slots of a batch) */
    int64_t scratch_cap;
    int64_t hits, queries;
};

/* ------------------------------------------------------------------------ */
/* hashing                                                                   */
/* ------------------------------------------------------------------------ */

static inline uint64_t bp_mix(uint64_t x) { /* splitmix64 finalizer: a bijection */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t bp_block_hash(uint64_t parent, const int32_t *tokens, int32_t n) {
    uint64_t h = bp_mix(parent);
    for (int32_t i = 0; i < n; i++) h = bp_mix(h + 0x9e3779b97f4a7c15ULL + (uint32_t)tokens[i]);
    return h;
}

/* ------------------------------------------------------------------------ */
/* prefix-cache index (hash -> block)                                        */
/* ------------------------------------------------------------------------ */

static int32_t ht_find(const pf_block_pool_t *p, uint64_t key) {
    for (uint64_t i = key & p->ht_mask;; i = (i + 1) & p->ht_mask) {
        if (p->ht_val[i] == BP_NONE) return BP_NONE;
        if (p->ht_key[i] == key) return p->ht_val[i];
    }
}

static void ht_insert(pf_block_pool_t *p, uint64_t key, int32_t block) {
    uint64_t i = key & p->ht_mask;
    while (p->ht_val[i] != BP_NONE) i = (i + 1) & p->ht_mask;
    p->ht_key[i] = key;
    p->ht_val[i] = block;
}

/* Backward-shift deletion for linear probing; `home` gives an entry's first probe. */
static void lp_erase(uint64_t *keys64, int64_t *keysi, int32_t *vals, uint64_t mask, uint64_t i, int hashed_ids) {
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (vals[j] == BP_NONE) break;
        uint64_t home = hashed_ids ? bp_mix((uint64_t)keysi[j]) & mask : keys64[j] & mask;
        /* the entry at j may move to i unless its home lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            if (hashed_ids)
                keysi[i] = keysi[j];
            else
                keys64[i] = keys64[j];
            vals[i] = vals[j];
            i = j;
        }
    }
    vals[i] = BP_NONE;
}

static void ht_erase(pf_block_pool_t *p, uint64_t key, int32_t block) {
    for (uint64_t i = key & p->ht_mask;; i = (i + 1) & p->ht_mask) {
        if (p->ht_val[i] == BP_NONE) return;
        if (p->ht_val[i] == block) {
            lp_erase(p->ht_key, NULL, p->ht_val, p->ht_mask, i, 0);
            return;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* sequence index (id -> slot)                                               */
/* ------------------------------------------------------------------------ */

static inline int32_t seq_find(const pf_block_pool_t *p, int64_t id) {
    if (!p->id_val) return BP_NONE;
    for (uint64_t i = bp_mix((uint64_t)id) & p->id_mask;; i = (i + 1) & p->id_mask) {
        int32_t v = p->id_val[i];
        if (v == BP_NONE || p->id_key[i] == id) return v;
    }
}

static void id_insert(pf_block_pool_t *p, int64_t id, int32_t slot) {
    uint64_t i = bp_mix((uint64_t)id) & p->id_mask;
    while (p->id_val[i] != BP_NONE) i = (i + 1) & p->id_mask;
    p->id_key[i] = id;
    p->id_val[i] = slot;
}

static void id_erase(pf_block_pool_t *p, int64_t id) {
    for (uint64_t i = bp_mix((uint64_t)id) & p->id_mask;; i = (i + 1) & p->id_mask) {
        if (p->id_val[i] == BP_NONE) return;
        if (p->id_key[i] == id) {
            lp_erase(NULL, p->id_key, p->id_val, p->id_mask, i, 1);
            return;
        }
    }
}

/* Make sure a free slot exists (grows slots and the id index; changes nothing visible). */
static pf_status slot_reserve(pf_block_pool_t *p) {
    if (p->nslot_free > 0) return PF_STATUS_OK;
    int32_t old = p->seq_cap;
    PF_CHECK(old <= INT32_MAX / 4, PF_STATUS_OUT_OF_MEMORY, "block pool: too many sequences (%d)", old);
    int32_t cap = old ? old * 2 : 16;
    uint64_t icap = 1;
    while (icap < (uint64_t)cap * 2) icap <<= 1;
    bp_seq *seqs = (bp_seq *)realloc(p->seqs, (size_t)cap * sizeof *seqs);
    PF_CHECK(seqs, PF_STATUS_OUT_OF_MEMORY, "block pool: cannot grow to %d sequences", cap);
    p->seqs = seqs;
    memset(seqs + old, 0, (size_t)(cap - old) * sizeof *seqs);
    int32_t *sf = (int32_t *)realloc(p->slot_free, (size_t)cap * sizeof *sf);
    int64_t *keys = (int64_t *)malloc((size_t)icap * sizeof *keys);
    int32_t *vals = (int32_t *)malloc((size_t)icap * sizeof *vals);
    if (sf) p->slot_free = sf;
    if (!sf || !keys || !vals) {
        free(keys);
        free(vals);
        return pf_set_error(PF_STATUS_OUT_OF_MEMORY, __FILE__, __LINE__, "block pool: cannot grow to %d sequences",
                            cap);
    }
    for (uint64_t i = 0; i < icap; i++) vals[i] = BP_NONE;
    int64_t *old_keys = p->id_key;
    int32_t *old_vals = p->id_val;
    uint64_t old_n = p->id_val ? p->id_mask + 1 : 0;
    p->id_key = keys;
    p->id_val = vals;
    p->id_mask = icap - 1;
    for (uint64_t i = 0; i < old_n; i++)
        if (old_vals[i] != BP_NONE) id_insert(p, old_keys[i], old_vals[i]);
    free(old_keys);
    free(old_vals);
    for (int32_t s = cap - 1; s >= old; s--) p->slot_free[p->nslot_free++] = s;
    p->seq_cap = cap;
    return PF_STATUS_OK;
}

/* Grow a sequence's table to hold at least n blocks. */
static pf_status seq_reserve(bp_seq *s, int64_t n) {
    if (n <= s->cap) return PF_STATUS_OK;
    int64_t cap = s->cap ? s->cap : 8;
    while (cap < n) cap *= 2;
    if (cap > INT32_MAX) cap = INT32_MAX;
    int32_t *b = (int32_t *)realloc(s->blocks, (size_t)cap * sizeof *b);
    PF_CHECK(b, PF_STATUS_OUT_OF_MEMORY, "block pool: cannot grow a block table to %lld blocks", (long long)cap);
    s->blocks = b;
    s->cap = (int32_t)cap;
    return PF_STATUS_OK;
}

static pf_status scratch_reserve(pf_block_pool_t *p, int64_t n) {
    if (n <= p->scratch_cap) return PF_STATUS_OK;
    int64_t cap = p->scratch_cap ? p->scratch_cap : 256;
    while (cap < n) cap *= 2;
    int32_t *s = (int32_t *)realloc(p->scratch, (size_t)cap * sizeof *s);
    PF_CHECK(s, PF_STATUS_OUT_OF_MEMORY, "block pool: cannot allocate %lld scratch entries", (long long)cap);
    p->scratch = s;
    p->scratch_cap = cap;
    return PF_STATUS_OK;
}

static uint32_t next_epoch(uint32_t *epoch, uint32_t *marks, int64_t n, size_t stride) {
    if (++*epoch == 0) { /* wrapped: clear stamps once every 4 billion calls */
        for (int64_t i = 0; i < n; i++) *(uint32_t *)((char *)marks + (size_t)i * stride) = 0;
        *epoch = 1;
    }
    return *epoch;
}

static uint32_t seq_epoch(pf_block_pool_t *p) {
    return next_epoch(&p->seq_epoch, p->seqs ? &p->seqs[0].mark : NULL, p->seqs ? p->seq_cap : 0, sizeof(bp_seq));
}

static uint32_t blk_epoch(pf_block_pool_t *p) {
    if (++p->blk_epoch == 0) {
        for (int s = 0; s < 2; s++)
            if (p->side[s].n) memset(p->side[s].mark, 0, (size_t)p->side[s].n * sizeof(uint32_t));
        p->blk_epoch = 1;
    }
    return p->blk_epoch;
}

/* ------------------------------------------------------------------------ */
/* blocks                                                                    */
/* ------------------------------------------------------------------------ */

static void lru_unlink(pf_block_pool_t *p, int32_t b) {
    int32_t pr = p->lru_prev[b], nx = p->lru_next[b];
    if (pr != BP_NONE)
        p->lru_next[pr] = nx;
    else
        p->lru_head = nx;
    if (nx != BP_NONE)
        p->lru_prev[nx] = pr;
    else
        p->lru_tail = pr;
    p->lru_prev[b] = p->lru_next[b] = BP_NONE;
    p->nevict--;
}

static void lru_push_tail(pf_block_pool_t *p, int32_t b) {
    p->lru_prev[b] = p->lru_tail;
    p->lru_next[b] = BP_NONE;
    if (p->lru_tail != BP_NONE)
        p->lru_next[p->lru_tail] = b;
    else
        p->lru_head = b;
    p->lru_tail = b;
    p->nevict++;
}

static void cache_drop(pf_block_pool_t *p, int32_t b) {
    ht_erase(p, p->side[0].hash[b], b);
    p->side[0].flags[b] &= (uint8_t)~BP_CACHED;
    p->ncached--;
}

/* Index block b (flags HASHED, hash set) unless its hash is taken already. */
static void cache_add(pf_block_pool_t *p, int32_t b) {
    bp_side *d = &p->side[0];
    if (ht_find(p, d->hash[b]) != BP_NONE) return;
    ht_insert(p, d->hash[b], b);
    d->flags[b] |= BP_CACHED;
    p->ncached++;
}

/* A fresh device block with refcount 1 (caller checked availability). */
static int32_t dev_take(pf_block_pool_t *p) {
    bp_side *d = &p->side[0];
    int32_t b;
    if (d->nfree > 0) {
        b = d->free_stack[--d->nfree];
    } else {
        b = p->lru_head;
        lru_unlink(p, b);
        cache_drop(p, b);
    }
    d->ref[b] = 1;
    d->flags[b] = 0;
    return b;
}

static int32_t host_take(pf_block_pool_t *p) {
    bp_side *h = &p->side[1];
    int32_t b = h->free_stack[--h->nfree];
    h->ref[b] = 1;
    h->flags[b] = 0;
    return b;
}

static void dev_release(pf_block_pool_t *p, int32_t b) {
    bp_side *d = &p->side[0];
    if (--d->ref[b] > 0) return;
    if (d->flags[b] & BP_CACHED) {
        lru_push_tail(p, b);
    } else {
        d->flags[b] = 0;
        d->free_stack[d->nfree++] = b;
    }
}

static void host_release(pf_block_pool_t *p, int32_t b) {
    bp_side *h = &p->side[1];
    if (--h->ref[b] > 0) return;
    h->flags[b] = 0;
    h->free_stack[h->nfree++] = b;
}

/* One more reference to a cached device block found by a prefix hit. */
static void dev_claim(pf_block_pool_t *p, int32_t b) {
    if (p->side[0].ref[b] == 0) lru_unlink(p, b);
    p->side[0].ref[b]++;
}

/* Block b (device) just became full: hash it and index it. */
static void dev_seal(pf_block_pool_t *p, int32_t b, uint64_t parent) {
    bp_side *d = &p->side[0];
    d->hash[b] = bp_block_hash(parent, d->tokens + (int64_t)b * p->block_size, p->block_size);
    d->parent_hash[b] = parent;
    d->flags[b] |= BP_HASHED;
    cache_add(p, b);
}

/* Leading cached full blocks of a prompt; returns the count, fills out (may be NULL). */
static int32_t prefix_walk(const pf_block_pool_t *p, const int32_t *tokens, int64_t n, int32_t *out, int32_t *evictable,
                           int32_t *eligible) {
    *evictable = 0;
    *eligible = 0;
    if (!p->caching || n <= 0 || !tokens) return 0;
    const bp_side *d = &p->side[0];
    const int32_t bs = p->block_size;
    int64_t max = (n - 1) / bs;
    *eligible = (int32_t)max;
    uint64_t parent = BP_ROOT_HASH;
    int32_t hits = 0;
    for (int64_t i = 0; i < max; i++) {
        const int32_t *t = tokens + i * bs;
        uint64_t h = bp_block_hash(parent, t, bs);
        int32_t b = ht_find(p, h);
        if (b == BP_NONE || d->parent_hash[b] != parent ||
            memcmp(d->tokens + (int64_t)b * bs, t, (size_t)bs * sizeof(int32_t)) != 0)
            break;
        if (out) out[hits] = b;
        if (d->ref[b] == 0) (*evictable)++;
        hits++;
        parent = h;
    }
    return hits;
}

static pf_status check_tokens(const int32_t *tokens, int64_t n, const char *what) {
    if (!tokens) return PF_STATUS_OK;
    for (int64_t i = 0; i < n; i++)
        PF_CHECK_VALUE(tokens[i] >= 0, "%s: token ids must be >= 0, got %d at index %lld", what, (int)tokens[i],
                       (long long)i);
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* lifetime                                                                  */
/* ------------------------------------------------------------------------ */

static void side_free(bp_side *s) {
    free(s->ref);
    free(s->free_stack);
    free(s->tokens);
    free(s->hash);
    free(s->parent_hash);
    free(s->flags);
    free(s->mark);
    free(s->remap);
}

static int side_init(bp_side *s, int32_t n, int32_t bs) {
    size_t m = n > 0 ? (size_t)n : 1;
    s->n = n;
    s->ref = (int32_t *)calloc(m, sizeof(int32_t));
    s->free_stack = (int32_t *)malloc(m * sizeof(int32_t));
    s->tokens = (int32_t *)calloc(m * (size_t)bs, sizeof(int32_t));
    s->hash = (uint64_t *)calloc(m, sizeof(uint64_t));
    s->parent_hash = (uint64_t *)calloc(m, sizeof(uint64_t));
    s->flags = (uint8_t *)calloc(m, 1);
    s->mark = (uint32_t *)calloc(m, sizeof(uint32_t));
    s->remap = (int32_t *)calloc(m, sizeof(int32_t));
    if (!s->ref || !s->free_stack || !s->tokens || !s->hash || !s->parent_hash || !s->flags || !s->mark || !s->remap)
        return -1;
    for (int32_t i = 0; i < n; i++) s->free_stack[i] = n - 1 - i; /* block 0 is taken first */
    s->nfree = n;
    return 0;
}

pf_status pf_block_pool_init(pf_block_pool_t **pool, const pf_block_pool_config *config) {
    PF_CHECK_VALUE(pool, "pool: expected a non-NULL pointer");
    *pool = NULL;
    PF_CHECK_VALUE(config, "config: expected a non-NULL pointer");
    PF_CHECK_VALUE(config->num_blocks >= 1, "num_blocks: expected >= 1, got %d", (int)config->num_blocks);
    PF_CHECK_VALUE(config->block_size >= 1, "block_size: expected >= 1, got %d", (int)config->block_size);
    PF_CHECK_VALUE(config->num_cpu_blocks >= 0, "num_cpu_blocks: expected >= 0, got %d", (int)config->num_cpu_blocks);
    PF_CHECK_VALUE(config->enable_prefix_caching == 0 || config->enable_prefix_caching == 1,
                   "enable_prefix_caching: expected 0 or 1, got %d", (int)config->enable_prefix_caching);
    PF_CHECK_VALUE((int64_t)config->num_blocks * config->block_size <= INT64_MAX / 8 &&
                       (int64_t)config->num_cpu_blocks * config->block_size <= INT64_MAX / 8,
                   "num_blocks * block_size: too large");
    pf_block_pool_t *p = (pf_block_pool_t *)calloc(1, sizeof *p);
    PF_CHECK(p, PF_STATUS_OUT_OF_MEMORY, "block pool: out of host memory");
    p->block_size = config->block_size;
    p->caching = config->enable_prefix_caching;
    int32_t n = config->num_blocks;
    uint64_t hcap = 2;
    while (hcap < (uint64_t)n * 2) hcap <<= 1;
    p->ht_mask = hcap - 1;
    p->ht_key = (uint64_t *)malloc((size_t)hcap * sizeof(uint64_t));
    p->ht_val = (int32_t *)malloc((size_t)hcap * sizeof(int32_t));
    p->lru_prev = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    p->lru_next = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    p->lru_head = p->lru_tail = BP_NONE;
    if (side_init(&p->side[0], n, p->block_size) < 0 ||
        side_init(&p->side[1], config->num_cpu_blocks, p->block_size) < 0 || !p->ht_key || !p->ht_val || !p->lru_prev ||
        !p->lru_next) {
        pf_block_pool_free(p); /* the message reads the config, not the freed pool */
        return pf_set_error(PF_STATUS_OUT_OF_MEMORY, __FILE__, __LINE__,
                            "block pool: out of host memory for %d blocks of %d tokens", (int)n,
                            (int)config->block_size);
    }
    for (uint64_t i = 0; i < hcap; i++) p->ht_val[i] = BP_NONE;
    for (int32_t i = 0; i < n; i++) p->lru_prev[i] = p->lru_next[i] = BP_NONE;
    *pool = p;
    return PF_STATUS_OK;
}

void pf_block_pool_free(pf_block_pool_t *p) {
    if (!p) return;
    side_free(&p->side[0]);
    side_free(&p->side[1]);
    free(p->lru_prev);
    free(p->lru_next);
    free(p->ht_key);
    free(p->ht_val);
    for (int32_t i = 0; i < p->seq_cap; i++) free(p->seqs[i].blocks);
    free(p->seqs);
    free(p->slot_free);
    free(p->id_key);
    free(p->id_val);
    free(p->scratch);
    free(p);
}

pf_status pf_block_pool_stats_get(const pf_block_pool_t *p, pf_block_pool_stats *st) {
    PF_CHECK_VALUE(p && st, "pool, stats: expected non-NULL pointers");
    st->num_blocks = p->side[0].n;
    st->block_size = p->block_size;
    st->num_cpu_blocks = p->side[1].n;
    st->num_free_blocks = p->side[0].nfree + p->nevict;
    st->num_evictable_blocks = p->nevict;
    st->num_used_blocks = p->side[0].n - st->num_free_blocks;
    st->num_cached_blocks = p->ncached;
    st->num_free_cpu_blocks = p->side[1].nfree;
    st->num_used_cpu_blocks = p->side[1].n - p->side[1].nfree;
    st->num_seqs = p->nseqs;
    st->prefix_cache_queries = p->queries;
    st->prefix_cache_hits = p->hits;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* sequences                                                                 */
/* ------------------------------------------------------------------------ */

pf_status pf_block_pool_prefix_lookup(const pf_block_pool_t *p, const int32_t *tokens, int64_t n, int32_t *hit_blocks,
                                      int32_t *hit_evictable) {
    PF_CHECK_VALUE(p && hit_blocks && hit_evictable, "pool, hit_blocks, hit_evictable: expected non-NULL pointers");
    PF_CHECK_VALUE(n >= 0, "num_tokens: expected >= 0, got %lld", (long long)n);
    PF_TRY(check_tokens(tokens, n, "token_ids"));
    int32_t eligible;
    *hit_blocks = prefix_walk(p, tokens, n, NULL, hit_evictable, &eligible);
    return PF_STATUS_OK;
}

pf_status pf_block_pool_allocate(pf_block_pool_t *p, int64_t id, const int32_t *tokens, int64_t n,
                                 int64_t *num_cached_tokens) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    const int32_t bs = p->block_size;
    PF_CHECK_VALUE(n >= 0 && n <= INT32_MAX, "allocate(seq_id %lld): num_tokens must be in [0, 2^31), got %lld",
                   (long long)id, (long long)n);
    PF_CHECK_VALUE(tokens || !p->caching || n == 0, "allocate(seq_id %lld): token_ids are required with prefix caching",
                   (long long)id);
    PF_CHECK_VALUE(seq_find(p, id) == BP_NONE, "allocate: seq_id %lld is already allocated", (long long)id);
    PF_TRY(check_tokens(tokens, n, "allocate: token_ids"));
    int32_t nb = (int32_t)((n + bs - 1) / bs);
    PF_TRY(scratch_reserve(p, nb));
    int32_t ev, eligible;
    int32_t hits = prefix_walk(p, tokens, n, p->scratch, &ev, &eligible);
    int32_t need = nb - hits, avail = p->side[0].nfree + p->nevict - ev;
    PF_CHECK(need <= avail, PF_STATUS_OUT_OF_BLOCKS,
             "allocate(seq_id %lld, %lld tokens): needs %d new blocks (%d reused from the prefix "
             "cache), only %d free of %d",
             (long long)id, (long long)n, need, hits, avail, p->side[0].n);
    PF_TRY(slot_reserve(p));
    int32_t slot = p->slot_free[p->nslot_free - 1];
    PF_TRY(seq_reserve(&p->seqs[slot], nb));

    /* nothing can fail from here on */
    p->nslot_free--;
    bp_seq *s = &p->seqs[slot];
    s->id = id;
    s->len = n;
    s->nblocks = nb;
    s->on_host = 0;
    id_insert(p, id, slot);
    p->nseqs++;
    if (p->caching) {
        p->queries += eligible;
        p->hits += hits;
    }
    bp_side *d = &p->side[0];
    for (int32_t i = 0; i < hits; i++) {
        dev_claim(p, p->scratch[i]);
        s->blocks[i] = p->scratch[i];
    }
    uint64_t parent = hits ? d->hash[s->blocks[hits - 1]] : BP_ROOT_HASH;
    for (int32_t i = hits; i < nb; i++) {
        int32_t b = dev_take(p);
        s->blocks[i] = b;
        int64_t first = (int64_t)i * bs;
        int32_t cnt = (int32_t)(n - first < bs ? n - first : bs);
        int32_t *dst = d->tokens + (int64_t)b * bs;
        if (tokens)
            memcpy(dst, tokens + first, (size_t)cnt * sizeof(int32_t));
        else
            for (int32_t j = 0; j < cnt; j++) dst[j] = -1;
        if (cnt == bs && p->caching) {
            dev_seal(p, b, parent);
            parent = d->hash[b];
        }
    }
    if (num_cached_tokens) *num_cached_tokens = (int64_t)hits * bs;
    return PF_STATUS_OK;
}

static pf_status append_fail(pf_block_pool_t *p, int32_t upto, pf_status st) {
    /* undo the simulated refcount drops of sequences [0, upto) */
    for (int32_t i = 0; i < upto; i++) {
        int32_t v = p->scratch[i];
        if (v < 0) {
            bp_seq *s = &p->seqs[~v];
            p->side[0].ref[s->blocks[s->nblocks - 1]]++;
        }
    }
    return st;
}

pf_status pf_block_pool_append(pf_block_pool_t *p, const int64_t *ids, int32_t ns, const int32_t *knew, int32_t uniform,
                               const int32_t *tokens, int64_t *cow, int32_t *num_cow) {
    PF_CHECK_VALUE(p && num_cow, "pool, num_cow: expected non-NULL pointers");
    PF_CHECK_VALUE(ns >= 0, "append: num_seqs must be >= 0, got %d", (int)ns);
    PF_CHECK_VALUE(ns == 0 || (ids && cow), "append: seq_ids and cow must be non-NULL");
    PF_CHECK_VALUE(knew || uniform >= 0, "append: num_new_tokens must be >= 0, got %d", (int)uniform);
    PF_TRY(scratch_reserve(p, ns));
    const int32_t bs = p->block_size;
    bp_side *d = &p->side[0];
    uint32_t ep = seq_epoch(p);
    int64_t need = 0, total = 0;
    /* validate, count blocks exactly: a copy-on-write drops the shared block's
     * refcount, which later sequences sharing it see (simulated, then undone) */
    for (int32_t i = 0; i < ns; i++) {
        int32_t slot = seq_find(p, ids[i]);
        pf_status st = PF_STATUS_INVALID_VALUE;
        if (slot == BP_NONE) {
            pf_set_error(st, __FILE__, __LINE__,
                         "append_slots: unknown seq_id %lld (never allocated, or already freed)", (long long)ids[i]);
            return append_fail(p, i, st);
        }
        bp_seq *s = &p->seqs[slot];
        int32_t k = knew ? knew[i] : uniform;
        if (s->on_host || s->mark == ep || k < 0 || s->len + k > INT32_MAX) {
            if (s->on_host)
                pf_set_error(st, __FILE__, __LINE__, "append_slots: seq_id %lld is swapped out; swap it in first",
                             (long long)ids[i]);
            else if (s->mark == ep)
                pf_set_error(st, __FILE__, __LINE__, "append_slots: seq_id %lld appears twice", (long long)ids[i]);
            else
                pf_set_error(st, __FILE__, __LINE__,
                             "append_slots(seq_id %lld): num_new_tokens must be >= 0 and keep the "
                             "length below 2^31, got %d",
                             (long long)ids[i], (int)k);
            return append_fail(p, i, st);
        }
        s->mark = ep;
        total += k;
        need += (s->len + k + bs - 1) / bs - s->nblocks;
        p->scratch[i] = slot;
        if (k > 0 && s->len % bs != 0 && d->ref[s->blocks[s->nblocks - 1]] > 1) {
            need++;
            d->ref[s->blocks[s->nblocks - 1]]--;
            p->scratch[i] = ~slot;
        }
    }
    append_fail(p, ns, PF_STATUS_OK); /* restore refcounts */
    if (total > 0 && !tokens && p->caching)
        return pf_set_error(PF_STATUS_INVALID_VALUE, __FILE__, __LINE__,
                            "append_slots: token_ids are required with prefix caching");
    PF_TRY(check_tokens(tokens, total, "append_slots: token_ids"));
    PF_CHECK(need <= (int64_t)d->nfree + p->nevict, PF_STATUS_OUT_OF_BLOCKS,
             "append_slots: %d sequence(s) need %lld new blocks, only %d free of %d", (int)ns, (long long)need,
             d->nfree + p->nevict, d->n);
    for (int32_t i = 0; i < ns; i++) {
        int32_t v = p->scratch[i];
        bp_seq *s = &p->seqs[v < 0 ? ~v : v];
        int32_t k = knew ? knew[i] : uniform;
        PF_TRY(seq_reserve(s, (s->len + k + bs - 1) / bs));
    }

    /* nothing can fail from here on */
    int32_t nc = 0;
    const int32_t *tok = tokens;
    for (int32_t i = 0; i < ns; i++) {
        int32_t v = p->scratch[i];
        bp_seq *s = &p->seqs[v < 0 ? ~v : v];
        int32_t k = knew ? knew[i] : uniform;
        if (k == 0) continue;
        int64_t pos = s->len;
        int32_t off = (int32_t)(pos % bs);
        if (off != 0) {
            int32_t last = s->blocks[s->nblocks - 1];
            if (d->ref[last] > 1) { /* copy-on-write */
                int32_t b = dev_take(p);
                memcpy(d->tokens + (int64_t)b * bs, d->tokens + (int64_t)last * bs, (size_t)off * sizeof(int32_t));
                d->ref[last]--;
                s->blocks[s->nblocks - 1] = b;
                cow[2 * nc] = last;
                cow[2 * nc + 1] = b;
                nc++;
            }
        }
        for (int32_t t = 0; t < k; t++) {
            int32_t b;
            if (off == 0) {
                b = dev_take(p);
                s->blocks[s->nblocks++] = b;
            } else {
                b = s->blocks[s->nblocks - 1];
            }
            d->tokens[(int64_t)b * bs + off] = tok ? tok[t] : -1;
            if (++off == bs) {
                off = 0;
                if (p->caching) dev_seal(p, b, s->nblocks > 1 ? d->hash[s->blocks[s->nblocks - 2]] : BP_ROOT_HASH);
            }
        }
        s->len = pos + k;
        if (tok) tok += k;
    }
    *num_cow = nc;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_fork(pf_block_pool_t *p, int64_t parent_id, int64_t child_id) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    int32_t ps = seq_find(p, parent_id);
    PF_CHECK_VALUE(ps != BP_NONE, "fork: unknown parent seq_id %lld (never allocated, or already freed)",
                   (long long)parent_id);
    PF_CHECK_VALUE(!p->seqs[ps].on_host, "fork: parent seq_id %lld is swapped out; swap it in first",
                   (long long)parent_id);
    PF_CHECK_VALUE(seq_find(p, child_id) == BP_NONE, "fork: child seq_id %lld is already allocated",
                   (long long)child_id);
    PF_TRY(slot_reserve(p));
    int32_t slot = p->slot_free[p->nslot_free - 1];
    PF_TRY(seq_reserve(&p->seqs[slot], p->seqs[ps].nblocks));
    p->nslot_free--;
    bp_seq *par = &p->seqs[ps], *c = &p->seqs[slot];
    c->id = child_id;
    c->len = par->len;
    c->nblocks = par->nblocks;
    c->on_host = 0;
    if (par->nblocks) memcpy(c->blocks, par->blocks, (size_t)par->nblocks * sizeof(int32_t));
    for (int32_t i = 0; i < par->nblocks; i++) p->side[0].ref[par->blocks[i]]++;
    id_insert(p, child_id, slot);
    p->nseqs++;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_release(pf_block_pool_t *p, int64_t id) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    int32_t slot = seq_find(p, id);
    PF_CHECK_VALUE(slot != BP_NONE, "free: unknown seq_id %lld (never allocated, or already freed)", (long long)id);
    bp_seq *s = &p->seqs[slot];
    for (int32_t i = s->nblocks - 1; i >= 0; i--) {
        if (s->on_host)
            host_release(p, s->blocks[i]);
        else
            dev_release(p, s->blocks[i]);
    }
    s->nblocks = 0;
    s->len = 0;
    s->on_host = 0;
    id_erase(p, id);
    p->slot_free[p->nslot_free++] = slot;
    p->nseqs--;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* swapping                                                                  */
/* ------------------------------------------------------------------------ */

static pf_status swap_validate(pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t to_host, int32_t *count) {
    const char *what = to_host ? "swap_out" : "swap_in";
    PF_CHECK_VALUE(ns >= 0 && (ns == 0 || ids), "%s: expected num_seqs >= 0 and seq_ids", what);
    uint32_t ep = seq_epoch(p);
    for (int32_t i = 0; i < ns; i++) {
        int32_t slot = seq_find(p, ids[i]);
        PF_CHECK_VALUE(slot != BP_NONE, "%s: unknown seq_id %lld (never allocated, or already freed)", what,
                       (long long)ids[i]);
        bp_seq *s = &p->seqs[slot];
        PF_CHECK_VALUE(s->mark != ep, "%s: seq_id %lld appears twice", what, (long long)ids[i]);
        s->mark = ep;
        PF_CHECK_VALUE(s->on_host != to_host, "%s: seq_id %lld is %s", what, (long long)ids[i],
                       to_host ? "already swapped out" : "not swapped out");
    }
    const bp_side *src = &p->side[to_host ? 0 : 1];
    uint32_t be = blk_epoch(p);
    int32_t n = 0;
    for (int32_t i = 0; i < ns; i++) {
        bp_seq *s = &p->seqs[seq_find(p, ids[i])];
        for (int32_t j = 0; j < s->nblocks; j++) {
            int32_t b = s->blocks[j];
            if (src->mark[b] != be) {
                src->mark[b] = be;
                n++;
            }
        }
    }
    *count = n;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_swap_count(pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t to_host,
                                   int32_t *num_blocks) {
    PF_CHECK_VALUE(p && num_blocks, "pool, num_blocks: expected non-NULL pointers");
    return swap_validate(p, ids, ns, to_host ? 1 : 0, num_blocks);
}

pf_status pf_block_pool_swap(pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t to_host, int64_t *mapping,
                             int64_t max_pairs, int64_t *num_pairs) {
    PF_CHECK_VALUE(p && num_pairs, "pool, num_pairs: expected non-NULL pointers");
    to_host = to_host ? 1 : 0;
    const char *what = to_host ? "swap_out" : "swap_in";
    int32_t count;
    PF_TRY(swap_validate(p, ids, ns, to_host, &count));
    PF_CHECK_VALUE(count <= max_pairs && (count == 0 || mapping), "%s: mapping holds %lld pairs, %d needed", what,
                   (long long)max_pairs, count);
    int32_t avail = to_host ? p->side[1].nfree : p->side[0].nfree + p->nevict;
    PF_CHECK(count <= avail, PF_STATUS_OUT_OF_BLOCKS, "%s: %d sequence(s) need %d %s blocks, only %d free of %d", what,
             (int)ns, count, to_host ? "CPU" : "device", avail, p->side[to_host].n);

    /* nothing can fail from here on */
    bp_side *src = &p->side[to_host ? 0 : 1], *dst = &p->side[to_host];
    const int32_t bs = p->block_size;
    uint32_t be = blk_epoch(p);
    int64_t np = 0;
    for (int32_t i = 0; i < ns; i++) {
        bp_seq *s = &p->seqs[seq_find(p, ids[i])];
        for (int32_t j = 0; j < s->nblocks; j++) {
            int32_t b = s->blocks[j], c;
            if (src->mark[b] != be) {
                src->mark[b] = be;
                c = to_host ? host_take(p) : dev_take(p);
                dst->ref[c] = 0;
                memcpy(dst->tokens + (int64_t)c * bs, src->tokens + (int64_t)b * bs, (size_t)bs * sizeof(int32_t));
                dst->hash[c] = src->hash[b];
                dst->parent_hash[c] = src->parent_hash[b];
                dst->flags[c] = (uint8_t)(src->flags[b] & BP_HASHED);
                if (!to_host && p->caching && (dst->flags[c] & BP_HASHED)) cache_add(p, c);
                src->remap[b] = c;
                mapping[2 * np] = b;
                mapping[2 * np + 1] = c;
                np++;
            } else {
                c = src->remap[b];
            }
            dst->ref[c]++;
            if (to_host)
                dev_release(p, b);
            else
                host_release(p, b);
            s->blocks[j] = c;
        }
        s->on_host = to_host;
    }
    *num_pairs = np;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* queries                                                                   */
/* ------------------------------------------------------------------------ */

static pf_status find_running(const pf_block_pool_t *p, int64_t id, const char *what, const bp_seq **out) {
    int32_t slot = seq_find(p, id);
    PF_CHECK_VALUE(slot != BP_NONE, "%s: unknown seq_id %lld (never allocated, or already freed)", what, (long long)id);
    PF_CHECK_VALUE(!p->seqs[slot].on_host, "%s: seq_id %lld is swapped out", what, (long long)id);
    *out = &p->seqs[slot];
    return PF_STATUS_OK;
}

pf_status pf_block_pool_seq_info(const pf_block_pool_t *p, int64_t id, int64_t *num_tokens, int32_t *num_blocks,
                                 int32_t *swapped) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    int32_t slot = seq_find(p, id);
    PF_CHECK_VALUE(slot != BP_NONE, "unknown seq_id %lld (never allocated, or already freed)", (long long)id);
    const bp_seq *s = &p->seqs[slot];
    if (num_tokens) *num_tokens = s->len;
    if (num_blocks) *num_blocks = s->nblocks;
    if (swapped) *swapped = s->on_host;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_block_table(const pf_block_pool_t *p, int64_t id, int32_t *out, int32_t capacity,
                                    int32_t *num_blocks) {
    PF_CHECK_VALUE(p && num_blocks, "pool, num_blocks: expected non-NULL pointers");
    int32_t slot = seq_find(p, id);
    PF_CHECK_VALUE(slot != BP_NONE, "block_table: unknown seq_id %lld (never allocated, or already freed)",
                   (long long)id);
    const bp_seq *s = &p->seqs[slot];
    PF_CHECK_VALUE(capacity >= s->nblocks && (s->nblocks == 0 || out), "block_table: out holds %d entries, %d needed",
                   (int)capacity, s->nblocks);
    if (s->nblocks) memcpy(out, s->blocks, (size_t)s->nblocks * sizeof(int32_t));
    *num_blocks = s->nblocks;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_max_blocks(const pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t *max_blocks) {
    PF_CHECK_VALUE(p && max_blocks && ns >= 0 && (ns == 0 || ids), "max_blocks: bad arguments");
    int32_t m = 0;
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = NULL;
        PF_TRY(find_running(p, ids[i], "block_tables", &s));
        if (s->nblocks > m) m = s->nblocks;
    }
    *max_blocks = m;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_block_tables(const pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t *out,
                                     int32_t width, int32_t pad) {
    PF_CHECK_VALUE(p && ns >= 0 && (ns == 0 || (ids && (out || width == 0))), "block_tables: bad arguments");
    PF_CHECK_VALUE(width >= 0, "block_tables: max_blocks must be >= 0, got %d", (int)width);
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = NULL;
        PF_TRY(find_running(p, ids[i], "block_tables", &s));
        PF_CHECK_VALUE(s->nblocks <= width, "block_tables: max_blocks %d is less than the %d blocks of seq_id %lld",
                       (int)width, s->nblocks, (long long)ids[i]);
    }
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = &p->seqs[seq_find(p, ids[i])];
        int32_t *row = out + (int64_t)i * width;
        if (s->nblocks) memcpy(row, s->blocks, (size_t)s->nblocks * sizeof(int32_t));
        if (pad == 0)
            memset(row + s->nblocks, 0, (size_t)(width - s->nblocks) * sizeof(int32_t));
        else
            for (int32_t j = s->nblocks; j < width; j++) row[j] = pad;
    }
    return PF_STATUS_OK;
}

pf_status pf_block_pool_seq_lens(const pf_block_pool_t *p, const int64_t *ids, int32_t ns, int32_t *out) {
    PF_CHECK_VALUE(p && ns >= 0 && (ns == 0 || (ids && out)), "seq_lens: bad arguments");
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = NULL;
        PF_TRY(find_running(p, ids[i], "seq_lens", &s));
    }
    for (int32_t i = 0; i < ns; i++) out[i] = (int32_t)p->seqs[seq_find(p, ids[i])].len;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_slot_mapping(const pf_block_pool_t *p, const int64_t *ids, int32_t ns, const int32_t *knew,
                                     int32_t uniform, int64_t *out, int64_t capacity, int64_t *num_slots) {
    PF_CHECK_VALUE(p && num_slots && ns >= 0 && (ns == 0 || ids), "slot_mapping: bad arguments");
    int64_t total = 0;
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = NULL;
        PF_TRY(find_running(p, ids[i], "slot_mapping", &s));
        int32_t k = knew ? knew[i] : uniform;
        PF_CHECK_VALUE(k >= 0 && k <= s->len,
                       "slot_mapping: num_new_tokens for seq_id %lld must be in [0, %lld], got %d", (long long)ids[i],
                       (long long)s->len, (int)k);
        total += k;
    }
    PF_CHECK_VALUE(total <= capacity && (total == 0 || out), "slot_mapping: out holds %lld slots, %lld needed",
                   (long long)capacity, (long long)total);
    const int64_t bs = p->block_size;
    int64_t o = 0;
    for (int32_t i = 0; i < ns; i++) {
        const bp_seq *s = &p->seqs[seq_find(p, ids[i])];
        int32_t k = knew ? knew[i] : uniform;
        for (int64_t t = s->len - k; t < s->len; t++) out[o++] = (int64_t)s->blocks[t / bs] * bs + t % bs;
    }
    *num_slots = total;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_seq_tokens(const pf_block_pool_t *p, int64_t id, int32_t *out, int64_t capacity,
                                   int64_t *num_tokens) {
    PF_CHECK_VALUE(p && num_tokens, "pool, num_tokens: expected non-NULL pointers");
    int32_t slot = seq_find(p, id);
    PF_CHECK_VALUE(slot != BP_NONE, "token_ids: unknown seq_id %lld (never allocated, or already freed)",
                   (long long)id);
    const bp_seq *s = &p->seqs[slot];
    PF_CHECK_VALUE(capacity >= s->len && (s->len == 0 || out), "token_ids: out holds %lld entries, %lld needed",
                   (long long)capacity, (long long)s->len);
    const bp_side *side = &p->side[s->on_host];
    const int32_t bs = p->block_size;
    for (int64_t t = 0; t < s->len; t++) out[t] = side->tokens[(int64_t)s->blocks[t / bs] * bs + t % bs];
    *num_tokens = s->len;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_seq_ids(const pf_block_pool_t *p, int64_t *out, int32_t capacity, int32_t *num_seqs) {
    PF_CHECK_VALUE(p && num_seqs, "pool, num_seqs: expected non-NULL pointers");
    PF_CHECK_VALUE(capacity >= p->nseqs && (p->nseqs == 0 || out), "seq_ids: out holds %d entries, %d needed",
                   (int)capacity, p->nseqs);
    int32_t n = 0;
    if (p->id_val)
        for (uint64_t i = 0; i <= p->id_mask; i++)
            if (p->id_val[i] != BP_NONE) out[n++] = p->id_key[i];
    *num_seqs = n;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_block_states(const pf_block_pool_t *p, int32_t on_host, int32_t *refcounts, int32_t *states,
                                     uint64_t *hashes) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    const bp_side *s = &p->side[on_host ? 1 : 0];
    for (int32_t b = 0; b < s->n; b++) {
        if (refcounts) refcounts[b] = s->ref[b];
        if (states)
            states[b] = s->ref[b] > 0                             ? PF_BLOCK_USED
                        : (!on_host && (s->flags[b] & BP_CACHED)) ? PF_BLOCK_EVICTABLE
                                                                  : PF_BLOCK_FREE;
        if (hashes) hashes[b] = (s->flags[b] & BP_HASHED) ? s->hash[b] : 0;
    }
    return PF_STATUS_OK;
}

pf_status pf_block_pool_free_list(const pf_block_pool_t *p, int32_t on_host, int32_t *out, int32_t capacity,
                                  int32_t *count) {
    PF_CHECK_VALUE(p && count, "pool, count: expected non-NULL pointers");
    const bp_side *s = &p->side[on_host ? 1 : 0];
    PF_CHECK_VALUE(capacity >= s->nfree && (s->nfree == 0 || out), "free_list: out holds %d entries, %d needed",
                   (int)capacity, s->nfree);
    for (int32_t i = 0; i < s->nfree; i++) out[i] = s->free_stack[s->nfree - 1 - i];
    *count = s->nfree;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_evictable(const pf_block_pool_t *p, int32_t *out, int32_t capacity, int32_t *count) {
    PF_CHECK_VALUE(p && count, "pool, count: expected non-NULL pointers");
    PF_CHECK_VALUE(capacity >= p->nevict && (p->nevict == 0 || out), "evictable: out holds %d entries, %d needed",
                   (int)capacity, p->nevict);
    int32_t n = 0;
    for (int32_t b = p->lru_head; b != BP_NONE; b = p->lru_next[b]) out[n++] = b;
    *count = n;
    return PF_STATUS_OK;
}

pf_status pf_block_pool_reset_prefix_cache(pf_block_pool_t *p, int32_t *num_evicted) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    int32_t n = 0;
    bp_side *d = &p->side[0];
    while (p->lru_head != BP_NONE) {
        int32_t b = p->lru_head;
        lru_unlink(p, b);
        cache_drop(p, b);
        d->flags[b] = 0;
        d->free_stack[d->nfree++] = b;
        n++;
    }
    if (num_evicted) *num_evicted = n;
    return PF_STATUS_OK;
}

/* ------------------------------------------------------------------------ */
/* invariants                                                                */
/* ------------------------------------------------------------------------ */

#define BP_EXPECT(cond, ...)                                                                                 \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            st = pf_set_error(PF_STATUS_INTERNAL, __FILE__, __LINE__, "block pool invariant: " __VA_ARGS__); \
            goto done;                                                                                       \
        }                                                                                                    \
    } while (0)

pf_status pf_block_pool_check(const pf_block_pool_t *p) {
    PF_CHECK_VALUE(p, "pool: expected a non-NULL pointer");
    pf_status st = PF_STATUS_OK;
    const int32_t bs = p->block_size;
    int32_t *refs[2] = {NULL, NULL};
    uint8_t *seen[2] = {NULL, NULL};
    for (int side = 0; side < 2; side++) {
        size_t m = p->side[side].n > 0 ? (size_t)p->side[side].n : 1;
        refs[side] = (int32_t *)calloc(m, sizeof(int32_t));
        seen[side] = (uint8_t *)calloc(m, 1);
        if (!refs[side] || !seen[side]) {
            st = pf_set_error(PF_STATUS_OUT_OF_MEMORY, __FILE__, __LINE__, "check: out of memory");
            goto done;
        }
    }
    /* sequences: tables, lengths, index */
    int32_t live = 0;
    for (int32_t slot = 0; slot < p->seq_cap; slot++) {
        const bp_seq *s = &p->seqs[slot];
        int32_t found = seq_find(p, s->id);
        if (found != slot) {
            BP_EXPECT(s->nblocks == 0 && s->len == 0, "unindexed slot %d holds blocks", slot);
            continue;
        }
        live++;
        BP_EXPECT(s->nblocks == (s->len + bs - 1) / bs, "seq_id %lld: %d blocks for %lld tokens", (long long)s->id,
                  s->nblocks, (long long)s->len);
        BP_EXPECT(s->nblocks <= s->cap, "seq_id %lld: table overflow", (long long)s->id);
        const bp_side *side = &p->side[s->on_host];
        for (int32_t j = 0; j < s->nblocks; j++) {
            int32_t b = s->blocks[j];
            BP_EXPECT(b >= 0 && b < side->n, "seq_id %lld: block %d out of range", (long long)s->id, b);
            refs[s->on_host][b]++;
            if (j + 1 < s->nblocks && p->caching && !s->on_host)
                BP_EXPECT(side->flags[b] & BP_HASHED, "seq_id %lld: full block %d has no hash", (long long)s->id, b);
        }
    }
    BP_EXPECT(live == p->nseqs, "%d indexed sequences, nseqs = %d", live, p->nseqs);
    BP_EXPECT(p->nslot_free + live == p->seq_cap, "slots: %d free + %d live != %d", p->nslot_free, live, p->seq_cap);
    for (int side = 0; side < 2; side++) {
        const bp_side *s = &p->side[side];
        for (int32_t b = 0; b < s->n; b++)
            BP_EXPECT(s->ref[b] == refs[side][b], "%s block %d: refcount %d, %d table references",
                      side ? "host" : "device", b, s->ref[b], refs[side][b]);
        for (int32_t i = 0; i < s->nfree; i++) {
            int32_t b = s->free_stack[i];
            BP_EXPECT(b >= 0 && b < s->n && !seen[side][b], "free list: bad or repeated block %d", b);
            seen[side][b] = 1;
            BP_EXPECT(s->ref[b] == 0 && !(s->flags[b] & BP_CACHED), "free list: block %d is in use or cached", b);
        }
    }
    int32_t nev = 0;
    for (int32_t b = p->lru_head, prev = BP_NONE; b != BP_NONE; prev = b, b = p->lru_next[b]) {
        BP_EXPECT(b >= 0 && b < p->side[0].n && !seen[0][b], "evictable list: bad or repeated block %d", b);
        BP_EXPECT(p->lru_prev[b] == prev, "evictable list: broken link at %d", b);
        seen[0][b] = 1;
        BP_EXPECT(p->side[0].ref[b] == 0 && (p->side[0].flags[b] & BP_CACHED),
                  "evictable block %d is in use or not cached", b);
        nev++;
    }
    BP_EXPECT(nev == p->nevict, "evictable count %d, list holds %d", p->nevict, nev);
    for (int side = 0; side < 2; side++) {
        const bp_side *s = &p->side[side];
        for (int32_t b = 0; b < s->n; b++)
            BP_EXPECT((s->ref[b] == 0) == (seen[side][b] != 0), "%s block %d: refcount %d but %s",
                      side ? "host" : "device", b, s->ref[b], seen[side][b] ? "listed as free" : "not listed as free");
    }
    int32_t ncached = 0, nindexed = 0;
    for (int32_t b = 0; b < p->side[0].n; b++) {
        if (!(p->side[0].flags[b] & BP_CACHED)) continue;
        ncached++;
        BP_EXPECT(p->side[0].flags[b] & BP_HASHED, "cached block %d has no hash", b);
        BP_EXPECT(ht_find(p, p->side[0].hash[b]) == b, "cached block %d is not indexed", b);
    }
    for (uint64_t i = 0; i <= p->ht_mask; i++) {
        int32_t b = p->ht_val[i];
        if (b == BP_NONE) continue;
        nindexed++;
        BP_EXPECT(b >= 0 && b < p->side[0].n && (p->side[0].flags[b] & BP_CACHED) && p->side[0].hash[b] == p->ht_key[i],
                  "index entry %llu -> block %d is stale", (unsigned long long)i, b);
        BP_EXPECT(bp_block_hash(p->side[0].parent_hash[b], p->side[0].tokens + (int64_t)b * bs, bs) == p->ht_key[i],
                  "cached block %d: tokens do not match its hash", b);
    }
    BP_EXPECT(ncached == p->ncached && nindexed == ncached, "cached count %d, flagged %d, indexed %d", p->ncached,
              ncached, nindexed);
done:
    for (int side = 0; side < 2; side++) {
        free(refs[side]);
        free(seen[side]);
    }
    return st;
}
