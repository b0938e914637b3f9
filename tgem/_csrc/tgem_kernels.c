/*
 * tgem_kernels.c -- fused CPU kernels of T-GEM's exact masked rank-one attention.
 *
 * Plain C11 with no link to Python or PyTorch; tgem/_kernels/_native.py loads the shared library with
 * ctypes and calls it on the raw float32 buffers of contiguous (N, G) tensors (N = batch x heads,
 * G = genes). For every row n, with scores s_ij = q_i k_j (no scaling):
 *
 *   h_i      = q_i log2(e) rounded once to float32 (computed in double: a float32 log2(e)
 *              is 1.3e-8 too small and would bias every exponent the same way, errors that
 *              add up coherently in the key gradients)
 *   m_i      = fl(h_i k*), k* the largest key if q_i >= 0, else the smallest (closed-form
 *              base-2 row maximum)
 *   e_ij     = exp(q_i k_j - max_j q_i k_j) = 2^(h_i k_j - m_i), the exponent as one fused
 *              multiply-subtract (vector paths; the scalar path rounds the product first).
 *              Rounding h_i scales a row's exponents by 1 + d_i (|d_i| <= 2^-24): the peak
 *              term becomes 2^(d_i m_i) instead of 1, a factor common to the whole row that
 *              cancels in out = N / Z and in the gradients; what remains is d_i (s_ij - m_i),
 *              which is small where e_ij is not. The fused exponent of the peak is the
 *              product's rounding error c_i = h_i k* - m_i, up to half an ulp of m_i: also a
 *              factor 2^c_i common to the row, but one that overflows (c_i > 128) or wipes
 *              out the whole row (c_i < -150) once |m_i| passes 2^32 (scores from inputs of
 *              about 2e4 on). Rows n with some |m_i| >= TGEM_FUSED_MAX (2^24, |c_i| <= 0.5)
 *              therefore round the product first in every path, as the scalar path always
 *              does: fl(h_i k_j) <= m_i by monotone rounding, so every exponent is <= 0 and
 *              the peak term is exactly 1. The choice is made per row n from m alone, in
 *              the forward and the backward prologue alike, so both passes compute the same
 *              exponents
 *   forward  : Z_i = sum_{j!=i} e_ij + e_ii, inv_z = 1 / Z, out_i = sum_{j!=i} e_ij v_j inv_z
 *   backward : w1 = grad inv_z, w2 = w1 q, D_ij = e_ij (v_j - out_i) for j != i (element by
 *              element, as the plain softmax backward: the gradients are covariances under
 *              the attention distribution and would cancel as differences of plain sums),
 *              dv_j = sum_{i!=j} e_ij w1_i,  dk_j = sum_{i!=j} D_ij w2_i - e_jj out_j w2_j,
 *              dq_i = w1_i (sum_{j!=i} D_ij k_j - e_ii out_i k_i)
 *
 * which is the algorithm of exact_forward / exact_backward in tgem/_kernels/_exact.py (that
 * path keeps q log2(e) as two float32 terms, because its exponents come out of a float32 matrix
 * product rather than one fused multiply-subtract; its exponential is torch.exp2). The
 * diagonal is excluded inside the sums (not subtracted afterwards). The backward pass runs
 * over key blocks (columns); the query gradient's row sums are added key block by key block,
 * in block order, either by one task per row (memory O(n g) plus one g x lanes work buffer
 * per running task) or, when there are few rows per thread, from per-block partials at the
 * end (the same additions). The AVX-512 path keeps these partial row sums as 16-lane vectors,
 * added lane by lane across key blocks and reduced across lanes once per row (a horizontal
 * reduction per row and key block cost about 2 of the 14 vector operations per gene pair).
 *
 * Accuracy: the exponential is 2^y = 2^n p(f), n = floor(y), f = y - n in [0, 1), p a degree-5
 * polynomial (relative approximation error 8.2e-8; at most 1.2 ulp (1.4e-7) after the float32
 * Horner evaluation with fused multiply-adds, 1.6e-7 without), with
 * exact power-of-two scaling that underflows gradually to zero and overflows to +inf (inside
 * the kernels' threads, which run with flush-to-zero on x86, results below 2^-126 are 0: see
 * tgem_fp_enter; tgem_exp2, the accuracy tests' entry point, runs on the caller's settings).
 * Sums are accumulated in blocks of TGEM_JB terms that are then added to the running totals.
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

#define TGEM_ABI_VERSION 3

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { TGEM_OK = 0, TGEM_EARGS = -1, TGEM_EISA = -2, TGEM_ENOMEM = -3 };

#define TGEM_JB 128                  /* terms per partial sum (blocked accumulation) */
#define TGEM_PARTIAL_BYTES (64.0 * 1024 * 1024) /* cap on the backward's per-block partials */
#define TGEM_EXP2_LO (-150.0f)       /* 2^-150 rounds to 0: everything below underflows */
#define TGEM_EXP2_HI 128.0f          /* 2^128 overflows to +inf */
#define TGEM_FUSED_MAX 16777216.0f   /* 2^24: row maxima below it use the fused exponent */

/* 2^f on [0, 1): near-minimax relative error 8.2e-8 with these float32 coefficients (fitted
 * by iteratively reweighted least squares on the relative error); p(0) = 1 exactly, so
 * 2^integer is exact. Degree 5 rather than 6: one fused multiply-add less per gene pair in
 * each pass (about 5 % of the kernel's work) for 1.2 instead of 0.75 ulp. */
#define TGEM_P5 1.8671263242140412e-03f
#define TGEM_P4 9.0170381590724e-03f
#define TGEM_P3 5.579990893602371e-02f
#define TGEM_P2 2.4016445875167847e-01f
#define TGEM_P1 6.931512951850891e-01f
#define TGEM_P0 1.0f

/* ------------------------------------------------------------------------------ threads */
typedef void (*tgem_task_fn)(const void *ctx, int64_t task);

/* Floating-point state of the kernels' threads: flush-to-zero and denormals-are-zero (x86).
 * Scores far below a row's maximum give exponentials below 2^-126; with gradual underflow
 * every operation that produces or reads such a subnormal float takes a microcode assist
 * (about 100 cycles), which made a training step 6-25x slower once attention sharpened
 * (query and key weights x30 and x300). Flushed, those terms are 0: they are below 2^-126
 * of a row maximum term of 1, so the sums are unchanged to float32 rounding, and the
 * PyTorch paths drop the same terms (they clamp the exponent instead, ATen's threads never
 * seeing this setting). Every thread that runs tasks, the caller included, sets the mode for
 * the duration of the call; the caller's own state is restored before the call returns. */
#if TGEM_X86 && defined(__SSE__)
#define TGEM_FTZ_DAZ 0x8040u /* MXCSR bits: FTZ (15) and DAZ (6) */
typedef unsigned int tgem_fpstate;
static tgem_fpstate tgem_fp_enter(void)
{
    const tgem_fpstate saved = _mm_getcsr();
    _mm_setcsr(saved | TGEM_FTZ_DAZ);
    return saved;
}
static void tgem_fp_leave(tgem_fpstate saved) { _mm_setcsr(saved); }
#else /* other platforms: gradual underflow, as before (the results are the same) */
typedef int tgem_fpstate;
static tgem_fpstate tgem_fp_enter(void) { return 0; }
static void tgem_fp_leave(tgem_fpstate saved) { (void)saved; }
#endif

