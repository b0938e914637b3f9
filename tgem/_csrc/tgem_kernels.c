/*
 * tgem_kernels.c -- fused CPU kernels of T-GEM's exact masked rank-one attention.
 *
 * Plain C11 with no link to Python or PyTorch; tgem/_native.py loads the shared library with
 * ctypes and calls it on the raw float32 buffers of contiguous (N, G) tensors (N = batch x heads,
 * G = genes). For every row n, with scores s_ij = q_i k_j (no scaling):
 *
 *   q'_i     = q_i log2(e) = h_i + l_i  (h = float32 product, l = its rounding error, from
 *              double: one float32 log2(e) would bias every exponent the same way)
 *   s'_ij    = h_i k_j + l_i k_j, m_i = s'_i at the largest key if q_i >= 0, else at the
 *              smallest (closed-form base-2 row maximum)
 *   e_ij     = exp(q_i k_j - max_j q_i k_j) = 2^(s'_ij - m_i)
 *   shifts   : candidates c = 0, 1, 2: (a_c, b_c) = (k, v) at the largest key, at the smallest
 *              key, and the means of k and v over the row
 *   forward  : Z'_i = sum_{j!=i} e_ij, S_i = sum_{j!=i} e_ij v_j                 (row sums)
 *              [P_ci = sum_{j!=i} e_ij (v_j - b_c)(k_j - a_c), K_ci = sum_{j!=i} e_ij (k_j - a_c)]
 *              e_diag = e_ii, Z = Z' + e_diag, inv_z = 1 / Z, out = S inv_z,
 *              sub_c = (out - b_c) K_c, c* = argmin_c |sub_c|,
 *              t = (P_c* - sub_c* - e_diag out (k_i - a_c*)) inv_z          (dq = grad t)
 *   backward : w1 = grad inv_z, w2 = w1 q, group g_i = argmin_c |out_i - b_c|,
 *              C0_j = sum_{i!=j} e_ij w1_i, C(1+c)_j = sum_{i!=j, g_i=c} e_ij w2_i,
 *              C4_j = sum_{i!=j} e_ij w2_i (out_i - b_{g_i})                 (column sums)
 *              dv = C0, dk = sum_c (v - b_c) C(1+c) - C4 - e_diag w2 out, dq = grad t
 *
 * with the score rounded before the shift is subtracted, by the same operations as the row
 * maximum, so that the peak of each row gives exactly 2^0 = 1 as in the float64 computation.
 * This is, operation for operation, exact_forward / exact_backward of tgem/_attention.py: the
 * diagonal is excluded inside the sums, and the gradient sums are centred at the score peak (or
 * the means, for flat rows) so that sharp softmaxes do not cancel catastrophically.
 *
 * Accuracy: the exponential is 2^y = 2^n p(f), n = floor(y), f = y - n in [0, 1), p a degree-6
 * polynomial (relative approximation error 2e-9; about 1 ulp after float32 rounding), with
 * exact power-of-two scaling that underflows gradually to zero and overflows to +inf. Sums are
 * accumulated in blocks of TGEM_JB terms that are then added to the running totals.
 *
 * Parallelism and determinism: the work is cut into tasks (row n, block of rows or columns)
 * whose decomposition does not depend on the thread count; every output element is computed
 * by exactly one task in a fixed order, so results are bitwise identical for any number of
 * threads. Threads are POSIX threads created per call; tasks are handed out dynamically.
 *
 * Dispatch: one implementation per instruction set (AVX-512F+DQ, AVX2+FMA, portable scalar), each
 * compiled with a per-function target attribute and chosen at run time by the caller from
 * tgem_isa_supported(); the library itself is built for the baseline architecture. The paths
 * agree to rounding, not bitwise: AVX-512 takes f = y - floor(y) truncated (vreduceps), AVX2
 * rounded to nearest, and the scalar path does not fuse multiply-adds.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define TGEM_X86 1
#include <immintrin.h>
#else
#define TGEM_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TGEM_API __attribute__((visibility("default")))
#define TGEM_INLINE static inline __attribute__((always_inline))
#else
#define TGEM_API
#define TGEM_INLINE static inline
#endif

#define TGEM_ABI_VERSION 1

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { TGEM_OK = 0, TGEM_EARGS = -1, TGEM_EISA = -2, TGEM_ENOMEM = -3 };

#define TGEM_JB 128                  /* terms per partial sum (blocked accumulation) */
#define TGEM_LOG2E 1.44269504088896340736f
#define TGEM_EXP2_LO (-150.0f)       /* 2^-150 rounds to 0: everything below underflows */
#define TGEM_EXP2_HI 128.0f          /* 2^128 overflows to +inf */

/* 2^f on [0, 1): minimax relative error 2.0e-9 with these float32 coefficients (the float32
 * Horner evaluation adds about 1 ulp); p(0) = 1 exactly, so 2^integer is exact. */
#define TGEM_P6 2.1612923592329025e-04f
#define TGEM_P5 1.246784464456141e-03f
#define TGEM_P4 9.675451554358006e-03f
#define TGEM_P3 5.5485282093286514e-02f
#define TGEM_P2 2.402293086051941e-01f
#define TGEM_P1 6.931470632553101e-01f
#define TGEM_P0 1.0f

/* ------------------------------------------------------------------------------ threads */
typedef void (*tgem_task_fn)(const void *ctx, int64_t task);

typedef struct {
    tgem_task_fn fn;
    const void *ctx;
    int64_t ntasks;
    atomic_llong next;
} tgem_job;

static void *tgem_worker(void *arg)
{
    tgem_job *job = (tgem_job *)arg;
    for (;;) {
        const int64_t task = (int64_t)atomic_fetch_add(&job->next, 1);
        if (task >= job->ntasks)
            break;
        job->fn(job->ctx, task);
    }
    return NULL;
}

#define TGEM_MAX_THREADS 256

/* Run fn(ctx, 0 .. ntasks-1) on up to nthreads threads (the caller is one of them). */
static void tgem_parallel(int nthreads, int64_t ntasks, tgem_task_fn fn, const void *ctx)
{
    tgem_job job;
    pthread_t threads[TGEM_MAX_THREADS];
    int started = 0;
    job.fn = fn;
    job.ctx = ctx;
    job.ntasks = ntasks;
    atomic_init(&job.next, 0);
    if (nthreads > TGEM_MAX_THREADS)
        nthreads = TGEM_MAX_THREADS;
    if ((int64_t)nthreads > ntasks)
        nthreads = (int)ntasks;
    for (int i = 1; i < nthreads; ++i) {
        if (pthread_create(&threads[started], NULL, tgem_worker, &job) != 0)
            break; /* fewer threads: same tasks, same results */
        ++started;
    }
    tgem_worker(&job);
    for (int i = 0; i < started; ++i)
        pthread_join(threads[i], NULL);
}

/* ------------------------------------------------------------------------------ shared */
#define TGEM_NC 3 /* candidate shifts of the gradient sums */

