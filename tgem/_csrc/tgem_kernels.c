/*
 * tgem_kernels.c -- fused CPU kernels of T-GEM's exact masked rank-one attention.
 *
 * Plain C11 with no link to Python or PyTorch; tgem/_native.py loads the shared library with
 * ctypes and calls it on the raw float32 buffers of contiguous (N, G) tensors (N = batch x heads,
 * G = genes). For every row n, with scores s_ij = q_i k_j (no scaling):
 *
 *   q'_i     = q_i log2(e)
 *   m_i      = q'_i max_j k_j  if q_i >= 0  else  q'_i min_j k_j  (exact base-2 row maximum)
 *   e_ij     = exp(q_i k_j - max_j q_i k_j) = 2^(q'_i k_j - m_i)
 *   forward  : S0_i = sum_{j!=i} e_ij, S1_i = sum_{j!=i} e_ij v_j,
 *              [R1_i = sum_{j!=i} e_ij k_j v_j, R2_i = sum_{j!=i} e_ij k_j]       (row sums)
 *              e_diag = e_ii, Z = S0 + e_diag, inv_z = 1 / Z, out = S1 inv_z,
 *              t = (R1 - out (R2 + e_diag k)) inv_z                (dq = grad t)
 *   backward : (m from the forward pass) w1 = grad inv_z, w2 = w1 q, w3 = w2 out,
 *              C1_j = sum_{i!=j} e_ij w1_i, C2_j = ..w2_i, C3_j = ..w3_i    (column sums)
 *              dv = C1, dk = v C2 - (C3 + e_diag w3), dq = grad t
 *
 * which is, operation for operation, exact_forward / exact_backward of tgem/_attention.py. The
 * diagonal is excluded inside the sums (no cancellation against a full sum).
 *
 * Accuracy: the exponential is 2^n * p(f), n = round(y), f = y - n in [-1/2, 1/2], p a degree-6
 * polynomial (relative approximation error 1.6e-8, about 2 ulp after float32 rounding), with
 * exact power-of-two scaling that underflows gradually to zero and overflows to +inf. Sums are
 * accumulated in blocks of TGEM_JB terms that are then added to the running totals.
 *
 * Parallelism and determinism: the work is cut into tasks (row n, block of rows or columns)
 * whose decomposition does not depend on the thread count; every output element is computed
 * by exactly one task in a fixed order, so results are bitwise identical for any number of
 * threads. Threads are POSIX threads created per call; tasks are handed out dynamically.
 *
 * Dispatch: one implementation per instruction set (AVX-512F, AVX2+FMA, portable scalar), each
 * compiled with a per-function target attribute and chosen at run time by the caller from
 * tgem_isa_supported(); the library itself is built for the baseline architecture. Each lane of
 * the AVX2 and AVX-512 kernels performs the same operations in the same order, so these two
 * paths give bitwise identical results; the scalar path does not fuse multiply-adds.
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

/* exp2 on [-1/2, 1/2]: near-minimax, highest degree first */
#define TGEM_P6 1.5345811571e-04f
#define TGEM_P5 1.3399931215e-03f
#define TGEM_P4 9.6184889587e-03f
#define TGEM_P3 5.5503287770e-02f
#define TGEM_P2 2.4022646891e-01f
#define TGEM_P1 6.9314720574e-01f
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
typedef struct {
    const float *q, *k, *v;
    int64_t n, g, blocks, rows;      /* rows per task, blocks = ceil(g / rows) */
    int grad;
    float *out, *m, *inv_z, *e_diag, *t;
} tgem_fwd_ctx;

