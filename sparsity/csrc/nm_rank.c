/* Exact top-n-of-m magnitude masks on CPU in one fused pass: each weight is read once and its mask, the 0/1
 * factor the forward multiplies by and/or the forward's weight (W * E, or MDGF's W * (E + beta (1 - E))) are
 * written from the same pass.
 *
 * Semantics are those of sparsity.masks.nm_mask: a key is the weight's bit pattern with the sign bit cleared (as
 * a signed integer of the same width it orders like |w|, NaN above inf), position i of a group is beaten by a
 * lower position j < i when key[j] >= key[i] and by a higher one j > i when key[j] > key[i] (the lower index
 * wins ties), and i is kept iff fewer than n positions beat it: exactly n per group.
 *
 * Every tensor is an (A, m, T) block in memory order: element (a, i, t) at (a * m + i) * T + t, so position i
 * of group (a, t) is a run of T contiguous elements (T = 9 for a 3x3 conv grouped along input channels, 1 for a
 * Linear). T > 1 vectorizes over t, T = 1 over a. Keep words go to a small stack buffer first and the outputs
 * are written from it in plain loops: a byte store inside the rank loop would set the vector width to 64 lanes,
 * which short runs (T = 9) never fill. float32 only, m in {2, 4, 8} unrolled as constants, T in {1, 9} as
 * constants too (other T: a runtime bound, still vectorized). The a-blocks are split evenly over OpenMP threads
 * (torch's pool when built with -fopenmp), else over pthreads.
 *
 * Built by sparsity/native.py with the system C compiler; without one, sparsity.masks uses torch ops instead.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define MAX_M 16
#define MAX_THREADS 64
#define CHUNK 2048 /* elements ranked per stack buffer */
#define UNROLL _Pragma("GCC unroll 16")

/* Outputs are written with streaming (non-temporal) stores where AVX-512 is there: they are weight-sized, far
 * larger than the caches, so reading their old lines in before overwriting them (what plain stores do) is a
 * third of the kernel's memory traffic for nothing. */
#if defined(__AVX512F__) && !defined(NM_NO_STREAMING)
#include <immintrin.h>
#define STREAMING 1
#else
#define STREAMING 0
#endif

/* dst[e] = kb[e] & 1 as bytes */
static inline void out_bytes(uint8_t *restrict dst, const int32_t *restrict kb, int64_t len) {
    int64_t e = 0;
#if STREAMING
    for (; e < len && ((uintptr_t)(dst + e) & 15); e++) dst[e] = (uint8_t)(kb[e] & 1);
    for (; e + 16 <= len; e += 16) {
        __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void *)(kb + e)), _mm512_set1_epi32(1));
        _mm_stream_si128((__m128i *)(dst + e), _mm512_cvtepi32_epi8(k));
    }
#endif
    for (; e < len; e++) dst[e] = (uint8_t)(kb[e] & 1);
}

/* dst[e] = kb[e] & c (the 0/1 factor: c = bits of 1.0) */
static inline void out_const(int32_t *restrict dst, const int32_t *restrict kb, int32_t c, int64_t len) {
    int64_t e = 0;
#if STREAMING
    for (; e < len && ((uintptr_t)(dst + e) & 63); e++) dst[e] = kb[e] & c;
    const __m512i cv = _mm512_set1_epi32(c);
    for (; e + 16 <= len; e += 16)
        _mm512_stream_si512((void *)(dst + e), _mm512_and_si512(_mm512_loadu_si512((const void *)(kb + e)), cv));
#endif
    for (; e < len; e++) dst[e] = kb[e] & c;
}

/* dst = w where kept, beta * w where not: W * E for beta = 0, MDGF's forward weight W * (E + beta (1 - E))
 * otherwise, bit for bit what torch's products give (beta * w rounded once; 0 * w is -0 for negative w and NaN
 * for a non-finite w, as in W * E) */