typedef struct {
    tgem_task_fn fn;
    const void *ctx;
    int64_t ntasks;
    atomic_llong next;
} tgem_job;

static void *tgem_worker(void *arg)
{
    tgem_job *job = (tgem_job *)arg;
    const tgem_fpstate saved = tgem_fp_enter();
    for (;;) {
        const int64_t task = (int64_t)atomic_fetch_add(&job->next, 1);
        if (task >= job->ntasks)
            break;
        job->fn(job->ctx, task);
    }
    tgem_fp_leave(saved);
    return NULL;
}

#define TGEM_MAX_THREADS 256

/* Run fn(ctx, 0 .. ntasks-1) on up to nthreads threads (the caller is one of them), each with
 * flush-to-zero set for the call (see tgem_fp_enter). */
void tgem_parallel(int nthreads, int64_t ntasks, tgem_task_fn fn, const void *ctx)
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
    float *scratch;                  /* per row n: h (g) */
    unsigned char *rounded;          /* per row n: exponents from rounded products (see top) */
    float *out, *m, *inv_z, *e_diag;
} tgem_fwd_ctx;

typedef struct {
    const float *q, *k, *v, *m, *inv_z, *e_diag, *out, *grad;
    int64_t n, g, blocks, cols;
    int rowwise;                     /* one task per row n (dq summed in place) or per block */
    int lanes;                       /* lanes of a partial dq sum: the key-block function
                                        leaves sum_j D_ij k_j as a vector of this many lanes
                                        (added lane by lane across key blocks, reduced across
                                        lanes once per row) */
    float *scratch;                  /* per row n: h, w1, w2 (3 g) */
    float *dqpart;                   /* block tasks only: per row n and key block, the partial
                                        sums_j D_ij k_j (g x lanes) */
    unsigned char *rounded;          /* per row n: as the forward's, from m */
    float *dq, *dk, *dv;
    atomic_int *failed;              /* set by a task whose work buffer could not be allocated */
} tgem_bwd_ctx;

/* -0 and +0 compare equal; make the result independent of the reduction order */
TGEM_INLINE float tgem_canon_zero(float x) { return x == 0.0f ? 0.0f : x; }

/* smallest and largest of k[0 .. g-1] (g >= 1), as vector min/max take them (x < m ? x : m);
 * four lanes at a time on x86 (SSE2 is part of the baseline), where one running pair of
 * scalars would be a chain of dependent compares */
static void tgem_minmax_scalar(const float *k, int64_t g, float *kmin, float *kmax)
{
    float lo = k[0], hi = k[0];
    int64_t j = 0;
#if TGEM_X86
    __m128 vlo = _mm_set1_ps(k[0]), vhi = vlo;
    for (; j + 4 <= g; j += 4) {
        const __m128 x = _mm_loadu_ps(k + j);
        vlo = _mm_min_ps(x, vlo);
        vhi = _mm_max_ps(x, vhi);
    }
    float l4[4], h4[4];
    _mm_storeu_ps(l4, vlo);
    _mm_storeu_ps(h4, vhi);
    for (int u = 0; u < 4; ++u) {
        lo = l4[u] < lo ? l4[u] : lo;
        hi = h4[u] > hi ? h4[u] : hi;
    }
#endif
    for (; j < g; ++j) {
        lo = k[j] < lo ? k[j] : lo;
        hi = k[j] > hi ? k[j] : hi;
    }
    *kmin = tgem_canon_zero(lo);
    *kmax = tgem_canon_zero(hi);
}

/* h = q log2(e), each rounded once from the double product */
static void tgem_scale_queries(const float *q, int64_t g, float *h)
{
    for (int64_t i = 0; i < g; ++i)
        h[i] = (float)((double)q[i] * 1.4426950408889634);
}

/* 1 when a row maximum of m[0 .. g-1] is too large (or not a number) for fused exponents */
static unsigned char tgem_needs_rounding(const float *m, int64_t g)
{
    int big = 0; /* no early exit: the loop vectorises */
    for (int64_t i = 0; i < g; ++i)
        big |= !(fabsf(m[i]) < TGEM_FUSED_MAX);
    return (unsigned char)big;
}

/* Forward prologue for row n: scaled queries, the closed-form row maxima m (the largest key
 * for q_i >= 0, else the smallest, times h_i) and the row's choice of exponent. */
static void tgem_fwd_prologue(const void *vctx, int64_t n)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g;
    const float *q = c->q + o;
    float *h = c->scratch + o, *m = c->m + o, kmin, kmax;
    tgem_scale_queries(q, g, h);
    tgem_minmax_scalar(c->k + o, g, &kmin, &kmax);
    for (int64_t i = 0; i < g; ++i)
        m[i] = h[i] * (q[i] >= 0.0f ? kmax : kmin);
    c->rounded[n] = tgem_needs_rounding(m, g);
}

/* Backward prologue for row n: scaled queries and the gradient weights. ISA-independent. */
static void tgem_bwd_prologue(const void *vctx, int64_t n)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g;
    float *hs = c->scratch + 3 * o, *w1 = hs + g, *w2 = w1 + g;
    tgem_scale_queries(c->q + o, g, hs);
    c->rounded[n] = tgem_needs_rounding(c->m + o, g);
    for (int64_t i = 0; i < g; ++i) {
        w1[i] = c->grad[o + i] * c->inv_z[o + i];
        w2[i] = w1[i] * c->q[o + i];
    }
}

#define TGEM_MAX_LANES 16

/* Sum of `lanes` (a power of two, at most TGEM_MAX_LANES) partial sums in a fixed pairwise
 * order; the row tasks and the epilogue both reduce with it. */
static float tgem_lanesum(const float *x, int lanes)
{
    float t[TGEM_MAX_LANES];
    memcpy(t, x, (size_t)lanes * sizeof(float));
    for (int w = lanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l)
            t[l] = t[l] + t[l + w];
    return t[0];
}

/* Backward epilogue for row n: dq from the per-block partial sums, added in block order (by
 * the row task itself, or here from the block tasks' partials: the same additions). */
static void tgem_bwd_epilogue(const void *vctx, int64_t n)
{
    const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;
    const int64_t g = c->g, o = n * g, lanes = c->lanes;
    const float *w1 = c->scratch + 3 * o + g;
    const float *part = c->rowwise ? NULL : c->dqpart + n * c->blocks * g * lanes;
    for (int64_t i = 0; i < g; ++i) {
        float s;
        if (c->rowwise) { /* the row task already added the blocks, in the same order */
            s = c->dq[o + i];
        } else if (lanes == 1) {
            s = part[i];
            for (int64_t b = 1; b < c->blocks; ++b)
                s += part[b * g + i];
        } else {
            float acc[TGEM_MAX_LANES];
            memcpy(acc, part + i * lanes, (size_t)lanes * sizeof(float));
            for (int64_t b = 1; b < c->blocks; ++b)
                for (int64_t l = 0; l < lanes; ++l)
                    acc[l] += part[(b * g + i) * lanes + l];
            s = tgem_lanesum(acc, (int)lanes);
        }
        c->dq[o + i] = w1[i] * (s - (c->e_diag[o + i] * c->out[o + i]) * c->k[o + i]);
    }
}