typedef struct {
    const float *q, *k, *v;
    int64_t n, g, blocks, rows;      /* rows per task, blocks = ceil(g / rows) */
    int grad, stride;                /* stride: scratch floats per row n, in units of g */
    float *scratch;                  /* per row n: h, l, [grad: k - a_c, (v - b_c)(k - a_c)] */
    float *ab;                       /* grad: per row n, a_0..2 then b_0..2 */
    float *out, *m, *inv_z, *e_diag, *t;
} tgem_fwd_ctx;

typedef struct {
    const float *q, *k, *v, *m, *inv_z, *e_diag, *out, *t, *grad;
    int64_t n, g, blocks, cols;
    float *scratch;                  /* per row n: h, l, m, w1, w2 by group 0..2, w4 (8 g) */
    float *ab;                       /* per row n: a_0..2 then b_0..2 */
    float *dq, *dk, *dv;
} tgem_bwd_ctx;

/* -0 and +0 compare equal; make the result independent of the reduction order */
TGEM_INLINE float tgem_canon_zero(float x) { return x == 0.0f ? 0.0f : x; }

static void tgem_minmax_scalar(const float *k, int64_t g, float *kmin, float *kmax)
{
    float lo = k[0], hi = k[0];
    for (int64_t j = 1; j < g; ++j) {
        lo = k[j] < lo ? k[j] : lo;
        hi = k[j] > hi ? k[j] : hi;
    }
    *kmin = tgem_canon_zero(lo);
    *kmax = tgem_canon_zero(hi);
}

/* Candidate shifts of row n: (k, v) at the first largest key, at the first smallest key, and
 * the means (accumulated in double). ab = a_0, a_1, a_2, b_0, b_1, b_2. */
static void tgem_candidates(const float *k, const float *v, int64_t g, float *ab)
{
    int64_t jmax = 0, jmin = 0;
    double sk = 0.0, sv = 0.0;
    for (int64_t j = 0; j < g; ++j) {
        jmax = k[j] > k[jmax] ? j : jmax;
        jmin = k[j] < k[jmin] ? j : jmin;
        sk += k[j];
        sv += v[j];
    }
    ab[0] = k[jmax];
    ab[1] = k[jmin];
    ab[2] = (float)(sk / (double)g);
    ab[3] = v[jmax];
    ab[4] = v[jmin];
    ab[5] = (float)(sv / (double)g);
}

/* q log2(e) as h + l: h the float32 product (as float32 arithmetic gives it), l its error */
static void tgem_split_queries(const float *q, int64_t g, float *h, float *l)
{
    for (int64_t i = 0; i < g; ++i) {
        h[i] = q[i] * TGEM_LOG2E;
        l[i] = (float)((double)q[i] * 1.4426950408889634 - (double)h[i]);
    }
}

/* Forward prologue for row n: split queries; for training, candidate shifts and the shifted
 * key columns. */
static void tgem_fwd_prologue(const void *vctx, int64_t n)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g;
    const float *k = c->k + o, *v = c->v + o;
    float *s = c->scratch + c->stride * o;
    tgem_split_queries(c->q + o, g, s, s + g);
    if (!c->grad)
        return;
    float *ab = c->ab + 6 * n;
    tgem_candidates(k, v, g, ab);
    for (int cc = 0; cc < TGEM_NC; ++cc) {
        float *kc = s + (2 + cc) * g, *kv = s + (2 + TGEM_NC + cc) * g;
        for (int64_t j = 0; j < g; ++j) {
            const float kj = k[j] - ab[cc];
            kc[j] = kj;
            kv[j] = (v[j] - ab[TGEM_NC + cc]) * kj;
        }
    }
}

/* Backward prologue for row n: base-2 query, shift, column weights by group, and dq.
 * ISA-independent. */
static void tgem_bwd_prologue(const void *vctx, int64_t n)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g;
    float *ab = c->ab + 6 * n;
    float *hs = c->scratch + 8 * o, *ls = hs + g, *ms = ls + g, *w1 = ms + g, *wg = w1 + g;
    float *w4 = wg + 3 * g;
    tgem_candidates(c->k + o, c->v + o, g, ab);
    tgem_split_queries(c->q + o, g, hs, ls);
    for (int64_t i = 0; i < g; ++i) {
        const float q = c->q[o + i], gr = c->grad[o + i], out = c->out[o + i];
        const float d0 = fabsf(out - ab[3]), d1 = fabsf(out - ab[4]), d2 = fabsf(out - ab[5]);
        const int grp = d1 < d0 ? (d2 < d1 ? 2 : 1) : (d2 < d0 ? 2 : 0);
        ms[i] = c->m[o + i];
        w1[i] = gr * c->inv_z[o + i];
        const float w2 = w1[i] * q;
        for (int cc = 0; cc < TGEM_NC; ++cc)
            wg[cc * g + i] = cc == grp ? w2 : 0.0f;
        w4[i] = w2 * (out - ab[3 + grp]);
        c->dq[o + i] = gr * c->t[o + i];
    }
}

/* ------------------------------------------------------------------------------ scalar */
#define TGEM_SL 16 /* rows (columns) per scalar task */