static inline void out_masked(float *restrict dst, const int32_t *restrict kb, const float *restrict w, float beta,
                              int64_t len) {
    int64_t e = 0;
#if STREAMING
    for (; e < len && ((uintptr_t)(dst + e) & 63); e++) dst[e] = kb[e] ? w[e] : beta * w[e];
    const __m512 bv = _mm512_set1_ps(beta);
    for (; e + 16 <= len; e += 16) {
        __m512 v = _mm512_loadu_ps(w + e);
        __mmask16 keep = _mm512_test_epi32_mask(_mm512_loadu_si512((const void *)(kb + e)), _mm512_set1_epi32(-1));
        _mm512_stream_ps(dst + e, _mm512_mask_blend_ps(keep, _mm512_mul_ps(bv, v), v));
    }
#endif
    for (; e < len; e++) dst[e] = kb[e] ? w[e] : beta * w[e];
}

/* keep word (all ones / all zeros) of every position of one group: IDX(i) = position i in w, KIDX(i) in kb */
#define RANK_GROUP(ST, IDX, KIDX)                                                                              \
    {                                                                                                          \
        ST k[MAX_M];                                                                                           \
        UNROLL for (int i = 0; i < m; i++) k[i] = w[IDX(i)] & SIGN;                                            \
        UNROLL for (int i = 0; i < m; i++) {                                                                   \
            ST beaten = 0;                                                                                     \
            UNROLL for (int j = 0; j < i; j++) beaten += k[j] >= k[i];                                         \
            UNROLL for (int j = i + 1; j < m; j++) beaten += k[j] > k[i];                                      \
            kb[KIDX(i)] = -(ST)(beaten < (ST)n);                                                               \
        }                                                                                                      \
    }
#define CON_IDX(i) (a * m + (i))
#define CON_KIDX(i) ((a - a0) * m + (i))
#define NAT_IDX(i) (base + (int64_t)(i) * T + t)
#define NAT_KIDX(i) (off + (int64_t)(i) * T + t)

/* a-blocks [a_lo, a_hi) of one (A, m, T) unit; MS: compile-time m; TS: compile-time T, 0 = the runtime T_rt */
#define DEFINE_RANGE(NAME, ST, SIGNV, MS, TS)                                                                  \
    static void NAME(const ST *restrict w, uint8_t *restrict mk, ST *restrict fa, ST *restrict ma,            \
                     int64_t T_rt, int64_t a_lo, int64_t a_hi, int m_rt, int n, ST one, float beta) {          \
        const ST SIGN = (ST)(SIGNV);                                                                           \
        const int m = (MS);                                                                                    \
        const int64_t T = (TS) ? (TS) : T_rt;                                                                  \
        (void)m_rt;                                                                                            \
        ST kb[CHUNK];                                                                                          \
        int64_t per = CHUNK / (m * T) > 0 ? CHUNK / (m * T) : 1; /* a-blocks per buffer (m * T <= CHUNK) */    \
        for (int64_t a0 = a_lo; a0 < a_hi; a0 += per) {                                                        \
            int64_t a1 = a0 + per < a_hi ? a0 + per : a_hi;                                                    \
            if (T == 1) {                                                                                      \
                for (int64_t a = a0; a < a1; a++) RANK_GROUP(ST, CON_IDX, CON_KIDX)                            \
            } else {                                                                                           \
                for (int64_t a = a0; a < a1; a++) {                                                            \
                    int64_t base = a * m * T, off = (a - a0) * m * T;                                          \
                    _Pragma("GCC ivdep") for (int64_t t = 0; t < T; t++) RANK_GROUP(ST, NAT_IDX, NAT_KIDX)     \
                }                                                                                              \
            }                                                                                                  \
            int64_t e0 = a0 * m * T, len = (a1 - a0) * m * T;                                                  \
            out_bytes(mk + e0, kb, len);                                                                       \
            if (fa) out_const(fa + e0, kb, one, len);                                                          \
            if (ma) out_masked((float *)(ma + e0), kb, (const float *)(w + e0), beta, len);                    \
        }                                                                                                      \
    }

typedef void (*range_fn)(const void *, uint8_t *, void *, void *, int64_t, int64_t, int64_t, int, int, uint64_t,
                         float);

#define DEFINE_WRAP(NAME, ST)                                                                                  \
    static void w_##NAME(const void *w, uint8_t *mk, void *fa, void *ma, int64_t T, int64_t a0, int64_t a1,    \
                         int m, int n, uint64_t one, float beta) {                                             \
        NAME((const ST *)w, mk, (ST *)fa, (ST *)ma, T, a0, a1, m, n, (ST)one, beta);                           \
    }
