/* CPU kernels of the Bayesian layers' reparameterised draw (trainer.kernels).
 *
 * Compiled at first use on the machine that runs them (cc -O3 -march=native, no
 * -ffast-math: NaN and Inf keep their IEEE meaning and denormals are not flushed in the
 * process), loaded with ctypes, called on float32 C-contiguous CPU tensors.
 *
 * Threads: the exported bnn_* functions split their work with OpenMP between `threads`
 * threads (torch.get_num_threads()) in BLOCK-aligned shares, each running a *_range
 * function. The library is loaded after torch and names the same libgomp.so.1, so it runs
 * on torch's own OpenMP threads (no second pool competing for the cores); without -fopenmp
 * the pragmas are ignored and everything runs on the calling thread. Every value depends
 * only on its element index, never on the split.
 *
 * Random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
 * 3", SC 2011; the counter-based generator of cuRAND and JAX) keyed by a 64-bit seed, one
 * counter per 4 outputs, turned into N(0, 1) draws by the Box-Muller transform on 24-bit
 * uniforms in (0, 1). Block b (elements b * BLOCK .. b * BLOCK + BLOCK - 1) uses the
 * counters b * BLOCK / 4 .. (b + 1) * BLOCK / 4 - 1, so a draw's values do not depend on how
 * it is split between threads, and two draws with different seeds are independent.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* glibc's vector math (libmvec) variants of the scalar functions. Declared here rather than
   through -ffast-math, which would also allow the compiler to assume no NaN/Inf and (with
   GCC < 13) link crtfastmath.o, which flushes denormals to zero in the whole process. */
extern float expf(float) __attribute__((__simd__("notinbranch")));
extern float logf(float) __attribute__((__simd__("notinbranch")));
extern float log1pf(float) __attribute__((__simd__("notinbranch")));
extern float sinf(float) __attribute__((__simd__("notinbranch")));
extern float cosf(float) __attribute__((__simd__("notinbranch")));

#define BLOCK 512           /* elements per block */
#define COUNTERS (BLOCK / 4) /* Philox counters per block */
#define HALF (BLOCK / 2)
#define SIGMA_FLOOR 1e-8f   /* trainer.priors.SIGMA_FLOOR */
#define SOFTPLUS_THRESHOLD 20.0f /* F.softplus: x itself above it */
#define PARALLEL_MIN (1 << 16) /* fewer elements: one thread (a team costs ~10 us) */

int bnn_kernels_version(void) { return 11; }

/* Whether this build runs OpenMP teams (compiled with -fopenmp). */
int bnn_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* This thread's share [*start, *end) of [0, n): whole blocks, in thread order. */
static inline void share(int64_t n, int64_t *start, int64_t *end) {
    int64_t t = 0, k = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    k = omp_get_num_threads();
#endif
    const int64_t blocks = (n + BLOCK - 1) / BLOCK, per = (blocks + k - 1) / k;
    *start = t * per * BLOCK < n ? t * per * BLOCK : n;
    *end = (t + 1) * per * BLOCK < n ? (t + 1) * per * BLOCK : n;
}

#define TEAM(n, threads) \
    _Pragma("omp parallel num_threads(threads) if ((n) >= PARALLEL_MIN && (threads) > 1)")

/* bits[l * COUNTERS + j] = lane l of Philox4x32-10(counter first + j, key (k0, k1)). */
static inline void philox_block(uint64_t first, uint32_t k0, uint32_t k1, uint32_t *bits) {
    uint32_t key0[10], key1[10];
    for (int r = 0; r < 10; r++) {
        key0[r] = k0 + (uint32_t)r * 0x9E3779B9u;
        key1[r] = k1 + (uint32_t)r * 0xBB67AE85u;
    }
    const uint32_t lo = (uint32_t)first, hi = (uint32_t)(first >> 32);
#pragma omp simd
    for (int j = 0; j < COUNTERS; j++) {
        uint32_t c0 = lo + (uint32_t)j, c1 = hi + (uint32_t)(c0 < lo), c2 = 0, c3 = 0;
#pragma GCC unroll 10
        for (int r = 0; r < 10; r++) {
            const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
            const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
            const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ key0[r];
            const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ key1[r];
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
        }
        bits[j] = c0;
        bits[COUNTERS + j] = c1;
        bits[2 * COUNTERS + j] = c2;
        bits[3 * COUNTERS + j] = c3;
    }
}

