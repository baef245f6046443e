/* Supermask's per-step passes on CPU, fused: expanding the kept tiles into the mask and the forward weight
 * (one pass), and the backward (one pass for both the weight gradient g * E and the score gradient, the sum of
 * g * W over every tile).
 *
 * A unit is a float32 weight seen as a contiguous rows x cols matrix (Linear (out, in); Conv2d (O, I*kh*kw)) with
 * square tiles of side `tile` (edge tiles hold what is left) and `keep`, one byte per tile, ceil(rows / tile) x
 * ceil(cols / tile) in row-major order. Pruned entries are written as 0 * value, what torch's product with a 0/1
 * factor gives (-0 for negative values, NaN for non-finite ones). Work is split over whole tile rows (a thread
 * sums whole tiles, in a fixed order: results do not depend on the thread count), in shares of equal element
 * counts: a split by number of tile rows gave one thread the narrow early layers and the other the wide late ones.
 *
 * Built with nm_rank.c by sparsity/native.py; without a compiler sparsity.methods.supermask uses torch ops.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_UNITS 4096

typedef struct {
    int64_t nunits;
    const int64_t *rows, *cols, *tile;
    int64_t first_block[MAX_UNITS + 1]; /* prefix sums of tile rows: the work items */
    int64_t first_elem[MAX_UNITS + 1];  /* prefix sums of elements */
} plan_t;

static int plan(plan_t *p, int64_t nunits, const int64_t *rows, const int64_t *cols, const int64_t *tile) {
    if (nunits < 0 || nunits > MAX_UNITS) return -1;
    p->nunits = nunits;
    p->rows = rows;
    p->cols = cols;
    p->tile = tile;
    p->first_block[0] = p->first_elem[0] = 0;
    for (int64_t u = 0; u < nunits; u++) {
        if (rows[u] < 0 || cols[u] < 0 || tile[u] < 1) return -1;
        p->first_block[u + 1] = p->first_block[u] + (rows[u] + tile[u] - 1) / tile[u];
        p->first_elem[u + 1] = p->first_elem[u] + rows[u] * cols[u];
    }
    return 0;
}

/* The tile rows [*b0, *b1) of thread `me` of `nt`: those whose first element lies in its equal share of all
 * elements (every tile row goes to exactly one thread) */
static void share(const plan_t *p, int me, int nt, int64_t *b0, int64_t *b1) {
    int64_t total = p->first_elem[p->nunits], bounds[2];
    for (int k = 0; k < 2; k++) {
        int64_t at = total * (me + k) / nt, b = p->first_block[p->nunits];
        for (int64_t u = 0; u < p->nunits; u++) {
            if (at < p->first_elem[u + 1]) { /* first tile row of unit u starting at or after `at` */
                int64_t per = p->tile[u] * p->cols[u], off = at - p->first_elem[u];
                b = p->first_block[u] + (off + per - 1) / per;
                break;
            }
        }
        bounds[k] = b;
    }
    *b0 = bounds[0];
    *b1 = bounds[1];
}