#define DEFINE_SPEC(TAG, ST, SIGNV, MS, TS)                                                                    \
    DEFINE_RANGE(r_##TAG##_m##MS##_t##TS, ST, SIGNV, MS, TS)                                                   \
    DEFINE_WRAP(r_##TAG##_m##MS##_t##TS, ST)

/* float32 (the dtype of training weights, AMP included) with m in {2, 4, 8}; T in {1, 9} as constants. Other
 * dtypes and m return -1 and the caller ranks with torch ops: a runtime m does not unroll and is no faster. */
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 2, 1)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 2, 0)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 4, 1)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 4, 9)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 4, 0)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 8, 1)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 8, 9)
DEFINE_SPEC(i32, int32_t, 0x7FFFFFFF, 8, 0)

static range_fn pick(int width, int m, int64_t T) {
    if (width != 4) return 0;
    if (m == 2) return T == 1 ? w_r_i32_m2_t1 : w_r_i32_m2_t0;
    if (m == 4) return T == 1 ? w_r_i32_m4_t1 : T == 9 ? w_r_i32_m4_t9 : w_r_i32_m4_t0;
    if (m == 8) return T == 1 ? w_r_i32_m8_t1 : T == 9 ? w_r_i32_m8_t9 : w_r_i32_m8_t0;
    return 0;
}

/* Threads for `total` elements: 1 to MAX_THREADS, and at least 64k elements per thread: below that a thread
 * costs more than it saves (as many threads as the work fills, not all-or-one: a 1M-element call on 16 threads
 * runs on 15, not on 1) */
static int clamp_threads(int nthreads, int64_t total) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > (total >> 16)) nthreads = total >> 16 > 0 ? (int)(total >> 16) : 1;
    return nthreads;
}

/* SR-STE's decayed gradient of one weight (see srste_grad below) */
static inline float srste_one(float g, float w, uint8_t keep, float lam) {
    float d = w - (keep ? w : 0.0f * w);
    return g + lam * d;
}

/* One AdamW step of a unit (torch's AdamW, decoupled weight decay, no amsgrad/maximize), with the roundings of
 * torch's fused CPU kernel for float32 so the two are interchangeable bit for bit (sparsity/optim.py checks that
 * once per process against torch itself before using this): p = w * (1 - lr wd); m = m + c1 (g - m) as one fused
 * multiply-add (c1 = 1 - beta1 < 0.5); v = (c2 g) g + v beta2, one fused multiply-add (c2 = 1 - beta2);
 * w = p + (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps). SR-STE (lam != 0): g + lam * (w - w e) first, e the mask
 * the forward used (read before the ranking overwrites it), the value its backward would have produced. */
typedef struct {
    const float *g;
    float *m, *v;
    float wdmul, c1, beta2, c2, bc2_sqrt, eps, neg_step, lam;
} adamw_t;

static inline float adamw_one(const adamw_t *a, float *w, uint8_t keep, int64_t e) {
    float g = a->g[e], p = w[e] * a->wdmul;
    if (a->lam != 0.0f) g = srste_one(g, w[e], keep, a->lam);
    float m = fmaf(a->c1, g - a->m[e], a->m[e]);
    float v = fmaf(a->c2 * g, g, a->v[e] * a->beta2);
    a->m[e] = m;
    a->v[e] = v;
    return p + (a->neg_step * m) / (sqrtf(v) / a->bc2_sqrt + a->eps);
}

static void adamw_range(const adamw_t *a, float *w, const uint8_t *keep, int64_t e, int64_t hi) {
#if STREAMING
    const __m512 wd = _mm512_set1_ps(a->wdmul), c1 = _mm512_set1_ps(a->c1), b2 = _mm512_set1_ps(a->beta2),
                 c2 = _mm512_set1_ps(a->c2), bc = _mm512_set1_ps(a->bc2_sqrt), eps = _mm512_set1_ps(a->eps),
                 ns = _mm512_set1_ps(a->neg_step), lam = _mm512_set1_ps(a->lam), zero = _mm512_setzero_ps();
    for (; e + 16 <= hi; e += 16) {
        __m512 wv = _mm512_loadu_ps(w + e), g = _mm512_loadu_ps(a->g + e), m = _mm512_loadu_ps(a->m + e);
        if (a->lam != 0.0f) {
            __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(keep + e)));
            __m512 we = _mm512_mask_blend_ps(_mm512_test_epi32_mask(k, k), _mm512_mul_ps(zero, wv), wv);
            g = _mm512_add_ps(g, _mm512_mul_ps(lam, _mm512_sub_ps(wv, we)));
        }
        __m512 p = _mm512_mul_ps(wv, wd);
        m = _mm512_fmadd_ps(c1, _mm512_sub_ps(g, m), m);
        __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(c2, g), g, _mm512_mul_ps(_mm512_loadu_ps(a->v + e), b2));
        _mm512_storeu_ps(a->m + e, m);
        _mm512_storeu_ps(a->v + e, v);
        __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc), eps);
        _mm512_storeu_ps(w + e, _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(ns, m), den)));
    }
