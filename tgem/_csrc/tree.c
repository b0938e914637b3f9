/*
 * tree.c -- the tree code of T-GEM's rank-one attention in C (backend "tree_native").
 *
 * The same algorithm as tgem/_kernels/_tree.py (read its module docstring: the reduction, the
 * tree, RHO, LEAF, the tolerance rule, the formulas of tree_forward and tree_backward). All
 * arithmetic is in double precision; (n, g) arrays are contiguous (n = batch x heads,
 * g = genes). What runs here:
 *
 *   tgem_tree_forward:  the whole forward pass of the attention, per row: the inputs q, k, v
 *                       read in their dtype (float32 or float64) and checked finite
 *                       (TREE_ENONFINITE otherwise; Python then raises the pure tree's
 *                       error), the rank-1 reduction (t = |q|, kmin, kmax, the two sides),
 *                       the row sums with the weight columns (1, v, v k, k) built in the task,
 *                       the diagonal e_ii = exp(-t_i d_own,i) (exponent clamped at EXP_FLOOR),
 *                       out = (N - e_ii v) / Z rounded to the input dtype (results below the
 *                       smallest normal number flushed to zero), and for a backward pass the
 *                       float64 out, Z, r = sum e v k, kk = sum e k;
 *   tgem_tree_backward: from those and the upstream gradient, per row: dq, the coefficients
 *                       c1 = grad / Z, c2 = c1 q, c2 out, the column sums, dk and dv, rounded
 *                       to the input dtype;
 *   tgem_tree_row_sums / tgem_tree_column_sums: the sums alone on float64 rows (the entropy
 *                       uses them, its elementwise parts in _tree.py):
 *     row sums:    out[i, :] = sum_j w[j, :] exp(-t_i d_j),  t_i = |q_i|,
 *                  d_j = kmax - k_j and w = w_plus for the queries with q_i >= 0,
 *                  d_j = k_j - kmin and w = w_minus for the others;
 *     column sums: out[j, :] = sum_{i: q_i >= 0} c[i, :] exp(-t_i (kmax - k_j))
 *                            + sum_{i: q_i < 0}  c[i, :] exp(-t_i (k_j - kmin));
 *   tgem_layer_reach:   "auto"'s per-layer choice: the score reach of a layer's queries
 *                       x * wq and keys x * wk (at the end of this file).
 *
 * Each one-dimensional sum S(t) = sum_s w_s exp(-t p_s) over source points p_s >= 0 is
 * evaluated at the targets t as follows (the parameters come from tree_parameters() in
 * _tree.py: the order P, RHO, CUT = log(genes / tol), the exponent clamp CUT + EXP_MARGIN,
 * LEAF and tol):
 *
 *   - cheap case: when (largest target) x (half the points' range) <= RHO, one Taylor
 *     expansion about the centre of the points: no sort, no tree. Every target uses the term
 *     count of the largest (as _tree.py does per row), evaluated by Horner's rule over blocks
 *     of targets in loops the compiler vectorises;
 *   - otherwise the points are sorted and cut into a count-balanced binary tree (node i of
 *     level l holds the sorted points [floor(i s / 2^l), floor((i + 1) s / 2^l)), leaves of at
 *     most LEAF points); the tree stops at the first level where every node is expanded for
 *     the largest target. Node moments M_n = sum w ((p - c) / r)^n / n! (normalised by the
 *     node's radius r) are computed at the last level from the points and translated up.
 *     Each target walks the tree depth first: skip a node when t dmin > CUT, expand it when
 *     t r <= RHO (exp(-t c) sum_n (-t r)^n M_n), sum its points directly at the last level,
 *     descend otherwise. There an expansion at x = t r uses the fewest terms p <= P whose
 *     remainder bound exp(2x) x^p / p! is at most tol, so the bound of _tree.py's docstring
 *     holds term by term; a target's factors exp(-t c) are computed a few dozen at a time.
 *
 * Threads: one task per row, run by tgem_parallel of tgem_kernels.c (the dense kernel's
 * POSIX threads, flush-to-zero inside them, the caller's floating-point state restored);
 * each thread allocates its workspace once per call. Each row is computed by one task in a
 * fixed order, so the results are bitwise independent of the thread count.
 *
 * Dispatch: the sums are compiled for each column count the attention uses (2, 3, 4, and any;
 * the fused passes use 2 or 4) for the baseline architecture and with AVX2+FMA, chosen per
 * call from the dense kernel's instruction-set code (AVX-512 runs the AVX2 code). Four columns
 * are one vector (GCC/Clang vector extensions), other loops are vectorised by the compiler.
 * Multiply-adds are not contracted (setup.py: -ffp-contract=off) and no sum is reassociated
 * by the compiler (where this file splits one into lanes, the lanes are in the code), so all
 * instances give bitwise the same results. The exponentials are tree_exp_neg_raw (below:
 * within 1 ulp, plain arithmetic, vectorisable), not libm's exp().
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define TREE_API __attribute__((visibility("default")))
#define TREE_INLINE static inline __attribute__((always_inline))
#define TREE_NOINLINE __attribute__((noinline))
#else
#define TREE_API
#define TREE_INLINE static inline
#define TREE_NOINLINE
#endif
#if defined(__GNUC__) || defined(__clang__)
/* four doubles as one vector (GCC/Clang vector extensions: elementwise IEEE operations, the
 * same results as the scalar code, as SSE2, AVX2 or any other instructions) */
#define TREE_VECTOR_EXT 1
typedef double tree_v4 __attribute__((vector_size(32), aligned(8)));
#else
#define TREE_VECTOR_EXT 0
#endif
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define TREE_X86 1
#define TREE_AVX2 __attribute__((target("avx2,fma")))
#else
#define TREE_X86 0
#endif

#define TREE_ABI_VERSION 3
#define TREE_MAX_ORDER 128 /* tol >= 1e-30 needs at most about 60 terms at RHO = 4 */
#define TREE_MAX_COLS 8
#define TREE_MAX_DEPTH 60
#define TREE_BINS 512 /* resolution of the table of expansion orders over x in [0, RHO] */
#define TREE_SMALL_SORT 48
#define TREE_BUF_ROWS 13 /* g-long double arrays a row task uses besides the sums' own */
#define TREE_SLOTS 256   /* workspaces per call: at least the threads (TGEM_MAX_THREADS) */ /* insertion sort below this many points, radix sort above */
/* counts of the work done (for tests): sums by one expansion (the cheap case), sums through
 * the tree, expansions evaluated in the tree, points summed directly at the leaves */
#define TREE_NCOUNTS 4

enum { TREE_OK = 0, TREE_EARGS = -1, TREE_ENOMEM = -3, TREE_ENONFINITE = -4 };

/* targets evaluated together in the cheap case (their powers and sums stay in L1) */
#define TREE_CHEAP_BLOCK 64

/* tgem_kernels.c: run fn(ctx, 0 .. ntasks - 1) on up to nthreads threads */
typedef void (*tgem_task_fn)(const void *ctx, int64_t task);
void tgem_parallel(int nthreads, int64_t ntasks, tgem_task_fn fn, const void *ctx);
int tgem_isa_supported(int isa); /* 0 scalar, 1 AVX2+FMA, 2 AVX-512 */

struct tree_params;
struct tree_ws;
typedef void (*tree_sums_fn)(const struct tree_params *p, struct tree_ws *ws, int64_t npts,
                             const double *targets, const unsigned char *valid,
                             int64_t ntargets, double *out, int64_t *counts);

typedef struct tree_params {
    int order;                          /* P: moments kept per node */
    int cols;                           /* weight columns C */
    double rho, cut, clamp;             /* RHO, CUT, largest exponent magnitude */
    int64_t leaf;                       /* LEAF */
    double xmax[TREE_MAX_ORDER + 1];    /* xmax[p]: largest x with exp(2x) x^p / p! <= tol */
    double inv[TREE_MAX_ORDER + 1];     /* inv[n] = 1 / (n + 1) */
    double bins_per_x;                  /* TREE_BINS / RHO */
    unsigned char terms_of[TREE_BINS + 2]; /* terms for x in [(b - 1) / bins_per_x,
                                              b / bins_per_x): those of the bin's upper end */
    tree_sums_fn sums;                  /* tree_exp_sums for these columns and instruction set */
} tree_params;

/* log of the remainder bound exp(2x) x^p / p! */
static double tree_log_bound(int p, double x)
{
    return 2.0 * x + p * log(x) - lgamma(p + 1.0);
}