static int64_t unit_of(const plan_t *p, int64_t block) {
    int64_t lo = 0, hi = p->nunits - 1;
    while (lo < hi) { /* last unit whose first block is <= block */
        int64_t mid = (lo + hi + 1) / 2;
        if (p->first_block[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(NM_NO_STREAMING)
#include <immintrin.h>
#define STREAMING 1
#else
#define STREAMING 0
#endif

/* dst[c] = src[c] where kexp[c], else 0 * src[c]; streaming stores where AVX-512 is there (the outputs are
 * weight-sized and read back much later: fetching their old lines first would be wasted traffic) */
static inline void select_row(float *restrict dst, const uint8_t *restrict kexp, const float *restrict src,
                              int64_t n) {
    int64_t c = 0;
#if STREAMING
    for (; c < n && ((uintptr_t)(dst + c) & 63); c++) dst[c] = kexp[c] ? src[c] : 0.0f * src[c];
    const __m512 zero = _mm512_setzero_ps();
    for (; c + 16 <= n; c += 16) {
        __m128i k = _mm_loadu_si128((const __m128i *)(kexp + c));
        __m512 v = _mm512_loadu_ps(src + c);
        _mm512_stream_ps(dst + c, _mm512_mask_blend_ps(_mm_test_epi8_mask(k, k), _mm512_mul_ps(zero, v), v));
    }
#endif
    for (; c < n; c++) dst[c] = kexp[c] ? src[c] : 0.0f * src[c];
}

/* one row of the backward, both outputs from one pass over g and w: acc[c] += g[c] * w[c] (the column sums over the
 * tile's rows, the same products and additions in the same order as the separate loops) and dst = g where kept,
 * 0 * g where not */
static inline void both_row(float *restrict dst, float *restrict acc, const uint8_t *restrict kexp,
                            const float *restrict g, const float *restrict w, int64_t n) {
    int64_t c = 0;
#if STREAMING
    for (; c < n && ((uintptr_t)(dst + c) & 63); c++) {
        acc[c] += g[c] * w[c];
        dst[c] = kexp[c] ? g[c] : 0.0f * g[c];
    }
    const __m512 zero = _mm512_setzero_ps();
    for (; c + 16 <= n; c += 16) {
        __m512 gv = _mm512_loadu_ps(g + c);
        _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), _mm512_mul_ps(gv, _mm512_loadu_ps(w + c))));
        __m128i k = _mm_loadu_si128((const __m128i *)(kexp + c));
        _mm512_stream_ps(dst + c, _mm512_mask_blend_ps(_mm_test_epi8_mask(k, k), _mm512_mul_ps(zero, gv), gv));
    }
#endif
    for (; c < n; c++) {
        acc[c] += g[c] * w[c];
        dst[c] = kexp[c] ? g[c] : 0.0f * g[c];
    }
}

/* keep bytes of tile row `tr` spread over the columns: kexp[c] = keep[tr, c / tile] (once per tile row, so the row
 * loops below are plain contiguous loops the compiler vectorizes) */
static void spread(const uint8_t *restrict krow, uint8_t *restrict kexp, int64_t cols, int64_t tile) {
    for (int64_t c0 = 0, t = 0; c0 < cols; c0 += tile, t++) /* a run per tile: no division per column */
        memset(kexp + c0, krow[t] != 0, (size_t)(cols - c0 < tile ? cols - c0 : tile));
}

/* mask = keep expanded, masked = w where kept, 0 * w where not, for tile row `tr` of a unit */
static void expand_block(const float *restrict w, uint8_t *restrict mask, float *restrict masked,
                         const uint8_t *restrict keep, uint8_t *restrict kexp, int64_t rows, int64_t cols,
                         int64_t tile, int64_t tr) {
    int64_t ct = (cols + tile - 1) / tile, r1 = (tr + 1) * tile < rows ? (tr + 1) * tile : rows;
    spread(keep + tr * ct, kexp, cols, tile);
    for (int64_t r = tr * tile; r < r1; r++) {
        const float *restrict wr = w + r * cols;
        uint8_t *restrict mr = mask + r * cols;
        float *restrict orow = masked + r * cols;
        memcpy(mr, kexp, (size_t)cols);
        select_row(orow, kexp, wr, cols);
    }
}

/* gw = g where kept, 0 * g where not (gw may be NULL); gs[tr, :] = per-tile sums of g * w (gs may be NULL) */
static void backward_block(const float *restrict g, const float *restrict w, const uint8_t *restrict keep,
                           float *restrict gw, float *restrict gs, float *restrict acc, uint8_t *restrict kexp,
                           int64_t rows, int64_t cols, int64_t tile, int64_t tr) {
    int64_t ct = (cols + tile - 1) / tile, r1 = (tr + 1) * tile < rows ? (tr + 1) * tile : rows;
    if (gw) spread(keep + tr * ct, kexp, cols, tile);
    if (gs) memset(acc, 0, (size_t)cols * sizeof(float));
    for (int64_t r = tr * tile; r < r1; r++) {
        const float *restrict gr = g + r * cols, *restrict wr = w + r * cols;
        if (gs && gw) {
            both_row(gw + r * cols, acc, kexp, gr, wr, cols);
            continue;
        }
        if (gs)
            for (int64_t c = 0; c < cols; c++) acc[c] += gr[c] * wr[c]; /* column sums over the tile's rows */
        if (gw) select_row(gw + r * cols, kexp, gr, cols);
    }
    if (gs)
        for (int64_t t = 0; t < ct; t++) {
            int64_t c1 = (t + 1) * tile < cols ? (t + 1) * tile : cols;
            float s = 0.0f;
            for (int64_t c = t * tile; c < c1; c++) s += acc[c];
            gs[tr * ct + t] = s;
        }
}

/* validates the units and fills the plan; returns the widest row (the per-thread scratch size) or -1 */
static int64_t setup(plan_t *p, int64_t nunits, const int64_t *rows, const int64_t *cols, const int64_t *tile,
                     int *nthreads) {
    if (plan(p, nunits, rows, cols, tile)) return -1;
    int64_t widest = 1;
    for (int64_t u = 0; u < nunits; u++) widest = cols[u] > widest ? cols[u] : widest;
#ifdef _OPENMP
    if (*nthreads < 1) *nthreads = 1;
#else
    *nthreads = 1;
#endif
    return widest;
}

int tile_expand(int64_t nunits, void *const *w, uint8_t *const *mask, void *const *masked, void *const *keep,
                const int64_t *rows, const int64_t *cols, const int64_t *tile, int nthreads) {
    plan_t local;
    int64_t widest = setup(&local, nunits, rows, cols, tile, &nthreads);
    if (widest < 0) return -1;
    uint8_t *kexp_all = (uint8_t *)malloc((size_t)nthreads * (size_t)widest); /* per-thread spread keep bytes */
    if (!kexp_all) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        int me = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int me = 0, nt = 1;
#endif
        uint8_t *kexp = kexp_all + (size_t)me * (size_t)widest;
        int64_t b0, b1;
        share(&local, me, nt, &b0, &b1);
        for (int64_t b = b0; b < b1; b++) {
            int64_t u = unit_of(&local, b);
            expand_block((const float *)w[u], mask[u], (float *)masked[u], (const uint8_t *)keep[u], kexp, rows[u],
                         cols[u], tile[u], b - local.first_block[u]);
        }
#if STREAMING
        _mm_sfence(); /* this thread's streaming stores, published before the region ends */
#endif
    }
    free(kexp_all);
    return 0;
}