/* z[0 .. BLOCK) ~ N(0, 1), the draws of block number `block`. */
static inline void normal_block(uint64_t block, uint32_t k0, uint32_t k1, float *z) {
    uint32_t bits[BLOCK];
    float radius[HALF], angle[HALF];
    philox_block(block * COUNTERS, k0, k1, bits);
#pragma omp simd
    for (int j = 0; j < HALF; j++) {
        /* the top 24 bits as (k + 0.5) / 2^24: never 0 or 1, so the log is finite */
        const float u1 = ((float)(bits[j] >> 8) + 0.5f) * (1.0f / 16777216.0f);
        const float u2 = ((float)(bits[HALF + j] >> 8) + 0.5f) * (1.0f / 16777216.0f);
        radius[j] = sqrtf(-2.0f * logf(u1));
        angle[j] = 6.28318530717958648f * u2;
    }
#pragma omp simd
    for (int j = 0; j < HALF; j++) z[j] = radius[j] * cosf(angle[j]);
#pragma omp simd
    for (int j = 0; j < HALF; j++) z[HALF + j] = radius[j] * sinf(angle[j]);
}

/* eps[start, end) ~ N(0, 1). */
static void normal_range(float *eps, int64_t start, int64_t end, uint64_t seed) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float z[BLOCK];
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t m = end - b < BLOCK ? end - b : BLOCK;
        normal_block((uint64_t)(b / BLOCK), k0, k1, z);
        for (int64_t j = 0; j < m; j++) eps[b + j] = z[j];
    }
}

/* sigma = softplus(rho) + 1e-8, eps ~ N(0, 1), w = mu + sigma * eps over [start, end). */
static void sample_range(const float *mu, const float *rho, float *w, float *sigma,
                         float *eps, int64_t start, int64_t end, uint64_t seed) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    float z[BLOCK], s[BLOCK];
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t m = end - b < BLOCK ? end - b : BLOCK;
        normal_block((uint64_t)(b / BLOCK), k0, k1, z);
        const float *r = rho + b;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) {
            const float x = r[j];
            s[j] = (x > SOFTPLUS_THRESHOLD ? x : log1pf(expf(x))) + SIGMA_FLOOR;
        }
#pragma omp simd
        for (int64_t j = 0; j < m; j++) {
            eps[b + j] = z[j];
            sigma[b + j] = s[j];
            w[b + j] = mu[b + j] + s[j] * z[j];
        }
    }
}

/* grad_rho = (grad_w * eps + grad_sigma) * sigmoid(rho) over [start, end), the chain rule
   through sigma = softplus(rho) + 1e-8 (whose derivative is sigmoid(rho), 1 above the
   softplus threshold); grad_sigma may be NULL (no other use of sigma had a gradient). */
static void sample_backward_range(const float *grad_w, const float *grad_sigma,
                                  const float *eps, const float *rho, float *grad_rho,
                                  int64_t start, int64_t end) {
    if (grad_sigma) {
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            const float x = rho[i];
            const float slope = x > SOFTPLUS_THRESHOLD ? 1.0f : 1.0f / (1.0f + expf(-x));
            grad_rho[i] = (grad_w[i] * eps[i] + grad_sigma[i]) * slope;
        }
    } else {
#pragma omp simd
        for (int64_t i = start; i < end; i++) {
            const float x = rho[i];
            const float slope = x > SOFTPLUS_THRESHOLD ? 1.0f : 1.0f / (1.0f + expf(-x));
            grad_rho[i] = grad_w[i] * eps[i] * slope;
        }
    }
}

