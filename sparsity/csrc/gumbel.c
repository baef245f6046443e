/* Gumbel N:M masks (method `gumbel`) on CPU: the sampled forward weight, its backward and the argmax masks, each
 * in one pass over the logits and the weight, with the Gumbel noise computed in registers instead of drawn into,
 * stored as and read back from logit-sized tensors (the torch path's cost on CPU: 4x a dense ResNet-18 step).
 *
 * Layout: a unit's weight is an (A, C, T) block in memory order, groups of m running along C (element (a, c, t)
 * at (a * C + c) * T + t); its logits are (A, T, C / m, K) contiguous, K = C(m, n) patterns per group, as
 * sparsity/methods/gumbel.py creates them (the weight viewed with the grouped dim moved last). `table` is the
 * (K, m) 0/1 byte table of the patterns, every row keeping the same n.
 *
 * Noise: logit number i of a unit (its flat index) gets u_i = ((h_i >> 41) + 0.5) * 2^-23, an exact float inside
 * (0, 1), from h_i = mix64(key + (i + 1) * GOLDEN), mix64 being SplitMix64's finalizer and key = mix64(seed): a
 * counter-based stream, so any range of it is computed on its own (threads split rows freely) and every thread
 * count gives the same bits. G_i = -log(-log(u_i)) with log_pos below. gumbel.py's torch version of the same
 * operations (counter_noise) gives the same bits; -ffp-contract=off keeps multiplies and adds apart so it holds.
 *
 * Forward: s = (logits + G) / tau, z = argmax s per group (first maximum), out = W * P[z]; s is written out for
 * the backward (recomputing the noise there costs more than reading s back). Backward (straight-through,
 * gradient of the soft sample): p = softmax(s), dy_k = sum_j P[k, j] g_j W_j, dlogits_k = p_k (dy_k - p.dy) / tau,
 * and dW = g * P[z] when asked: the torch path's values up to float rounding (its exp and summation order differ).
 * Without OpenMP the rows run on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
/* AVX-512 paths (argmax over 16 groups at once, streaming stores); -DNM_NO_STREAMING builds the plain C loops every
 * other CPU runs, which give the same bits */
#if defined(__AVX512F__) && !defined(NM_NO_STREAMING)
#include <immintrin.h>
#define GUMBEL_AVX512 1
#else
#define GUMBEL_AVX512 0
#endif

