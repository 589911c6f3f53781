/* One-pass C kernels of the epoch summaries (trainer.store._native).
 *
 * Compiled at first use like trainer/kernels/fused.c (cc -O3 -march=native, no -ffast-math,
 * -ffp-contract=off so that every product and difference is rounded as numpy rounds it), but
 * torch-free and single-threaded: the store and the service load it without PyTorch, and
 * ctypes releases the GIL around each call, so an epoch's summaries can run beside the
 * writer's own work. Arrays are C-contiguous; nothing here allocates more than the
 * candidates of an order statistic (returned as -1 when that fails).
 *
 * Order statistics are exact. A float32's bits, with the sign bit flipped for positive
 * values and every bit flipped for negative ones, order as unsigned integers exactly as the
 * values do (-0 before +0, which are equal values). A histogram of the top 16 bits of those
 * keys locates the bin of every wanted rank; one more pass gathers the low 16 bits of the
 * values in those bins, and a histogram of those (or a sort, for a few) gives the exact
 * values. bfloat16 codes are 16-bit keys already: their histogram is the whole answer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector math variant of log (libmvec), as in fused.c. */
extern double log(double) __attribute__((__simd__("notinbranch")));

#define BINS 65536
#define BLOCK 2048  /* elements per block: the block's partial sums are added to the totals */
#define SELECT_MAX 1024 /* ranks of one bnn_select call (its bookkeeping is on the stack) */
#define SORT_MAX 64 /* fewer candidates in a bin: insertion sort instead of a histogram */

int bnn_summaries_version(void) { return 2; }

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Unsigned order of the keys == order of the values (NaN aside). */
static inline uint32_t key_of(uint32_t u) { return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u); }

static inline uint32_t bits_of_key(uint32_t k) { return k ^ (k >> 31 ? 0x80000000u : 0xFFFFFFFFu); }

static inline void add_to_hist(const float *x, int64_t m, uint32_t *hist) {
    const uint32_t *u = (const uint32_t *)x;
    for (int64_t j = 0; j < m; j++) hist[key_of(u[j]) >> 16]++;
}

/* hist[b] = how many of the n values have b as the top 16 bits of their key. */
void bnn_key_hist(const float *x, int64_t n, uint32_t *hist) {
    memset(hist, 0, BINS * sizeof *hist);
    add_to_hist(x, n, hist);
}

/* The sums of trainer.store.numeric.gaussian_sums over n (mu, sigma) pairs (finite, sigma > 0)
 * about the centres m_c and s_c, in out[0..10]: sum w, sum v, sum log v, sum d w, sum d^2 w,
 * sum c, sum c w, sum c^2 w, sum c^2, sum u, sum u^2 (v = sigma^2, w = 1/v, d = v - s_c^2,
 * c = mu - m_c, u = sigma - s_c, all in float64). Each element's terms are formed as numpy
 * forms them; the sums are accumulated per block, in SIMD lanes, and blocks are added in
 * order, so they differ from numpy's pairwise sums only in the last bits. With hist_mu and
 * hist_sigma (or NULL) the same pass fills their key histograms (bnn_key_hist). */
void bnn_gauss_sums(const float *mu, const float *sigma, int64_t n, double m_c, double s_c,
                    double *out, uint32_t *hist_mu, uint32_t *hist_sigma) {
    const double v_c = s_c * s_c;
    double t[11] = {0};
    if (hist_mu) memset(hist_mu, 0, BINS * sizeof *hist_mu);
    if (hist_sigma) memset(hist_sigma, 0, BINS * sizeof *hist_sigma);
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = n - b < BLOCK ? n - b : BLOCK;
        const float *ms = mu + b, *ss = sigma + b;
        double sw = 0, sv = 0, sl = 0, ds = 0, dd = 0, cs = 0, cws = 0, ccw = 0, cc = 0, us = 0,
               uu = 0;
#pragma omp simd reduction(+ : sw, sv, sl, ds, dd, cs, cws, ccw, cc, us, uu)
        for (int64_t j = 0; j < m; j++) {
            const double x = (double)ss[j], v = x * x, w = 1.0 / v;
            sw += w;
            sv += v;
            sl += log(v);
            const double d = v - v_c, dw = d * w;
            ds += dw;
            dd += dw * d;
            const double c = (double)ms[j] - m_c, cw = c * w;
            cs += c;
            cws += cw;
            ccw += cw * c;
            cc += c * c;
            const double u = x - s_c;
            us += u;
            uu += u * u;
        }
        t[0] += sw;
        t[1] += sv;
        t[2] += sl;
        t[3] += ds;
        t[4] += dd;
        t[5] += cs;
        t[6] += cws;
        t[7] += ccw;
        t[8] += cc;
        t[9] += us;
        t[10] += uu;
        if (hist_mu) add_to_hist(ms, m, hist_mu);
        if (hist_sigma) add_to_hist(ss, m, hist_sigma);
    }
    memcpy(out, t, sizeof t);
}