static int tree_params_init(tree_params *p, int order, int cols, double rho, double cut,
                            double clamp, int64_t leaf, double tol)
{
    if (order < 1 || order > TREE_MAX_ORDER || cols < 1 || cols > TREE_MAX_COLS ||
        !(rho > 0.0) || !(tol > 0.0) || leaf < 2 || !(cut == cut) || !(clamp >= cut) ||
        !(clamp <= 708.0)) /* the range of tree_exp_neg_raw */
        return TREE_EARGS;
    p->order = order;
    p->cols = cols;
    p->rho = rho;
    p->cut = cut;
    p->clamp = clamp;
    p->leaf = leaf;
    for (int n = 0; n <= TREE_MAX_ORDER; ++n)
        p->inv[n] = 1.0 / (n + 1);
    const double log_tol = log(tol);
    p->xmax[0] = 0.0;
    for (int n = 1; n <= order; ++n) {
        /* bisection on the increasing function log_bound(n, x) - log(tol), x in (0, rho] */
        double lo = 0.0, hi = rho;
        if (tree_log_bound(n, hi) <= log_tol) {
            p->xmax[n] = hi;
            continue;
        }
        for (int it = 0; it < 100; ++it) {
            const double mid = 0.5 * (lo + hi);
            if (tree_log_bound(n, mid) <= log_tol)
                lo = mid;
            else
                hi = mid;
        }
        p->xmax[n] = lo;
    }
    p->xmax[order] = rho; /* P itself is chosen so that the bound holds at RHO */
    /* the table: terms at the upper end of each bin of x (the bound grows with x) */
    p->bins_per_x = TREE_BINS / rho;
    for (int b = 0; b <= TREE_BINS + 1; ++b) {
        const double x = b >= TREE_BINS ? rho : b / p->bins_per_x;
        int n = 1;
        while (n < order && x > p->xmax[n])
            ++n;
        p->terms_of[b] = (unsigned char)n;
    }
    return TREE_OK;
}

/* terms whose remainder bound at x = t r is at most tol (0 <= x <= RHO): the fewest that
 * meet it at the upper end of x's bin (a monotone function of x) */
TREE_INLINE int tree_terms(const tree_params *p, double x)
{
    const int b = (int)(x * p->bins_per_x);
    return p->terms_of[(b < TREE_BINS ? b : TREE_BINS) + 1];
}

/*
 * exp(-x) for 0 <= x <= 708 (every caller clamps x below that first: a guard here would let
 * the compiler branch around the whole computation and not vectorise loops of it),
 * within about 2 ulps: x log2(e) rounded to an integer n by the 1.5 * 2^52 shift, the reduced
 * argument r = -x - n log(2) (|r| <= 0.35) in two steps (n log2_hi is exact), exp(r) by its
 * Taylor polynomial of degree 13 (remainder below 5e-18) by Estrin's scheme, times 2^n built
 * from n's bits. Plain IEEE operations and integer ones, no table and no call: a loop of
 * these is vectorised by the compiler, and every instance computes the same value.
 */
TREE_INLINE double tree_exp_neg_raw(double x)
{
    const double shift = 6755399441055744.0; /* 1.5 * 2^52 */
    const double log2e = 1.4426950408889634074;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const double y = -x;
    double kd = y * log2e + shift;
    uint64_t bits;
    memcpy(&bits, &kd, sizeof(bits));
    kd -= shift;
    const double r = (y - kd * ln2_hi) - kd * ln2_lo;
    /* 1 + (r + r^2 Q(r)), Q(r) = sum_{2 <= n <= 13} r^(n - 2) / n! by Estrin's scheme (pairs,
     * then the powers r^2, r^4, r^8: a dependency chain of 4 steps instead of Horner's 12) */
    const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    const double q01 = 0.5 + r * (1.0 / 6.0), q23 = 1.0 / 24.0 + r * (1.0 / 120.0);
    const double q45 = 1.0 / 720.0 + r * (1.0 / 5040.0);
    const double q67 = 1.0 / 40320.0 + r * (1.0 / 362880.0);
    const double q89 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0);
    const double q1011 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
    const double q03 = q01 + r2 * q23, q47 = q45 + r2 * q67, q811 = q89 + r2 * q1011;
    const double q07 = q03 + r4 * q47;
    const double e = 1.0 + (r + r2 * (q07 + r8 * q811));
    const uint64_t scale_bits = (bits + 1023) << 52; /* 2^n, n = bits - the shift's bits */
    double scale;
    memcpy(&scale, &scale_bits, sizeof(scale));
    return e * scale;
}

/* b where x's sign bit is set, else a, by bit masks: both computed, no branch (the compiler
 * keeps a branch for ?: between floating-point expressions, which stops vectorisation, and
 * SSE2 has no vector form of a comparison turned into an integer) */
TREE_INLINE double tree_select_sign(double x, double a, double b)
{
    uint64_t xb, ab, bb;
    memcpy(&xb, &x, sizeof(xb));
    memcpy(&ab, &a, sizeof(ab));
    memcpy(&bb, &b, sizeof(bb));
    const uint64_t mask = (uint64_t)0 - (xb >> 63);
    ab = (ab & ~mask) | (bb & mask);
    double r;
    memcpy(&r, &ab, sizeof(r));
    return r;
}


/* --------------------------------------------------------------------------- workspace */
typedef struct {
    uint64_t bits; /* of a point >= 0: ordered as the point */
    int64_t i;     /* its position before the sort */
} tree_key;

typedef struct tree_ws {
    double *pts;     /* source points (g), sorted in place */
    double *w;       /* their weights (g x C) */
    double *w_tmp;   /* permutation buffer (g x C) */
    tree_key *keys;  /* sort keys (g) */
    tree_key *keys_tmp; /* radix sort buffer (g) */
    double *mom;     /* node moments (nodes x P x C) */
    double *geom;    /* per node: centre, radius (nodes x 2) */
    double *buf;     /* the row tasks' own arrays (g x TREE_BUF_ROWS) */
    unsigned char *valid; /* (g) */
    int64_t max_nodes;
} tree_ws;

static int64_t tree_depth(int64_t s, int64_t leaf)
{
    int64_t depth = 0;
    while (depth < TREE_MAX_DEPTH && (s + ((int64_t)1 << depth) - 1) >> depth > leaf)
        ++depth;
    return depth;
}

static void tree_ws_free(tree_ws *ws)
{
    free(ws->pts);
    free(ws->w);
    free(ws->w_tmp);
    free(ws->keys);
    free(ws->keys_tmp);
    free(ws->mom);
    free(ws->geom);
    free(ws->buf);
    free(ws->valid);
}

static int tree_ws_alloc(tree_ws *ws, int64_t g, const tree_params *p)
{
    memset(ws, 0, sizeof(*ws));
    const int64_t depth = tree_depth(g, p->leaf);
    ws->max_nodes = ((int64_t)2 << depth) - 1;
    const int64_t c = p->cols;
    ws->pts = malloc((size_t)(g > 0 ? g : 1) * sizeof(double));
    ws->w = malloc((size_t)(g > 0 ? g : 1) * c * sizeof(double));
    ws->w_tmp = malloc((size_t)(g > 0 ? g : 1) * c * sizeof(double));
    ws->keys = malloc((size_t)(g > 0 ? g : 1) * sizeof(tree_key));
    ws->keys_tmp = malloc((size_t)(g > 0 ? g : 1) * sizeof(tree_key));
    /* the cheap case keeps one node's moments, the tree all of them */
    ws->mom = malloc((size_t)ws->max_nodes * p->order * c * sizeof(double));
    ws->geom = malloc((size_t)ws->max_nodes * 2 * sizeof(double));
    ws->buf = malloc((size_t)(g > 0 ? g : 1) * TREE_BUF_ROWS * sizeof(double));
    ws->valid = malloc((size_t)(g > 0 ? g : 1));
    if (!ws->pts || !ws->w || !ws->w_tmp || !ws->keys || !ws->keys_tmp || !ws->mom || !ws->geom ||
        !ws->buf || !ws->valid) {
        tree_ws_free(ws);
        return TREE_ENOMEM;
    }
    return TREE_OK;
}

/* Workspaces for one call: a task takes a free slot, allocates its workspace the first time
 * (so each thread allocates about once per call, not once per row: fresh memory costs a page
 * fault per page), and gives it back. Which slot a row gets does not change its results: a
 * task writes every array before it reads it. */
typedef struct {
    atomic_int busy;
    int ready;
    tree_ws ws;
} tree_slot;

static tree_slot *tree_slots_new(void)
{
    tree_slot *slots = calloc(TREE_SLOTS, sizeof(tree_slot));
    if (slots)
        for (int i = 0; i < TREE_SLOTS; ++i)
            atomic_init(&slots[i].busy, 0);
    return slots;
}