#endif
    for (; e < hi; e++) w[e] = adamw_one(a, w, keep ? keep[e] : 1, e);
}

typedef struct {
    int64_t nunits;
    void *const *w;
    uint8_t *const *mask;
    void *const *factor;
    void *const *masked;
    const int64_t *A, *T;
    int m, n, width;
    uint64_t one;
    float beta;
    int64_t lo, hi; /* this worker's share: the a-blocks whose first element lies in [lo, hi) of all units */
    const adamw_t *adam; /* per unit, or NULL: nm_keep_adamw's optimizer step before the ranking */
} job_t;

static void *worker(void *arg) {
    const job_t *j = (const job_t *)arg;
    int64_t start = 0;
    for (int64_t u = 0; u < j->nunits && start < j->hi; u++) {
        int64_t size = (int64_t)j->m * j->T[u], end = start + j->A[u] * size;
        int64_t a0 = j->lo > start ? (j->lo - start + size - 1) / size : 0;
        int64_t a1 = j->hi < end ? (j->hi - start + size - 1) / size : j->A[u];
        range_fn rank = pick(j->width, j->m, j->T[u]);
        if (a0 < a1 && !j->adam) {
            rank(j->w[u], j->mask[u], j->factor[u], j->masked[u], j->T[u], a0, a1, j->m, j->n, j->one, j->beta);
        } else if (a0 < a1) {
            /* a chunk at a time: the update leaves it in L1 for the ranking that follows (one call per chunk, so
             * the update's writes come before the ranking's restrict-qualified reads) */
            int64_t per = CHUNK / size > 0 ? CHUNK / size : 1;
            for (int64_t c = a0; c < a1; c += per) {
                int64_t c1 = c + per < a1 ? c + per : a1;
                adamw_range(&j->adam[u], (float *)j->w[u], j->mask[u], c * size, c1 * size);
                rank(j->w[u], j->mask[u], j->factor[u], j->masked[u], j->T[u], c, c1, j->m, j->n, j->one, j->beta);
            }
        }
        start = end;
    }
#if STREAMING
    _mm_sfence(); /* streaming stores are weakly ordered: publish them before the thread reports done */
#endif
    return 0;
}

/* nm_keep and nm_keep_adamw (adam NULL: masks only) */
static int nm_run(int64_t nunits, void *const *w, uint8_t *const *mask, void *const *factor, void *const *masked,
                  const int64_t *A, const int64_t *T, int m, int n, int width, uint64_t one, float beta,
                  const adamw_t *adam, int nthreads) {
    if (m < 1 || m > MAX_M || n < 1 || n > m || !pick(width, m, 1)) return -1;
    int64_t total = 0;
    for (int64_t u = 0; u < nunits; u++) {
        if (A[u] < 0 || T[u] < 1 || (int64_t)m * T[u] > CHUNK) return -1;
        total += A[u] * m * T[u];
    }
    nthreads = clamp_threads(nthreads, total);
    job_t jobs[MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        job_t j = {nunits, w, mask, factor, masked, A, T, m, n, width, one, beta, total * i / nthreads,
                   total * (i + 1) / nthreads, adam};
        jobs[i] = j;
    }
#ifdef _OPENMP
    /* torch's own OpenMP runtime (libgomp.so.1 is already loaded by torch): its pool is hot, and no second pool
     * competes with torch's workers, which spin for a while after every parallel op */
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int i = 0; i < nthreads; i++) worker(&jobs[i]);
#else
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&tid[i], 0, worker, &jobs[i]) == 0;
    worker(&jobs[0]);
    for (int i = 1; i < nthreads; i++) {
        if (started[i])
            pthread_join(tid[i], 0);
        else
            worker(&jobs[i]); /* no thread could be started: do its share here */
    }