/* One backward task: a whole row n (key blocks in order, dq summed in place in c->dq, or,
 * for vector partials, in a work buffer of g x lanes reduced across lanes at the end), or one
 * (row, key block) whose partial dq sums go to c->dqpart. Both add the same numbers in the
 * same order, so the choice (made from the sizes and the thread count) never changes a bit. */
#define TGEM_BWD_TASK(name, block_fn, attr)                                                    \
    attr static void name(const void *vctx, int64_t task)                                    \
    {                                                                                         \
        const tgem_bwd_ctx *c = (const tgem_bwd_ctx *)vctx;                                   \
        const int64_t g = c->g, lanes = c->lanes;                                             \
        if (c->rowwise) {                                                                     \
            float *dqv = lanes == 1 ? c->dq + task * g                                        \
                                    : (float *)malloc((size_t)(g * lanes) * sizeof(float));   \
            if (dqv == NULL) {                                                                \
                atomic_store(c->failed, 1);                                                   \
                return;                                                                       \
            }                                                                                 \
            for (int64_t blk = 0; blk < c->blocks; ++blk)                                     \
                block_fn(c, task, blk, dqv, blk > 0);                                         \
            if (lanes > 1) {                                                                  \
                for (int64_t i = 0; i < g; ++i)                                               \
                    c->dq[task * g + i] = tgem_lanesum(dqv + i * lanes, (int)lanes);          \
                free(dqv);                                                                    \
            }                                                                                 \
        } else {                                                                              \
            const int64_t n = task / c->blocks, blk = task % c->blocks;                       \
            block_fn(c, n, blk, c->dqpart + (n * c->blocks + blk) * g * lanes, 0);            \
        }                                                                                     \
    }

/* dk of key j from its column sum (the same formula in every path) */
TGEM_INLINE float tgem_dk_final(const tgem_bwd_ctx *c, int64_t j, float sum_dw2)
{
    const float *w2 = c->scratch + 3 * (j - j % c->g) + 2 * c->g;
    return sum_dw2 - (c->e_diag[j] * c->out[j]) * w2[j % c->g];
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
    float p = TGEM_P5;
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
    const float *hs = c->scratch + o;
    float qh[TGEM_SL], ms[TGEM_SL];
    float z[TGEM_SL] = {0}, s1[TGEM_SL] = {0};
    for (int64_t l = 0; l < nr; ++l) {
        qh[l] = hs[i0 + l];
        ms[l] = c->m[o + i0 + l];
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        float pz[TGEM_SL] = {0}, pn[TGEM_SL] = {0};
        for (int64_t j = jb; j < je; ++j) {
            const float kj = k[j], vj = v[j];
            for (int64_t l = 0; l < nr; ++l) {
                float p = tgem_exp2_scalar(qh[l] * kj - ms[l]);
                p = (j == i0 + l) ? 0.0f : p;
                pz[l] = pz[l] + p;
                pn[l] = pn[l] + p * vj;
            }
        }
        for (int64_t l = 0; l < nr; ++l) {
            z[l] += pz[l];
            s1[l] += pn[l];
        }
    }
    for (int64_t l = 0; l < nr; ++l) {
        const int64_t i = o + i0 + l;
        const float kr = k[i0 + l];
        const float ed = tgem_exp2_scalar(qh[l] * kr - ms[l]);
        const float iz = 1.0f / (z[l] + ed);
        c->e_diag[i] = ed;
        c->inv_z[i] = iz;
        c->out[i] = s1[l] * iz;
    }
}

/* Backward work of row n, key block blk: dv and dk of the block's keys, and the block's
 * partial dq row sums written to dqp (acc = 0) or added to it (acc = 1). */
static void tgem_bwd_block_scalar(const tgem_bwd_ctx *c, int64_t n, int64_t blk, float *dqp,
                                  int acc)
{
    const int64_t g = c->g, j0 = blk * TGEM_SL;
    const int64_t o = n * g, nc = g - j0 < TGEM_SL ? g - j0 : TGEM_SL;
    const float *hs = c->scratch + 3 * o, *w1 = hs + g, *w2 = w1 + g;
    const float *ms = c->m + o, *out = c->out + o;
    float cv[TGEM_SL] = {0}, ck[TGEM_SL] = {0}, kc[TGEM_SL], vc[TGEM_SL];
    for (int64_t l = 0; l < nc; ++l) {
        kc[l] = c->k[o + j0 + l];
        vc[l] = c->v[o + j0 + l];
    }
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        float pv[TGEM_SL] = {0}, pk[TGEM_SL] = {0};
        for (int64_t i = ib; i < ie; ++i) {
            float dq = 0.0f;
            for (int64_t l = 0; l < nc; ++l) {
                float p = tgem_exp2_scalar(hs[i] * kc[l] - ms[i]);
                p = (i == j0 + l) ? 0.0f : p;
                const float d = p * (vc[l] - out[i]);
                pv[l] = pv[l] + p * w1[i];
                pk[l] = pk[l] + d * w2[i];
                dq = dq + d * kc[l];
            }
            dqp[i] = acc ? dqp[i] + dq : dq;
        }
        for (int64_t l = 0; l < nc; ++l) {
            cv[l] += pv[l];
            ck[l] += pk[l];
        }
    }
    for (int64_t l = 0; l < nc; ++l) {
        c->dv[o + j0 + l] = cv[l];
        c->dk[o + j0 + l] = tgem_dk_final(c, o + j0 + l, ck[l]);
    }
}


TGEM_BWD_TASK(tgem_bwd_task_scalar, tgem_bwd_block_scalar, )

#if TGEM_X86

/* ------------------------------------------------------------------------------ AVX2+FMA */
#define TGEM_T256 __attribute__((target("avx2,fma")))
#define TGEM_INLINE256 static inline __attribute__((always_inline, target("avx2,fma")))
#ifndef NVI256
#define NVI256 4                /* vectors of 8 lanes per task: forward */
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
        p[u] = _mm256_fmadd_ps(_mm256_set1_ps(TGEM_P5), y[u], _mm256_set1_ps(TGEM_P4));
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

/* exponent h k - m: one fused multiply-subtract, or the product rounded first (see top) */
TGEM_INLINE256 __m256 tgem_exponent_256(__m256 h, __m256 k, __m256 m, int rounded)
{
    return rounded ? _mm256_sub_ps(_mm256_mul_ps(h, k), m) : _mm256_fmsub_ps(h, k, m);
}