static void tree_slots_free(tree_slot *slots)
{
    if (!slots)
        return;
    for (int i = 0; i < TREE_SLOTS; ++i)
        if (slots[i].ready)
            tree_ws_free(&slots[i].ws);
    free(slots);
}

/* a free slot with its workspace for g points (NULL when out of memory) */
static tree_slot *tree_slot_take(tree_slot *slots, int64_t g, const tree_params *p)
{
    tree_slot *slot = NULL;
    for (int i = 0; !slot; i = (i + 1) % TREE_SLOTS) /* fewer tasks run than there are slots */
        if (!atomic_exchange(&slots[i].busy, 1))
            slot = &slots[i];
    if (!slot->ready) {
        if (tree_ws_alloc(&slot->ws, g, p) != TREE_OK) {
            atomic_store(&slot->busy, 0);
            return NULL;
        }
        slot->ready = 1;
    }
    return slot;
}

static void tree_slot_give(tree_slot *slot) { atomic_store(&slot->busy, 0); }

/* Sort keys[0 .. n) by bits, stably (ties keep their positions: a total, fixed order):
 * insertion sort for a few keys, else a least-significant-digit radix sort on bytes, whose
 * passes are skipped where every key has the same byte. The result is in ws->keys. */
static void tree_sort(tree_ws *ws, int64_t n)
{
    tree_key *a = ws->keys, *b = ws->keys_tmp;
    if (n < TREE_SMALL_SORT) {
        for (int64_t s = 1; s < n; ++s) {
            const tree_key key = a[s];
            int64_t j = s;
            for (; j > 0 && a[j - 1].bits > key.bits; --j)
                a[j] = a[j - 1];
            a[j] = key;
        }
        return;
    }
    int64_t count[8][256];
    memset(count, 0, sizeof(count));
    for (int64_t s = 0; s < n; ++s)
        for (int byte = 0; byte < 8; ++byte)
            ++count[byte][(a[s].bits >> (8 * byte)) & 255];
    for (int byte = 0; byte < 8; ++byte) {
        int64_t *c = count[byte], total = 0;
        if (c[(a[0].bits >> (8 * byte)) & 255] == n)
            continue; /* one digit value: the pass would not move anything */
        for (int d = 0; d < 256; ++d) {
            const int64_t here = c[d];
            c[d] = total;
            total += here;
        }
        for (int64_t s = 0; s < n; ++s)
            b[c[(a[s].bits >> (8 * byte)) & 255]++] = a[s];
        tree_key *swap = a;
        a = b;
        b = swap;
    }
    if (a != ws->keys)
        memcpy(ws->keys, a, (size_t)n * sizeof(tree_key));
}

/* smallest and largest of x[0 .. n), n >= 1, in four lanes (four short dependency chains
 * instead of one long one); a fixed order of operations, the same in every instance */
TREE_INLINE void tree_range(const double *x, int64_t n, double *lo, double *hi)
{
    double mn[4] = {x[0], x[0], x[0], x[0]}, mx[4] = {x[0], x[0], x[0], x[0]};
    int64_t s = 0;
    for (; s + 4 <= n; s += 4)
        for (int l = 0; l < 4; ++l) {
            mn[l] = x[s + l] < mn[l] ? x[s + l] : mn[l];
            mx[l] = x[s + l] > mx[l] ? x[s + l] : mx[l];
        }
    for (; s < n; ++s) {
        mn[0] = x[s] < mn[0] ? x[s] : mn[0];
        mx[0] = x[s] > mx[0] ? x[s] : mx[0];
    }
    for (int l = 1; l < 4; ++l) {
        mn[0] = mn[l] < mn[0] ? mn[l] : mn[0];
        mx[0] = mx[l] > mx[0] ? mx[l] : mx[0];
    }
    *lo = mn[0];
    *hi = mx[0];
}

/* ---------------------------------------------------------------------- moments, sums */
/* normalised moments about centre c, radius r of points [lo, hi): mom (P x C), zeroed here */
TREE_INLINE void tree_moments(const tree_params *p, int cols, int order, const double *pts,
                              const double *w, int64_t lo, int64_t hi, double c, double r,
                              double *mom)
{
#if TREE_VECTOR_EXT
    if (cols == 4) { /* the four columns as one vector (the compiler does not find it) */
        tree_v4 accv[TREE_MAX_ORDER];
        memset(accv, 0, (size_t)order * sizeof(tree_v4));
        int64_t j = lo;
        /* four points per pass over the moments (each moment loaded and stored once for
         * them), added in the order of the points: the same sums as one point at a time */
        for (; j + 4 <= hi; j += 4) {
            double u[4], pw[4] = {1.0, 1.0, 1.0, 1.0};
            tree_v4 wv[4];
            for (int l = 0; l < 4; ++l) {
                u[l] = r > 0.0 ? (pts[j + l] - c) / r : 0.0;
                memcpy(&wv[l], w + (j + l) * 4, sizeof(tree_v4));
            }
            for (int n = 0; n < order; ++n) {
                tree_v4 a = accv[n];
                a += pw[0] * wv[0];
                a += pw[1] * wv[1];
                a += pw[2] * wv[2];
                a += pw[3] * wv[3];
                accv[n] = a;
                for (int l = 0; l < 4; ++l)
                    pw[l] *= u[l] * p->inv[n];
            }
        }
        for (; j < hi; ++j) {
            const double u = r > 0.0 ? (pts[j] - c) / r : 0.0;
            tree_v4 wv;
            memcpy(&wv, w + j * 4, sizeof(wv));
            double pw = 1.0;
            for (int n = 0; n < order; ++n) {
                accv[n] += pw * wv;
                pw *= u * p->inv[n];
            }
        }
        memcpy(mom, accv, (size_t)order * sizeof(tree_v4));
        return;
    }
#endif
    double acc[TREE_MAX_ORDER * TREE_MAX_COLS];
    memset(acc, 0, (size_t)order * cols * sizeof(double));
    for (int64_t j = lo; j < hi; ++j) {
        const double u = r > 0.0 ? (pts[j] - c) / r : 0.0;
        const double *wj = w + j * cols;
        double pw = 1.0;
        for (int n = 0; n < order; ++n) {
            double *m = acc + n * cols;
            for (int col = 0; col < cols; ++col)
                m[col] += pw * wj[col];
            pw *= u * p->inv[n]; /* no division in the loop */
        }
    }
    memcpy(mom, acc, (size_t)order * cols * sizeof(double));
}

/* poly = sum_{n < terms} (-x)^n M_n, x = t r: the expansion without its factor exp(-t c) */
TREE_INLINE void tree_poly(const tree_params *p, int cols, const double *mom, double x,
                           double *poly)
{
    /* even and odd terms summed apart (sum_n x^n M_n with the signs applied at the end):
     * two short dependency chains instead of Horner's one long one */
    const double x2 = x * x;
    const int terms = tree_terms(p, x);
#if TREE_VECTOR_EXT
    if (cols == 4) { /* the four columns as one vector */
        tree_v4 ev = {0.0, 0.0, 0.0, 0.0}, od = {0.0, 0.0, 0.0, 0.0}, me, mo;
        double pe = 1.0;
        int n = 0;
        for (; n + 1 < terms; n += 2) {
            const double po = pe * x;
            memcpy(&me, mom + n * 4, sizeof(me));
            memcpy(&mo, mom + (n + 1) * 4, sizeof(mo));
            ev += pe * me;
            od += po * mo;
            pe *= x2;
        }
        if (n < terms) {
            memcpy(&me, mom + n * 4, sizeof(me));
            ev += pe * me;
        }
        ev -= od;
        memcpy(poly, &ev, sizeof(ev));
        return;
    }
#endif
    double even[TREE_MAX_COLS] = {0}, odd[TREE_MAX_COLS] = {0};
    double pe = 1.0;
    int n = 0;
    for (; n + 1 < terms; n += 2) {
        const double po = pe * x;
        for (int col = 0; col < cols; ++col) {
            even[col] += pe * mom[n * cols + col];
            odd[col] += po * mom[(n + 1) * cols + col];
        }
        pe *= x2;
    }
    if (n < terms)
        for (int col = 0; col < cols; ++col)
            even[col] += pe * mom[n * cols + col];
    for (int col = 0; col < cols; ++col)
        poly[col] = even[col] - odd[col];
}

/* expansions of one target whose factors exp(-t c) are computed together (a vectorised loop,
 * instead of one exponential's latency per expansion), then added to acc in their order */
