/* Fused multiply-add throughput probe for benchmarks/fma_probe.py (not part of tgem).
 *
 * Each of nthreads threads runs `iters` rounds of independent vector FMA chains held in
 * registers (fma_probe_chains(isa) chains of fma_isa_lanes(isa) lanes), with the same run-time
 * dispatch as tgem's native kernel (tgem/_csrc/tgem_kernels.c): AVX-512F, AVX2+FMA, scalar.
 * The caller times fma_probe(). It returns a checksum (so the work cannot be optimised away), or
 * NaN for an unsupported instruction set or bad arguments.
 *
 * Built by fma_probe.py with the C compiler ($CC, default cc):
 *     cc -O3 -std=gnu11 -ffp-contract=off -shared -fPIC -pthread fma_probe.c -o fma_probe.so
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#define FMA_X86 1
#include <immintrin.h>
#else
#define FMA_X86 0
#endif

#define API __attribute__((visibility("default")))
#define MAX_THREADS 256
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 }; /* the codes of tgem._kernels._native.ISAS */

typedef struct { int64_t iters; float seed; float result; } probe_task;

#define CHAINS_SCALAR 8
static void *task_scalar(void *arg)
{
    probe_task *c = (probe_task *)arg;
    float acc[CHAINS_SCALAR];
    const float a = 0.999f * c->seed, b = 1e-3f;
    for (int r = 0; r < CHAINS_SCALAR; ++r)
        acc[r] = (float)r;
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < CHAINS_SCALAR; ++r)
            acc[r] = acc[r] * a + b;
    float s = 0.0f;
    for (int r = 0; r < CHAINS_SCALAR; ++r)
        s += acc[r];
    c->result = s;
    return NULL;
}

#if FMA_X86
#define CHAINS_256 12
__attribute__((target("avx2,fma"))) static void *task_avx2(void *arg)
{
    probe_task *c = (probe_task *)arg;
    __m256 acc[CHAINS_256];
    const __m256 a = _mm256_set1_ps(0.999f * c->seed), b = _mm256_set1_ps(1e-3f);
    for (int r = 0; r < CHAINS_256; ++r)
        acc[r] = _mm256_set1_ps((float)r);
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < CHAINS_256; ++r)
            acc[r] = _mm256_fmadd_ps(acc[r], a, b);
    __m256 s = acc[0];
    for (int r = 1; r < CHAINS_256; ++r)
        s = _mm256_add_ps(s, acc[r]);
    float tmp[8];
    _mm256_storeu_ps(tmp, s);
    c->result = tmp[0];
    return NULL;
}

#define CHAINS_512 24
__attribute__((target("avx512f,avx512dq"))) static void *task_avx512(void *arg)
{
    probe_task *c = (probe_task *)arg;
    __m512 acc[CHAINS_512];
    const __m512 a = _mm512_set1_ps(0.999f * c->seed), b = _mm512_set1_ps(1e-3f);
    for (int r = 0; r < CHAINS_512; ++r)
        acc[r] = _mm512_set1_ps((float)r);
    for (int64_t it = 0; it < c->iters; ++it)
#pragma GCC unroll 32
        for (int r = 0; r < CHAINS_512; ++r)
            acc[r] = _mm512_fmadd_ps(acc[r], a, b);
    __m512 s = acc[0];
    for (int r = 1; r < CHAINS_512; ++r)
        s = _mm512_add_ps(s, acc[r]);
    float tmp[16];
    _mm512_storeu_ps(tmp, s);
    c->result = tmp[0];
    return NULL;
}
#endif

/* 1 if this processor (and OS) can run the path `isa`, else 0 */
API int fma_isa_supported(int isa)
{
    if (isa == ISA_SCALAR)
        return 1;
#if FMA_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

/* lanes of one vector of the path `isa` */
API int fma_isa_lanes(int isa) { return isa == ISA_AVX512 ? 16 : (isa == ISA_AVX2 ? 8 : 1); }

/* independent FMA chains per round of the path `isa` */
API int fma_probe_chains(int isa)
{
#if FMA_X86
    if (isa == ISA_AVX512)
        return CHAINS_512;
    if (isa == ISA_AVX2)
        return CHAINS_256;
#endif
    return CHAINS_SCALAR;
}

API float fma_probe(int isa, int nthreads, int64_t iters, float seed)
{
    probe_task tasks[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    void *(*fn)(void *) = task_scalar;
    if (!fma_isa_supported(isa) || nthreads < 1 || nthreads > MAX_THREADS || iters < 0)
        return NAN;
#if FMA_X86
    if (isa == ISA_AVX512)
        fn = task_avx512;
    else if (isa == ISA_AVX2)
        fn = task_avx2;
#endif
    int started = 0;
    for (int i = 0; i < nthreads; ++i) {
        tasks[i].iters = iters;
        tasks[i].seed = seed;
        tasks[i].result = 0.0f;
    }
    for (int i = 1; i < nthreads; ++i) {
        if (pthread_create(&threads[started], NULL, fn, &tasks[i]) != 0)
            break;
        ++started;
    }
    fn(&tasks[0]); /* the caller is one of the threads */
    for (int i = 0; i < started; ++i)
        pthread_join(threads[i], NULL);
    if (started != nthreads - 1)
        return NAN; /* fewer threads than asked would bias the rate: refuse */
    float s = 0.0f;
    for (int i = 0; i < nthreads; ++i)
        s += tasks[i].result;
    return s;
}