TGEM_INLINE256 void tgem_rows_256(const float *k, const float *v, int64_t jb, int64_t je,
                                  const __m256 *qh, const __m256 *ms,
                                  const __m256i *rowidx, __m256 *az, __m256 *an, int masked,
                                  int rounded)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m256 kj = _mm256_set1_ps(k[j]), vj = _mm256_set1_ps(v[j]);
        const __m256i jj = _mm256_set1_epi32((int32_t)j);
        __m256 e[NVMAX256];
        for (int u = 0; u < NVI256; ++u)
            e[u] = tgem_exponent_256(qh[u], kj, ms[u], rounded);
        tgem_exp2n_256(e, NVI256);
        if (masked)
            for (int u = 0; u < NVI256; ++u)
                e[u] = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(rowidx[u], jj)),
                                        e[u]);
        for (int u = 0; u < NVI256; ++u) {
            az[u] = _mm256_add_ps(az[u], e[u]);
            an[u] = _mm256_fmadd_ps(e[u], vj, an[u]);
        }
    }
}

/* forward task body; `rounded` is a constant in each of the two functions below */
TGEM_INLINE256 void tgem_fwd_body_avx2(const void *vctx, int64_t task, const int rounded)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * 8 * NVI256;
    const int64_t o = n * g;
    const float *k = c->k + o, *v = c->v + o, *hs = c->scratch + o;
    __m256 qh[NVMAX256], ms[NVMAX256], z[NVMAX256], s1[NVMAX256];
    __m256i tm[NVMAX256], rowidx[NVMAX256];
    const __m256 zero = _mm256_setzero_ps();
    for (int u = 0; u < NVI256; ++u) {
        const int64_t r0 = i0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        rowidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        qh[u] = r0 < g ? _mm256_maskload_ps(hs + r0, tm[u]) : zero;
        ms[u] = r0 < g ? _mm256_maskload_ps(c->m + o + r0, tm[u]) : zero;
        z[u] = s1[u] = zero;
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        const int masked = jb < i0 + 8 * NVI256 && je > i0;
        __m256 az[NVMAX256], an[NVMAX256];
        for (int u = 0; u < NVI256; ++u)
            az[u] = an[u] = zero;
        if (masked) /* constant arguments: a specialised copy of the loop each */
            tgem_rows_256(k, v, jb, je, qh, ms, rowidx, az, an, 1, rounded);
        else
            tgem_rows_256(k, v, jb, je, qh, ms, rowidx, az, an, 0, rounded);
        for (int u = 0; u < NVI256; ++u) {
            z[u] = _mm256_add_ps(z[u], az[u]);
            s1[u] = _mm256_add_ps(s1[u], an[u]);
        }
    }
    for (int u = 0; u < NVI256; ++u) {
        const int64_t r0 = i0 + 8 * u;
        if (r0 >= g)
            break;
        const __m256 kr = _mm256_maskload_ps(k + r0, tm[u]);
        __m256 ed = tgem_exponent_256(qh[u], kr, ms[u], rounded);
        tgem_exp2n_256(&ed, 1);
        const __m256 iz = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(z[u], ed));
        _mm256_maskstore_ps(c->e_diag + o + r0, tm[u], ed);
        _mm256_maskstore_ps(c->inv_z + o + r0, tm[u], iz);
        _mm256_maskstore_ps(c->out + o + r0, tm[u], _mm256_mul_ps(s1[u], iz));
    }
}

/* the rows of large scores in a function of their own, so that the common one keeps its
 * code (and speed) as it was */
TGEM_T256 __attribute__((noinline)) static void tgem_fwd_rounded_avx2(const void *vctx, int64_t task)
{
    tgem_fwd_body_avx2(vctx, task, 1);
}

TGEM_T256 static void tgem_fwd_task_avx2(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->rounded[task / c->blocks])
        tgem_fwd_rounded_avx2(vctx, task);
    else
        tgem_fwd_body_avx2(vctx, task, 0);
}

TGEM_INLINE256 float tgem_hsum_256(__m256 x)
{
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* keys in lanes, queries i in [ib, ie): accumulates dv (av) and dk (ak) column sums and
 * writes the partial dq row sums of this key block */
TGEM_INLINE256 void tgem_cols_256(const float *hs, const float *ms,
                                  const float *w1, const float *w2, const float *out,
                                  int64_t ib, int64_t ie, const __m256 *kc, const __m256 *vc,
                                  const __m256i *colidx, const __m256i *tm, __m256 *av,
                                  __m256 *ak, float *dqp, int acc, int masked, int rounded)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m256 hi = _mm256_set1_ps(hs[i]);
        const __m256 mi = _mm256_set1_ps(ms[i]), oi = _mm256_set1_ps(out[i]);
        const __m256 a = _mm256_set1_ps(w1[i]), b = _mm256_set1_ps(w2[i]);
        const __m256i ii = _mm256_set1_epi32((int32_t)i);
        __m256 e[NVMAX256], dsum = _mm256_setzero_ps();
        for (int u = 0; u < NVB256; ++u)
            e[u] = tgem_exponent_256(hi, kc[u], mi, rounded);
        tgem_exp2n_256(e, NVB256);
        if (masked)
            for (int u = 0; u < NVB256; ++u)
                e[u] = _mm256_and_ps(_mm256_andnot_ps(_mm256_castsi256_ps(
                           _mm256_cmpeq_epi32(colidx[u], ii)), e[u]), _mm256_castsi256_ps(tm[u]));
        for (int u = 0; u < NVB256; ++u) {
            const __m256 d = _mm256_mul_ps(e[u], _mm256_sub_ps(vc[u], oi));
            av[u] = _mm256_fmadd_ps(e[u], a, av[u]);
            ak[u] = _mm256_fmadd_ps(d, b, ak[u]);
            dsum = u == 0 ? _mm256_mul_ps(d, kc[0]) : _mm256_fmadd_ps(d, kc[u], dsum);
        }
        const float r = tgem_hsum_256(dsum);
        dqp[i] = acc ? dqp[i] + r : r;
    }
}