static void insertion_sort(uint16_t *a, int64_t m) {
    for (int64_t i = 1; i < m; i++) {
        const uint16_t v = a[i];
        int64_t j = i;
        for (; j > 0 && a[j - 1] > v; j--) a[j] = a[j - 1];
        a[j] = v;
    }
}

/* out[i] = the value of rank ranks[i] (0-based, ascending, each < n) among the n values of x
 * (no NaN), hist its bnn_key_hist. Returns 0, or -1 when memory for the candidates (the low
 * 16 bits of the values in the wanted bins) cannot be had. */
int bnn_select(const float *x, int64_t n, const uint32_t *hist, const int64_t *ranks, int k,
               float *out) {
    if (k <= 0) return 0;
    if (k > SELECT_MAX) return -1;
    int64_t bin_of[k], local[k]; /* each rank's bin and its rank within the bin */
    int64_t sbin[k], scount[k], soffset[k], sfill[k];
    int slots = 0;
    int64_t before = 0, total = 0;
    int i = 0;
    for (int64_t b = 0; b < BINS && i < k; b++) {
        const int64_t c = hist[b];
        while (i < k && ranks[i] < before + c) {
            bin_of[i] = b;
            local[i] = ranks[i] - before;
            if (slots == 0 || sbin[slots - 1] != b) {
                sbin[slots] = b;
                scount[slots] = c;
                soffset[slots] = total;
                sfill[slots] = total;
                total += c;
                slots++;
            }
            i++;
        }
        before += c;
    }
    if (i < k) return -1; /* a rank beyond the histogram's count: the caller's bug */
    uint16_t *low = malloc((size_t)(total ? total : 1) * sizeof *low);
    uint16_t *slot_of = calloc(BINS, sizeof *slot_of);
    uint32_t *fine = NULL;
    int failed = low == NULL || slot_of == NULL;
    if (!failed) {
        for (int s = 0; s < slots; s++) slot_of[sbin[s]] = (uint16_t)(s + 1);
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t j = 0; j < n; j++) {
            const uint32_t key = key_of(u[j]);
            const int s = slot_of[key >> 16];
            if (s) low[sfill[s - 1]++] = (uint16_t)key;
        }
        i = 0;
        for (int s = 0; s < slots && !failed; s++) {
            uint16_t *part = low + soffset[s];
            const int64_t c = scount[s];
            if (c <= SORT_MAX) {
                insertion_sort(part, c);
                for (; i < k && bin_of[i] == sbin[s]; i++)
                    out[i] = float_of(bits_of_key((uint32_t)(sbin[s] << 16) | part[local[i]]));
                continue;
            }
            if (!fine && !(fine = malloc(BINS * sizeof *fine))) {
                failed = 1;
                break;
            }
            memset(fine, 0, BINS * sizeof *fine);
            for (int64_t j = 0; j < c; j++) fine[part[j]]++;
            int64_t seen = 0;
            uint32_t v = 0;
            for (; i < k && bin_of[i] == sbin[s]; i++) {
                while (seen + fine[v] <= local[i]) seen += fine[v++];
                out[i] = float_of(bits_of_key((uint32_t)(sbin[s] << 16) | v));
            }
        }
    }
    free(low);
    free(slot_of);
    free(fine);
    return failed ? -1 : 0;
}

