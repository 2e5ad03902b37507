/* A numpy data allocator (NEP 49 handler) that keeps large freed blocks for reuse.
 *
 * Why: a checkpoint job allocates the same few large arrays for every tensor (the tensor read
 * from the file, its codes, its mask). Through malloc each such array is a fresh mapping: the
 * kernel faults and zeroes every page of it, and frees them again at munmap; on a virtual
 * machine that reports free pages to its host, each fault is also a round trip to the host.
 * Blocks kept here are mapped once per job and reused while the job runs.
 *
 * Blocks of POOLED_MIN bytes or more are mappings that start on a 2 MiB boundary (hinted to be huge pages),
 * kept on a free list when freed, up to `limit` bytes; a request takes the smallest free block it
 * fits in that is at most twice its size. A request that finds none evicts free blocks, oldest
 * first, until the free bytes plus the new mapping fit the limit, so memory held by the pool is at
 * most the live arrays plus `limit`. Smaller requests are plain malloc. The HDR bytes before every
 * block's data say which kind it is, so free and realloc need no lookup; a pooled block's data
 * starts one page into its mapping (page-aligned, as direct I/O wants it), a small one's is
 * malloc-aligned.
 *
 * Arrays remember the handler that made them (NEP 49), so a pooled array freed after its job is
 * still returned here; with the limit back at 0 its mapping is released at once.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HDR 64
#define PAGE_OFFSET 4096 /* where a pooled block's data starts in its mapping: page-aligned, for direct I/O */
#define POOLED_MIN ((size_t)1 << 20)
#define HUGE_PAGE ((size_t)2 << 20)
#define KIND_SMALL 0x736d616c6c000001ULL
#define KIND_POOLED 0x706f6f6c65640002ULL

typedef struct block {
    uint64_t kind;
    size_t size;   /* small: the bytes requested; pooled: the usable bytes after the header */
    size_t mapped; /* pooled: the bytes of the mapping (the header included) */
    struct block *next, *prev;
} block;

_Static_assert(sizeof(block) <= HDR, "the header must fit in HDR bytes");

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static block *newest, *oldest; /* the free list, newest first */
static size_t free_bytes, limit;
static uint64_t stat_hits, stat_maps, stat_unmaps;

static void unlink_block(block *b) {
    if (b->prev) b->prev->next = b->next; else newest = b->next;
    if (b->next) b->next->prev = b->prev; else oldest = b->prev;
    free_bytes -= b->mapped;
}

/* detach free blocks, oldest first, until at most `keep` bytes stay free; returns them chained */
static block *evict_locked(size_t keep) {
    block *out = NULL;
    while (oldest && free_bytes > keep) {
        block *b = oldest;
        unlink_block(b);
        b->next = out;
        out = b;
    }
    return out;
}

static char *mapping_of(block *b) { return (char *)b + HDR - PAGE_OFFSET; }

static void unmap_chain(block *b) {
    while (b) {
        block *n = b->next;
        munmap(mapping_of(b), b->mapped);
        __atomic_add_fetch(&stat_unmaps, 1, __ATOMIC_RELAXED);
        b = n;
    }
}

static void *map_block(size_t size) {
    if (size > SIZE_MAX - PAGE_OFFSET - 2 * HUGE_PAGE) return NULL;
    size_t mapped = (size + PAGE_OFFSET + PAGE_OFFSET - 1) / PAGE_OFFSET * PAGE_OFFSET;
    /* map one huge page more and trim, so the block starts on a huge-page boundary (whole huge
     * pages, then small pages for the rest) */
    char *raw = mmap(NULL, mapped + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *p = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > raw) munmap(raw, (size_t)(p - raw));
    if (p + mapped < raw + mapped + HUGE_PAGE) munmap(p + mapped, (size_t)(raw + mapped + HUGE_PAGE - (p + mapped)));
#ifdef MADV_HUGEPAGE
    madvise(p, mapped, MADV_HUGEPAGE);
#endif
    __atomic_add_fetch(&stat_maps, 1, __ATOMIC_RELAXED);
    block *b = (block *)(p + PAGE_OFFSET - HDR);
    b->kind = KIND_POOLED;
    b->size = mapped - PAGE_OFFSET;
    b->mapped = mapped;
    b->next = b->prev = NULL;
    return p + PAGE_OFFSET;
}