typedef struct {
    const float *q, *k, *v, *m, *inv_z, *e_diag, *out, *t, *grad;
    int64_t n, g, blocks, cols;
    float *scratch;                  /* per row n: q', m, w1, w2, w3 (5 g floats) */
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

/* Backward prologue for row n: base-2 query (bitwise that of the forward pass), the shift,
 * the three column weights and dq. ISA-independent. */
static void tgem_bwd_prologue(const void *vctx, int64_t n)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g;
    float *qs = c->scratch + 5 * o, *ms = qs + g, *w1 = ms + g, *w2 = w1 + g, *w3 = w2 + g;
    for (int64_t i = 0; i < g; ++i) {
        const float q = c->q[o + i], gr = c->grad[o + i];
        qs[i] = q * TGEM_LOG2E;
        ms[i] = c->m[o + i];
        w1[i] = gr * c->inv_z[o + i];
        w2[i] = w1[i] * q;
        w3[i] = w2[i] * c->out[o + i];
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
    y = y < TGEM_EXP2_LO ? TGEM_EXP2_LO : y; /* NaN passes through */
    y = y > TGEM_EXP2_HI ? TGEM_EXP2_HI : y;
    const float n = (y + 12582912.0f) - 12582912.0f; /* round half to even, |y| < 2^22 */
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

static void tgem_fwd_task_scalar(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * TGEM_SL;
    const int64_t o = n * g, nr = g - i0 < TGEM_SL ? g - i0 : TGEM_SL;
    const float *k = c->k + o, *v = c->v + o;
    float kmin, kmax, qs[TGEM_SL], ms[TGEM_SL];
    float z[TGEM_SL] = {0}, s1[TGEM_SL] = {0}, r1[TGEM_SL] = {0}, r2[TGEM_SL] = {0};
    tgem_minmax_scalar(k, g, &kmin, &kmax);
    for (int64_t l = 0; l < nr; ++l) {
        const float q = c->q[o + i0 + l];
        qs[l] = q * TGEM_LOG2E;
        ms[l] = q >= 0.0f ? qs[l] * kmax : qs[l] * kmin;
        c->m[o + i0 + l] = ms[l];
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        float pz[TGEM_SL] = {0}, pn[TGEM_SL] = {0}, p1[TGEM_SL] = {0}, p2[TGEM_SL] = {0};
        for (int64_t j = jb; j < je; ++j) {
            const float kj = k[j], vj = v[j], kvj = k[j] * v[j];
            for (int64_t l = 0; l < nr; ++l) {
                float p = tgem_exp2_scalar(qs[l] * kj - ms[l]);
                p = (j == i0 + l) ? 0.0f : p;
                pz[l] = pz[l] + p;
                pn[l] = pn[l] + p * vj;
                if (c->grad) {
                    p1[l] = p1[l] + p * kvj;
                    p2[l] = p2[l] + p * kj;
                }
            }
        }
        for (int64_t l = 0; l < nr; ++l) {
            z[l] += pz[l];
            s1[l] += pn[l];
            r1[l] += p1[l];
            r2[l] += p2[l];
        }
    }
    for (int64_t l = 0; l < nr; ++l) {
        const int64_t i = o + i0 + l;
        const float kr = k[i0 + l];
        const float ed = tgem_exp2_scalar(qs[l] * kr - ms[l]);
        const float iz = 1.0f / (z[l] + ed);
        const float out = s1[l] * iz;
        c->e_diag[i] = ed;
        c->inv_z[i] = iz;
        c->out[i] = out;
        if (c->grad)
            c->t[i] = (r1[l] - out * (r2[l] + ed * kr)) * iz;
    }
}

static void tgem_bwd_task_scalar(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * TGEM_SL;
    const int64_t o = n * g, nc = g - j0 < TGEM_SL ? g - j0 : TGEM_SL;
    const float *qs = c->scratch + 5 * o, *ms = qs + g, *w1 = ms + g, *w2 = w1 + g, *w3 = w2 + g;
    float c1[TGEM_SL] = {0}, c2[TGEM_SL] = {0}, c3[TGEM_SL] = {0}, kc[TGEM_SL];
    for (int64_t l = 0; l < nc; ++l)
        kc[l] = c->k[o + j0 + l];
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        float p1[TGEM_SL] = {0}, p2[TGEM_SL] = {0}, p3[TGEM_SL] = {0};
        for (int64_t i = ib; i < ie; ++i) {
            for (int64_t l = 0; l < nc; ++l) {
                float p = tgem_exp2_scalar(qs[i] * kc[l] - ms[i]);
                p = (i == j0 + l) ? 0.0f : p;
                p1[l] = p1[l] + p * w1[i];
                p2[l] = p2[l] + p * w2[i];
                p3[l] = p3[l] + p * w3[i];
            }
        }
        for (int64_t l = 0; l < nc; ++l) {
            c1[l] += p1[l];
            c2[l] += p2[l];
            c3[l] += p3[l];
        }
    }
    for (int64_t l = 0; l < nc; ++l) {
        const int64_t j = o + j0 + l;
        c->dv[j] = c1[l];
        c->dk[j] = c->v[j] * c2[l] - (c3[l] + c->e_diag[j] * w3[j0 + l]);
    }
}

#if TGEM_X86
/* ------------------------------------------------------------------------------ AVX2+FMA */
#define TGEM_T256 __attribute__((target("avx2,fma")))
#define TGEM_INLINE256 static inline __attribute__((always_inline, target("avx2,fma")))
#define NV256 2                 /* vectors of 8 lanes per task */
#define BL256 (8 * NV256)

TGEM_INLINE256 __m256 tgem_exp2_256(__m256 y)
{
    y = _mm256_max_ps(_mm256_set1_ps(TGEM_EXP2_LO), y); /* NaN (second operand) passes */
    y = _mm256_min_ps(_mm256_set1_ps(TGEM_EXP2_HI), y);
    const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(y, n);
    __m256 p = _mm256_set1_ps(TGEM_P6);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(TGEM_P0));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2); /* = p 2^n, rounded once */
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