#define GUMBEL_MAX_THREADS 64
#define GUMBEL_MAX_K 70

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL;

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline float bits_f(uint32_t i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

static inline uint32_t f_bits(float f) {
    uint32_t i;
    memcpy(&i, &f, 4);
    return i;
}

/* natural log of a positive normal float: the mantissa reduced to [sqrt(2)/2, sqrt(2)), log(1 + f) from
 * s = f / (2 + f) and a degree-8 polynomial in s (the classic fdlibm logf scheme, under 1 ulp); branch free so
 * the noise loop vectorizes. Inputs here are -log(u) in [3e-8, 17] and u in (0, 1): never zero, subnormal or inf */
static inline float log_pos(float x) {
    /* exact float32 values, written in hex so that gumbel.py's torch version holds the same bits */
    const float ln2_hi = 0x1.62e3p-1f, ln2_lo = 0x1.2fefa2p-17f;
    const float lg1 = 0x1.555554p-1f, lg2 = 0x1.999c26p-2f, lg3 = 0x1.23d3dcp-2f, lg4 = 0x1.f13c4cp-3f;
    uint32_t ix = f_bits(x) + (0x3f800000u - 0x3f3504f3u);
    float dk = (float)((int32_t)(ix >> 23) - 0x7f);
    float f = bits_f((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
    float s = f / (2.0f + f);
    float z = s * s;
    float w = z * z;
    float r = z * (lg1 + w * lg3) + w * (lg2 + w * lg4);
    float hfsq = 0.5f * f * f;
    return s * (hfsq + r) + dk * ln2_lo - hfsq + f + dk * ln2_hi;
}

/* noise[j] = G of logit number first + j, for j < len */
static void gumbel_noise(float *restrict noise, uint64_t key, int64_t first, int64_t len) {
    for (int64_t j = 0; j < len; j++) {
        uint64_t h = mix64(key + (uint64_t)(first + j + 1) * GOLDEN);
        float u = ((float)(uint32_t)(h >> 41) + 0.5f) * 0x1p-23f;
        noise[j] = -log_pos(-log_pos(u));
    }
}

/* exp(x) for x <= 0 (a softmax shifted by its maximum): 2^k * e^r with |r| <= ln2 / 2 and a degree-7 polynomial
 * (relative error about 2e-7); below -87 (-inf included) the result is exp(-87), about 1.6e-38, where the exact one
 * underflows; NaN stays NaN (a NaN or infinite logit makes its group's gradient NaN, as in the torch path). Branch
 * free (vectorizes; the build's -fno-trapping-math lets the compiler turn the selects into blends) */
static inline float exp_nonpos(float x) {
    const float c = x < -87.0f ? -87.0f : (x == x ? x : 0.0f); /* NaN: computed as 0, returned as NaN below */
    const int32_t ki = (int32_t)(0.5f - c * 1.44269504089f); /* round(-c / ln2), c <= 0 */
    const float k = (float)-ki;
    const float r = c - k * 0.693359375f + k * 2.12194440e-4f; /* c - k ln2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float y = p * bits_f((uint32_t)(127 - ki) << 23);
    return x == x ? y : x;
}

typedef struct {
    int64_t A, C, T;
    int m, K, n;
    const uint8_t *table;
    const float *w, *logits, *grad;
    float *out, *s, *dlogits, *dw;
    uint8_t *mask;
    uint64_t key;
    float tau;
    uint8_t kept[GUMBEL_MAX_K * 64]; /* kept positions of pattern k: kept[k * n + i], i < n */
} gumbel_args;

#define CH 64 /* groups per chunk: the stack buffers hold CH * K floats (about 70 kB per thread in all) */
#define INLINE static inline __attribute__((always_inline))

/* dst[0..len) = src: s and dlogits are logit-sized and read again only after the rest of the pass (the backward,
 * the optimizer), so where AVX-512 is there they bypass the caches (streaming stores; fenced at the end of run) */
static inline void stream_out(float *restrict dst, const float *restrict src, int64_t len) {
    int64_t j = 0;
#if GUMBEL_AVX512
    for (; j < len && ((uintptr_t)(dst + j) & 63); j++) dst[j] = src[j];
    for (; j + 16 <= len; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#endif
    for (; j < len; j++) dst[j] = src[j];
}

#if GUMBEL_AVX512
/* cols[k] lane q = v[6 q + k] for 16 groups of 6 (96 floats): three two-register permutes per column, merged */
static inline void transpose6(const float *v, __m512 *cols) {
    __m512 r[6];
    for (int i = 0; i < 6; i++) r[i] = _mm512_loadu_ps(v + 16 * i);
    const __m512i six_q = _mm512_setr_epi32(0, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 66, 72, 78, 84, 90);
    for (int k = 0; k < 6; k++) {
        const __m512i e = _mm512_add_epi32(six_q, _mm512_set1_epi32(k)); /* element wanted by each lane */
        const __m512i idx = _mm512_and_si512(e, _mm512_set1_epi32(31));
        const __mmask16 hi1 = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(32));
        const __mmask16 hi2 = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(64));
        const __m512 c0 = _mm512_permutex2var_ps(r[0], idx, r[1]);
        const __m512 c1 = _mm512_permutex2var_ps(r[2], idx, r[3]);
        const __m512 c2 = _mm512_permutex2var_ps(r[4], idx, r[5]);
        cols[k] = _mm512_mask_blend_ps(hi2, _mm512_mask_blend_ps(hi1, c0, c1), c2);
    }
}
#endif

/* z[q] = index of the largest of v[q * K + k] over k, the first one on ties, a NaN counting as the largest (the
 * first NaN wins: torch.argmax's rule); top[q] = that value when top is not NULL. Branch free, 16 groups per
 * vector where AVX-512 is there: the winner of random noise is unpredictable, and compilers turn the scalar
 * selects into branches that mispredict half the time (measured: 2.6 ns per logit for the argmax alone) */
INLINE void argmax_groups(const float *restrict v, int64_t ng, const int K, int32_t *restrict z,
                          float *restrict top) {
    int64_t q = 0;
#if GUMBEL_AVX512
    const __m512i lanes = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(K));
    for (; q + 16 <= ng; q += 16) {
        const float *base = v + q * K;
        __m512 cols[6];
        if (K == 6) transpose6(base, cols); /* 2:4: permutes instead of gathers (slow on some CPUs) */
        __m512 b = K == 6 ? cols[0] : _mm512_i32gather_ps(lanes, base, 4);
        __m512i bi = _mm512_setzero_si512();
        for (int k = 1; k < K; k++) {
            const __m512 x = K == 6 ? cols[k] : _mm512_i32gather_ps(lanes, base + k, 4);
            const __mmask16 take = _mm512_cmp_ps_mask(x, b, _CMP_GT_OQ) |
                                   (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(b, b, _CMP_ORD_Q));
            b = _mm512_mask_blend_ps(take, b, x);
            bi = _mm512_mask_blend_epi32(take, bi, _mm512_set1_epi32(k));
        }
        _mm512_storeu_si512((void *)(z + q), bi);
        if (top) _mm512_storeu_ps(top + q, b);
    }
#endif
    for (; q < ng; q++) { /* selects as bit masks: nothing a compiler would make a branch of */
        uint32_t b = f_bits(v[q * K]);
        int32_t bi = 0;
        for (int k = 1; k < K; k++) {
            const float x = v[q * K + k], bf = bits_f(b);
            const uint32_t take = -(uint32_t)((x > bf) | ((x != x) & (bf == bf)));
            bi = (int32_t)(((uint32_t)bi & ~take) | ((uint32_t)k & take));
            b = (b & ~take) | (f_bits(x) & take);
        }
        z[q] = bi;
        if (top) top[q] = bits_f(b);
    }
}

/* forward of one logits row (a, t): s = (logits + G) / tau (saved for the backward), out = W * P[argmax s] */
INLINE void row_forward(const gumbel_args *g, int64_t a, int64_t t, const int m, const int K, const int n) {
    (void)n;
    const int64_t G = g->C / m, T = g->T, row = (a * T + t) * G * K;
    const float *restrict w = g->w + a * g->C * T + t;
    float *restrict out = g->out + a * g->C * T + t;
    const uint8_t *restrict table = g->table;
    const float tau = g->tau;
    float s[CH * GUMBEL_MAX_K];
    int32_t z[CH];
    for (int64_t g0 = 0; g0 < G; g0 += CH) {
        const int64_t ng = G - g0 < CH ? G - g0 : CH, len = ng * K;
        const float *restrict lg = g->logits + row + g0 * K;
        gumbel_noise(s, g->key, row + g0 * K, len);
        for (int64_t j = 0; j < len; j++) s[j] = (s[j] + lg[j]) / tau;
        stream_out(g->s + row + g0 * K, s, len);
        argmax_groups(s, ng, K, z, NULL);
        for (int64_t q = 0; q < ng; q++) {
            const uint8_t *keep = table + z[q] * m;
            const int64_t e0 = (g0 + q) * m * T;
            for (int j = 0; j < m; j++) out[e0 + j * T] = w[e0 + j * T] * (float)keep[j];
        }
    }
}

/* argmax masks of one logits row (no noise) */
INLINE void row_argmax(const gumbel_args *g, int64_t a, int64_t t, const int m, const int K, const int n) {
    (void)n;
    const int64_t G = g->C / m, T = g->T, row = (a * T + t) * G * K;
    uint8_t *restrict mask = g->mask + a * g->C * T + t;
    const uint8_t *restrict table = g->table;
    int32_t z[CH];
    for (int64_t g0 = 0; g0 < G; g0 += CH) {
        const int64_t ng = G - g0 < CH ? G - g0 : CH;
        argmax_groups(g->logits + row + g0 * K, ng, K, z, NULL);
        for (int64_t q = 0; q < ng; q++) {
            const uint8_t *keep = table + z[q] * m;
            const int64_t e0 = (g0 + q) * m * T;
            for (int j = 0; j < m; j++) mask[e0 + j * T] = keep[j];
        }
    }
}

/* backward of one row from the saved s: p = softmax(s), dy = P (g * W), dlogits = p (dy - p.dy) / tau, dw = g P[z] */
INLINE void row_backward(const gumbel_args *g, int64_t a, int64_t t, const int m, const int K, const int n) {
    const int64_t G = g->C / m, T = g->T, row = (a * T + t) * G * K;
    const float *restrict w = g->w + a * g->C * T + t;
    const float *restrict gr = g->grad + a * g->C * T + t;
    float *restrict dw = g->dw ? g->dw + a * g->C * T + t : NULL;
    const uint8_t *restrict table = g->table, *restrict kept = g->kept;
    const float tau = g->tau;
    /* per logit: e (exp, then p), dy (then dlogits), and the group's sum or dot spread over its K logits, so that
     * the divisions and products run as flat vector loops */
    float e[CH * GUMBEL_MAX_K], dy[CH * GUMBEL_MAX_K], spread[CH * GUMBEL_MAX_K], top[CH], gw[CH * 64];
    int32_t z[CH];
    for (int64_t g0 = 0; g0 < G; g0 += CH) {
        const int64_t ng = G - g0 < CH ? G - g0 : CH, len = ng * K;
        const float *restrict sv = g->s + row + g0 * K;
        argmax_groups(sv, ng, K, z, top);
        for (int64_t q = 0; q < ng; q++)
            for (int k = 0; k < K; k++) e[q * K + k] = sv[q * K + k] - top[q];
        for (int64_t j = 0; j < len; j++) e[j] = exp_nonpos(e[j]);
        for (int64_t q = 0; q < ng; q++) {
            const int64_t e0 = (g0 + q) * m * T;
            for (int j = 0; j < m; j++) gw[q * m + j] = gr[e0 + j * T] * w[e0 + j * T];
        }
        for (int64_t q = 0; q < ng; q++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++) sum += e[q * K + k];
            for (int k = 0; k < K; k++) {
                float acc = 0.0f;
                for (int i = 0; i < n; i++) acc += gw[q * m + kept[k * n + i]];
                dy[q * K + k] = acc;
                spread[q * K + k] = sum;
            }
        }
        for (int64_t j = 0; j < len; j++) e[j] = e[j] / spread[j]; /* p = softmax(s) */
        for (int64_t q = 0; q < ng; q++) {
            float dot = 0.0f;
            for (int k = 0; k < K; k++) dot += e[q * K + k] * dy[q * K + k];
            for (int k = 0; k < K; k++) spread[q * K + k] = dot;
        }
        for (int64_t j = 0; j < len; j++) dy[j] = e[j] * (dy[j] - spread[j]);
        if (tau != 1.0f) /* x / 1 is x: the division only where it changes something */
            for (int64_t j = 0; j < len; j++) dy[j] = dy[j] / tau;
        stream_out(g->dlogits + row + g0 * K, dy, len);
        if (dw)
            for (int64_t q = 0; q < ng; q++) {
                const uint8_t *keep = table + z[q] * m;
                const int64_t e0 = (g0 + q) * m * T;
                for (int j = 0; j < m; j++) dw[e0 + j * T] = gr[e0 + j * T] * (float)keep[j];
            }
    }
}