#endif
    return 0;
}

/* Masks for nunits blocks: w[u], mask[u] (bytes 0/1), factor[u] (0/1) and masked[u] (W * (E + beta (1 - E)))
 * (NULL: not written), each A[u] x m x T[u] elements of `width` bytes. Returns 0, or -1 for arguments it does
 * not handle (nothing written then). */
int nm_keep(int64_t nunits, void *const *w, uint8_t *const *mask, void *const *factor, void *const *masked,
            const int64_t *A, const int64_t *T, int m, int n, int width, uint64_t one, float beta, int nthreads) {
    return nm_run(nunits, w, mask, factor, masked, A, T, m, n, width, one, beta, 0, nthreads);
}

/* The same masks, each unit's weights first taken one AdamW step (adam[u]: its gradient, moments and scalars)
 * chunk by chunk, so the ranking reads weights the update has just left in L1: one pass over the weights for
 * the optimizer and the masks of the next step together (float32 only). */
int nm_keep_adamw(int64_t nunits, void *const *w, uint8_t *const *mask, void *const *factor, void *const *masked,
                  const int64_t *A, const int64_t *T, int m, int n, uint64_t one, float beta, const adamw_t *adam,
                  int nthreads) {
    if (!adam) return -1;
    return nm_run(nunits, w, mask, factor, masked, A, T, m, n, 4, one, beta, adam, nthreads);
}

/* The one-pass elementwise kernels below (SR-STE's and USD's gradients, the products by a frozen mask) share this
 * argument block and one thread split: run(a, lo, hi) over [0, len) cut into one even range per thread (the
 * thread count from `work`, the elements behind `len`), each thread fencing its streaming stores before the region
 * ends. Without OpenMP the ranges run one after another on the calling thread. */
typedef struct {
    const float *x, *w;           /* the gradient (or the tensor a mask multiplies), the weight */
    const uint8_t *keep;          /* the 1-byte mask */
    const float *coef, *tau;      /* USD: per row */
    float *out;
    float lam;                    /* SR-STE */
    int64_t cols;                 /* USD: elements per row */
} ew_t;

typedef void (*ew_range)(const ew_t *a, int64_t lo, int64_t hi);

static int split_ranges(int64_t len, int64_t work, int nthreads, ew_range run, const ew_t *a) {
    if (len < 0 || work < 0) return -1;
    nthreads = clamp_threads(nthreads, work);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int i = 0; i < nthreads; i++) {
        run(a, len * i / nthreads, len * (i + 1) / nthreads);
#if STREAMING
        _mm_sfence();
#endif
    }
    return 0;
}

/* SR-STE's weight gradient in one pass, reading the 1-byte mask instead of a weight-sized W * E: with
 * d = w - w * e (w * e = w where kept, 0 * w where pruned), out = g + lam * d. These are the torch ops it replaces
 * (sub, then addcmul(g, d, 1, value=lam)) with their roundings, so the result is bit for bit theirs, non-finite
 * weights included: g where kept (d = +0 for a finite w), g + lam * w where pruned. -ffp-contract=off (native.py)
 * keeps the compiler from contracting the multiply and add into one fused (once-rounded) operation. */
static void srste_range(const ew_t *a, int64_t e, int64_t hi) {
    const float *restrict g = a->x, *restrict w = a->w;
    const uint8_t *restrict keep = a->keep;
    float *restrict out = a->out;
    const float lam = a->lam;
#if STREAMING
    for (; e < hi && ((uintptr_t)(out + e) & 63); e++) out[e] = srste_one(g[e], w[e], keep[e], lam);
    const __m512 lv = _mm512_set1_ps(lam), zero = _mm512_setzero_ps();
    for (; e + 16 <= hi; e += 16) {
        __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(keep + e)));
        __m512 wv = _mm512_loadu_ps(w + e);
        __m512 we = _mm512_mask_blend_ps(_mm512_test_epi32_mask(k, k), _mm512_mul_ps(zero, wv), wv);
        __m512 d = _mm512_sub_ps(wv, we);
        _mm512_stream_ps(out + e, _mm512_add_ps(_mm512_loadu_ps(g + e), _mm512_mul_ps(lv, d)));
    }