TGEM_INLINE256 void tgem_rows_256(const float *k, const float *v, int64_t jb, int64_t je,
                                  const __m256 *qs, const __m256 *ms, const __m256i *rowidx,
                                  __m256 *pz, __m256 *pn, __m256 *p1, __m256 *p2, int grad,
                                  int masked)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m256 kj = _mm256_set1_ps(k[j]), vj = _mm256_set1_ps(v[j]);
        const __m256 kvj = _mm256_set1_ps(k[j] * v[j]);
        const __m256i jj = _mm256_set1_epi32((int32_t)j);
        for (int u = 0; u < NV256; ++u) {
            __m256 p = tgem_exp2_256(_mm256_fmsub_ps(qs[u], kj, ms[u]));
            if (masked)
                p = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(rowidx[u], jj)), p);
            pz[u] = _mm256_add_ps(pz[u], p);
            pn[u] = _mm256_fmadd_ps(p, vj, pn[u]);
            if (grad) {
                p1[u] = _mm256_fmadd_ps(p, kvj, p1[u]);
                p2[u] = _mm256_fmadd_ps(p, kj, p2[u]);
            }
        }
    }
}

TGEM_INLINE256 void tgem_fwd_256(const tgem_fwd_ctx *c, int64_t task, int grad)
{
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * BL256, o = n * g;
    const float *k = c->k + o, *v = c->v + o;
    float kmin, kmax;
    __m256 qs[NV256], ms[NV256], z[NV256], s1[NV256], r1[NV256], r2[NV256];
    __m256i tm[NV256], rowidx[NV256];
    tgem_minmax_256(k, g, &kmin, &kmax);
    const __m256 vkmin = _mm256_set1_ps(kmin), vkmax = _mm256_set1_ps(kmax);
    const __m256 zero = _mm256_setzero_ps();
    for (int u = 0; u < NV256; ++u) {
        const int64_t r0 = i0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        rowidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 q = r0 < g ? _mm256_maskload_ps(c->q + o + r0, tm[u]) : zero;
        const __m256 pos = _mm256_cmp_ps(q, zero, _CMP_GE_OQ);
        qs[u] = _mm256_mul_ps(q, _mm256_set1_ps(TGEM_LOG2E));
        ms[u] = _mm256_blendv_ps(_mm256_mul_ps(qs[u], vkmin), _mm256_mul_ps(qs[u], vkmax), pos);
        if (r0 < g)
            _mm256_maskstore_ps(c->m + o + r0, tm[u], ms[u]);
        z[u] = s1[u] = r1[u] = r2[u] = zero;
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        __m256 pz[NV256], pn[NV256], p1[NV256], p2[NV256];
        for (int u = 0; u < NV256; ++u)
            pz[u] = pn[u] = p1[u] = p2[u] = zero;
        if (jb < i0 + BL256 && je > i0)
            tgem_rows_256(k, v, jb, je, qs, ms, rowidx, pz, pn, p1, p2, grad, 1);
        else
            tgem_rows_256(k, v, jb, je, qs, ms, rowidx, pz, pn, p1, p2, grad, 0);
        for (int u = 0; u < NV256; ++u) {
            z[u] = _mm256_add_ps(z[u], pz[u]);
            s1[u] = _mm256_add_ps(s1[u], pn[u]);
            if (grad) {
                r1[u] = _mm256_add_ps(r1[u], p1[u]);
                r2[u] = _mm256_add_ps(r2[u], p2[u]);
            }
        }
    }
    for (int u = 0; u < NV256; ++u) {
        const int64_t r0 = i0 + 8 * u;
        if (r0 >= g)
            break;
        const __m256 kr = _mm256_maskload_ps(k + r0, tm[u]);
        const __m256 ed = tgem_exp2_256(_mm256_fmsub_ps(qs[u], kr, ms[u]));
        const __m256 iz = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(z[u], ed));
        const __m256 out = _mm256_mul_ps(s1[u], iz);
        _mm256_maskstore_ps(c->e_diag + o + r0, tm[u], ed);
        _mm256_maskstore_ps(c->inv_z + o + r0, tm[u], iz);
        _mm256_maskstore_ps(c->out + o + r0, tm[u], out);
        if (grad) {
            const __m256 r2d = _mm256_add_ps(r2[u], _mm256_mul_ps(ed, kr));
            const __m256 tt = _mm256_mul_ps(_mm256_sub_ps(r1[u], _mm256_mul_ps(out, r2d)), iz);
            _mm256_maskstore_ps(c->t + o + r0, tm[u], tt);
        }
    }
}