/* KL(N(mu_i, sigma_i^2) || N(mp, sp^2)) summed over a layer needs three sums: of
   log(sigma_i), of sigma_i^2 + d_i^2 and of d_i, d_i = mu_i - mp (in float32, as the torch
   path takes it). One pass writes each block's three sums, accumulated in float64, into
   partials[3 * block ...]; bnn_sum3 adds the blocks in order, so the result does not
   depend on the split between threads. */
static void kl_partials_range(const float *mu, const float *sigma, float mp,
                              double *partials, int64_t start, int64_t end) {
    float logs[BLOCK];
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t m = end - b < BLOCK ? end - b : BLOCK;
        const float *s = sigma + b, *u = mu + b;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) logs[j] = logf(s[j]);
        double sum_log = 0.0, second = 0.0, sum_d = 0.0;
#pragma omp simd reduction(+ : sum_log, second, sum_d)
        for (int64_t j = 0; j < m; j++) {
            const double d = (double)(u[j] - mp), sd = (double)s[j];
            sum_log += (double)logs[j];
            second += sd * sd + d * d;
            sum_d += d;
        }
        double *out = partials + 3 * (b / BLOCK);
        out[0] = sum_log;
        out[1] = second;
        out[2] = sum_d;
    }
}

static void sum3(const double *partials, int64_t blocks, double *out) {
    double a = 0.0, b = 0.0, c = 0.0;
    for (int64_t i = 0; i < blocks; i++) {
        a += partials[3 * i];
        b += partials[3 * i + 1];
        c += partials[3 * i + 2];
    }
    out[0] = a;
    out[1] = b;
    out[2] = c;
}

/* The KL's gradients, times the incoming gradient: grad_mu = (mu - mp) * scale and
   grad_sigma = sigma * scale - grad / sigma, scale = grad / sp^2. */
static void kl_backward_range(const float *mu, const float *sigma, float mp, float scale,
                              float grad, float *grad_mu, float *grad_sigma, int64_t start,
                              int64_t end) {
#pragma omp simd
    for (int64_t i = start; i < end; i++) {
        grad_mu[i] = (mu[i] - mp) * scale;
        grad_sigma[i] = sigma[i] * scale - grad / sigma[i];
    }
}

/* The bfloat16 code (upper 16 bits, rounded to nearest, ties away from zero) of a finite
   non-negative float32 given by its bits u, as trainer.store's encode_bf16 stores it: 0 for
   0, the smallest code (1) for a tiny non-zero value, the largest finite code (0x7f7f) for
   one that would round to Inf. Monotonic in u, so the largest code of a set of values is
   the code of their largest value: a per-element max kept as codes is exactly the max that
   a version-2 epoch file stores, at half the memory traffic of a float32 max. */
static inline uint32_t bf16_code(uint32_t u) {
    uint32_t c = (u + 0x8000u) >> 16;
    c = c < 0x7f7fu ? c : 0x7f7fu;
    return c | (uint32_t)(c == 0u && u != 0u);
}

/* The bits of |x| where x is finite, 0 where it is not. */
static inline uint32_t finite_abs_bits(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint32_t mag = bits & 0x7fffffffu;
    return mag < 0x7f800000u ? mag : 0u;
}

/* One step's gradient statistics (trainer.capture.GradientRecorder) in one pass over g.
   Per block, partials[4 * block ...] = {sum of g^2 (float64; NaN and Inf propagate, as in
   a norm), sum of |g| over the finite g, max of |g| over the finite g, count of non-finite
   g}. With max_code/nonfinite (per-element level; else NULL), also per element:
   max_code = max(max_code, bf16_code(|g|)) where g is finite, nonfinite += 1 where it is
   not; with sum_abs too (a step that the per-element mean samples; NULL on the others),
   sum_abs += |g| where g is finite, and nonfinite_mean += 1 where it is not (when not NULL:
   the mean's own count, kept apart when the mean samples fewer steps than the rest).
   (Storing a max code only in the 128-byte runs of codes where one grows, to keep the
   other cache lines clean, was tried: no faster than the plain store.) */