TGEM_INLINE float tgem_bits_to_float(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

TGEM_INLINE float tgem_exp2_scalar(float y)
{
    /* below -150 the result rounds to 0 and above 128 it is +inf: clamping changes nothing */
    y = y < TGEM_EXP2_LO ? TGEM_EXP2_LO : y; /* NaN passes through */
    y = y > TGEM_EXP2_HI ? TGEM_EXP2_HI : y;
    const float r = (y + 12582912.0f) - 12582912.0f; /* nearest integer, |y| < 2^22 */
    const float n = r > y ? r - 1.0f : r;              /* floor */
    const float f = y - n;
    float p = TGEM_P6;
    p = p * f + TGEM_P5;
    p = p * f + TGEM_P4;
    p = p * f + TGEM_P3;
    p = p * f + TGEM_P2;
    p = p * f + TGEM_P1;
    p = p * f + TGEM_P0;
    const int32_t ni = (n == n) ? (int32_t)n : 0;
    const int32_t n1 = ni >> 1, n2 = ni - n1; /* both in [-75, 64]: normal powers of two */
    const float s1 = tgem_bits_to_float((uint32_t)(n1 + 127) << 23);
    const float s2 = tgem_bits_to_float((uint32_t)(n2 + 127) << 23);
    return (p * s1) * s2;
}

/* t from the row sums, choosing the candidate shift with the smallest subtracted term */
TGEM_INLINE float tgem_t_scalar(const float *ab, const float *pp, const float *kk, float out,
                                float ed, float kr, float iz)
{
    float best_sub = (out - ab[3]) * kk[0], best_p = pp[0], best_a = ab[0];
    for (int cc = 1; cc < TGEM_NC; ++cc) {
        const float sub = (out - ab[3 + cc]) * kk[cc];
        if (fabsf(sub) < fabsf(best_sub)) {
            best_sub = sub;
            best_p = pp[cc];
            best_a = ab[cc];
        }
    }
    return ((best_p - best_sub) - (ed * out) * (kr - best_a)) * iz;
}

static void tgem_fwd_task_scalar(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * TGEM_SL;
    const int64_t o = n * g, nr = g - i0 < TGEM_SL ? g - i0 : TGEM_SL;
    const float *k = c->k + o, *v = c->v + o;
    const float *hs = c->scratch + c->stride * o, *ls = hs + g, *sc = hs + 2 * g;
    const float *ab = c->grad ? c->ab + 6 * n : NULL;
    float kmin, kmax, qh[TGEM_SL], ql[TGEM_SL], ms[TGEM_SL];
    float z[TGEM_SL] = {0}, s1[TGEM_SL] = {0}, pp[TGEM_NC][TGEM_SL] = {{0}};
    float kk[TGEM_NC][TGEM_SL] = {{0}};
    tgem_minmax_scalar(k, g, &kmin, &kmax);
    for (int64_t l = 0; l < nr; ++l) {
        const float kx = c->q[o + i0 + l] >= 0.0f ? kmax : kmin;
        qh[l] = hs[i0 + l];
        ql[l] = ls[i0 + l];
        ms[l] = qh[l] * kx + ql[l] * kx;
        c->m[o + i0 + l] = ms[l];
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        float pz[TGEM_SL] = {0}, pn[TGEM_SL] = {0}, p1[TGEM_NC][TGEM_SL] = {{0}};
        float p2[TGEM_NC][TGEM_SL] = {{0}};
        for (int64_t j = jb; j < je; ++j) {
            const float kj = k[j], vj = v[j];
            for (int64_t l = 0; l < nr; ++l) {
                float p = tgem_exp2_scalar((qh[l] * kj + ql[l] * kj) - ms[l]);
                p = (j == i0 + l) ? 0.0f : p;
                pz[l] = pz[l] + p;
                pn[l] = pn[l] + p * vj;
                if (c->grad) {
                    for (int cc = 0; cc < TGEM_NC; ++cc) {
                        p1[cc][l] = p1[cc][l] + p * sc[(TGEM_NC + cc) * g + j];
                        p2[cc][l] = p2[cc][l] + p * sc[cc * g + j];
                    }
                }
            }
        }
        for (int64_t l = 0; l < nr; ++l) {
            z[l] += pz[l];
            s1[l] += pn[l];
            for (int cc = 0; cc < TGEM_NC; ++cc) {
                pp[cc][l] += p1[cc][l];
                kk[cc][l] += p2[cc][l];
            }
        }
    }
    for (int64_t l = 0; l < nr; ++l) {
        const int64_t i = o + i0 + l;
        const float kr = k[i0 + l];
        const float ed = tgem_exp2_scalar((qh[l] * kr + ql[l] * kr) - ms[l]);
        const float iz = 1.0f / (z[l] + ed);
        const float out = s1[l] * iz;
        c->e_diag[i] = ed;
        c->inv_z[i] = iz;
        c->out[i] = out;
        if (c->grad) {
            const float ppl[TGEM_NC] = {pp[0][l], pp[1][l], pp[2][l]};
            const float kkl[TGEM_NC] = {kk[0][l], kk[1][l], kk[2][l]};
            c->t[i] = tgem_t_scalar(ab, ppl, kkl, out, ed, kr, iz);
        }
    }
}

/* dk, dv of key j from its column sums (identical formula in every path) */
TGEM_INLINE void tgem_dkdv_scalar(const tgem_bwd_ctx *c, int64_t n, int64_t jj, const float *cs)
{
    const float *ab = c->ab + 6 * n;
    const int64_t j = n * c->g + jj;
    const float vj = c->v[j];
    const float w2 = (c->grad[j] * c->inv_z[j]) * c->q[j];
    float dk = (vj - ab[3]) * cs[1] + (vj - ab[4]) * cs[2];
    dk = dk + (vj - ab[5]) * cs[3];
    c->dk[j] = (dk - cs[4]) - (c->e_diag[j] * w2) * c->out[j];
    c->dv[j] = cs[0];
}

static void tgem_bwd_task_scalar(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * TGEM_SL;
    const int64_t o = n * g, nc = g - j0 < TGEM_SL ? g - j0 : TGEM_SL;
    const float *hs = c->scratch + 8 * o, *ls = hs + g, *ms = ls + g, *w1 = ms + g, *wg = w1 + g;
    const float *w4 = wg + 3 * g;
    float cs[5][TGEM_SL] = {{0}}, kc[TGEM_SL];
    for (int64_t l = 0; l < nc; ++l)
        kc[l] = c->k[o + j0 + l];
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        float ps[5][TGEM_SL] = {{0}};
        for (int64_t i = ib; i < ie; ++i) {
            const float wi[5] = {w1[i], wg[i], wg[g + i], wg[2 * g + i], w4[i]};
            for (int64_t l = 0; l < nc; ++l) {
                float p = tgem_exp2_scalar((hs[i] * kc[l] + ls[i] * kc[l]) - ms[i]);
                p = (i == j0 + l) ? 0.0f : p;
                for (int a = 0; a < 5; ++a)
                    ps[a][l] = ps[a][l] + p * wi[a];
            }
        }
        for (int a = 0; a < 5; ++a)
            for (int64_t l = 0; l < nc; ++l)
                cs[a][l] += ps[a][l];
    }
    for (int64_t l = 0; l < nc; ++l) {
        const float col[5] = {cs[0][l], cs[1][l], cs[2][l], cs[3][l], cs[4][l]};
        tgem_dkdv_scalar(c, n, j0 + l, col);
    }
}

#if TGEM_X86
/* ------------------------------------------------------------------------------ AVX2+FMA */
#define TGEM_T256 __attribute__((target("avx2,fma")))
#define TGEM_INLINE256 static inline __attribute__((always_inline, target("avx2,fma")))
#ifndef NVI256
#define NVI256 4                /* vectors of 8 lanes per task: inference forward */
#endif
#ifndef NVF256
#define NVF256 1                /* training forward */
#endif
#ifndef NVB256
#define NVB256 2                /* backward */
#endif
#define NVMAX256 4

/* y[u] = 2^y[u] for u < nv, step by step across the nv vectors: the dependency chains are
 * interleaved in program order, so the out-of-order core always has independent work. */
TGEM_INLINE256 void tgem_exp2n_256(__m256 *y, int nv)
{
    __m256 n[NVMAX256], p[NVMAX256];
    const __m256i bias = _mm256_set1_epi32(127);
    for (int u = 0; u < nv; ++u)
        y[u] = _mm256_max_ps(_mm256_set1_ps(TGEM_EXP2_LO), y[u]); /* NaN (2nd operand) passes */
    for (int u = 0; u < nv; ++u)
        y[u] = _mm256_min_ps(_mm256_set1_ps(TGEM_EXP2_HI), y[u]);
    for (int u = 0; u < nv; ++u)
        n[u] = _mm256_round_ps(y[u], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    for (int u = 0; u < nv; ++u)
        y[u] = _mm256_sub_ps(y[u], n[u]);
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(_mm256_set1_ps(TGEM_P6), y[u], _mm256_set1_ps(TGEM_P5));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(p[u], y[u], _mm256_set1_ps(TGEM_P4));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(p[u], y[u], _mm256_set1_ps(TGEM_P3));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(p[u], y[u], _mm256_set1_ps(TGEM_P2));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(p[u], y[u], _mm256_set1_ps(TGEM_P1));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm256_fmadd_ps(p[u], y[u], _mm256_set1_ps(TGEM_P0));
    for (int u = 0; u < nv; ++u) {
        /* p 2^n = (p 2^n1) 2^n2 with n1 = floor(n/2): both factors normal, one rounding */
        const __m256i ni = _mm256_cvtps_epi32(n[u]);
        const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
        const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
        const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
        y[u] = _mm256_mul_ps(_mm256_mul_ps(p[u], s1), s2);
    }
}

TGEM_INLINE256 __m256i tgem_tailmask_256(int64_t remaining)
{
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int32_t r = remaining > 8 ? 8 : (remaining < 0 ? 0 : (int32_t)remaining);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), iota);
}