/* the row functions with m and K as constants for 2:4 (the common case: loops unrolled), as variables otherwise */
#define DISPATCH(fn, g, a, t)                                  \
    do {                                                       \
        if ((g)->m == 4 && (g)->K == 6)                        \
            fn(g, a, t, 4, 6, 2);                              \
        else                                                   \
            fn(g, a, t, (g)->m, (g)->K, (g)->n);               \
    } while (0)

static int threads_for(int nthreads, int64_t work) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > GUMBEL_MAX_THREADS) nthreads = GUMBEL_MAX_THREADS;
    int64_t most = work >> 15; /* at least 32 k logits per thread */
    if (most < 1) most = 1;
    return (int64_t)nthreads > most ? (int)most : nthreads;
}

/* every pattern row of the table keeps the same number n of positions; their list goes to g->kept */
static int prepare(gumbel_args *g) {
    if (g->m < 1 || g->m > 64 || g->K < 1 || g->K > GUMBEL_MAX_K || g->C % g->m || g->A < 0 || g->T < 1) return -1;
    g->n = 0;
    for (int j = 0; j < g->m; j++) g->n += g->table[j] != 0;
    for (int k = 0; k < g->K; k++) {
        int c = 0;
        for (int j = 0; j < g->m; j++) {
            if (g->table[k * g->m + j] > 1) return -1;
            if (g->table[k * g->m + j]) {
                if (c == g->n) return -1;
                g->kept[k * g->n + c++] = (uint8_t)j;
            }
        }
        if (c != g->n) return -1;
    }
    return 0;
}