TGEM_T256 static void tgem_fwd_task_avx2(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->grad)
        tgem_fwd_256(c, task, 1);
    else
        tgem_fwd_256(c, task, 0);
}

TGEM_INLINE256 void tgem_cols_256(const float *qs, const float *ms, const float *w1,
                                  const float *w2, const float *w3, int64_t ib, int64_t ie,
                                  const __m256 *kc, const __m256i *colidx, __m256 *p1,
                                  __m256 *p2, __m256 *p3, int masked)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m256 qi = _mm256_set1_ps(qs[i]), mi = _mm256_set1_ps(ms[i]);
        const __m256 a = _mm256_set1_ps(w1[i]), b = _mm256_set1_ps(w2[i]);
        const __m256 d = _mm256_set1_ps(w3[i]);
        const __m256i ii = _mm256_set1_epi32((int32_t)i);
        for (int u = 0; u < NV256; ++u) {
            __m256 p = tgem_exp2_256(_mm256_fmsub_ps(qi, kc[u], mi));
            if (masked)
                p = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(colidx[u], ii)), p);
            p1[u] = _mm256_fmadd_ps(p, a, p1[u]);
            p2[u] = _mm256_fmadd_ps(p, b, p2[u]);
            p3[u] = _mm256_fmadd_ps(p, d, p3[u]);
        }
    }
}