TGEM_INLINE256 void tgem_minmax_256(const float *k, int64_t g, float *kmin, float *kmax)
{
    __m256 lo = _mm256_set1_ps(k[0]), hi = lo;
    int64_t j = 0;
    for (; j + 8 <= g; j += 8) {
        const __m256 x = _mm256_loadu_ps(k + j);
        lo = _mm256_min_ps(lo, x);
        hi = _mm256_max_ps(hi, x);
    }
    float l8[8], h8[8];
    _mm256_storeu_ps(l8, lo);
    _mm256_storeu_ps(h8, hi);
    float a = l8[0], b = h8[0];
    for (int u = 1; u < 8; ++u) {
        a = l8[u] < a ? l8[u] : a;
        b = h8[u] > b ? h8[u] : b;
    }
    for (; j < g; ++j) {
        a = k[j] < a ? k[j] : a;
        b = k[j] > b ? k[j] : b;
    }
    *kmin = tgem_canon_zero(a);
    *kmax = tgem_canon_zero(b);
}

/* accumulators: 0 sum e, 1 sum e v, then (grad) P_0, K_0, P_1, K_1, P_2, K_2 */
TGEM_INLINE256 void tgem_rows_256(const float *k, const float *v, const float *sc, int64_t g,
                                  int64_t jb, int64_t je, const __m256 *qh, const __m256 *ql,
                                  const __m256 *ms, const __m256i *rowidx, __m256 (*acc)[NVMAX256], int grad,
                                  int masked, int nv)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m256 kj = _mm256_set1_ps(k[j]), vj = _mm256_set1_ps(v[j]);
        const __m256i jj = _mm256_set1_epi32((int32_t)j);
        __m256 e[NVMAX256];
        for (int u = 0; u < nv; ++u)
            e[u] = _mm256_sub_ps(_mm256_fmadd_ps(ql[u], kj, _mm256_mul_ps(qh[u], kj)), ms[u]);
        tgem_exp2n_256(e, nv);
        if (masked)
            for (int u = 0; u < nv; ++u)
                e[u] = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(rowidx[u], jj)),
                                        e[u]);
        for (int u = 0; u < nv; ++u) {
            acc[0][u] = _mm256_add_ps(acc[0][u], e[u]);
            acc[1][u] = _mm256_fmadd_ps(e[u], vj, acc[1][u]);
        }
        if (grad) {
            for (int cc = 0; cc < TGEM_NC; ++cc) {
                const __m256 kv = _mm256_set1_ps(sc[(TGEM_NC + cc) * g + j]);
                const __m256 kc = _mm256_set1_ps(sc[cc * g + j]);
                for (int u = 0; u < nv; ++u) {
                    acc[2 + 2 * cc][u] = _mm256_fmadd_ps(e[u], kv, acc[2 + 2 * cc][u]);
                    acc[3 + 2 * cc][u] = _mm256_fmadd_ps(e[u], kc, acc[3 + 2 * cc][u]);
                }
            }
        }
    }
}

TGEM_INLINE256 void tgem_fwd_256(const tgem_fwd_ctx *c, int64_t task, int grad, int nv)
{
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * 8 * nv, o = n * g;
    const float *k = c->k + o, *v = c->v + o;
    const float *hs = c->scratch + c->stride * o, *ls = hs + g, *sc = hs + 2 * g;
    const float *ab = grad ? c->ab + 6 * n : NULL;
    const int na = grad ? 8 : 2;
    float kmin, kmax, tot[8][NVMAX256 * 8];
    __m256 qh[NVMAX256], ql[NVMAX256], ms[NVMAX256];
    __m256i tm[NVMAX256], rowidx[NVMAX256];
    tgem_minmax_256(k, g, &kmin, &kmax);
    const __m256 vkmin = _mm256_set1_ps(kmin), vkmax = _mm256_set1_ps(kmax);
    const __m256 zero = _mm256_setzero_ps();
    for (int u = 0; u < nv; ++u) {
        const int64_t r0 = i0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        rowidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 q = r0 < g ? _mm256_maskload_ps(c->q + o + r0, tm[u]) : zero;
        const __m256 kx = _mm256_blendv_ps(vkmin, vkmax, _mm256_cmp_ps(q, zero, _CMP_GE_OQ));
        qh[u] = r0 < g ? _mm256_maskload_ps(hs + r0, tm[u]) : zero;
        ql[u] = r0 < g ? _mm256_maskload_ps(ls + r0, tm[u]) : zero;
        ms[u] = _mm256_fmadd_ps(ql[u], kx, _mm256_mul_ps(qh[u], kx));
        if (r0 < g)
            _mm256_maskstore_ps(c->m + o + r0, tm[u], ms[u]);
    }
    memset(tot, 0, sizeof tot);
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        __m256 acc[8][NVMAX256];
        for (int a = 0; a < na; ++a)
            for (int u = 0; u < nv; ++u)
                acc[a][u] = zero;
        if (jb < i0 + 8 * nv && je > i0)
            tgem_rows_256(k, v, sc, g, jb, je, qh, ql, ms, rowidx, acc, grad, 1, nv);
        else
            tgem_rows_256(k, v, sc, g, jb, je, qh, ql, ms, rowidx, acc, grad, 0, nv);
        for (int a = 0; a < na; ++a)
            for (int u = 0; u < nv; ++u)
                _mm256_storeu_ps(tot[a] + 8 * u,
                                 _mm256_add_ps(_mm256_loadu_ps(tot[a] + 8 * u), acc[a][u]));
    }
    for (int u = 0; u < nv; ++u) {
        const int64_t r0 = i0 + 8 * u;
        if (r0 >= g)
            break;
        const __m256 kr = _mm256_maskload_ps(k + r0, tm[u]);
        __m256 ed = _mm256_sub_ps(_mm256_fmadd_ps(ql[u], kr, _mm256_mul_ps(qh[u], kr)), ms[u]);
        tgem_exp2n_256(&ed, 1);
        const __m256 iz = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                        _mm256_add_ps(_mm256_loadu_ps(tot[0] + 8 * u), ed));
        const __m256 out = _mm256_mul_ps(_mm256_loadu_ps(tot[1] + 8 * u), iz);
        _mm256_maskstore_ps(c->e_diag + o + r0, tm[u], ed);
        _mm256_maskstore_ps(c->inv_z + o + r0, tm[u], iz);
        _mm256_maskstore_ps(c->out + o + r0, tm[u], out);
        if (grad) {
            float edl[8], izl[8], outl[8];
            _mm256_storeu_ps(edl, ed);
            _mm256_storeu_ps(izl, iz);
            _mm256_storeu_ps(outl, out);
            for (int l = 0; l < 8 && r0 + l < g; ++l) {
                const int64_t x = 8 * u + l;
                const float pp[TGEM_NC] = {tot[2][x], tot[4][x], tot[6][x]};
                const float kk[TGEM_NC] = {tot[3][x], tot[5][x], tot[7][x]};
                c->t[o + r0 + l] = tgem_t_scalar(ab, pp, kk, outl[l], edl[l], k[r0 + l], izl[l]);
            }
        }
    }
}