#define TREE_DEFER 32
typedef struct {
    int count;
    double arg[TREE_DEFER];                  /* t c */
    double poly[TREE_DEFER * TREE_MAX_COLS]; /* tree_poly */
} tree_deferred;

TREE_INLINE void tree_flush(const tree_params *p, int cols, tree_deferred *d, double *acc)
{
    const double clamp = p->clamp;
    double scale[TREE_DEFER];
    for (int k = 0; k < d->count; ++k) /* vectorised */
        scale[k] = tree_exp_neg_raw(d->arg[k] < clamp ? d->arg[k] : clamp);
    for (int k = 0; k < d->count; ++k)
        for (int col = 0; col < cols; ++col)
            acc[col] += scale[k] * d->poly[k * cols + col];
    d->count = 0;
}

/*
 * The cheap case's evaluation: out[m, :] += exp(-t_m c) sum_{n < terms} (-t_m r)^n M_n for
 * the valid targets, every target with the same term count (that of the largest target).
 * Blocks of TREE_CHEAP_BLOCK valid targets, Horner's rule over the terms with the loops over
 * the targets and columns innermost (vectorised by the compiler); each target's operations
 * and their order are the same in every instance.
 */
TREE_INLINE void tree_cheap_eval(const tree_params *p, const double *mom, int terms, double c,
                                 double r, const double *targets, const unsigned char *valid,
                                 int64_t ntargets, double *out, const int cols)
{
    const double clamp = p->clamp;
    double nx[TREE_CHEAP_BLOCK], scale[TREE_CHEAP_BLOCK];
    double acc[TREE_CHEAP_BLOCK * TREE_MAX_COLS];
    int64_t idx[TREE_CHEAP_BLOCK + 1];
    int64_t m = 0;
    while (m < ntargets) {
        int nb = 0;
        if (valid) /* no branch on valid (0 or 1): the slot is overwritten when it is 0 */
            for (; m < ntargets && nb < TREE_CHEAP_BLOCK; ++m) {
                idx[nb] = m;
                nb += valid[m];
            }
        else
            for (; m < ntargets && nb < TREE_CHEAP_BLOCK; ++m)
                idx[nb++] = m;
        for (int b = 0; b < nb; ++b)
            nx[b] = -(targets[idx[b]] * r);
#if TREE_VECTOR_EXT
        if (cols == 4) { /* one vector per target (the compiler vectorises over the targets
                            otherwise, with shuffles) */
            tree_v4 accv[TREE_CHEAP_BLOCK], mv;
            memcpy(&mv, mom + (int64_t)(terms - 1) * 4, sizeof(mv));
            for (int b = 0; b < nb; ++b)
                accv[b] = mv;
            for (int n = terms - 2; n >= 0; --n) {
                memcpy(&mv, mom + (int64_t)n * 4, sizeof(mv));
                for (int b = 0; b < nb; ++b)
                    accv[b] = accv[b] * nx[b] + mv;
            }
            for (int b = 0; b < nb; ++b)
                scale[b] = targets[idx[b]] * c;
            for (int b = 0; b < nb; ++b) /* vectorised */
                scale[b] = tree_exp_neg_raw(scale[b] < clamp ? scale[b] : clamp);
            for (int b = 0; b < nb; ++b) {
                tree_v4 o;
                memcpy(&o, out + idx[b] * 4, sizeof(o));
                o += scale[b] * accv[b];
                memcpy(out + idx[b] * 4, &o, sizeof(o));
            }
            continue;
        }
#endif
        const double *top = mom + (int64_t)(terms - 1) * cols;
        for (int b = 0; b < nb; ++b)
            for (int col = 0; col < cols; ++col)
                acc[b * cols + col] = top[col];
        for (int n = terms - 2; n >= 0; --n) {
            const double *mn = mom + (int64_t)n * cols;
            for (int b = 0; b < nb; ++b)
                for (int col = 0; col < cols; ++col)
                    acc[b * cols + col] = acc[b * cols + col] * nx[b] + mn[col];
        }
        for (int b = 0; b < nb; ++b)
            scale[b] = targets[idx[b]] * c;
        for (int b = 0; b < nb; ++b) /* vectorised */
            scale[b] = tree_exp_neg_raw(scale[b] < clamp ? scale[b] : clamp);
        for (int b = 0; b < nb; ++b)
            for (int col = 0; col < cols; ++col)
                out[idx[b] * cols + col] += scale[b] * acc[b * cols + col];
    }
}

TREE_INLINE int64_t tree_lo(int64_t s, int64_t level, int64_t i) { return (i * s) >> level; }

/*
 * out[m, :] += sum_s ws->w[s, :] exp(-targets[m] ws->pts[s]) for the targets with valid[m]
 * (valid NULL: all; else each entry 0 or 1), s < npts. Reorders ws->pts and ws->w.
 */