TGEM_T256 static void tgem_bwd_task_avx2(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * BL256, o = n * g;
    const float *qs = c->scratch + 5 * o, *ms = qs + g, *w1 = ms + g, *w2 = w1 + g, *w3 = w2 + g;
    const __m256 zero = _mm256_setzero_ps();
    __m256 kc[NV256], c1[NV256], c2[NV256], c3[NV256];
    __m256i tm[NV256], colidx[NV256];
    for (int u = 0; u < NV256; ++u) {
        const int64_t r0 = j0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        colidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        kc[u] = r0 < g ? _mm256_maskload_ps(c->k + o + r0, tm[u]) : zero;
        c1[u] = c2[u] = c3[u] = zero;
    }
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m256 p1[NV256], p2[NV256], p3[NV256];
        for (int u = 0; u < NV256; ++u)
            p1[u] = p2[u] = p3[u] = zero;
        if (ib < j0 + BL256 && ie > j0)
            tgem_cols_256(qs, ms, w1, w2, w3, ib, ie, kc, colidx, p1, p2, p3, 1);
        else
            tgem_cols_256(qs, ms, w1, w2, w3, ib, ie, kc, colidx, p1, p2, p3, 0);
        for (int u = 0; u < NV256; ++u) {
            c1[u] = _mm256_add_ps(c1[u], p1[u]);
            c2[u] = _mm256_add_ps(c2[u], p2[u]);
            c3[u] = _mm256_add_ps(c3[u], p3[u]);
        }
    }
    for (int u = 0; u < NV256; ++u) {
        const int64_t r0 = j0 + 8 * u;
        if (r0 >= g)
            break;
        const __m256 vj = _mm256_maskload_ps(c->v + o + r0, tm[u]);
        const __m256 ed = _mm256_maskload_ps(c->e_diag + o + r0, tm[u]);
        const __m256 w3j = _mm256_maskload_ps(w3 + r0, tm[u]);
        const __m256 dk = _mm256_sub_ps(_mm256_mul_ps(vj, c2[u]),
                                        _mm256_add_ps(c3[u], _mm256_mul_ps(ed, w3j)));
        _mm256_maskstore_ps(c->dv + o + r0, tm[u], c1[u]);
        _mm256_maskstore_ps(c->dk + o + r0, tm[u], dk);
    }
}

TGEM_T256 static void tgem_exp2_array_avx2(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 8) {
        const __m256i tm = tgem_tailmask_256(len - i);
        _mm256_maskstore_ps(out + i, tm, tgem_exp2_256(_mm256_maskload_ps(y + i, tm)));
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
#define TGEM_T512 __attribute__((target("avx512f")))
#define TGEM_INLINE512 static inline __attribute__((always_inline, target("avx512f")))
#ifndef NV512
#define NV512 4                 /* vectors of 16 lanes per task */
#endif
#define BL512 (16 * NV512)

TGEM_INLINE512 __m512 tgem_exp2_512(__m512 y)
{
    y = _mm512_max_ps(_mm512_set1_ps(TGEM_EXP2_LO), y); /* NaN (second operand) passes */
    y = _mm512_min_ps(_mm512_set1_ps(TGEM_EXP2_HI), y);
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_set1_ps(TGEM_P6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(TGEM_P0));
    return _mm512_scalef_ps(p, n); /* = p 2^n, rounded once */
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

TGEM_INLINE512 void tgem_rows_512(const float *k, const float *v, int64_t jb, int64_t je,
                                  int64_t i0, const __m512 *qs, const __m512 *ms, __m512 *pz,
                                  __m512 *pn, __m512 *p1, __m512 *p2, int grad, int masked)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m512 kj = _mm512_set1_ps(k[j]), vj = _mm512_set1_ps(v[j]);
        const __m512 kvj = _mm512_set1_ps(k[j] * v[j]);
        for (int u = 0; u < NV512; ++u) {
            __m512 p = tgem_exp2_512(_mm512_fmsub_ps(qs[u], kj, ms[u]));
            if (masked) {
                const uint64_t lane = (uint64_t)(j - i0 - 16 * u);
                if (lane < 16)
                    p = _mm512_maskz_mov_ps((__mmask16)~(1u << lane), p);
            }
            pz[u] = _mm512_add_ps(pz[u], p);
            pn[u] = _mm512_fmadd_ps(p, vj, pn[u]);
            if (grad) {
                p1[u] = _mm512_fmadd_ps(p, kvj, p1[u]);
                p2[u] = _mm512_fmadd_ps(p, kj, p2[u]);
            }
        }
    }
}