TGEM_T256 static void tgem_fwd_task_avx2(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->grad)
        tgem_fwd_256(c, task, 1, NVF256);
    else
        tgem_fwd_256(c, task, 0, NVI256);
}

/* accumulators: 0 w1, 1..3 w2 by group, 4 w4 */
TGEM_INLINE256 void tgem_cols_256(const float *hs, const float *ls, const float *ms, const float *w1,
                                  const float *wg, const float *w4, int64_t g, int64_t ib,
                                  int64_t ie, const __m256 *kc, const __m256i *colidx,
                                  __m256 (*acc)[NVMAX256], int masked)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m256 hi = _mm256_set1_ps(hs[i]), li = _mm256_set1_ps(ls[i]);
        const __m256 mi = _mm256_set1_ps(ms[i]);
        const __m256 wi[5] = {_mm256_set1_ps(w1[i]), _mm256_set1_ps(wg[i]),
                              _mm256_set1_ps(wg[g + i]), _mm256_set1_ps(wg[2 * g + i]),
                              _mm256_set1_ps(w4[i])};
        const __m256i ii = _mm256_set1_epi32((int32_t)i);
        __m256 e[NVMAX256];
        for (int u = 0; u < NVB256; ++u)
            e[u] = _mm256_sub_ps(_mm256_fmadd_ps(li, kc[u], _mm256_mul_ps(hi, kc[u])), mi);
        tgem_exp2n_256(e, NVB256);
        if (masked)
            for (int u = 0; u < NVB256; ++u)
                e[u] = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(colidx[u], ii)),
                                        e[u]);
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB256; ++u)
                acc[a][u] = _mm256_fmadd_ps(e[u], wi[a], acc[a][u]);
    }
}

TGEM_T256 static void tgem_bwd_task_avx2(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * 8 * NVB256;
    const int64_t o = n * g;
    const float *hs = c->scratch + 8 * o, *ls = hs + g, *ms = ls + g, *w1 = ms + g, *wg = w1 + g;
    const float *w4 = wg + 3 * g;
    const __m256 zero = _mm256_setzero_ps();
    float tot[5][NVMAX256 * 8];
    __m256 kc[NVMAX256];
    __m256i tm[NVMAX256], colidx[NVMAX256];
    for (int u = 0; u < NVB256; ++u) {
        const int64_t r0 = j0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        colidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        kc[u] = r0 < g ? _mm256_maskload_ps(c->k + o + r0, tm[u]) : zero;
    }
    memset(tot, 0, sizeof tot);
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m256 acc[5][NVMAX256];
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB256; ++u)
                acc[a][u] = zero;
        if (ib < j0 + 8 * NVB256 && ie > j0)
            tgem_cols_256(hs, ls, ms, w1, wg, w4, g, ib, ie, kc, colidx, acc, 1);
        else
            tgem_cols_256(hs, ls, ms, w1, wg, w4, g, ib, ie, kc, colidx, acc, 0);
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB256; ++u)
                _mm256_storeu_ps(tot[a] + 8 * u,
                                 _mm256_add_ps(_mm256_loadu_ps(tot[a] + 8 * u), acc[a][u]));
    }
    for (int64_t x = 0; x < 8 * NVB256 && j0 + x < g; ++x) {
        const float col[5] = {tot[0][x], tot[1][x], tot[2][x], tot[3][x], tot[4][x]};
        tgem_dkdv_scalar(c, n, j0 + x, col);
    }
}

TGEM_T256 static void tgem_exp2_array_avx2(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 8) {
        const __m256i tm = tgem_tailmask_256(len - i);
        __m256 x = _mm256_maskload_ps(y + i, tm);
        tgem_exp2n_256(&x, 1);
        _mm256_maskstore_ps(out + i, tm, x);
    }
}
#define TGEM_PROBE_CHAINS_256 12
typedef struct { int64_t iters; float seed; float *result; } tgem_probe_ctx;

TGEM_T256 static void tgem_probe_task_avx2(const void *vctx, int64_t task)
{
    const tgem_probe_ctx *c = (const tgem_probe_ctx *)vctx;
    __m256 acc[TGEM_PROBE_CHAINS_256];
    const __m256 a = _mm256_set1_ps(0.999f * c->seed), b = _mm256_set1_ps(1e-3f);
    for (int r = 0; r < TGEM_PROBE_CHAINS_256; ++r)
        acc[r] = _mm256_set1_ps((float)r);
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < TGEM_PROBE_CHAINS_256; ++r)
            acc[r] = _mm256_fmadd_ps(acc[r], a, b);
    __m256 s = acc[0];
    for (int r = 1; r < TGEM_PROBE_CHAINS_256; ++r)
        s = _mm256_add_ps(s, acc[r]);
    float tmp[8];
    _mm256_storeu_ps(tmp, s);
    c->result[task] = tmp[0];
}


/* ------------------------------------------------------------------------------ AVX-512F */
#define TGEM_T512 __attribute__((target("avx512f,avx512dq")))
#define TGEM_INLINE512 static inline __attribute__((always_inline, target("avx512f,avx512dq")))
#ifndef NVI512
#define NVI512 4                /* vectors of 16 lanes per task: inference forward */
#endif
#ifndef NVF512
#define NVF512 2                /* training forward */
#endif
#ifndef NVB512
#define NVB512 3                /* backward */
#endif
#define NVMAX512 4

/* y[u] = 2^y[u] for u < nv, interleaved across the nv vectors (see tgem_exp2n_256).
 * f = y - floor(y) in one instruction (vreduceps) and scalef(p, y) = p 2^floor(y): no clamping
 * is needed (y = -inf gives 0, +inf gives +inf, NaN stays NaN). */