TREE_INLINE void tree_exp_sums(const tree_params *p, tree_ws *ws, int64_t npts,
                               const double *targets, const unsigned char *valid,
                               int64_t ntargets, double *out, int64_t *counts, const int cols)
{
    /* the largest valid target, without branches on valid (a random pattern: the signs of
     * q): the targets are >= 0 and not nan, so the lanes' maxima combined in any order give
     * the same value */
    double lane[4] = {-1.0, -1.0, -1.0, -1.0};
    int64_t m4 = 0;
    if (valid) { /* an invalid target counts as 0 (targets are finite), so none valid is
                    told apart by the count */
        int64_t count = 0;
        for (int64_t m = 0; m < ntargets; ++m)
            count += valid[m];
        if (count == 0)
            return;
        for (; m4 + 4 <= ntargets; m4 += 4)
            for (int l = 0; l < 4; ++l) {
                const double x = targets[m4 + l] * (double)valid[m4 + l];
                lane[l] = x > lane[l] ? x : lane[l];
            }
        for (; m4 < ntargets; ++m4) {
            const double x = targets[m4] * (double)valid[m4];
            lane[0] = x > lane[0] ? x : lane[0];
        }
    } else {
        for (; m4 + 4 <= ntargets; m4 += 4)
            for (int l = 0; l < 4; ++l)
                lane[l] = targets[m4 + l] > lane[l] ? targets[m4 + l] : lane[l];
        for (; m4 < ntargets; ++m4)
            lane[0] = targets[m4] > lane[0] ? targets[m4] : lane[0];
    }
    double tmax = lane[0];
    for (int l = 1; l < 4; ++l)
        tmax = lane[l] > tmax ? lane[l] : tmax;
    if (tmax < 0.0 || npts == 0)
        return;
    double *pts = ws->pts, *w = ws->w;
    double pmin, pmax;
    tree_range(pts, npts, &pmin, &pmax);
    const double centre = 0.5 * (pmin + pmax), radius = 0.5 * (pmax - pmin);
    if (tmax * radius <= p->rho) { /* the cheap case: one expansion, no sort */
        ++counts[0];
        const int order = tree_terms(p, tmax * radius);
        tree_moments(p, cols, order, pts, w, 0, npts, centre, radius, ws->mom);
        tree_cheap_eval(p, ws->mom, order, centre, radius, targets, valid, ntargets, out, cols);
        return;
    }

    ++counts[1];
    /* sort the points (ties by position), weights along */
    for (int64_t s = 0; s < npts; ++s) {
        uint64_t bits;
        memcpy(&bits, pts + s, sizeof(bits));
        ws->keys[s].bits = bits >> 63 ? 0 : bits; /* -0.0 as +0.0; no point is below 0 */
        ws->keys[s].i = s;
    }
    tree_sort(ws, npts);
    for (int64_t s = 0; s < npts; ++s) {
        memcpy(pts + s, &ws->keys[s].bits, sizeof(double));
        memcpy(ws->w_tmp + s * cols, w + ws->keys[s].i * cols, (size_t)cols * sizeof(double));
    }
    memcpy(w, ws->w_tmp, (size_t)npts * cols * sizeof(double));

    /* the last level needed: the leaves, or the first level expanded for every target */
    const int64_t depth = tree_depth(npts, p->leaf);
    int64_t last = 0;
    for (; last < depth; ++last) {
        int64_t nodes = (int64_t)1 << last, wide = 0;
        for (int64_t i = 0; i < nodes && !wide; ++i) {
            const int64_t lo = tree_lo(npts, last, i), hi = tree_lo(npts, last, i + 1);
            wide = tmax * 0.5 * (pts[hi - 1] - pts[lo]) > p->rho;
        }
        if (!wide)
            break;
    }
    const int order = p->order;
    const int64_t stride = (int64_t)order * cols;
    /* node (l, i) has heap index 2^l - 1 + i; geometry and moments of the last level */
    {
        const int64_t nodes = (int64_t)1 << last, base = nodes - 1;
        for (int64_t i = 0; i < nodes; ++i) {
            const int64_t lo = tree_lo(npts, last, i), hi = tree_lo(npts, last, i + 1);
            const double c = 0.5 * (pts[lo] + pts[hi - 1]), r = 0.5 * (pts[hi - 1] - pts[lo]);
            ws->geom[2 * (base + i)] = c;
            ws->geom[2 * (base + i) + 1] = r;
            tree_moments(p, cols, order, pts, w, lo, hi, c, r, ws->mom + (base + i) * stride);
        }
    }
    /* translated up: M'_n = sum_{m <= n} M_m ratio^m delta^(n - m) / (n - m)! */
    for (int64_t level = last - 1; level >= 0; --level) {
        const int64_t nodes = (int64_t)1 << level, base = nodes - 1;
        for (int64_t i = 0; i < nodes; ++i) {
            const int64_t lo = tree_lo(npts, level, i), hi = tree_lo(npts, level, i + 1);
            const double c = 0.5 * (pts[lo] + pts[hi - 1]), r = 0.5 * (pts[hi - 1] - pts[lo]);
            const int64_t node = base + i;
            ws->geom[2 * node] = c;
            ws->geom[2 * node + 1] = r;
            double *mp = ws->mom + node * stride;
            memset(mp, 0, (size_t)stride * sizeof(double));
            for (int half = 0; half < 2; ++half) {
                const int64_t child = 2 * node + 1 + half;
                const double cc = ws->geom[2 * child], rc = ws->geom[2 * child + 1];
                const double ratio = r > 0.0 ? rc / r : 0.0, delta = r > 0.0 ? (cc - c) / r : 0.0;
                const double *mc = ws->mom + child * stride;
                double scaled[TREE_MAX_ORDER * TREE_MAX_COLS], shift[TREE_MAX_ORDER];
                double ratio_m = 1.0, f = 1.0;
                for (int m = 0; m < order; ++m) {
                    for (int col = 0; col < cols; ++col)
                        scaled[m * cols + col] = mc[m * cols + col] * ratio_m;
                    ratio_m *= ratio;
                    shift[m] = f;
                    f *= delta / (m + 1);
                }
#if TREE_VECTOR_EXT
                if (cols == 4) { /* the four columns as one vector */
                    for (int n = 0; n < order; ++n) {
                        tree_v4 sum, term;
                        memcpy(&sum, mp + n * 4, sizeof(sum));
                        for (int m = 0; m <= n; ++m) {
                            memcpy(&term, scaled + m * 4, sizeof(term));
                            sum += term * shift[n - m];
                        }
                        memcpy(mp + n * 4, &sum, sizeof(sum));
                    }
                    continue;
                }
#endif
                for (int n = 0; n < order; ++n)
                    for (int m = 0; m <= n; ++m)
                        for (int col = 0; col < cols; ++col)
                            mp[n * cols + col] += scaled[m * cols + col] * shift[n - m];
            }
        }
    }

    /* each target walks the tree depth first */
    for (int64_t m = 0; m < ntargets; ++m) {
        if (valid && !valid[m])
            continue;
        const double t = targets[m];
        double acc[TREE_MAX_COLS] = {0};
        tree_deferred deferred;
        deferred.count = 0;
        int64_t stack_l[TREE_MAX_DEPTH + 2], stack_i[TREE_MAX_DEPTH + 2];
        int sp = 0;
        stack_l[sp] = 0;
        stack_i[sp++] = 0;
        while (sp > 0) {
            --sp;
            const int64_t level = stack_l[sp], i = stack_i[sp];
            const int64_t node = ((int64_t)1 << level) - 1 + i;
            const int64_t lo = tree_lo(npts, level, i);
            if (t * pts[lo] > p->cut)
                continue; /* every term below exp(-CUT) |w| */
            const double c = ws->geom[2 * node], r = ws->geom[2 * node + 1];
            if (t * r <= p->rho) {
                if (deferred.count == TREE_DEFER)
                    tree_flush(p, cols, &deferred, acc);
                deferred.arg[deferred.count] = t * c;
                tree_poly(p, cols, ws->mom + node * stride, t * r,
                          deferred.poly + deferred.count * cols);
                ++deferred.count;
                ++counts[2];
            } else if (level == last) { /* a leaf: direct sum */
                const int64_t hi = tree_lo(npts, level, i + 1);
                counts[3] += hi - lo;
                for (int64_t s0 = lo; s0 < hi; s0 += TREE_CHEAP_BLOCK) {
                    const int64_t s1 = hi - s0 < TREE_CHEAP_BLOCK ? hi : s0 + TREE_CHEAP_BLOCK;
                    double e[TREE_CHEAP_BLOCK];
                    for (int64_t s = s0; s < s1; ++s) /* vectorised */
                        e[s - s0] = t * pts[s];
                    for (int64_t s = 0; s < s1 - s0; ++s)
                        e[s] = tree_exp_neg_raw(e[s] < p->clamp ? e[s] : p->clamp);
                    for (int64_t s = s0; s < s1; ++s)
                        for (int col = 0; col < cols; ++col)
                            acc[col] += e[s - s0] * w[s * cols + col];
                }
            } else { /* the nearer child (smaller points) last, so it is summed first */
                stack_l[sp] = level + 1;
                stack_i[sp++] = 2 * i + 1;
                stack_l[sp] = level + 1;
                stack_i[sp++] = 2 * i;
            }
        }
        tree_flush(p, cols, &deferred, acc);
        for (int col = 0; col < cols; ++col)
            out[m * cols + col] += acc[col];
    }
}

/* Instances for the column counts the attention uses (a constant count lets the compiler
 * unroll and vectorise the loops over the columns), each for the baseline architecture and
 * for AVX2+FMA. The contraction of multiply-adds is off (setup.py: -ffp-contract=off) and no
 * loop is reassociated, so every instance computes the same operations in the same order:
 * the results are bitwise the same on every path. */
#define TREE_INSTANCE(name, attr, cols)                                                      \
    attr TREE_NOINLINE static void name(const tree_params *p, tree_ws *ws, int64_t npts,     \
                                        const double *targets, const unsigned char *valid,  \
                                        int64_t ntargets, double *out, int64_t *counts)     \
    {                                                                                        \
        tree_exp_sums(p, ws, npts, targets, valid, ntargets, out, counts, cols);            \
    }
#define TREE_BASELINE
TREE_INSTANCE(tree_sums_any, TREE_BASELINE, p->cols)
TREE_INSTANCE(tree_sums_2, TREE_BASELINE, 2)
TREE_INSTANCE(tree_sums_3, TREE_BASELINE, 3)
TREE_INSTANCE(tree_sums_4, TREE_BASELINE, 4)
#if TREE_X86
TREE_INSTANCE(tree_sums_any_avx2, TREE_AVX2, p->cols)
TREE_INSTANCE(tree_sums_2_avx2, TREE_AVX2, 2)
TREE_INSTANCE(tree_sums_3_avx2, TREE_AVX2, 3)
TREE_INSTANCE(tree_sums_4_avx2, TREE_AVX2, 4)
#endif

/* the instance for `cols` columns and the instruction set `isa` (0 scalar, 1 AVX2, 2 AVX-512:
 * the AVX2 code, four doubles being all the columns there are) */
static tree_sums_fn tree_pick(int cols, int isa)
{
#if TREE_X86
    if (isa >= 1 && tgem_isa_supported(1))
        return cols == 2 ? tree_sums_2_avx2
               : cols == 3 ? tree_sums_3_avx2
               : cols == 4 ? tree_sums_4_avx2
                           : tree_sums_any_avx2;
#endif
    (void)isa;
    return cols == 2   ? tree_sums_2
           : cols == 3 ? tree_sums_3
           : cols == 4 ? tree_sums_4
                       : tree_sums_any;
}

/* --------------------------------------------------------------------------- row tasks */
typedef struct {
    const double *q, *k, *w_plus, *w_minus; /* row sums: weights over keys (n x g x C) */
    const double *coeffs;                   /* column sums: weights over queries (n x g x C) */
    int64_t g;
    const tree_params *p;
    double *out;
    tree_slot *slots;
    atomic_int error;
    atomic_llong counts[TREE_NCOUNTS];
} tree_ctx;

static void tree_add_to(atomic_llong *dst, const int64_t *counts)
{
    for (int i = 0; i < TREE_NCOUNTS; ++i)
        atomic_fetch_add(&dst[i], (long long)counts[i]);
}