/* a pooled block for `size` bytes: a free one that fits (at most twice the size), else a new mapping */
static void *take(size_t size, int *fresh) {
    block *best = NULL, *evicted = NULL;
    pthread_mutex_lock(&lock);
    for (block *b = newest; b; b = b->next)
        if (b->size >= size && b->size / 2 <= size && (!best || b->size < best->size)) best = b;
    if (best) {
        unlink_block(best);
        stat_hits++;
    } else {
        size_t need = (size + PAGE_OFFSET + PAGE_OFFSET - 1) / PAGE_OFFSET * PAGE_OFFSET;
        evicted = evict_locked(limit > need ? limit - need : 0);
    }
    pthread_mutex_unlock(&lock);
    unmap_chain(evicted);
    *fresh = best == NULL;
    return best ? (char *)best + HDR : map_block(size);
}

static void give_back(block *b) {
    block *evicted = NULL;
    pthread_mutex_lock(&lock);
    if (b->mapped <= limit) {
        b->prev = NULL;
        b->next = newest;
        if (newest) newest->prev = b; else oldest = b;
        newest = b;
        free_bytes += b->mapped;
        evicted = evict_locked(limit);
        b = NULL;
    }
    pthread_mutex_unlock(&lock);
    unmap_chain(evicted);
    if (b) {
        munmap(mapping_of(b), b->mapped);
        __atomic_add_fetch(&stat_unmaps, 1, __ATOMIC_RELAXED);
    }
}

static void *small_alloc(size_t size, int zero) {
    if (size > SIZE_MAX - HDR) return NULL;
    block *b = zero ? calloc(1, size + HDR) : malloc(size + HDR);
    if (!b) return NULL;
    b->kind = KIND_SMALL;
    b->size = size;
    return (char *)b + HDR;
}

static void *pool_malloc(void *ctx, size_t size) {
    (void)ctx;
    if (size < POOLED_MIN) return small_alloc(size, 0);
    int fresh;
    return take(size, &fresh);
}

static void *pool_calloc(void *ctx, size_t n, size_t elsize) {
    (void)ctx;
    if (elsize && n > SIZE_MAX / elsize) return NULL;
    size_t size = n * elsize;
    if (size < POOLED_MIN) return small_alloc(size, 1);
    int fresh;
    void *p = take(size, &fresh);
    if (p && !fresh) memset(p, 0, size); /* a new mapping is zero already */
    return p;
}

static void pool_free(void *ctx, void *p, size_t size) {
    (void)ctx;
    (void)size;
    if (!p) return;
    block *b = (block *)((char *)p - HDR);
    if (b->kind == KIND_SMALL) free(b);
    else if (b->kind == KIND_POOLED) give_back(b);
    else abort(); /* not a block of this allocator: memory is corrupt */
}

static void *pool_realloc(void *ctx, void *p, size_t size) {
    if (!p) return pool_malloc(ctx, size);
    block *b = (block *)((char *)p - HDR);
    if (b->kind == KIND_SMALL && size < POOLED_MIN) {
        if (size > SIZE_MAX - HDR) return NULL;
        block *nb = realloc(b, size + HDR);
        if (!nb) return NULL;
        nb->size = size;
        return (char *)nb + HDR;
    }
    if (b->kind == KIND_POOLED && size <= b->size) return p;
    if (b->kind != KIND_SMALL && b->kind != KIND_POOLED) abort();
    void *q = pool_malloc(ctx, size);
    if (!q) return NULL;
    memcpy(q, p, b->size < size ? b->size : size);
    pool_free(ctx, p, b->size);
    return q;
}

/* numpy's PyDataMem_Handler (numpy/ndarraytypes.h, NEP 49): name, version 1, then the allocator */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} data_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    data_allocator allocator;
} data_handler;

data_handler lowbit_array_pool_handler = {
    "lowbit_array_pool", 1, {NULL, pool_malloc, pool_calloc, pool_realloc, pool_free}};

/* the most free bytes the pool keeps; lowering it releases free blocks, oldest first, at once */
void lowbit_array_pool_limit(size_t bytes) {
    pthread_mutex_lock(&lock);
    limit = bytes;
    block *evicted = evict_locked(limit);
    pthread_mutex_unlock(&lock);
    unmap_chain(evicted);
}

/* out: free bytes held, requests served from the free list, mappings made, mappings released */
void lowbit_array_pool_stats(uint64_t *out) {
    pthread_mutex_lock(&lock);
    out[0] = free_bytes;
    out[1] = stat_hits;
    pthread_mutex_unlock(&lock);
    out[2] = __atomic_load_n(&stat_maps, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&stat_unmaps, __ATOMIC_RELAXED);
}