TGEM_INLINE512 void tgem_exp2n_512(__m512 *y, int nv)
{
    __m512 f[NVMAX512], p[NVMAX512];
    for (int u = 0; u < nv; ++u)
        f[u] = _mm512_reduce_ps(y[u], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(_mm512_set1_ps(TGEM_P6), f[u], _mm512_set1_ps(TGEM_P5));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(p[u], f[u], _mm512_set1_ps(TGEM_P4));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(p[u], f[u], _mm512_set1_ps(TGEM_P3));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(p[u], f[u], _mm512_set1_ps(TGEM_P2));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(p[u], f[u], _mm512_set1_ps(TGEM_P1));
    for (int u = 0; u < nv; ++u)
        p[u] = _mm512_fmadd_ps(p[u], f[u], _mm512_set1_ps(TGEM_P0));
    for (int u = 0; u < nv; ++u)
        y[u] = _mm512_scalef_ps(p[u], y[u]); /* = p 2^floor(y), rounded once */
}

TGEM_INLINE512 __mmask16 tgem_tailmask_512(int64_t remaining)
{
    if (remaining >= 16)
        return (__mmask16)0xFFFF;
    if (remaining <= 0)
        return (__mmask16)0;
    return (__mmask16)((1u << remaining) - 1u);
}

TGEM_INLINE512 void tgem_minmax_512(const float *k, int64_t g, float *kmin, float *kmax)
{
    __m512 lo = _mm512_set1_ps(k[0]), hi = lo;
    int64_t j = 0;
    for (; j + 16 <= g; j += 16) {
        const __m512 x = _mm512_loadu_ps(k + j);
        lo = _mm512_min_ps(lo, x);
        hi = _mm512_max_ps(hi, x);
    }
    float l16[16], h16[16];
    _mm512_storeu_ps(l16, lo);
    _mm512_storeu_ps(h16, hi);
    float a = l16[0], b = h16[0];
    for (int u = 1; u < 16; ++u) {
        a = l16[u] < a ? l16[u] : a;
        b = h16[u] > b ? h16[u] : b;
    }
    for (; j < g; ++j) {
        a = k[j] < a ? k[j] : a;
        b = k[j] > b ? k[j] : b;
    }
    *kmin = tgem_canon_zero(a);
    *kmax = tgem_canon_zero(b);
}

/* accumulators: 0 sum e, 1 sum e v, then (grad) P_0, K_0, P_1, K_1, P_2, K_2 */
TGEM_INLINE512 void tgem_rows_512(const float *k, const float *v, const float *sc, int64_t g,
                                  int64_t jb, int64_t je, int64_t i0, const __m512 *qh,
                                  const __m512 *ql, const __m512 *ms, __m512 (*acc)[NVMAX512], int grad,
                                  int masked, int nv)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m512 kj = _mm512_set1_ps(k[j]), vj = _mm512_set1_ps(v[j]);
        __m512 e[NVMAX512];
        for (int u = 0; u < nv; ++u)
            e[u] = _mm512_sub_ps(_mm512_fmadd_ps(ql[u], kj, _mm512_mul_ps(qh[u], kj)), ms[u]);
        tgem_exp2n_512(e, nv);
        if (masked) {
            for (int u = 0; u < nv; ++u) {
                const uint64_t lane = (uint64_t)(j - i0 - 16 * u);
                if (lane < 16)
                    e[u] = _mm512_maskz_mov_ps((__mmask16)~(1u << lane), e[u]);
            }
        }
        for (int u = 0; u < nv; ++u) {
            acc[0][u] = _mm512_add_ps(acc[0][u], e[u]);
            acc[1][u] = _mm512_fmadd_ps(e[u], vj, acc[1][u]);
        }
        if (grad) {
            for (int cc = 0; cc < TGEM_NC; ++cc) {
                const __m512 kv = _mm512_set1_ps(sc[(TGEM_NC + cc) * g + j]);
                const __m512 kc = _mm512_set1_ps(sc[cc * g + j]);
                for (int u = 0; u < nv; ++u) {
                    acc[2 + 2 * cc][u] = _mm512_fmadd_ps(e[u], kv, acc[2 + 2 * cc][u]);
                    acc[3 + 2 * cc][u] = _mm512_fmadd_ps(e[u], kc, acc[3 + 2 * cc][u]);
                }
            }
        }
    }
}

TGEM_INLINE512 void tgem_fwd_512(const tgem_fwd_ctx *c, int64_t task, int grad, int nv)
{
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * 16 * nv, o = n * g;
    const float *k = c->k + o, *v = c->v + o;
    const float *hs = c->scratch + c->stride * o, *ls = hs + g, *sc = hs + 2 * g;
    const float *ab = grad ? c->ab + 6 * n : NULL;
    const int na = grad ? 8 : 2;
    float kmin, kmax, tot[8][NVMAX512 * 16];
    __m512 qh[NVMAX512], ql[NVMAX512], ms[NVMAX512];
    __mmask16 tm[NVMAX512];
    tgem_minmax_512(k, g, &kmin, &kmax);
    const __m512 vkmin = _mm512_set1_ps(kmin), vkmax = _mm512_set1_ps(kmax);
    const __m512 zero = _mm512_setzero_ps();
    for (int u = 0; u < nv; ++u) {
        const int64_t r0 = i0 + 16 * u;
        tm[u] = tgem_tailmask_512(g - r0);
        const int64_t r = r0 < g ? r0 : 0;
        const __m512 q = _mm512_maskz_loadu_ps(tm[u], c->q + o + r);
        const __mmask16 pos = _mm512_cmp_ps_mask(q, zero, _CMP_GE_OQ);
        const __m512 kx = _mm512_mask_blend_ps(pos, vkmin, vkmax);
        qh[u] = _mm512_maskz_loadu_ps(tm[u], hs + r);
        ql[u] = _mm512_maskz_loadu_ps(tm[u], ls + r);
        ms[u] = _mm512_fmadd_ps(ql[u], kx, _mm512_mul_ps(qh[u], kx));
        _mm512_mask_storeu_ps(c->m + o + (r0 < g ? r0 : 0), tm[u], ms[u]);
    }
    memset(tot, 0, sizeof tot);
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        __m512 acc[8][NVMAX512];
        for (int a = 0; a < na; ++a)
            for (int u = 0; u < nv; ++u)
                acc[a][u] = zero;
        if (jb < i0 + 16 * nv && je > i0)
            tgem_rows_512(k, v, sc, g, jb, je, i0, qh, ql, ms, acc, grad, 1, nv);
        else
            tgem_rows_512(k, v, sc, g, jb, je, i0, qh, ql, ms, acc, grad, 0, nv);
        for (int a = 0; a < na; ++a)
            for (int u = 0; u < nv; ++u)
                _mm512_storeu_ps(tot[a] + 16 * u,
                                 _mm512_add_ps(_mm512_loadu_ps(tot[a] + 16 * u), acc[a][u]));
    }
    for (int u = 0; u < nv; ++u) {
        const int64_t r0 = i0 + 16 * u;
        if (r0 >= g)
            break;
        const __m512 kr = _mm512_maskz_loadu_ps(tm[u], k + r0);
        __m512 ed = _mm512_sub_ps(_mm512_fmadd_ps(ql[u], kr, _mm512_mul_ps(qh[u], kr)), ms[u]);
        tgem_exp2n_512(&ed, 1);
        const __m512 iz = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                        _mm512_add_ps(_mm512_loadu_ps(tot[0] + 16 * u), ed));
        const __m512 out = _mm512_mul_ps(_mm512_loadu_ps(tot[1] + 16 * u), iz);
        _mm512_mask_storeu_ps(c->e_diag + o + r0, tm[u], ed);
        _mm512_mask_storeu_ps(c->inv_z + o + r0, tm[u], iz);
        _mm512_mask_storeu_ps(c->out + o + r0, tm[u], out);
        if (grad) {
            float edl[16], izl[16], outl[16];
            _mm512_storeu_ps(edl, ed);
            _mm512_storeu_ps(izl, iz);
            _mm512_storeu_ps(outl, out);
            for (int l = 0; l < 16 && r0 + l < g; ++l) {
                const int64_t x = 16 * u + l;
                const float pp[TGEM_NC] = {tot[2][x], tot[4][x], tot[6][x]};
                const float kk[TGEM_NC] = {tot[3][x], tot[5][x], tot[7][x]};
                c->t[o + r0 + l] = tgem_t_scalar(ab, pp, kk, outl[l], edl[l], k[r0 + l], izl[l]);
            }
        }
    }
}

