/* benchmarks/fma_peak.c — the machine's float32 FMA peak, measured rather than looked up.
 *
 * bench.py compiles this with -O3 -march=native -fopenmp and reports every conv config's
 * GFLOP/s as a share of what it returns. Each thread runs chains of fused multiply-adds on
 * ACCUMULATORS independent vector registers: an FMA has a latency of ~4 cycles and a core
 * issues up to two per cycle, so at least 8 chains must be in flight to keep both units busy;
 * more are used where the register file allows (32 zmm on AVX-512, 16 ymm on AVX2), leaving
 * registers for the two constants. No memory is touched inside the loop.
 */
#include <math.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
#define ACCUMULATORS 24
typedef __m512 vec;
#define VSET1(v) _mm512_set1_ps(v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VLANE0(v) _mm512_cvtss_f32(v)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
#define ACCUMULATORS 12
typedef __m256 vec;
#define VSET1(v) _mm256_set1_ps(v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VLANE0(v) _mm256_cvtss_f32(v)
#else
/* No known vector FMA: scalar fmaf, so the figure stays correct (and modest) elsewhere. */
#define LANES 1
#define ACCUMULATORS 8
typedef float vec;
#define VSET1(v) (v)
#define VFMA(a, b, c) fmaf(a, b, c)
#define VADD(a, b) ((a) + (b))
#define VLANE0(v) (v)
#endif

/* Written at the end so that the compiler cannot drop the loop as dead code. */
static volatile float fma_peak_sink;

int fma_peak_lanes(void) { return LANES; }
int fma_peak_accumulators(void) { return ACCUMULATORS; }

/* Runs `iterations` rounds of ACCUMULATORS vector FMAs on each of `threads` OpenMP threads and
 * returns the wall seconds the parallel region took (from the first thread's start to the last
 * one's end, as a kernel's time is measured). FLOPs done: 2 · LANES · ACCUMULATORS ·
 * iterations · threads. */
double fma_peak_seconds(int threads, long iterations)
{
    double start = omp_get_wtime();
    #pragma omp parallel num_threads(threads)
    {
        /* x ← x·a + b with a just under 1 stays finite and normal for any iteration count. */
        const vec a = VSET1(0.999999f), b = VSET1(1e-7f);
        vec acc[ACCUMULATORS];
        #pragma GCC unroll 64
        for (int i = 0; i < ACCUMULATORS; i++)
            acc[i] = VSET1(1.0f + 0.001f * (float)(i + omp_get_thread_num()));
        for (long it = 0; it < iterations; it++) {
            /* Unrolled in full, so that every accumulator lives in a register. */
            #pragma GCC unroll 64
            for (int i = 0; i < ACCUMULATORS; i++)
                acc[i] = VFMA(acc[i], a, b);
        }
        vec sum = acc[0];
        for (int i = 1; i < ACCUMULATORS; i++)
            sum = VADD(sum, acc[i]);
        #pragma omp critical
        fma_peak_sink += VLANE0(sum);
    }
    return omp_get_wtime() - start;
}