/* bfloat16 codes of n float32 values, exactly as trainer.store._codec.encode_bf16: rounded to
 * nearest, ties away from zero; NaN stays NaN (0x7FC0 with its sign), a finite value never
 * becomes infinite (the largest bfloat16 instead) and a non-zero one never zero (the smallest).
 * With bits < 7, each finite code then keeps only `bits` mantissa bits, exactly as
 * trainer.store._codec.round_bf16: its magnitude rounded to nearest, ties to even, never to
 * Inf (the largest code of `bits` bits instead) nor from non-zero to zero (the smallest).
 * With hist (or NULL), hist[code] counts the codes. */
void bnn_bf16_encode(const float *x, int64_t n, int bits, uint16_t *codes, uint32_t *hist) {
    const uint32_t *src = (const uint32_t *)x;
    const uint32_t drop = bits >= 0 && bits < 7 ? (uint32_t)(7 - bits) : 0u;
    const uint32_t half = drop ? (1u << (drop - 1)) - 1u : 0u;
    const uint32_t top = (0x7F7Fu >> drop) << drop, least = 1u << drop;
    if (hist) memset(hist, 0, BINS * sizeof *hist);
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = n - b < BLOCK ? n - b : BLOCK;
        const uint32_t *u = src + b;
        uint16_t *out = codes + b;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) {
            const uint32_t v = u[j], mag = v & 0x7FFFFFFFu;
            const uint16_t sign = (uint16_t)((v >> 16) & 0x8000u);
            uint16_t code = (uint16_t)((v + 0x8000u) >> 16);
            code = mag > 0x7F800000u ? (uint16_t)(sign | 0x7FC0u) : code;
            code = (mag >= 0x7F7F8000u && mag < 0x7F800000u) ? (uint16_t)(sign | 0x7F7Fu) : code;
            code = (mag != 0 && mag < 0x8000u) ? (uint16_t)(sign | 0x0001u) : code;
            code = mag == 0 ? sign : code;
            out[j] = code;
        }
        if (drop) {
#pragma omp simd
            for (int64_t j = 0; j < m; j++) {
                const uint32_t c = out[j], cmag = c & 0x7FFFu;
                uint32_t r = ((cmag + half + ((cmag >> drop) & 1u)) >> drop) << drop;
                r = r >= 0x7F80u ? top : r;
                r = (cmag != 0 && r == 0) ? least : r;
                r = cmag >= 0x7F80u ? cmag : r; /* Inf and NaN as they are */
                out[j] = (uint16_t)((c & 0x8000u) | r);
            }
        }
        if (hist)
            for (int64_t j = 0; j < m; j++) hist[out[j]]++;
    }
}

/* The finite bfloat16 codes in the order of their values: the negative ones from the most
 * negative (0xFF7F) to -0 (0x8000), then +0 (0x0000) to the largest (0x7F7F). */
static inline uint32_t code_at(uint32_t i) { return i < 0x7F80u ? 0xFF7Fu - i : i - 0x7F80u; }
#define FINITE_CODES (2 * 0x7F80u)

/* From a histogram of bfloat16 codes: counts[0] the non-finite codes (Inf, NaN), counts[1]
 * the zeros (either sign), counts[2] the finite ones, *top the largest finite value (NaN when
 * none), and out[i] the finite value of rank ranks[i] (0-based, ascending, < counts[2]; k may
 * be 0). Returns 0, or -1 when a rank is out of range. */
int bnn_bf16_stats(const uint32_t *hist, const int64_t *ranks, int k, int64_t *counts,
                   float *top, float *out) {
    int64_t bad = 0, finite = 0;
    for (uint32_t c = 0; c < BINS; c++) {
        if ((c & 0x7F80u) == 0x7F80u)
            bad += hist[c];
        else
            finite += hist[c];
    }
    counts[0] = bad;
    counts[1] = (int64_t)hist[0] + hist[0x8000];
    counts[2] = finite;
    *top = NAN;
    for (uint32_t i = FINITE_CODES; i-- > 0;) {
        const uint32_t c = code_at(i);
        if (hist[c]) {
            *top = float_of(c << 16);
            break;
        }
    }
    int64_t seen = 0;
    uint32_t i = 0;
    for (int r = 0; r < k; r++) {
        if (ranks[r] < 0 || ranks[r] >= finite) return -1;
        while (seen + hist[code_at(i)] <= ranks[r]) seen += hist[code_at(i++)];
        out[r] = float_of(code_at(i) << 16);
    }
    return 0;
}