static void tree_add_counts(tree_ctx *ctx, const int64_t *counts)
{
    tree_add_to(ctx->counts, counts);
}

static void tree_key_range(const double *k, int64_t g, double *kmin, double *kmax)
{
    tree_range(k, g, kmin, kmax);
}

static void tree_row_task(const void *vctx, int64_t row)
{
    tree_ctx *ctx = (tree_ctx *)vctx;
    const tree_params *p = ctx->p;
    const int64_t g = ctx->g, cols = p->cols;
    const double *q = ctx->q + row * g, *k = ctx->k + row * g;
    double *out = ctx->out + row * g * cols;
    memset(out, 0, (size_t)g * cols * sizeof(double));
    int64_t counts[TREE_NCOUNTS] = {0};
    tree_slot *slot = tree_slot_take(ctx->slots, g, p);
    if (!slot) {
        atomic_store(&ctx->error, TREE_ENOMEM);
        return;
    }
    tree_ws ws = slot->ws;
    double *t = ws.buf;
    unsigned char *valid = ws.valid;
    double kmin, kmax;
    tree_key_range(k, g, &kmin, &kmax);
    for (int side = 0; side < 2; ++side) { /* q >= 0, then q < 0 */
        int64_t count = 0;
        for (int64_t i = 0; i < g; ++i) {
            valid[i] = (q[i] >= 0.0) == (side == 0);
            t[i] = fabs(q[i]);
            count += valid[i];
        }
        if (count == 0)
            continue;
        const double *w = (side == 0 ? ctx->w_plus : ctx->w_minus) + row * g * cols;
        for (int64_t j = 0; j < g; ++j)
            ws.pts[j] = side == 0 ? kmax - k[j] : k[j] - kmin;
        memcpy(ws.w, w, (size_t)g * cols * sizeof(double));
        p->sums(p, &ws, g, t, valid, g, out, counts);
    }
    tree_add_counts(ctx, counts);
    tree_slot_give(slot);
}

static void tree_column_task(const void *vctx, int64_t row)
{
    tree_ctx *ctx = (tree_ctx *)vctx;
    const tree_params *p = ctx->p;
    const int64_t g = ctx->g, cols = p->cols;
    const double *q = ctx->q + row * g, *k = ctx->k + row * g;
    const double *coeffs = ctx->coeffs + row * g * cols;
    double *out = ctx->out + row * g * cols;
    memset(out, 0, (size_t)g * cols * sizeof(double));
    int64_t counts[TREE_NCOUNTS] = {0};
    tree_slot *slot = tree_slot_take(ctx->slots, g, p);
    if (!slot) {
        atomic_store(&ctx->error, TREE_ENOMEM);
        return;
    }
    tree_ws ws = slot->ws;
    double *d = ws.buf;
    double kmin, kmax;
    tree_key_range(k, g, &kmin, &kmax);
    for (int side = 0; side < 2; ++side) {
        int64_t count = 0; /* the sources: the queries of this sign */
        for (int64_t i = 0; i < g; ++i) {
            if ((q[i] >= 0.0) != (side == 0))
                continue;
            ws.pts[count] = fabs(q[i]);
            memcpy(ws.w + count * cols, coeffs + i * cols, (size_t)cols * sizeof(double));
            ++count;
        }
        if (count == 0)
            continue;
        for (int64_t j = 0; j < g; ++j)
            d[j] = side == 0 ? kmax - k[j] : k[j] - kmin;
        p->sums(p, &ws, count, d, NULL, g, out, counts);
    }
    tree_add_counts(ctx, counts);
    tree_slot_give(slot);
}

/* ------------------------------------------------------------ fused forward and backward */
/* The whole attention per row: the rank-1 reduction, the sums and the elementwise parts
 * (the formulas of tree_forward and tree_backward in _tree.py), one task per row, reading the
 * inputs in their dtype (float32 or float64) and writing the results rounded to it. */
typedef struct {
    const void *q, *k, *v, *grad; /* (n x g), float32 when f32 else float64 */
    int f32;
    int with_grad;                /* forward: also r, kk (4 weight columns, else 2) */
    double exp_floor;             /* EXP_FLOOR: clamp of the diagonal's exponent */
    double *out, *z, *r, *kk;     /* forward: written (NULL: not wanted); backward: read */
    void *y, *dq, *dk, *dv;       /* results in the input dtype */
    int64_t g;
    const tree_params *p;
    tree_slot *slots;
    atomic_int error;
    atomic_llong counts[TREE_NCOUNTS];
} tree_fused_ctx;

/* row `row` of src (float32 or float64) as doubles; returns whether all are finite */
static int tree_load(const void *src, int f32, int64_t row, int64_t g, double *dst)
{
    if (f32) {
        const float *s = (const float *)src + row * g;
        for (int64_t j = 0; j < g; ++j)
            dst[j] = s[j];
    } else {
        memcpy(dst, (const double *)src + row * g, (size_t)g * sizeof(double));
    }
    int finite = 1;
    for (int64_t j = 0; j < g; ++j)
        finite &= dst[j] - dst[j] == 0.0; /* nan for inf and nan */
    return finite;
}

/* src rounded to the dtype into row `row` of dst, results below the smallest normal number
 * flushed to (+) zero (as _to_output of _tree.py) */
static void tree_store(void *dst, int f32, int64_t row, int64_t g, const double *src)
{
    if (f32) {
        float *d = (float *)dst + row * g;
        for (int64_t j = 0; j < g; ++j) {
            const float x = (float)src[j];
            d[j] = fabsf(x) < 1.17549435082228750797e-38F ? 0.0F : x;
        }
    } else {
        double *d = (double *)dst + row * g;
        for (int64_t j = 0; j < g; ++j) {
            const double x = src[j];
            d[j] = fabs(x) < 2.2250738585072013831e-308 ? 0.0 : x;
        }
    }
}

/* the diagonal term exp(q_i k_i - m_i) = exp(-t_i d_own), exponent clamped at exp_floor; d_own
 * is chosen by q's sign bit (q = -0.0 has t = 0, so either side gives 1, as q >= 0 does) */
TREE_INLINE double tree_e_diag(double q, double k, double kmin, double kmax, double floor_)
{
    const double x = fabs(q) * tree_select_sign(q, kmax - k, k - kmin);
    return tree_exp_neg_raw(x < floor_ ? x : floor_);
}

static void tree_fwd_task(const void *vctx, int64_t row)
{
    tree_fused_ctx *ctx = (tree_fused_ctx *)vctx;
    const tree_params *p = ctx->p;
    const int64_t g = ctx->g, cols = p->cols;
    int64_t counts[TREE_NCOUNTS] = {0};
    tree_slot *slot = tree_slot_take(ctx->slots, g, p);
    if (!slot) {
        atomic_store(&ctx->error, TREE_ENOMEM);
        return;
    }
    tree_ws ws = slot->ws;
    double *buf = ws.buf; /* 5 + cols <= TREE_BUF_ROWS arrays */
    unsigned char *valid = ws.valid;
    double *q = buf, *k = q + g, *v = k + g, *t = v + g, *res = t + g, *sums = res + g;
    const int finite = tree_load(ctx->q, ctx->f32, row, g, q) &
                       tree_load(ctx->k, ctx->f32, row, g, k) &
                       tree_load(ctx->v, ctx->f32, row, g, v);
    if (!finite) {
        atomic_store(&ctx->error, TREE_ENONFINITE);
        goto done;
    }
    memset(sums, 0, (size_t)g * cols * sizeof(double));
    double kmin, kmax;
    tree_key_range(k, g, &kmin, &kmax);
    for (int64_t i = 0; i < g; ++i)
        t[i] = fabs(q[i]);
    for (int side = 0; side < 2; ++side) { /* q >= 0, then q < 0 */
        int64_t count = 0;
        for (int64_t i = 0; i < g; ++i) {
            valid[i] = (q[i] >= 0.0) == (side == 0);
            count += valid[i];
        }
        if (count == 0)
            continue;
        for (int64_t j = 0; j < g; ++j) {
            ws.pts[j] = side == 0 ? kmax - k[j] : k[j] - kmin;
            double *wj = ws.w + j * cols;
            wj[0] = 1.0;
            wj[1] = v[j];
            if (cols == 4) {
                wj[2] = v[j] * k[j];
                wj[3] = k[j];
            }
        }
        p->sums(p, &ws, g, t, valid, g, sums, counts);
    }
    const int64_t at = row * g;
    const double exp_floor = ctx->exp_floor;
    for (int64_t i = 0; i < g; ++i) /* vectorised */
        res[i] = tree_e_diag(q[i], k[i], kmin, kmax, exp_floor);
    for (int64_t i = 0; i < g; ++i) {
        const double *s = sums + i * cols;
        res[i] = (s[1] - res[i] * v[i]) / s[0];
    }
    if (ctx->out)
        for (int64_t i = 0; i < g; ++i) {
            const double *s = sums + i * cols;
            ctx->out[at + i] = res[i];
            ctx->z[at + i] = s[0];
            if (cols == 4) {
                ctx->r[at + i] = s[2];
                ctx->kk[at + i] = s[3];
            }
        }
    tree_store(ctx->y, ctx->f32, row, g, res);
done:
    tree_add_to(ctx->counts, counts);
    tree_slot_give(slot);
}