int tile_backward(int64_t nunits, void *const *g, void *const *w, void *const *keep, void *const *gw,
                  void *const *gs, const int64_t *rows, const int64_t *cols, const int64_t *tile, int nthreads) {
    plan_t local;
    int64_t widest = setup(&local, nunits, rows, cols, tile, &nthreads);
    if (widest < 0) return -1;
    /* per-thread column sums and spread keep bytes */
    float *acc_all = (float *)malloc((size_t)nthreads * (size_t)widest * (sizeof(float) + 1));
    if (!acc_all) return -1;
    uint8_t *kexp_all = (uint8_t *)(acc_all + (size_t)nthreads * (size_t)widest);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        int me = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int me = 0, nt = 1;
#endif
        float *acc = acc_all + (size_t)me * (size_t)widest;
        uint8_t *kexp = kexp_all + (size_t)me * (size_t)widest;
        int64_t b0, b1;
        share(&local, me, nt, &b0, &b1);
        for (int64_t b = b0; b < b1; b++) {
            int64_t u = unit_of(&local, b);
            backward_block((const float *)g[u], (const float *)w[u], (const uint8_t *)keep[u], (float *)gw[u],
                           (float *)gs[u], acc, kexp, rows[u], cols[u], tile[u], b - local.first_block[u]);
        }
#if STREAMING
        _mm_sfence();
#endif
    }
    free(acc_all);
    return 0;
}