TGEM_T256 static void tgem_bwd_block_avx2(const tgem_bwd_ctx *c, int64_t n, int64_t blk,
                                          float *dqp, int acc)
{
    const int64_t g = c->g;
    const int64_t j0 = blk * 8 * NVB256, o = n * g;
    const float *hs = c->scratch + 3 * o, *w1 = hs + g, *w2 = w1 + g;
    const int tail = j0 + 8 * NVB256 > g;
    const __m256 zero = _mm256_setzero_ps();
    __m256 kc[NVMAX256], vc[NVMAX256], cv[NVMAX256], ck[NVMAX256];
    __m256i tm[NVMAX256], colidx[NVMAX256];
    for (int u = 0; u < NVB256; ++u) {
        const int64_t r0 = j0 + 8 * u;
        tm[u] = tgem_tailmask_256(g - r0);
        colidx[u] = _mm256_add_epi32(_mm256_set1_epi32((int32_t)r0),
                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        kc[u] = r0 < g ? _mm256_maskload_ps(c->k + o + r0, tm[u]) : zero;
        vc[u] = r0 < g ? _mm256_maskload_ps(c->v + o + r0, tm[u]) : zero;
        cv[u] = ck[u] = zero;
    }
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m256 av[NVMAX256], ak[NVMAX256];
        for (int u = 0; u < NVB256; ++u)
            av[u] = ak[u] = zero;
        const int masked = tail || (ib < j0 + 8 * NVB256 && ie > j0);
        if (c->rounded[n])
            tgem_cols_256(hs, c->m + o, w1, w2, c->out + o, ib, ie, kc, vc, colidx, tm, av,
                          ak, dqp, acc, masked, 1);
        else if (masked)
            tgem_cols_256(hs, c->m + o, w1, w2, c->out + o, ib, ie, kc, vc, colidx, tm, av,
                          ak, dqp, acc, 1, 0);
        else
            tgem_cols_256(hs, c->m + o, w1, w2, c->out + o, ib, ie, kc, vc, colidx, tm, av,
                          ak, dqp, acc, 0, 0);
        for (int u = 0; u < NVB256; ++u) {
            cv[u] = _mm256_add_ps(cv[u], av[u]);
            ck[u] = _mm256_add_ps(ck[u], ak[u]);
        }
    }
    for (int u = 0; u < NVB256; ++u) {
        const int64_t r0 = j0 + 8 * u;
        if (r0 >= g)
            break;
        float sk[8];
        _mm256_storeu_ps(sk, ck[u]);
        _mm256_maskstore_ps(c->dv + o + r0, tm[u], cv[u]);
        for (int l = 0; l < 8 && r0 + l < g; ++l)
            c->dk[o + r0 + l] = tgem_dk_final(c, o + r0 + l, sk[l]);
    }
}

TGEM_BWD_TASK(tgem_bwd_task_avx2, tgem_bwd_block_avx2, TGEM_T256)

TGEM_T256 static void tgem_exp2_array_avx2(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 8) {
        const __m256i tm = tgem_tailmask_256(len - i);
        __m256 x = _mm256_maskload_ps(y + i, tm);
        tgem_exp2n_256(&x, 1);
        _mm256_maskstore_ps(out + i, tm, x);
    }
}

/* ------------------------------------------------------------------------------ AVX-512F */
#define TGEM_T512 __attribute__((target("avx512f,avx512dq")))
#define TGEM_INLINE512 static inline __attribute__((always_inline, target("avx512f,avx512dq")))
#ifndef NVI512
#define NVI512 4                /* vectors of 16 lanes per task: forward */
#endif
#ifndef NVB512
#define NVB512 4                /* backward */
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
        p[u] = _mm512_fmadd_ps(_mm512_set1_ps(TGEM_P5), f[u], _mm512_set1_ps(TGEM_P4));
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

/* exponent h k - m: one fused multiply-subtract, or the product rounded first (see top) */
TGEM_INLINE512 __m512 tgem_exponent_512(__m512 h, __m512 k, __m512 m, int rounded)
{
    return rounded ? _mm512_sub_ps(_mm512_mul_ps(h, k), m) : _mm512_fmsub_ps(h, k, m);
}

TGEM_INLINE512 void tgem_rows_512(const float *k, const float *v, int64_t jb, int64_t je,
                                  int64_t i0, const __m512 *qh, const __m512 *ms,
                                  __m512 *az, __m512 *an, int masked, int rounded)
{
    for (int64_t j = jb; j < je; ++j) {
        const __m512 kj = _mm512_set1_ps(k[j]), vj = _mm512_set1_ps(v[j]);
        __m512 e[NVMAX512];
        for (int u = 0; u < NVI512; ++u)
            e[u] = tgem_exponent_512(qh[u], kj, ms[u], rounded);
        tgem_exp2n_512(e, NVI512);
        if (masked) {
            for (int u = 0; u < NVI512; ++u) {
                const uint64_t lane = (uint64_t)(j - i0 - 16 * u);
                if (lane < 16)
                    e[u] = _mm512_maskz_mov_ps((__mmask16)~(1u << lane), e[u]);
            }
        }
        for (int u = 0; u < NVI512; ++u) {
            az[u] = _mm512_add_ps(az[u], e[u]);
            an[u] = _mm512_fmadd_ps(e[u], vj, an[u]);
        }
    }
}

/* forward task body; `rounded` is a constant in each of the two functions below */
TGEM_INLINE512 void tgem_fwd_body_avx512(const void *vctx, int64_t task, const int rounded)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    const int64_t g = c->g, n = task / c->blocks, i0 = (task % c->blocks) * 16 * NVI512;
    const int64_t o = n * g;
    const float *k = c->k + o, *v = c->v + o, *hs = c->scratch + o;
    __m512 qh[NVMAX512], ms[NVMAX512], z[NVMAX512], s1[NVMAX512];
    __mmask16 tm[NVMAX512];
    const __m512 zero = _mm512_setzero_ps();
    for (int u = 0; u < NVI512; ++u) {
        const int64_t r0 = i0 + 16 * u, r = r0 < g ? r0 : 0;
        tm[u] = tgem_tailmask_512(g - r0);
        qh[u] = _mm512_maskz_loadu_ps(tm[u], hs + r);
        ms[u] = _mm512_maskz_loadu_ps(tm[u], c->m + o + r);
        z[u] = s1[u] = zero;
    }
    for (int64_t jb = 0; jb < g; jb += TGEM_JB) {
        const int64_t je = jb + TGEM_JB < g ? jb + TGEM_JB : g;
        const int masked = jb < i0 + 16 * NVI512 && je > i0;
        __m512 az[NVMAX512], an[NVMAX512];
        for (int u = 0; u < NVI512; ++u)
            az[u] = an[u] = zero;
        if (masked) /* constant arguments: a specialised copy of the loop each */
            tgem_rows_512(k, v, jb, je, i0, qh, ms, az, an, 1, rounded);
        else
            tgem_rows_512(k, v, jb, je, i0, qh, ms, az, an, 0, rounded);
        for (int u = 0; u < NVI512; ++u) {
            z[u] = _mm512_add_ps(z[u], az[u]);
            s1[u] = _mm512_add_ps(s1[u], an[u]);
        }
    }
    for (int u = 0; u < NVI512; ++u) {
        const int64_t r0 = i0 + 16 * u;
        if (r0 >= g)
            break;
        const __m512 kr = _mm512_maskz_loadu_ps(tm[u], k + r0);
        __m512 ed = tgem_exponent_512(qh[u], kr, ms[u], rounded);
        tgem_exp2n_512(&ed, 1);
        const __m512 iz = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(z[u], ed));
        _mm512_mask_storeu_ps(c->e_diag + o + r0, tm[u], ed);
        _mm512_mask_storeu_ps(c->inv_z + o + r0, tm[u], iz);
        _mm512_mask_storeu_ps(c->out + o + r0, tm[u], _mm512_mul_ps(s1[u], iz));
    }
}

/* the rows of large scores in a function of their own, so that the common one keeps its
 * code (and speed) as it was */
TGEM_T512 __attribute__((noinline)) static void tgem_fwd_rounded_avx512(const void *vctx, int64_t task)
{
    tgem_fwd_body_avx512(vctx, task, 1);
}