TGEM_INLINE512 void tgem_fwd_512(const tgem_fwd_ctx *c, int64_t task, int grad)
{
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * BL512, o = n * g;
    const float *k = c->k + o, *v = c->v + o;
    float kmin, kmax;
    __m512 qs[NV512], ms[NV512], z[NV512], s1[NV512], r1[NV512], r2[NV512];
    __mmask16 tm[NV512];
    tgem_minmax_512(k, g, &kmin, &kmax);
    const __m512 vkmin = _mm512_set1_ps(kmin), vkmax = _mm512_set1_ps(kmax);
    const __m512 zero = _mm512_setzero_ps();
    for (int u = 0; u < NV512; ++u) {
        const int64_t r0 = i0 + 16 * u;
        tm[u] = tgem_tailmask_512(g - r0);
        const __m512 q = _mm512_maskz_loadu_ps(tm[u], c->q + o + (r0 < g ? r0 : 0));
        const __mmask16 pos = _mm512_cmp_ps_mask(q, zero, _CMP_GE_OQ);
        qs[u] = _mm512_mul_ps(q, _mm512_set1_ps(TGEM_LOG2E));
        ms[u] = _mm512_mask_blend_ps(pos, _mm512_mul_ps(qs[u], vkmin), _mm512_mul_ps(qs[u], vkmax));
        _mm512_mask_storeu_ps(c->m + o + (r0 < g ? r0 : 0), tm[u], ms[u]);
        z[u] = s1[u] = r1[u] = r2[u] = zero;
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        __m512 pz[NV512], pn[NV512], p1[NV512], p2[NV512];
        for (int u = 0; u < NV512; ++u)
            pz[u] = pn[u] = p1[u] = p2[u] = zero;
        if (jb < i0 + BL512 && je > i0)
            tgem_rows_512(k, v, jb, je, i0, qs, ms, pz, pn, p1, p2, grad, 1);
        else
            tgem_rows_512(k, v, jb, je, i0, qs, ms, pz, pn, p1, p2, grad, 0);
        for (int u = 0; u < NV512; ++u) {
            z[u] = _mm512_add_ps(z[u], pz[u]);
            s1[u] = _mm512_add_ps(s1[u], pn[u]);
            if (grad) {
                r1[u] = _mm512_add_ps(r1[u], p1[u]);
                r2[u] = _mm512_add_ps(r2[u], p2[u]);
            }
        }
    }
    for (int u = 0; u < NV512; ++u) {
        const int64_t r0 = i0 + 16 * u;
        if (r0 >= g)
            break;
        const __m512 kr = _mm512_maskz_loadu_ps(tm[u], k + r0);
        const __m512 ed = tgem_exp2_512(_mm512_fmsub_ps(qs[u], kr, ms[u]));
        const __m512 iz = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(z[u], ed));
        const __m512 out = _mm512_mul_ps(s1[u], iz);
        _mm512_mask_storeu_ps(c->e_diag + o + r0, tm[u], ed);
        _mm512_mask_storeu_ps(c->inv_z + o + r0, tm[u], iz);
        _mm512_mask_storeu_ps(c->out + o + r0, tm[u], out);
        if (grad) {
            const __m512 r2d = _mm512_add_ps(r2[u], _mm512_mul_ps(ed, kr));
            const __m512 tt = _mm512_mul_ps(_mm512_sub_ps(r1[u], _mm512_mul_ps(out, r2d)), iz);
            _mm512_mask_storeu_ps(c->t + o + r0, tm[u], tt);
        }
    }
}

TGEM_T512 static void tgem_fwd_task_avx512(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->grad)
        tgem_fwd_512(c, task, 1);
    else
        tgem_fwd_512(c, task, 0);
}

TGEM_INLINE512 void tgem_cols_512(const float *qs, const float *ms, const float *w1,
                                  const float *w2, const float *w3, int64_t ib, int64_t ie,
                                  int64_t j0, const __m512 *kc, __m512 *p1, __m512 *p2,
                                  __m512 *p3, int masked)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m512 qi = _mm512_set1_ps(qs[i]), mi = _mm512_set1_ps(ms[i]);
        const __m512 a = _mm512_set1_ps(w1[i]), b = _mm512_set1_ps(w2[i]);
        const __m512 d = _mm512_set1_ps(w3[i]);
        for (int u = 0; u < NV512; ++u) {
            __m512 p = tgem_exp2_512(_mm512_fmsub_ps(qi, kc[u], mi));
            if (masked) {
                const uint64_t lane = (uint64_t)(i - j0 - 16 * u);
                if (lane < 16)
                    p = _mm512_maskz_mov_ps((__mmask16)~(1u << lane), p);
            }
            p1[u] = _mm512_fmadd_ps(p, a, p1[u]);
            p2[u] = _mm512_fmadd_ps(p, b, p2[u]);
            p3[u] = _mm512_fmadd_ps(p, d, p3[u]);
        }
    }
}