/* Tile selection: keep[i] = 1 for the k largest of a unit's n scores, exactly k of them; ties go to the lower
 * index, NaN ranks as +inf and -0 as +0 (what sparsity.masks.tile_mask does with torch ops). The k-th largest
 * value is found by a radix select on unsigned keys that order like the floats (three digits from the top, each a
 * histogram pass over the entries that share the digits so far), then one pass keeps everything above it and the
 * first (k - #above) entries equal to it. Units are spread over threads whole (dynamic schedule). */
static inline uint32_t score_key(uint32_t bits) {
    uint32_t mag = bits & 0x7FFFFFFFu;
    if (mag > 0x7F800000u) return 0x80000000u + 0x7F800000u; /* NaN of either sign: as +inf */
    if ((bits >> 31) && mag != 0) return 0x80000000u - mag;   /* negative: below every non-negative, reversed */
    return 0x80000000u + mag;                                 /* -0 and +0 alike */
}

/* the value of rank r (0-based, ascending) of a[0..n), and in *above how many entries are larger; a is reordered */
static uint32_t radix_select(uint32_t *a, int64_t n, int64_t r, int64_t *above) {
    static const int shift[3] = {21, 10, 0};
    static const uint32_t digits[3] = {2048, 2048, 1024};
    int64_t hist[2048];
    uint32_t value = 0;
    *above = 0;
    for (int d = 0; d < 3; d++) {
        uint32_t mask = digits[d] - 1;
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < n; i++) hist[(a[i] >> shift[d]) & mask]++;
        uint32_t b = 0;
        int64_t below = 0;
        while (below + hist[b] <= r) below += hist[b++];
        *above += n - below - hist[b];
        r -= below;
        value |= b << shift[d];
        int64_t m = 0; /* keep the entries whose digit is b (branch-free) */
        for (int64_t i = 0; i < n; i++) {
            a[m] = a[i];
            m += ((a[i] >> shift[d]) & mask) == b;
        }
        n = m;
    }
    return value;
}

static void top_unit(const float *scores, uint8_t *keep, int64_t n, int64_t k, uint32_t *scratch) {
    const uint32_t *bits = (const uint32_t *)scores;
    if (k <= 0 || k >= n) {
        memset(keep, k > 0, (size_t)n);
        return;
    }
    for (int64_t i = 0; i < n; i++) scratch[i] = score_key(bits[i]);
    int64_t above;
    uint32_t v = radix_select(scratch, n, n - k, &above);
    int64_t ties = k - above; /* entries equal to v that are kept: the first ones */
    for (int64_t i = 0; i < n; i++) {
        uint32_t key = score_key(bits[i]);
        int tie = key == v && ties > 0;
        ties -= tie;
        keep[i] = (uint8_t)((key > v) | tie);
    }
}

int tile_topk(int64_t nunits, void *const *scores, uint8_t *const *keep, const int64_t *len, const int64_t *k,
              int nthreads) {
    int64_t widest = 1;
    for (int64_t u = 0; u < nunits; u++) {
        if (len[u] < 0) return -1;
        widest = len[u] > widest ? len[u] : widest;
    }
#ifdef _OPENMP
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nunits) nthreads = nunits > 0 ? (int)nunits : 1;
#else
    nthreads = 1;
#endif
    uint32_t *scratch_all = (uint32_t *)malloc((size_t)nthreads * (size_t)widest * sizeof(uint32_t));
    if (!scratch_all) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        uint32_t *scratch = scratch_all + (size_t)omp_get_thread_num() * (size_t)widest;
#pragma omp for schedule(dynamic, 1) nowait
#else
        uint32_t *scratch = scratch_all;
#endif
        for (int64_t u = 0; u < nunits; u++) top_unit((const float *)scores[u], keep[u], len[u], k[u], scratch);
    }
    free(scratch_all);
    return 0;
}