static void grad_stats_range(const float *g, float *sum_abs, uint16_t *max_code,
                             int32_t *nonfinite, int32_t *nonfinite_mean, int64_t start,
                             int64_t end, double *partials) {
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t m = end - b < BLOCK ? end - b : BLOCK;
        const float *x = g + b;
        /* float32 lanes within the block (each lane sums BLOCK / width values), float64
           across blocks; where a square could overflow or underflow float32 (a block's
           max |g| outside [2^-50, 2^50]), the block again in float64 */
        float fsq = 0.0f, fsabs = 0.0f, mabs = 0.0f;
        int bad = 0;
#pragma omp simd reduction(+ : fsq, fsabs, bad) reduction(max : mabs)
        for (int64_t j = 0; j < m; j++) {
            uint32_t bits;
            memcpy(&bits, &x[j], 4);
            const int finite = (bits & 0x7f800000u) != 0x7f800000u;
            const float a = finite ? fabsf(x[j]) : 0.0f;
            fsq += x[j] * x[j];
            fsabs += a;
            mabs = a > mabs ? a : mabs;
            bad += !finite;
        }
        double sq = fsq, sabs = fsabs;
        if (!bad && mabs != 0.0f && !(mabs >= 0x1p-50f && mabs <= 0x1p50f)) {
            sq = 0.0;
            sabs = 0.0;
            for (int64_t j = 0; j < m; j++) {
                sq += (double)x[j] * (double)x[j];
                sabs += fabs((double)x[j]);
            }
        }
        if (max_code && sum_abs) {
            float *s = sum_abs + b;
            uint16_t *mx = max_code + b;
#pragma omp simd
            for (int64_t j = 0; j < m; j++) {
                const uint32_t u = finite_abs_bits(x[j]);
                float a;
                memcpy(&a, &u, 4);
                s[j] += a;
                const uint32_t c = bf16_code(u);
                mx[j] = c > mx[j] ? (uint16_t)c : mx[j];
            }
        } else if (max_code) {
            uint16_t *mx = max_code + b;
#pragma omp simd
            for (int64_t j = 0; j < m; j++) {
                const uint32_t c = bf16_code(finite_abs_bits(x[j]));
                mx[j] = c > mx[j] ? (uint16_t)c : mx[j];
            }
        }
        if (max_code && bad) {
            int32_t *nm = sum_abs ? nonfinite_mean : 0;
            for (int64_t j = 0; j < m; j++) {
                uint32_t bits;
                memcpy(&bits, &x[j], 4);
                const int32_t nf = (bits & 0x7f800000u) == 0x7f800000u;
                nonfinite[b + j] += nf;
                if (nm)
                    nm[b + j] += nf;
            }
        }
        double *out = partials + 4 * (b / BLOCK);
        out[0] = sq;
        out[1] = sabs;
        out[2] = (double)mabs;
        out[3] = (double)bad;
    }
}

/* The blocks' partials of bnn_grad_stats combined in order: {sum g^2, sum |g|, max |g|,
   non-finite count}. */
static void grad_total(const double *partials, int64_t blocks, double *out) {
    double sq = 0.0, sabs = 0.0, mabs = 0.0, bad = 0.0;
    for (int64_t i = 0; i < blocks; i++) {
        sq += partials[4 * i];
        sabs += partials[4 * i + 1];
        mabs = partials[4 * i + 2] > mabs ? partials[4 * i + 2] : mabs;
        bad += partials[4 * i + 3];
    }
    out[0] = sq;
    out[1] = sabs;
    out[2] = mabs;
    out[3] = bad;
}


/* Adam's hyperparameters for one tensor's step (trainer.optim.RecordingAdam). */
typedef struct {
    float beta1, beta2, eps;
    float weight_decay; /* L2 penalty added to the gradient (Adam); 0 for AdamW */
    float decay;        /* the parameter's factor before the update: 1 - lr * wd (AdamW), 1 */
    float step_size;    /* lr / (1 - beta1^t) */
    float bias2_sqrt;   /* sqrt(1 - beta2^t) */
    float pad;
} adam_hyper;