TGEM_T512 static void tgem_bwd_task_avx512(const void *vctx, int64_t task)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, j0 = (task % c->blocks) * BL512, o = n * g;
    const float *qs = c->scratch + 5 * o, *ms = qs + g, *w1 = ms + g, *w2 = w1 + g, *w3 = w2 + g;
    const __m512 zero = _mm512_setzero_ps();
    __m512 kc[NV512], c1[NV512], c2[NV512], c3[NV512];
    __mmask16 tm[NV512];
    for (int u = 0; u < NV512; ++u) {
        const int64_t r0 = j0 + 16 * u;
        tm[u] = tgem_tailmask_512(g - r0);
        kc[u] = _mm512_maskz_loadu_ps(tm[u], c->k + o + (r0 < g ? r0 : 0));
        c1[u] = c2[u] = c3[u] = zero;
    }
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m512 p1[NV512], p2[NV512], p3[NV512];
        for (int u = 0; u < NV512; ++u)
            p1[u] = p2[u] = p3[u] = zero;
        if (ib < j0 + BL512 && ie > j0)
            tgem_cols_512(qs, ms, w1, w2, w3, ib, ie, j0, kc, p1, p2, p3, 1);
        else
            tgem_cols_512(qs, ms, w1, w2, w3, ib, ie, j0, kc, p1, p2, p3, 0);
        for (int u = 0; u < NV512; ++u) {
            c1[u] = _mm512_add_ps(c1[u], p1[u]);
            c2[u] = _mm512_add_ps(c2[u], p2[u]);
            c3[u] = _mm512_add_ps(c3[u], p3[u]);
        }
    }
    for (int u = 0; u < NV512; ++u) {
        const int64_t r0 = j0 + 16 * u;
        if (r0 >= g)
            break;
        const __m512 vj = _mm512_maskz_loadu_ps(tm[u], c->v + o + r0);
        const __m512 ed = _mm512_maskz_loadu_ps(tm[u], c->e_diag + o + r0);
        const __m512 w3j = _mm512_maskz_loadu_ps(tm[u], w3 + r0);
        const __m512 dk = _mm512_sub_ps(_mm512_mul_ps(vj, c2[u]),
                                        _mm512_add_ps(c3[u], _mm512_mul_ps(ed, w3j)));
        _mm512_mask_storeu_ps(c->dv + o + r0, tm[u], c1[u]);
        _mm512_mask_storeu_ps(c->dk + o + r0, tm[u], dk);
    }
}

TGEM_T512 static void tgem_exp2_array_avx512(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 tm = tgem_tailmask_512(len - i);
        _mm512_mask_storeu_ps(out + i, tm, tgem_exp2_512(_mm512_maskz_loadu_ps(tm, y + i)));
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
        return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

/* lanes of one vector of the path `isa` (used to turn the FMA probe into lane-operations) */
TGEM_API int tgem_isa_lanes(int isa)
{
    return isa == ISA_AVX512 ? 16 : (isa == ISA_AVX2 ? 8 : 1);
}

/* rows (forward) or columns (backward) per task of the path `isa` */
static int64_t tgem_block(int isa)
{
#if TGEM_X86
    if (isa == ISA_AVX512)
        return BL512;
    if (isa == ISA_AVX2)
        return BL256;
#endif
    (void)isa;
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
    c.rows = tgem_block(isa);
    c.blocks = (g + c.rows - 1) / c.rows;
    c.out = out; c.m = m; c.inv_z = inv_z; c.e_diag = e_diag; c.t = t;
    tgem_parallel(nthreads, n * c.blocks, fn, &c);
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
    c.cols = tgem_block(isa);
    c.blocks = (g + c.cols - 1) / c.cols;
    c.scratch = (float *)malloc((size_t)(5 * n * g) * sizeof(float));
    if (c.scratch == NULL)
        return TGEM_ENOMEM;
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