TGEM_T512 static void tgem_fwd_task_avx512(const void *vctx, int64_t task)
{
    const tgem_fwd_ctx *c = (const tgem_fwd_ctx *)vctx;
    if (c->rounded[task / c->blocks])
        tgem_fwd_rounded_avx512(vctx, task);
    else
        tgem_fwd_body_avx512(vctx, task, 0);
}

/* keys in lanes, queries i in [ib, ie): see tgem_cols_256 */
TGEM_INLINE512 void tgem_cols_512(const float *hs, const float *ms,
                                  const float *w1, const float *w2, const float *out,
                                  int64_t ib, int64_t ie, int64_t j0, const __m512 *kc,
                                  const __m512 *vc, const __mmask16 *tm, __m512 *av,
                                  __m512 *ak, float *dqp, int acc, int masked, int rounded)
{
    for (int64_t i = ib; i < ie; ++i) {
        const __m512 hi = _mm512_set1_ps(hs[i]);
        const __m512 mi = _mm512_set1_ps(ms[i]), oi = _mm512_set1_ps(out[i]);
        const __m512 a = _mm512_set1_ps(w1[i]), b = _mm512_set1_ps(w2[i]);
        __m512 e[NVMAX512], dsum = _mm512_setzero_ps();
        for (int u = 0; u < NVB512; ++u)
            e[u] = tgem_exponent_512(hi, kc[u], mi, rounded);
        tgem_exp2n_512(e, NVB512);
        if (masked) {
            for (int u = 0; u < NVB512; ++u) {
                const uint64_t lane = (uint64_t)(i - j0 - 16 * u);
                const __mmask16 keep = lane < 16 ? (__mmask16)(tm[u] & ~(1u << lane)) : tm[u];
                e[u] = _mm512_maskz_mov_ps(keep, e[u]);
            }
        }
        for (int u = 0; u < NVB512; ++u) {
            const __m512 d = _mm512_mul_ps(e[u], _mm512_sub_ps(vc[u], oi));
            av[u] = _mm512_fmadd_ps(e[u], a, av[u]);
            ak[u] = _mm512_fmadd_ps(d, b, ak[u]);
            dsum = u == 0 ? _mm512_mul_ps(d, kc[0]) : _mm512_fmadd_ps(d, kc[u], dsum);
        }
        float *dp = dqp + 16 * i; /* 16-lane partial, reduced once per row (tgem_lanesum) */
        _mm512_storeu_ps(dp, acc ? _mm512_add_ps(_mm512_loadu_ps(dp), dsum) : dsum);
    }
}

TGEM_T512 static void tgem_bwd_block_avx512(const tgem_bwd_ctx *c, int64_t n, int64_t blk,
                                            float *dqp, int acc)
{
    const int64_t g = c->g;
    const int64_t j0 = blk * 16 * NVB512, o = n * g;
    const float *hs = c->scratch + 3 * o, *w1 = hs + g, *w2 = w1 + g;
    const int tail = j0 + 16 * NVB512 > g;
    const __m512 zero = _mm512_setzero_ps();
    __m512 kc[NVMAX512], vc[NVMAX512], cv[NVMAX512], ck[NVMAX512];
    __mmask16 tm[NVMAX512];
    for (int u = 0; u < NVB512; ++u) {
        const int64_t r0 = j0 + 16 * u, r = r0 < g ? r0 : 0;
        tm[u] = tgem_tailmask_512(g - r0);
        kc[u] = _mm512_maskz_loadu_ps(tm[u], c->k + o + r);
        vc[u] = _mm512_maskz_loadu_ps(tm[u], c->v + o + r);
        cv[u] = ck[u] = zero;
    }
    for (int64_t ib = 0; ib < g; ib += TGEM_JB) {
        const int64_t ie = ib + TGEM_JB < g ? ib + TGEM_JB : g;
        __m512 av[NVMAX512], ak[NVMAX512];
        for (int u = 0; u < NVB512; ++u)
            av[u] = ak[u] = zero;
        const int masked = tail || (ib < j0 + 16 * NVB512 && ie > j0);
        if (c->rounded[n])
            tgem_cols_512(hs, c->m + o, w1, w2, c->out + o, ib, ie, j0, kc, vc, tm, av, ak,
                          dqp, acc, masked, 1);
        else if (masked)
            tgem_cols_512(hs, c->m + o, w1, w2, c->out + o, ib, ie, j0, kc, vc, tm, av, ak,
                          dqp, acc, 1, 0);
        else
            tgem_cols_512(hs, c->m + o, w1, w2, c->out + o, ib, ie, j0, kc, vc, tm, av, ak,
                          dqp, acc, 0, 0);
        for (int u = 0; u < NVB512; ++u) {
            cv[u] = _mm512_add_ps(cv[u], av[u]);
            ck[u] = _mm512_add_ps(ck[u], ak[u]);
        }
    }
    for (int u = 0; u < NVB512; ++u) {
        const int64_t r0 = j0 + 16 * u;
        if (r0 >= g)
            break;
        float sk[16];
        _mm512_storeu_ps(sk, ck[u]);
        _mm512_mask_storeu_ps(c->dv + o + r0, tm[u], cv[u]);
        for (int l = 0; l < 16 && r0 + l < g; ++l)
            c->dk[o + r0 + l] = tgem_dk_final(c, o + r0 + l, sk[l]);
    }
}

TGEM_BWD_TASK(tgem_bwd_task_avx512, tgem_bwd_block_avx512, TGEM_T512)

TGEM_T512 static void tgem_exp2_array_avx512(const float *y, float *out, int64_t len)
{
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 tm = tgem_tailmask_512(len - i);
        __m512 x = _mm512_maskz_loadu_ps(tm, y + i);
        tgem_exp2n_512(&x, 1);
        _mm512_mask_storeu_ps(out + i, tm, x);
    }
}

#endif /* TGEM_X86 */

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

/* rows (forward) or columns (backward) per task of the path `isa` */
static int64_t tgem_block(int isa, int backward)
{
#if TGEM_X86
    if (isa == ISA_AVX512)
        return 16 * (backward ? NVB512 : NVI512);
    if (isa == ISA_AVX2)
        return 8 * (backward ? NVB256 : NVI256);
#endif
    (void)isa;
    (void)backward;
    return TGEM_SL;
}

/*
 * Forward pass on contiguous (n, g) float32 arrays: writes out, m (base-2 row maxima), inv_z
 * and e_diag. Returns 0, or a negative error code.
 */
TGEM_API int tgem_forward(const float *q, const float *k, const float *v, int64_t n, int64_t g,
                          float *out, float *m, float *inv_z, float *e_diag, int isa,
                          int nthreads)
{
    tgem_fwd_ctx c;
    tgem_task_fn fn = tgem_fwd_task_scalar;
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
        fn = tgem_fwd_task_avx512;
    else if (isa == ISA_AVX2)
        fn = tgem_fwd_task_avx2;
#endif
    c.q = q; c.k = k; c.v = v; c.n = n; c.g = g;
    c.rows = tgem_block(isa, 0);
    c.blocks = (g + c.rows - 1) / c.rows;
    c.out = out; c.m = m; c.inv_z = inv_z; c.e_diag = e_diag;
    c.scratch = (float *)malloc((size_t)(n * g) * sizeof(float));
    c.rounded = (unsigned char *)malloc((size_t)n);
    if (c.scratch == NULL || c.rounded == NULL) {
        free(c.scratch);
        free(c.rounded);
        return TGEM_ENOMEM;
    }
    tgem_parallel(nthreads, n, tgem_fwd_prologue, &c);
    tgem_parallel(nthreads, n * c.blocks, fn, &c);
    free(c.scratch);
    free(c.rounded);
    return TGEM_OK;
}