/* One Adam (or AdamW) update of p[start, end) from g, m = exp_avg, v = exp_avg_sq, as
   torch.optim.Adam's update for float32 (torch/optim/adam.py):
       g' = g + wd * p (Adam), p = p * (1 - lr * wd) (AdamW)
       m = m + (1 - beta1) * (g' - m), v = beta2 * v + (1 - beta2) * g'^2
       p = p - step_size * (m / (sqrt(v) / bias2_sqrt + eps)),
   with, when partials is not NULL, the statistics of the raw g of grad_stats_range taken in
   the same pass (each block's statistics while its gradients are in the L1 cache): the
   separate pass over every gradient that capture costs otherwise. */
static void adam_range(float *p, const float *g, float *m, float *v, const adam_hyper *h,
                       float *sum_abs, uint16_t *max_code, int32_t *nonfinite,
                       int32_t *nonfinite_mean, int64_t start, int64_t end,
                       double *partials) {
    const float b2 = h->beta2, c1 = 1.0f - h->beta1, c2 = 1.0f - h->beta2;
    const float eps = h->eps, wd = h->weight_decay, decay = h->decay;
    const float step = h->step_size, bias2 = h->bias2_sqrt;
    for (int64_t b = start; b < end; b += BLOCK) {
        const int64_t n = end - b < BLOCK ? end - b : BLOCK;
        if (partials)
            grad_stats_range(g, sum_abs, max_code, nonfinite, nonfinite_mean, b, b + n,
                             partials);
        float *pb = p + b, *mb = m + b, *vb = v + b;
        const float *gb = g + b;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            const float pj = pb[j] * decay;
            const float gj = gb[j] + wd * pj;
            const float mj = mb[j] + c1 * (gj - mb[j]); /* exp_avg.lerp_(g, 1 - beta1) */
            const float vj = b2 * vb[j] + c2 * (gj * gj);
            mb[j] = mj;
            vb[j] = vj;
            pb[j] = pj - step * (mj / (sqrtf(vj) / bias2 + eps)); /* addcdiv_ */
        }
    }
}