static void tree_bwd_task(const void *vctx, int64_t row)
{
    tree_fused_ctx *ctx = (tree_fused_ctx *)vctx;
    const tree_params *p = ctx->p;
    const int64_t g = ctx->g, cols = p->cols; /* 4: c1, c2, c2 out, 0 (one vector) */
    int64_t counts[TREE_NCOUNTS] = {0};
    tree_slot *slot = tree_slot_take(ctx->slots, g, p);
    if (!slot) {
        atomic_store(&ctx->error, TREE_ENOMEM);
        return;
    }
    tree_ws ws = slot->ws;
    double *buf = ws.buf; /* 9 + cols <= TREE_BUF_ROWS arrays */
    double *q = buf, *k = q + g, *v = k + g, *gr = v + g, *d = gr + g, *dq = d + g;
    double *dk = dq + g, *dv = dk + g, *ed = dv + g, *sums = ed + g;
    tree_load(ctx->q, ctx->f32, row, g, q);
    tree_load(ctx->k, ctx->f32, row, g, k);
    tree_load(ctx->v, ctx->f32, row, g, v);
    tree_load(ctx->grad, ctx->f32, row, g, gr);
    const int64_t at = row * g;
    const double *out = ctx->out + at, *z = ctx->z + at, *r = ctx->r + at, *kk = ctx->kk + at;
    double kmin, kmax;
    tree_key_range(k, g, &kmin, &kmax);
    const double exp_floor = ctx->exp_floor;
    for (int64_t i = 0; i < g; ++i) /* vectorised */
        ed[i] = tree_e_diag(q[i], k[i], kmin, kmax, exp_floor);
    for (int64_t i = 0; i < g; ++i)
        dq[i] = gr[i] * ((r[i] - ed[i] * v[i] * k[i]) - out[i] * kk[i]) / z[i];
    memset(sums, 0, (size_t)g * cols * sizeof(double));
    for (int side = 0; side < 2; ++side) {
        int64_t count = 0; /* the sources: the queries of this sign */
        for (int64_t i = 0; i < g; ++i) { /* no branch on the sign (a random pattern): the
                                              slot is overwritten when q[i] is of the other */
            const double c1 = gr[i] / z[i], c2 = c1 * q[i];
            ws.pts[count] = fabs(q[i]);
            ws.w[count * 4] = c1;
            ws.w[count * 4 + 1] = c2;
            ws.w[count * 4 + 2] = c2 * out[i];
            ws.w[count * 4 + 3] = 0.0;
            count += (q[i] >= 0.0) == (side == 0);
        }
        if (count == 0)
            continue;
        for (int64_t j = 0; j < g; ++j)
            d[j] = side == 0 ? kmax - k[j] : k[j] - kmin;
        p->sums(p, &ws, count, d, NULL, g, sums, counts);
    }
    for (int64_t j = 0; j < g; ++j) {
        const double *s = sums + j * 4;
        const double a = ed[j] / z[j];
        dv[j] = s[0] - gr[j] * a;
        dk[j] = v[j] * (s[1] - gr[j] * q[j] * a) - s[2];
    }
    tree_store(ctx->dq, ctx->f32, row, g, dq);
    tree_store(ctx->dk, ctx->f32, row, g, dk);
    tree_store(ctx->dv, ctx->f32, row, g, dv);
    tree_add_to(ctx->counts, counts);
    tree_slot_give(slot);
}

/* Run task(ctx, 0 .. n - 1) on up to nthreads threads with fresh workspace slots, error
 * code and work counters (the fields of either context kind, passed by address); counts
 * (TREE_NCOUNTS entries, may be NULL) receive the work done. */
static int tree_run_tasks(tree_slot **slots, atomic_int *error, atomic_llong *acc,
                          tgem_task_fn task, const void *ctx, int64_t n, int64_t *counts,
                          int nthreads)
{
    atomic_init(error, TREE_OK);
    for (int i = 0; i < TREE_NCOUNTS; ++i)
        atomic_init(&acc[i], 0);
    *slots = tree_slots_new();
    if (!*slots)
        return TREE_ENOMEM;
    tgem_parallel(nthreads, n, task, ctx);
    tree_slots_free(*slots);
    if (counts)
        for (int i = 0; i < TREE_NCOUNTS; ++i)
            counts[i] = (int64_t)atomic_load(&acc[i]);
    return atomic_load(error);
}

static int tree_fused_run(tree_fused_ctx *ctx, tgem_task_fn task, int64_t n, int64_t *counts,
                          int nthreads)
{
    return tree_run_tasks(&ctx->slots, &ctx->error, ctx->counts, task, ctx, n, counts, nthreads);
}

/* ---------------------------------------------------------------------------------- API */
TREE_API int tgem_tree_abi_version(void) { return TREE_ABI_VERSION; }

/* one task per row; counts (TREE_NCOUNTS entries, may be NULL) receive the work done */
static int tree_run(tree_ctx *ctx, tgem_task_fn task, int64_t n, int64_t *counts, int nthreads)
{
    return tree_run_tasks(&ctx->slots, &ctx->error, ctx->counts, task, ctx, n, counts, nthreads);
}

/* row sums (see the top of this file); arrays contiguous, out (n x g x cols) written,
 * counts (TREE_NCOUNTS, may be NULL) the work done */
TREE_API int tgem_tree_row_sums(const double *q, const double *k, const double *w_plus,
                                const double *w_minus, int64_t n, int64_t g, int cols,
                                int order, double rho, double cut, double clamp, int64_t leaf,
                                double tol, double *out, int64_t *counts, int isa,
                                int nthreads)
{
    tree_params p;
    if (n < 0 || g < 0 || nthreads < 1 ||
        (n > 0 && g > 0 && (!q || !k || !w_plus || !w_minus || !out)))
        return TREE_EARGS;
    int code = tree_params_init(&p, order, cols, rho, cut, clamp, leaf, tol);
    if (code != TREE_OK)
        return code;
    p.sums = tree_pick(cols, isa);
    if (n == 0 || g == 0)
        return TREE_OK;
    tree_ctx ctx = {.q = q, .k = k, .w_plus = w_plus, .w_minus = w_minus, .g = g, .p = &p,
                    .out = out};
    return tree_run(&ctx, tree_row_task, n, counts, nthreads);
}

/* column sums (see the top of this file); as tgem_tree_row_sums */
TREE_API int tgem_tree_column_sums(const double *q, const double *k, const double *coeffs,
                                   int64_t n, int64_t g, int cols, int order, double rho,
                                   double cut, double clamp, int64_t leaf, double tol,
                                   double *out, int64_t *counts, int isa, int nthreads)
{
    tree_params p;
    if (n < 0 || g < 0 || nthreads < 1 || (n > 0 && g > 0 && (!q || !k || !coeffs || !out)))
        return TREE_EARGS;
    int code = tree_params_init(&p, order, cols, rho, cut, clamp, leaf, tol);
    if (code != TREE_OK)
        return code;
    p.sums = tree_pick(cols, isa);
    if (n == 0 || g == 0)
        return TREE_OK;
    tree_ctx ctx = {.q = q, .k = k, .coeffs = coeffs, .g = g, .p = &p, .out = out};
    return tree_run(&ctx, tree_column_task, n, counts, nthreads);
}

/* Fused forward (see "fused forward and backward" above): q, k, v (n x g) float32 (f32) or
 * float64, contiguous; y (the output, the inputs' dtype) written; with with_grad, out, z, r
 * and kk (n x g float64, the backward's inputs) written too (out may be NULL without
 * with_grad: then none of them is). TREE_ENONFINITE when an input holds inf or nan. */