static int run(gumbel_args *g, int mode, int nthreads) {
    if (prepare(g)) return -1;
    const int64_t rows = g->A * g->T;
    nthreads = threads_for(nthreads, rows * (g->C / g->m) * g->K);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int i = 0; i < nthreads; i++) {
        for (int64_t r = rows * i / nthreads; r < rows * (i + 1) / nthreads; r++) {
            const int64_t a = r / g->T, t = r % g->T;
            if (mode == 0)
                DISPATCH(row_forward, g, a, t);
            else if (mode == 1)
                DISPATCH(row_backward, g, a, t);
            else
                DISPATCH(row_argmax, g, a, t);
        }
#if GUMBEL_AVX512
        _mm_sfence();
#endif
    }
    return 0;
}

/* out = W * P[argmax s], s = (logits + G) / tau written to `s` (the logits' shape) for the backward */
int gumbel_forward(int64_t A, int64_t C, int64_t T, int m, int K, const uint8_t *table, const float *w,
                   const float *logits, float *out, float *s, uint64_t key, float tau, int nthreads) {
    gumbel_args g = {A, C, T, m, K, 0, table, w, logits, NULL, out, s, NULL, NULL, NULL, key, tau, {0}};
    return run(&g, 0, nthreads);
}

/* dlogits (the logits' shape) from the forward's s and, when dw is not NULL, dw = g * P[z] (the weight's) */
int gumbel_backward(int64_t A, int64_t C, int64_t T, int m, int K, const uint8_t *table, const float *w,
                    const float *s, const float *grad, float *dlogits, float *dw, float tau, int nthreads) {
    gumbel_args g = {A, C, T, m, K, 0, table, w, NULL, grad, NULL, (float *)s, dlogits, dw, NULL, 0, tau, {0}};
    return run(&g, 1, nthreads);
}

/* mask (bytes, the weight's layout) = P[argmax logits], no noise */
int gumbel_argmax_mask(int64_t A, int64_t C, int64_t T, int m, int K, const uint8_t *table, const float *logits,
                       uint8_t *mask, int nthreads) {
    gumbel_args g = {A, C, T, m, K, 0, table, NULL, logits, NULL, NULL, NULL, NULL, NULL, mask, 0, 1.0f, {0}};
    return run(&g, 2, nthreads);
}

/* the noise of logit numbers [first, first + len) of stream `key` (tests compare it with the torch version) */
int gumbel_noise_range(uint64_t key, int64_t first, int64_t len, float *out) {
    if (len < 0) return -1;
    for (int64_t j = 0; j < len; j += 1024)
        gumbel_noise(out + j, key, first + j, len - j < 1024 ? len - j : 1024);
    return 0;
}