/* The number of NaN and Inf values in x[start, end) (one read pass, integer compares). */
static int64_t count_nonfinite_range(const float *x, int64_t start, int64_t end) {
    int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t i = start; i < end; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        bad += (bits & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

/* ---- entry points (ctypes) ---- */

void bnn_normal(float *eps, int64_t n, uint64_t seed, int threads) {
    TEAM(n, threads)
    {
        int64_t s, e;
        share(n, &s, &e);
        normal_range(eps, s, e, seed);
    }
}

void bnn_sample(const float *mu, const float *rho, float *w, float *sigma, float *eps,
                int64_t n, uint64_t seed, int threads) {
    TEAM(n, threads)
    {
        int64_t s, e;
        share(n, &s, &e);
        sample_range(mu, rho, w, sigma, eps, s, e, seed);
    }
}

void bnn_sample_backward(const float *grad_w, const float *grad_sigma, const float *eps,
                         const float *rho, float *grad_rho, int64_t n, int threads) {
    TEAM(n, threads)
    {
        int64_t s, e;
        share(n, &s, &e);
        sample_backward_range(grad_w, grad_sigma, eps, rho, grad_rho, s, e);
    }
}

/* out = {sum log sigma, sum sigma^2 + d^2, sum d}; partials: 3 doubles per block. */
void bnn_kl_sums(const float *mu, const float *sigma, float mp, double *partials, int64_t n,
                 int threads, double *out) {
    TEAM(n, threads)
    {
        int64_t s, e;
        share(n, &s, &e);
        kl_partials_range(mu, sigma, mp, partials, s, e);
    }
    sum3(partials, (n + BLOCK - 1) / BLOCK, out);
}

void bnn_kl_backward(const float *mu, const float *sigma, float mp, float scale, float grad,
                     float *grad_mu, float *grad_sigma, int64_t n, int threads) {
    TEAM(n, threads)
    {
        int64_t s, e;
        share(n, &s, &e);
        kl_backward_range(mu, sigma, mp, scale, grad, grad_mu, grad_sigma, s, e);
    }
}

int64_t bnn_count_nonfinite(const float *x, int64_t n, int threads) {
    int64_t bad = 0;
#pragma omp parallel num_threads(threads) if (n >= PARALLEL_MIN && threads > 1) reduction(+ : bad)
    {
        int64_t s, e;
        share(n, &s, &e);
        bad += count_nonfinite_range(x, s, e);
    }
    return bad;
}

/* This thread's share [*s, *e) of tensor t of n elements in a k-tensor call: a share of
   each tensor of at least PARALLEL_MIN elements, smaller tensors wholly on thread 0; returns
   whether it is non-empty. */
static inline int tensor_share(int64_t n, int64_t *s, int64_t *e) {
    int64_t t0 = 0;
#ifdef _OPENMP
    t0 = omp_get_thread_num();
#endif
    *s = 0;
    *e = n;
    if (n >= PARALLEL_MIN)
        share(n, s, e);
    else if (t0 != 0)
        return 0;
    return *s < *e;
}

/* grad_stats_range over k gradients (each thread its share of each; a gradient below
   PARALLEL_MIN elements wholly on the first thread), then each gradient's totals into
   out[4 * t ...] = {sum g^2, sum |g|, max |g|, non-finite count}. Gradient t's block
   partials start at partials + 4 * first_block[t]; max_code/nonfinite: NULL (totals only),
   or one accumulator per gradient; sum_abs/nonfinite_mean: NULL (no sum this step), or one
   per gradient (an entry of nonfinite_mean may be NULL). */
void bnn_grad_stats(int64_t k, const float *const *g, float *const *sum_abs,
                    uint16_t *const *max_code, int32_t *const *nonfinite,
                    int32_t *const *nonfinite_mean, const int64_t *sizes,
                    const int64_t *first_block, double *partials, int threads, double *out) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        for (int64_t t = 0; t < k; t++) {
            int64_t s, e;
            if (tensor_share(sizes[t], &s, &e))
                grad_stats_range(g[t], sum_abs ? sum_abs[t] : 0, max_code ? max_code[t] : 0,
                                 nonfinite ? nonfinite[t] : 0,
                                 nonfinite_mean ? nonfinite_mean[t] : 0, s, e,
                                 partials + 4 * first_block[t]);
        }
    }
    for (int64_t t = 0; t < k; t++)
        grad_total(partials + 4 * first_block[t], (sizes[t] + BLOCK - 1) / BLOCK, out + 4 * t);
}

/* One Adam step of k tensors (adam_range; each thread its share of each, a tensor below
   PARALLEL_MIN elements wholly on the first thread). record[t]: 0 no statistics of tensor t,
   1 its totals into out[4 * t ...] (as bnn_grad_stats), 2 the totals and its per-element
   accumulators max_code[t], nonfinite[t], and, where not NULL, sum_abs[t] and
   nonfinite_mean[t] (as bnn_grad_stats). */
void bnn_adam(int64_t k, float *const *p, const float *const *g, float *const *m,
              float *const *v, const adam_hyper *hyper, const int32_t *record,
              float *const *sum_abs, uint16_t *const *max_code, int32_t *const *nonfinite,
              int32_t *const *nonfinite_mean, const int64_t *sizes,
              const int64_t *first_block, double *partials, int threads, double *out) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        for (int64_t t = 0; t < k; t++) {
            int64_t s, e;
            if (!tensor_share(sizes[t], &s, &e))
                continue;
            const int element = record[t] == 2;
            adam_range(p[t], g[t], m[t], v[t], hyper + t,
                       element && sum_abs ? sum_abs[t] : 0, element ? max_code[t] : 0,
                       element ? nonfinite[t] : 0,
                       element && nonfinite_mean ? nonfinite_mean[t] : 0, s, e,
                       record[t] ? partials + 4 * first_block[t] : 0);
        }
    }
    for (int64_t t = 0; t < k; t++)
        if (record[t])
            grad_total(partials + 4 * first_block[t], (sizes[t] + BLOCK - 1) / BLOCK,
                       out + 4 * t);
}