TGEM_T512 static void tgem_fwd_task_avx512(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->grad)
        tgem_fwd_512(c, task, 1, NVF512);
    else
        tgem_fwd_512(c, task, 0, NVI512);
}

/* accumulators: 0 w1, 1..3 w2 by group, 4 w4 */
TGEM_INLINE512 void tgem_cols_512(const float *hs, const float *ls, const float *ms, const float *w1,
                                  const float *wg, const float *w4, int64_t g, int64_t ib,
                                  int64_t ie, int64_t j0, const __m512 *kc,
                                  __m512 (*acc)[NVMAX512], int masked)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m512 hi = _mm512_set1_ps(hs[i]), li = _mm512_set1_ps(ls[i]);
        const __m512 mi = _mm512_set1_ps(ms[i]);
        const __m512 wi[5] = {_mm512_set1_ps(w1[i]), _mm512_set1_ps(wg[i]),
                              _mm512_set1_ps(wg[g + i]), _mm512_set1_ps(wg[2 * g + i]),
                              _mm512_set1_ps(w4[i])};
        __m512 e[NVMAX512];
        for (int u = 0; u < NVB512; ++u)
            e[u] = _mm512_sub_ps(_mm512_fmadd_ps(li, kc[u], _mm512_mul_ps(hi, kc[u])), mi);
        tgem_exp2n_512(e, NVB512);
        if (masked) {
            for (int u = 0; u < NVB512; ++u) {
                const uint64_t lane = (uint64_t)(i - j0 - 16 * u);
                if (lane < 16)
                    e[u] = _mm512_maskz_mov_ps((__mmask16)~(1u << lane), e[u]);
            }
        }
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB512; ++u)
                acc[a][u] = _mm512_fmadd_ps(e[u], wi[a], acc[a][u]);
    }
}

TGEM_T512 static void tgem_bwd_task_avx512(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * 16 * NVB512;
    const int64_t o = n * g;
    const float *hs = c->scratch + 8 * o, *ls = hs + g, *ms = ls + g, *w1 = ms + g, *wg = w1 + g;
    const float *w4 = wg + 3 * g;
    const __m512 zero = _mm512_setzero_ps();
    float tot[5][NVMAX512 * 16];
    __m512 kc[NVMAX512];
    for (int u = 0; u < NVB512; ++u) {
        const int64_t r0 = j0 + 16 * u;
        kc[u] = _mm512_maskz_loadu_ps(tgem_tailmask_512(g - r0), c->k + o + (r0 < g ? r0 : 0));
    }
    memset(tot, 0, sizeof tot);
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m512 acc[5][NVMAX512];
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB512; ++u)
                acc[a][u] = zero;
        if (ib < j0 + 16 * NVB512 && ie > j0)
            tgem_cols_512(hs, ls, ms, w1, wg, w4, g, ib, ie, j0, kc, acc, 1);
        else
            tgem_cols_512(hs, ls, ms, w1, wg, w4, g, ib, ie, j0, kc, acc, 0);
        for (int a = 0; a < 5; ++a)
            for (int u = 0; u < NVB512; ++u)
                _mm512_storeu_ps(tot[a] + 16 * u,
                                 _mm512_add_ps(_mm512_loadu_ps(tot[a] + 16 * u), acc[a][u]));
    }
    for (int64_t x = 0; x < 16 * NVB512 && j0 + x < g; ++x) {
        const float col[5] = {tot[0][x], tot[1][x], tot[2][x], tot[3][x], tot[4][x]};
        tgem_dkdv_scalar(c, n, j0 + x, col);
    }
}

TGEM_T512 static void tgem_exp2_array_avx512(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 tm = tgem_tailmask_512(len - i);
        __m512 x = _mm512_maskz_loadu_ps(tm, y + i);
        tgem_exp2n_512(&x, 1);
        _mm512_mask_storeu_ps(out + i, tm, x);
    }
}

#define TGEM_PROBE_CHAINS_512 24
TGEM_T512 static void tgem_probe_task_avx512(const void *vctx, int64_t task)
{
    const tgem_probe_ctx *c = (const tgem_probe_ctx *)vctx;
    __m512 acc[TGEM_PROBE_CHAINS_512];
    const __m512 a = _mm512_set1_ps(0.999f * c->seed), b = _mm512_set1_ps(1e-3f);
    for (int r = 0; r < TGEM_PROBE_CHAINS_512; ++r)
        acc[r] = _mm512_set1_ps((float)r);
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < TGEM_PROBE_CHAINS_512; ++r)
            acc[r] = _mm512_fmadd_ps(acc[r], a, b);
    __m512 s = acc[0];
    for (int r = 1; r < TGEM_PROBE_CHAINS_512; ++r)
        s = _mm512_add_ps(s, acc[r]);
    float tmp[16];
    _mm512_storeu_ps(tmp, s);
    c->result[task] = tmp[0];
}
#else
typedef struct { int64_t iters; float seed; float *result; } tgem_probe_ctx;
#endif /* TGEM_X86 */

#define TGEM_PROBE_CHAINS_SCALAR 8
static void tgem_probe_task_scalar(const void *vctx, int64_t task)
{
    const tgem_probe_ctx *c = (const tgem_probe_ctx *)vctx;
    float acc[TGEM_PROBE_CHAINS_SCALAR];
    const float a = 0.999f * c->seed, b = 1e-3f;
    for (int r = 0; r < TGEM_PROBE_CHAINS_SCALAR; ++r)
        acc[r] = (float)r;
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < TGEM_PROBE_CHAINS_SCALAR; ++r)
            acc[r] = acc[r] * a + b;
    float s = 0.0f;
    for (int r = 0; r < TGEM_PROBE_CHAINS_SCALAR; ++r)
        s += acc[r];
    c->result[task] = s;
}

/* ------------------------------------------------------------------------------ API */
TGEM_API int tgem_abi_version(void) { return TGEM_ABI_VERSION; }