/*
 * Backward pass: from the inputs, the forward outputs m, inv_z, e_diag, out and the upstream
 * gradient grad, writes dq, dk, dv. Returns 0, or a negative error code.
 */
TGEM_API int tgem_backward(const float *q, const float *k, const float *v, const float *m,
                           const float *inv_z, const float *e_diag, const float *out,
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
    c.q = q; c.k = k; c.v = v; c.m = m; c.inv_z = inv_z; c.e_diag = e_diag; c.out = out;
    c.grad = grad; c.n = n; c.g = g; c.dq = dq; c.dk = dk; c.dv = dv;
    c.cols = tgem_block(isa, 1);
    c.blocks = (g + c.cols - 1) / c.cols;
    c.lanes = 1;
#if TGEM_X86
    if (isa == ISA_AVX512)
        c.lanes = 16;
#endif
    atomic_int failed;
    atomic_init(&failed, 0);
    c.failed = &failed;
    /* Row tasks need no partial sums (memory O(n g)); block tasks keep blocks x n x g partials
     * but give idle threads work when there are few rows. Block tasks only while there are
     * fewer than 4 rows per thread and their partials stay under TGEM_PARTIAL_BYTES. */
    c.rowwise = n >= 4 * (int64_t)nthreads ||
                (double)c.blocks * (double)n * (double)g * (double)c.lanes * sizeof(float) >
                    TGEM_PARTIAL_BYTES;
    c.scratch = (float *)malloc((size_t)((3 + (c.rowwise ? 0 : c.blocks * c.lanes)) * n * g) *
                                sizeof(float));
    c.rounded = (unsigned char *)malloc((size_t)n);
    if (c.scratch == NULL || c.rounded == NULL) {
        free(c.scratch);
        free(c.rounded);
        return TGEM_ENOMEM;
    }
    c.dqpart = c.rowwise ? NULL : c.scratch + 3 * n * g;
    tgem_parallel(nthreads, n, tgem_bwd_prologue, &c);
    tgem_parallel(nthreads, c.rowwise ? n : n * c.blocks, fn, &c);
    if (atomic_load(&failed)) {
        free(c.scratch);
        free(c.rounded);
        return TGEM_ENOMEM;
    }
    tgem_parallel(nthreads, n, tgem_bwd_epilogue, &c);
    free(c.scratch);
    free(c.rounded);
    return TGEM_OK;
}

/* ------------------------------------------------------------------------------ layer */
/*
 * A whole attention layer around the kernels, so that the O(batch x heads x genes) work
 * around the pair sums costs no PyTorch operator calls: x is (b, g), the per-gene weights
 * wq, wk, wv are (h, g) and w0 is (h); rows n = bi h + hh of the (b h, g) arrays belong to
 * sample bi and head hh. Forward: q = x wq, k = x wk, v = x wv (each product rounded once, as
 * PyTorch's), the attention, and mixed = sum_hh w0_hh out_hh (summed in double in head order,
 * then rounded). Backward: the heads' upstream gradient w0_hh grad_mixed (rounded once), the
 * kernels' dq, dk, dv, then dx = sum_hh (dq wq + dk wk + dv wv), dwq = sum_bi dq x (and dk, dv
 * alike) and dw0 = sum_{bi, i} grad_mixed out, every sum in double in a fixed order (heads,
 * then samples, then genes), so the results stay independent of the thread count.
 */
typedef struct {
    const float *x, *wq, *wk, *wv, *w0, *gm, *out;
    const float *dq, *dk, *dv;
    int64_t b, h, g;
    float *q, *k, *v, *gh, *mixed, *dx, *dwq, *dwk, *dwv;
    double *dw0part;                 /* per row n: sum_i grad_mixed out (backward) */
} tgem_layer_ctx;

static void tgem_layer_qkv(const void *vctx, int64_t n)
{
    const tgem_layer_ctx *c = (const tgem_layer_ctx *)vctx;
    const int64_t g = c->g, hh = n % c->h;
    const float *restrict x = c->x + (n / c->h) * g;
    const float *restrict wq = c->wq + hh * g, *restrict wk = c->wk + hh * g,
                *restrict wv = c->wv + hh * g;
    float *restrict q = c->q + n * g, *restrict k = c->k + n * g, *restrict v = c->v + n * g;
    for (int64_t i = 0; i < g; ++i)
        q[i] = x[i] * wq[i];
    for (int64_t i = 0; i < g; ++i)
        k[i] = x[i] * wk[i];
    for (int64_t i = 0; i < g; ++i)
        v[i] = x[i] * wv[i];
}

/* genes per chunk of the head mix and the weight-gradient sums (a double accumulator each) */
#define TGEM_LAYER_CHUNK 512

static void tgem_layer_mix(const void *vctx, int64_t bi)
{
    const tgem_layer_ctx *c = (const tgem_layer_ctx *)vctx;
    const int64_t g = c->g, h = c->h;
    double acc[TGEM_LAYER_CHUNK];
    for (int64_t i0 = 0; i0 < g; i0 += TGEM_LAYER_CHUNK) {
        const int64_t len = g - i0 < TGEM_LAYER_CHUNK ? g - i0 : TGEM_LAYER_CHUNK;
        for (int64_t i = 0; i < len; ++i)
            acc[i] = 0.0;
        for (int64_t hh = 0; hh < h; ++hh) { /* heads in order, each gene on its own */
            const double w0 = (double)c->w0[hh];
            const float *restrict out = c->out + (bi * h + hh) * g + i0;
            for (int64_t i = 0; i < len; ++i)
                acc[i] += w0 * (double)out[i];
        }
        float *restrict mixed = c->mixed + bi * g + i0;
        for (int64_t i = 0; i < len; ++i)
            mixed[i] = (float)acc[i];
    }
}

static void tgem_layer_bwd_prologue(const void *vctx, int64_t n)
{
    const tgem_layer_ctx *c = (const tgem_layer_ctx *)vctx;
    const int64_t g = c->g;
    const float w0 = c->w0[n % c->h];
    const float *restrict gm = c->gm + (n / c->h) * g, *restrict out = c->out + n * g;
    float *restrict gh = c->gh + n * g;
    double s = 0.0;
    for (int64_t i = 0; i < g; ++i)
        gh[i] = w0 * gm[i];
    for (int64_t i = 0; i < g; ++i)
        s += (double)gm[i] * (double)out[i];
    c->dw0part[n] = s;
}

/* tasks 0 .. b-1: dx of sample bi (heads in order); tasks b .. b+h-1: dwq, dwk, dwv of head
 * hh (samples in order); each gene's sum in double, on its own */
