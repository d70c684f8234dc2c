/* Greedy and temperature sampling over the vocabulary on CPU, row by row, for the rows sampling.py hands it.
 *
 * Built and loaded through triton_backend/native.py; sampling_kernel.py says why and holds the torch reference
 * to it. Row i of logits is `vocab` floats, rows `stride` floats apart. For every row:
 *   lse[i]     log(sum(exp(x))): a token's log-prob under the model is its logit less this;
 *   mode[i]    0: nothing more (the caller chooses); 1: greedy, chosen[i] = the first index of the maximum;
 *              2: temperature: inverse-CDF in vocabulary order over the weights exp((x - max) / temperature[i]),
 *              chosen[i] = the first token whose cumulative weight exceeds uniform[i] * total (uniform in [0, 1));
 *              where rounding leaves the draw at or past the total, the last token with weight.
 * The logits are the model's own, so finite (rows with penalties or bans, whose logits hold -inf, go to torch's
 * path). Weights whose exponent is below -100 are 0 exactly (a tiny temperature leaves only the maximum), so a
 * token is chosen only if its weight is positive. `scratch` holds one row's weights (vocab floats).
 * Compiled with -ffast-math (vectorised exp, sums in any order).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define CHUNK 64 /* the cumulative search steps over sums of this many weights, then within one chunk */

static float row_max(const float *x, int64_t vocab) {
    float m = x[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < vocab; j++) m = x[j] > m ? x[j] : m;
    return m;
}

static int64_t draw(const float *x, int64_t vocab, float m, float temperature, float u, float *w) {
    float sums[(vocab + CHUNK - 1) / CHUNK];
    float total = 0.0f;
    /* by the reciprocal (as -ffast-math would anyway), kept finite: at the tiniest temperatures (1e-45 is valid)
     * 1 / t is infinite, and 0 * inf at the maximum would be NaN */
    const float inverse = temperature < 1.0f / FLT_MAX ? FLT_MAX : 1.0f / temperature;
    for (int64_t c = 0, start = 0; start < vocab; c++, start += CHUNK) {
        const int64_t end = start + CHUNK < vocab ? start + CHUNK : vocab;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = start; j < end; j++) {
            const float z = (x[j] - m) * inverse;
            w[j] = z < -100.0f ? 0.0f : expf(z);
            s += w[j];
        }
        sums[c] = s;
        total += s;
    }
    const float target = u * total;
    float cumulative = 0.0f;
    for (int64_t c = 0, start = 0; start < vocab; c++, start += CHUNK) {
        if (cumulative + sums[c] <= target) { /* the draw lies beyond this chunk */
            cumulative += sums[c];
            continue;
        }
        for (int64_t j = start; j < vocab; j++) { /* from here one weight at a time, to the end if need be */
            cumulative += w[j];
            if (cumulative > target) return j; /* it grew past the draw: w[j] > 0 */
        }
        break;
    }
    /* rounding left the draw at or past the total: the last token with weight */
    int64_t last = vocab - 1;
    while (last > 0 && !(w[last] > 0.0f)) last--;
    return last;
}

void sample_rows(const float *logits, int64_t stride, int64_t vocab, int64_t n, const int32_t *mode,
                 const float *temperature, const float *uniform, int64_t *chosen, float *lse, float *scratch) {
    for (int64_t i = 0; i < n; i++) {
        const float *x = logits + i * stride;
        const float m = row_max(x, vocab);
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < vocab; j++) s += expf(x[j] - m);
        lse[i] = m + logf(s);
        if (mode[i] == 1) {
            int64_t j = 0;
            while (j < vocab - 1 && x[j] != m) j++; /* bounded: a NaN logit (a broken model) equals nothing */
            chosen[i] = j;
        } else if (mode[i] == 2) {
            chosen[i] = draw(x, vocab, m, temperature[i], uniform[i], scratch);
        }
    }
}