/* 1 if this processor (and OS) can run the path `isa` of this build, else 0 */
TGEM_API int tgem_isa_supported(int isa)
{
    if (isa == ISA_SCALAR)
        return 1;
#if TGEM_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

/* lanes of one vector of the path `isa` (used to turn the FMA probe into lane-operations) */
TGEM_API int tgem_isa_lanes(int isa)
{
    return isa == ISA_AVX512 ? 16 : (isa == ISA_AVX2 ? 8 : 1);
}

/* rows (forward) or columns (backward) per task of the path `isa` */
static int64_t tgem_block(int isa, int pass) /* pass: 0 inference, 1 training forward, 2 back */
{
#if TGEM_X86
    if (isa == ISA_AVX512)
        return 16 * (pass == 0 ? NVI512 : (pass == 1 ? NVF512 : NVB512));
    if (isa == ISA_AVX2)
        return 8 * (pass == 0 ? NVI256 : (pass == 1 ? NVF256 : NVB256));
#endif
    (void)isa;
    (void)pass;
    return TGEM_SL;
}

/*
 * Forward pass on contiguous (n, g) float32 arrays. Writes out, m, inv_z, e_diag and, when
 * need_grad, t (dq = grad * t); t may be NULL otherwise. Returns 0, or a negative error code.
 */
TGEM_API int tgem_forward(const float *q, const float *k, const float *v, int64_t n, int64_t g,
                          int need_grad, float *out, float *m, float *inv_z, float *e_diag,
                          float *t, int isa, int nthreads)
{
    tgem_fwd_ctx c;
    tgem_task_fn fn = tgem_fwd_task_scalar;
    if (n < 0 || g < 0 || nthreads < 1 || (need_grad && t == NULL))
        return TGEM_EARGS;
    if (!tgem_isa_supported(isa))
        return TGEM_EISA;
    if (n == 0 || g == 0)
        return TGEM_OK;
    if (g > INT32_MAX)
        return TGEM_EARGS;
#if TGEM_X86
    if (isa == ISA_AVX512)
        fn = tgem_fwd_task_avx512;
    else if (isa == ISA_AVX2)
        fn = tgem_fwd_task_avx2;
#endif
    c.q = q; c.k = k; c.v = v; c.n = n; c.g = g; c.grad = need_grad ? 1 : 0;
    c.rows = tgem_block(isa, c.grad);
    c.blocks = (g + c.rows - 1) / c.rows;
    c.out = out; c.m = m; c.inv_z = inv_z; c.e_diag = e_diag; c.t = t;
    c.stride = c.grad ? 2 + 2 * TGEM_NC : 2;
    c.scratch = (float *)malloc((size_t)(c.stride * n * g + 6 * n) * sizeof(float));
    if (c.scratch == NULL)
        return TGEM_ENOMEM;
    c.ab = c.scratch + c.stride * n * g;
    tgem_parallel(nthreads, n, tgem_fwd_prologue, &c);
    tgem_parallel(nthreads, n * c.blocks, fn, &c);
    free(c.scratch);
    return TGEM_OK;
}

/*
 * Backward pass: from the inputs, the forward outputs m, inv_z, e_diag, out, t and the
 * upstream gradient grad, writes dq, dk, dv. Returns 0, or a negative error code.
 */
TGEM_API int tgem_backward(const float *q, const float *k, const float *v, const float *m,
                           const float *inv_z,
                           const float *e_diag, const float *out, const float *t,
                           const float *grad, int64_t n, int64_t g, float *dq, float *dk,
                           float *dv, int isa, int nthreads)
{
    tgem_bwd_ctx c;
    tgem_task_fn fn = tgem_bwd_task_scalar;
    if (n < 0 || g < 0 || nthreads < 1)
        return TGEM_EARGS;
    if (!tgem_isa_supported(isa))
        return TGEM_EISA;
    if (n == 0 || g == 0)
        return TGEM_OK;
    if (g > INT32_MAX)
        return TGEM_EARGS;
#if TGEM_X86
    if (isa == ISA_AVX512)
        fn = tgem_bwd_task_avx512;
    else if (isa == ISA_AVX2)
        fn = tgem_bwd_task_avx2;
#endif
    c.q = q; c.k = k; c.v = v; c.m = m; c.inv_z = inv_z; c.e_diag = e_diag; c.out = out; c.t = t;
    c.grad = grad; c.n = n; c.g = g; c.dq = dq; c.dk = dk; c.dv = dv;
    c.cols = tgem_block(isa, 2);
    c.blocks = (g + c.cols - 1) / c.cols;
    c.scratch = (float *)malloc((size_t)(8 * n * g + 6 * n) * sizeof(float));
    if (c.scratch == NULL)
        return TGEM_ENOMEM;
    c.ab = c.scratch + 8 * n * g;
    tgem_parallel(nthreads, n, tgem_bwd_prologue, &c);
    tgem_parallel(nthreads, n * c.blocks, fn, &c);
    free(c.scratch);
    return TGEM_OK;
}

/* out[i] = 2^y[i] with the kernels' exponential (for accuracy tests). */
TGEM_API int tgem_exp2(const float *y, float *out, int64_t len, int isa)
{
    if (len < 0)
        return TGEM_EARGS;
    if (!tgem_isa_supported(isa))
        return TGEM_EISA;
#if TGEM_X86
    if (isa == ISA_AVX512) {
        tgem_exp2_array_avx512(y, out, len);
        return TGEM_OK;
    }
    if (isa == ISA_AVX2) {
        tgem_exp2_array_avx2(y, out, len);
        return TGEM_OK;
    }
#endif
    for (int64_t i = 0; i < len; ++i)
        out[i] = tgem_exp2_scalar(y[i]);
    return TGEM_OK;
}

/*
 * Fused multiply-add throughput probe: each of nthreads threads runs `iters` rounds of
 * independent vector FMA chains (tgem_probe_chains(isa) chains of tgem_isa_lanes(isa) lanes).
 * The caller times the call. Returns a checksum (so the work cannot be optimised away), or NaN
 * for an unsupported ISA or bad arguments.
 */
TGEM_API int tgem_probe_chains(int isa)
{
#if TGEM_X86
    if (isa == ISA_AVX512)
        return TGEM_PROBE_CHAINS_512;
    if (isa == ISA_AVX2)
        return TGEM_PROBE_CHAINS_256;
#endif
    (void)isa;
    return TGEM_PROBE_CHAINS_SCALAR;
}

TGEM_API float tgem_fma_probe(int isa, int nthreads, int64_t iters, float seed)
{
    float result[TGEM_MAX_THREADS];
    tgem_probe_ctx c;
    tgem_task_fn fn = tgem_probe_task_scalar;
    if (!tgem_isa_supported(isa) || nthreads < 1 || nthreads > TGEM_MAX_THREADS || iters < 0)
        return NAN;
#if TGEM_X86
    if (isa == ISA_AVX512)
        fn = tgem_probe_task_avx512;
    else if (isa == ISA_AVX2)
        fn = tgem_probe_task_avx2;
#endif
    c.iters = iters;
    c.seed = seed;
    c.result = result;
    tgem_parallel(nthreads, nthreads, fn, &c);
    float s = 0.0f;
    for (int i = 0; i < nthreads; ++i)
        s += result[i];
    return s;
}