static void tgem_layer_bwd_epilogue(const void *vctx, int64_t task)
{
    const tgem_layer_ctx *c = (const tgem_layer_ctx *)vctx;
    const int64_t g = c->g, h = c->h, b = c->b;
    double acc[3][TGEM_LAYER_CHUNK];
    for (int64_t i0 = 0; i0 < g; i0 += TGEM_LAYER_CHUNK) {
        const int64_t len = g - i0 < TGEM_LAYER_CHUNK ? g - i0 : TGEM_LAYER_CHUNK;
        double *restrict a0 = acc[0], *restrict a1 = acc[1], *restrict a2 = acc[2];
        for (int64_t i = 0; i < len; ++i)
            a0[i] = a1[i] = a2[i] = 0.0;
        if (task < b) {
            for (int64_t hh = 0; hh < h; ++hh) {
                const int64_t r = (task * h + hh) * g + i0, w = hh * g + i0;
                const float *restrict dq = c->dq + r, *restrict dk = c->dk + r,
                            *restrict dv = c->dv + r;
                const float *restrict wq = c->wq + w, *restrict wk = c->wk + w,
                            *restrict wv = c->wv + w;
                for (int64_t i = 0; i < len; ++i)
                    a0[i] += (double)dq[i] * (double)wq[i] + (double)dk[i] * (double)wk[i] +
                             (double)dv[i] * (double)wv[i];
            }
            float *restrict dx = c->dx + task * g + i0;
            for (int64_t i = 0; i < len; ++i)
                dx[i] = (float)a0[i];
            continue;
        }
        const int64_t hh = task - b;
        for (int64_t bi = 0; bi < b; ++bi) {
            const int64_t r = (bi * h + hh) * g + i0;
            const float *restrict x = c->x + bi * g + i0;
            const float *restrict dq = c->dq + r, *restrict dk = c->dk + r,
                        *restrict dv = c->dv + r;
            for (int64_t i = 0; i < len; ++i) {
                const double xi = (double)x[i];
                a0[i] += (double)dq[i] * xi;
                a1[i] += (double)dk[i] * xi;
                a2[i] += (double)dv[i] * xi;
            }
        }
        for (int64_t i = 0; i < len; ++i) {
            c->dwq[hh * g + i0 + i] = (float)a0[i];
            c->dwk[hh * g + i0 + i] = (float)a1[i];
            c->dwv[hh * g + i0 + i] = (float)a2[i];
        }
    }
}

/* Checks shared by the layer entry points; on success fills the context's inputs and sizes. */
static int tgem_layer_init(tgem_layer_ctx *c, const float *x, const float *wq, const float *wk,
                           const float *wv, const float *w0, int64_t b, int64_t h, int64_t g,
                           int isa, int nthreads)
{
    if (b < 0 || h < 0 || g < 0 || nthreads < 1 || (h > 0 && b > INT64_MAX / h))
        return TGEM_EARGS;
    if (!tgem_isa_supported(isa))
        return TGEM_EISA;
    memset(c, 0, sizeof *c);
    c->x = x; c->wq = wq; c->wk = wk; c->wv = wv; c->w0 = w0; c->b = b; c->h = h; c->g = g;
    return TGEM_OK;
}

/*
 * Layer forward: writes q, k, v, out, m, inv_z, e_diag (each (b h, g), kept for the backward
 * pass) and mixed (b, g). Returns 0, or a negative error code.
 */
TGEM_API int tgem_layer_forward(const float *x, const float *wq, const float *wk,
                                const float *wv, const float *w0, int64_t b, int64_t h,
                                int64_t g, float *q, float *k, float *v, float *out, float *m,
                                float *inv_z, float *e_diag, float *mixed, int isa, int nthreads)
{
    tgem_layer_ctx c;
    int code = tgem_layer_init(&c, x, wq, wk, wv, w0, b, h, g, isa, nthreads);
    if (code != TGEM_OK)
        return code;
    c.q = q; c.k = k; c.v = v; c.out = out; c.mixed = mixed;
    if (b == 0 || g == 0)
        return TGEM_OK;
    tgem_parallel(nthreads, b * h, tgem_layer_qkv, &c);
    code = tgem_forward(q, k, v, b * h, g, out, m, inv_z, e_diag, isa, nthreads);
    if (code != TGEM_OK)
        return code;
    tgem_parallel(nthreads, b, tgem_layer_mix, &c);
    return TGEM_OK;
}

/*
 * Layer backward: from the layer's inputs, what tgem_layer_forward kept and the upstream
 * gradient grad_mixed (b, g), writes dx (b, g), dwq, dwk, dwv (h, g) and dw0 (h). Returns 0,
 * or a negative error code.
 */
TGEM_API int tgem_layer_backward(const float *x, const float *wq, const float *wk,
                                 const float *wv, const float *w0, const float *q,
                                 const float *k, const float *v, const float *m,
                                 const float *inv_z, const float *e_diag, const float *out,
                                 const float *grad_mixed, int64_t b, int64_t h, int64_t g,
                                 float *dx, float *dwq, float *dwk, float *dwv, float *dw0,
                                 int isa, int nthreads)
{
    tgem_layer_ctx c;
    int code = tgem_layer_init(&c, x, wq, wk, wv, w0, b, h, g, isa, nthreads);
    if (code != TGEM_OK)
        return code;
    for (int64_t hh = 0; hh < h; ++hh)
        dw0[hh] = 0.0f;
    if (b == 0 || h == 0 || g == 0) {
        memset(dx, 0, (size_t)(b * g) * sizeof(float));
        memset(dwq, 0, (size_t)(h * g) * sizeof(float));
        memset(dwk, 0, (size_t)(h * g) * sizeof(float));
        memset(dwv, 0, (size_t)(h * g) * sizeof(float));
        return TGEM_OK;
    }
    const int64_t n = b * h;
    float *work = (float *)malloc((size_t)(4 * n * g) * sizeof(float));
    double *part = (double *)malloc((size_t)n * sizeof(double));
    if (work == NULL || part == NULL) {
        free(work);
        free(part);
        return TGEM_ENOMEM;
    }
    c.gm = grad_mixed; c.out = out; c.dx = dx; c.dwq = dwq; c.dwk = dwk; c.dwv = dwv;
    c.gh = work;
    c.dq = work + n * g; c.dk = work + 2 * n * g; c.dv = work + 3 * n * g;
    c.dw0part = part;
    tgem_parallel(nthreads, n, tgem_layer_bwd_prologue, &c);
    code = tgem_backward(q, k, v, m, inv_z, e_diag, out, c.gh, n, g, work + n * g,
                         work + 2 * n * g, work + 3 * n * g, isa, nthreads);
    if (code == TGEM_OK) {
        tgem_parallel(nthreads, b + h, tgem_layer_bwd_epilogue, &c);
        for (int64_t hh = 0; hh < h; ++hh) {
            double s = 0.0;
            for (int64_t bi = 0; bi < b; ++bi)
                s += part[bi * h + hh];
            dw0[hh] = (float)s;
        }
    }
    free(work);
    free(part);
    return code;
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