TREE_API int tgem_tree_forward(const void *q, const void *k, const void *v, int f32, int64_t n,
                               int64_t g, int with_grad, int order, double rho, double cut,
                               double clamp, int64_t leaf, double tol, double exp_floor,
                               void *y, double *out, double *z, double *r, double *kk,
                               int64_t *counts, int isa, int nthreads)
{
    tree_params p;
    if (n < 0 || g < 0 || nthreads < 1 ||
        (n > 0 && g > 0 &&
         (!q || !k || !v || !y || (with_grad && (!out || !z || !r || !kk)) ||
          (out && (!z || (with_grad && (!r || !kk)))))))
        return TREE_EARGS;
    if (!(exp_floor >= 0.0 && exp_floor <= 708.0))
        return TREE_EARGS;
    const int cols = with_grad ? 4 : 2;
    int code = tree_params_init(&p, order, cols, rho, cut, clamp, leaf, tol);
    if (code != TREE_OK)
        return code;
    p.sums = tree_pick(cols, isa);
    if (n == 0 || g == 0)
        return TREE_OK;
    tree_fused_ctx ctx = {.q = q, .k = k, .v = v, .f32 = f32 != 0, .with_grad = with_grad != 0,
                          .exp_floor = exp_floor, .out = out, .z = z, .r = r, .kk = kk,
                          .y = y, .g = g, .p = &p};
    return tree_fused_run(&ctx, tree_fwd_task, n, counts, nthreads);
}

/* Fused backward: the forward's inputs (as given to it), the upstream gradient grad (their
 * dtype), its out, z, r, kk; dq, dk, dv (the inputs' dtype) written. */
TREE_API int tgem_tree_backward(const void *q, const void *k, const void *v, const void *grad,
                                int f32, const double *out, const double *z, const double *r,
                                const double *kk, int64_t n, int64_t g, int order, double rho,
                                double cut, double clamp, int64_t leaf, double tol,
                                double exp_floor, void *dq, void *dk, void *dv,
                                int64_t *counts, int isa, int nthreads)
{
    tree_params p;
    if (n < 0 || g < 0 || nthreads < 1 ||
        (n > 0 && g > 0 &&
         (!q || !k || !v || !grad || !out || !z || !r || !kk || !dq || !dk || !dv)))
        return TREE_EARGS;
    if (!(exp_floor >= 0.0 && exp_floor <= 708.0))
        return TREE_EARGS;
    int code = tree_params_init(&p, order, 4, rho, cut, clamp, leaf, tol);
    if (code != TREE_OK)
        return code;
    p.sums = tree_pick(4, isa);
    if (n == 0 || g == 0)
        return TREE_OK;
    tree_fused_ctx ctx = {.q = q, .k = k, .v = v, .grad = grad, .f32 = f32 != 0,
                          .exp_floor = exp_floor, .out = (double *)out, .z = (double *)z,
                          .r = (double *)r, .kk = (double *)kk, .dq = dq, .dk = dk, .dv = dv,
                          .g = g, .p = &p};
    return tree_fused_run(&ctx, tree_bwd_task, n, counts, nthreads);
}

/* ------------------------------------------------------------------ auto's per-layer reach */
/* The score reach of one layer: the largest max_i |q_i| * (max_j k_j - min_j k_j) over the
 * (batch x heads) rows of q = x * wq and k = x * wk, computed in T (float or double) as
 * tgem._kernels._registry._layer_reach does, so the same value: the products and extremes are
 * exact operations whatever their order. NaN anywhere makes the result NaN (numpy's min and
 * max propagate it). One thread: a few hundred thousand products, where waking a thread pool
 * costs more than the pass. The genes go by vectors of 32 bytes (compare and select on bit
 * masks: the same extremes as a scalar loop), the rest one by one. */
typedef float tree_reach_f32v __attribute__((vector_size(16), aligned(4)));
typedef int32_t tree_reach_f32m __attribute__((vector_size(16)));
typedef double tree_reach_f64v __attribute__((vector_size(16), aligned(8)));
typedef int64_t tree_reach_f64m __attribute__((vector_size(16)));

#define TREE_REACH_SELECT(M, V, C, A, B) ((V)(((C) & (M)(A)) | (~(C) & (M)(B))))
#define TREE_REACH_GROUPS 4 /* independent accumulators: the selects' latency overlaps */
#define TREE_REACH_ROW(T, V, M, NAME)                                                          \
    static T NAME(const T *x, const T *wq, const T *wk, int64_t g, int *bad)                   \
    {                                                                                          \
        enum { L = sizeof(V) / sizeof(T), U = TREE_REACH_GROUPS };                             \
        const V zero = {0};                                                                    \
        V qlo[U], qhi[U], klo[U], khi[U];                                                      \
        M nan[U];                                                                              \
        for (int u = 0; u < U; ++u) {                                                          \
            qlo[u] = klo[u] = zero + (T)INFINITY;                                              \
            qhi[u] = khi[u] = zero - (T)INFINITY;                                              \
            nan[u] = (M){0};                                                                   \
        }                                                                                      \
        int64_t i = 0;                                                                         \
        for (; i + U * L <= g; i += U * L)                                                     \
            for (int u = 0; u < U; ++u) {                                                      \
                V xv, qv, kv;                                                                  \
                memcpy(&xv, x + i + u * L, sizeof xv);                                         \
                memcpy(&qv, wq + i + u * L, sizeof qv);                                        \
                memcpy(&kv, wk + i + u * L, sizeof kv);                                        \
                const V a = xv * qv, c = xv * kv;                                              \
                qlo[u] = TREE_REACH_SELECT(M, V, a < qlo[u], a, qlo[u]);                       \
                qhi[u] = TREE_REACH_SELECT(M, V, a > qhi[u], a, qhi[u]);                       \
                klo[u] = TREE_REACH_SELECT(M, V, c < klo[u], c, klo[u]);                       \
                khi[u] = TREE_REACH_SELECT(M, V, c > khi[u], c, khi[u]);                       \
                nan[u] |= (a != a) | (c != c);                                                 \
            }                                                                                  \
        T lo = (T)INFINITY, hi = -(T)INFINITY, kl = (T)INFINITY, kh = -(T)INFINITY;            \
        int bad_row = 0;                                                                       \
        for (int u = 0; u < U; ++u)                                                            \
            for (int j = 0; j < L; ++j) {                                                      \
                lo = qlo[u][j] < lo ? qlo[u][j] : lo;                                          \
                hi = qhi[u][j] > hi ? qhi[u][j] : hi;                                          \
                kl = klo[u][j] < kl ? klo[u][j] : kl;                                          \
                kh = khi[u][j] > kh ? khi[u][j] : kh;                                          \
                bad_row |= nan[u][j] != 0;                                                     \
            }                                                                                  \
        for (; i < g; ++i) {                                                                   \
            const T a = x[i] * wq[i], c = x[i] * wk[i];                                        \
            lo = a < lo ? a : lo;                                                              \
            hi = a > hi ? a : hi;                                                              \
            kl = c < kl ? c : kl;                                                              \
            kh = c > kh ? c : kh;                                                              \
            bad_row |= (a != a) | (c != c);                                                    \
        }                                                                                      \
        *bad |= bad_row;                                                                       \
        const T top = -lo > hi ? -lo : hi; /* max(|hi|, |lo|) */                               \
        return top * (kh - kl);                                                                \
    }
TREE_REACH_ROW(float, tree_reach_f32v, tree_reach_f32m, tree_reach_row_f32)
TREE_REACH_ROW(double, tree_reach_f64v, tree_reach_f64m, tree_reach_row_f64)

/* x (batch x g), wq and wk (heads x g), contiguous, float32 when f32 else float64; *reach
 * receives the layer's reach (0 when batch, heads or g is 0). */
TREE_API int tgem_layer_reach(const void *x, const void *wq, const void *wk, int f32,
                              int64_t batch, int64_t heads, int64_t g, double *reach)
{
    if (batch < 0 || heads < 0 || g < 0 || !reach ||
        (batch > 0 && heads > 0 && g > 0 && (!x || !wq || !wk)))
        return TREE_EARGS;
    double best = 0.0;
    int bad = 0;
    if (batch > 0 && heads > 0 && g > 0) {
        best = -INFINITY;
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t h = 0; h < heads; ++h) {
                const double r =
                    f32 ? (double)tree_reach_row_f32((const float *)x + b * g,
                                                     (const float *)wq + h * g,
                                                     (const float *)wk + h * g, g, &bad)
                        : tree_reach_row_f64((const double *)x + b * g,
                                             (const double *)wq + h * g,
                                             (const double *)wk + h * g, g, &bad);
                bad |= r != r;
                best = r > best ? r : best;
            }
    }
    *reach = bad ? NAN : best;
    return TREE_OK;
}