#endif
    for (; e < hi; e++) out[e] = srste_one(g[e], w[e], keep[e], lam);
}

int srste_grad(int64_t len, const float *g, const float *w, const uint8_t *keep, float *out, float lam,
               int nthreads) {
    const ew_t a = {.x = g, .w = w, .keep = keep, .out = out, .lam = lam};
    return split_ranges(len, len, nthreads, srste_range, &a);
}

/* USD's weight gradient during its search, in one pass: out = g * e + (c * w) * (|w| < tau), e the 1-byte mask and
 * c, tau per row of `cols` elements. This is the torch expression it replaces, `grad * mask + coef * weight *
 * (weight.abs() < tau)`, with its roundings (each factor exactly 0 or 1), so the result is bit for bit torch's:
 * non-finite values included (g * 0 is NaN for an infinite g, a NaN weight fails the comparison and gives NaN).
 * The selects vectorize under the build's -fno-trapping-math. Threads split rows. */
static void usd_rows(const ew_t *a, int64_t r, int64_t hi) {
    const float *restrict g = a->x, *restrict w = a->w, *restrict coef = a->coef, *restrict tau = a->tau;
    const uint8_t *restrict keep = a->keep;
    float *restrict out = a->out;
    const int64_t cols = a->cols;
    for (; r < hi; r++) {
        const float c = coef[r], t = tau[r];
        const int64_t o = r * cols;
        for (int64_t j = 0; j < cols; j++) {
            const float wv = w[o + j];
            const float kept = keep[o + j] ? 1.0f : 0.0f, small = fabsf(wv) < t ? 1.0f : 0.0f;
            out[o + j] = g[o + j] * kept + (c * wv) * small;
        }
    }
}

int usd_grad(int64_t rows, int64_t cols, const float *g, const float *w, const uint8_t *keep, const float *coef,
             const float *tau, float *out, int nthreads) {
    if (cols < 0) return -1;
    const ew_t a = {.x = g, .w = w, .keep = keep, .coef = coef, .tau = tau, .out = out, .cols = cols};
    return split_ranges(rows, rows * cols, nthreads, usd_rows, &a);
}

/* out = x * e with e the 1-byte mask as an exact 0/1 factor: a frozen mask's forward weight W * E or its gradient
 * g * E, reading one byte per element instead of a float factor (x * 0 is -0 for a negative x and NaN for a
 * non-finite one, as torch's product gives). Streaming stores where AVX-512 is there, as for the masks. */
static inline float mask_one(float x, uint8_t keep) { return x * (keep ? 1.0f : 0.0f); }

static void mask_range(const ew_t *a, int64_t e, int64_t hi) {
    const float *restrict x = a->x;
    const uint8_t *restrict keep = a->keep;
    float *restrict out = a->out;
#if STREAMING
    for (; e < hi && ((uintptr_t)(out + e) & 63); e++) out[e] = mask_one(x[e], keep[e]);
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (; e + 16 <= hi; e += 16) {
        __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(keep + e)));
        __m512 f = _mm512_mask_blend_ps(_mm512_test_epi32_mask(k, k), zero, one);
        _mm512_stream_ps(out + e, _mm512_mul_ps(_mm512_loadu_ps(x + e), f));
    }
#endif
    for (; e < hi; e++) out[e] = mask_one(x[e], keep[e]);
}

int mask_mul(int64_t len, const float *x, const uint8_t *keep, float *out, int nthreads) {
    const ew_t a = {.x = x, .keep = keep, .out = out};
    return split_ranges(len, len, nthreads, mask_range, &a);
}

/* x *= e in place (zeroing a frozen mask's pruned weights): the same values as x.mul_(factor); x is both read and
 * written, so no restrict and no streaming stores here */
static void mask_range_inplace(const ew_t *a, int64_t e, int64_t hi) {
    float *x = a->out;
    const uint8_t *keep = a->keep;
    for (; e < hi; e++) x[e] = mask_one(x[e], keep[e]);
}

int mask_mul_inplace(int64_t len, float *x, const uint8_t *keep, int nthreads) {
    const ew_t a = {.keep = keep, .out = x};
    return split_ranges(len, len, nthreads, mask_range_inplace, &a);
}
