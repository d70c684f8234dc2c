/* Decode attention over the paged KV cache on CPU: one query token per sequence, read in place from its blocks;
 * and the store of a step's keys and values into their blocks (store_kv, at the end).
 *
 * Built and loaded by decode_kernel.py (see there for why this is C and not torch operations). For each
 * sequence and each key/value group, the keys of its blocks are read once, in table order, for the query heads
 * that share the group; the softmax runs block by block with a running maximum and sum (as flash-decoding does),
 * so no score, weight or gathered key is ever written to memory. Float32 throughout. Compiled with -ffast-math
 * (vectorised exp from glibc's libmvec, sums in any order): nothing here relies on infinities or NaN.
 *
 * Layouts (all contiguous):
 *   q       [n, groups, heads_per_group, dim]
 *   keys    [blocks, groups, block_size, dim]   (this layer's pool; values the same)
 *   tables  flat block ids; sequence i's table starts at table_starts[i]
 *   lengths [n]: keys sequence i sees (its position + 1), so it reads ceil(lengths[i] / block_size) blocks
 *   out     [n, groups, heads_per_group, dim]
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 256 /* block_size at most this (the caller checks) */
#define MAX_DIM 512   /* head dim at most this */
#define MAX_HEADS 64  /* query heads per group at most this */

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int64_t dim) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < dim; k++) s += a[k] * b[k];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DOT8 1
/* Eight dot products at once: q (dim floats, dim a multiple of 8) with eight consecutive keys (row stride dim).
 * Their horizontal sums share one tree of hadds (9 instructions for the eight) where the loop in dot() reduces
 * each alone: that reduction was 40 % of the kernel's time on 16-wide heads (perf annotate). */
static inline __attribute__((always_inline)) __m256 dot8(const float *q, const float *k, int64_t dim) {
    __m256 a[8];
    for (int r = 0; r < 8; r++) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k + r * dim));
        for (int64_t c = 8; c < dim; c += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + r * dim + c), acc);
        a[r] = acc;
    }
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 low = _mm256_hadd_ps(h01, h23), high = _mm256_hadd_ps(h45, h67); /* per 128-bit half */
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}
#endif

static inline __attribute__((always_inline)) void attend(
    const float *q, const float *keys, const float *values, const int64_t *tables, const int64_t *table_starts,
    const int64_t *lengths, int64_t n, int64_t groups, int64_t heads_per_group, int64_t dim, int64_t block_size,
    float scale, float *out) {
    float scores[MAX_HEADS][MAX_BLOCK];
    float best[MAX_HEADS], total[MAX_HEADS] = {0};
    const int64_t block_stride = groups * block_size * dim;
    for (int64_t i = 0; i < n; i++) {
        const int64_t length = lengths[i];
        const int64_t *table = tables + table_starts[i];
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + (i * groups + g) * heads_per_group * dim;
            float *acc = out + (i * groups + g) * heads_per_group * dim;
            memset(acc, 0, sizeof(float) * heads_per_group * dim);
            for (int64_t start = 0, b = 0; start < length; start += block_size, b++) {
                const int64_t seen = length - start < block_size ? length - start : block_size;
                const float *kb = keys + table[b] * block_stride + g * block_size * dim;
                const float *vb = values + table[b] * block_stride + g * block_size * dim;
                /* Blocks lie anywhere in the pool: ask for the next one while this one is worked on (9 % on
                 * the long preset's capacity shape, tools/probes/decode_attention.py). 16 floats: a 64-byte line. */
                if (start + block_size < length) {
                    const float *kn = keys + table[b + 1] * block_stride + g * block_size * dim;
                    const float *vn = values + table[b + 1] * block_stride + g * block_size * dim;
                    for (int64_t line = 0; line < block_size * dim; line += 16) {
                        __builtin_prefetch(kn + line);
                        __builtin_prefetch(vn + line);
                    }
                }
                int64_t first = 0; /* keys whose scores are done */
#ifdef DOT8
                if (dim % 8 == 0) {
                    const __m256 scale8 = _mm256_set1_ps(scale);
                    for (; first + 8 <= seen; first += 8)
                        for (int64_t h = 0; h < heads_per_group; h++)
                            _mm256_storeu_ps(scores[h] + first,
                                             _mm256_mul_ps(scale8, dot8(qg + h * dim, kb + first * dim, dim)));
                }
#endif
                for (int64_t j = first; j < seen; j++)
                    for (int64_t h = 0; h < heads_per_group; h++)
                        scores[h][j] = scale * dot(qg + h * dim, kb + j * dim, dim);
                for (int64_t h = 0; h < heads_per_group; h++) {
                    float *s = scores[h];
                    float block_max = s[0];
                    for (int64_t j = 1; j < seen; j++) block_max = s[j] > block_max ? s[j] : block_max;
                    /* the first block sets the running maximum: no infinity is ever needed (fast-math) */
                    const float new_best = start == 0 || block_max > best[h] ? block_max : best[h];
                    const float shrink = start == 0 ? 0.0f : expf(best[h] - new_best);
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t j = 0; j < seen; j++) {
                        s[j] = expf(s[j] - new_best);
                        sum += s[j];
                    }
                    total[h] = total[h] * shrink + sum;
                    best[h] = new_best;
                    float *a = acc + h * dim;
#pragma omp simd
                    for (int64_t k = 0; k < dim; k++) a[k] *= shrink;
                    int64_t j = 0;
                    for (; j + 4 <= seen; j += 4) { /* four values per pass over the accumulator */
                        const float *v = vb + j * dim;
#pragma omp simd
                        for (int64_t k = 0; k < dim; k++)
                            a[k] += s[j] * v[k] + s[j + 1] * v[dim + k] + s[j + 2] * v[2 * dim + k] +
                                    s[j + 3] * v[3 * dim + k];
                    }
                    for (; j < seen; j++) {
                        const float *v = vb + j * dim;
#pragma omp simd
                        for (int64_t k = 0; k < dim; k++) a[k] += s[j] * v[k];
                    }
                }
            }
            for (int64_t h = 0; h < heads_per_group; h++) {
                const float inverse = 1.0f / total[h];
                float *a = acc + h * dim;
#pragma omp simd
                for (int64_t k = 0; k < dim; k++) a[k] *= inverse;
            }
        }
    }
}

/* The head dims models use get their own copy of the loop, compiled for that dim: the dot products and the value
 * updates then unroll into whole vector registers. tools/probes/decode_attention.py: 1.3x faster on the long preset's
 * 16-wide heads, 1.3-1.4x on 64-wide ones, than the one loop for every dim. */
void paged_decode(const float *q, const float *keys, const float *values, const int64_t *tables,
                  const int64_t *table_starts, const int64_t *lengths, int64_t n, int64_t groups,
                  int64_t heads_per_group, int64_t dim, int64_t block_size, float scale, float *out) {
#define ATTEND(d) attend(q, keys, values, tables, table_starts, lengths, n, groups, heads_per_group, d, block_size, \
                         scale, out)
    switch (dim) {
    case 16: ATTEND(16); break;
    case 32: ATTEND(32); break;
    case 64: ATTEND(64); break;
    case 128: ATTEND(128); break;
    default: ATTEND(dim);
    }
#undef ATTEND
}

/* A step's keys and values into the pool: token t's, for every group, to block blocks[t] at offset offsets[t].
 * k and v are [n, groups, dim] views, each with its own token and group strides (v is a column slice of the step's
 * fused QKV product; k too, or a rotated copy) and a contiguous last dim. Two indexed writes in torch cost 12-30 us
 * each a layer; this is a copy. */
void store_kv(float *keys, float *values, const float *k, const float *v, int64_t k_token, int64_t k_group,
              int64_t v_token, int64_t v_group, const int64_t *blocks, const int64_t *offsets, int64_t n,
              int64_t groups, int64_t block_size, int64_t dim) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t to = ((blocks[t] * groups + g) * block_size + offsets[t]) * dim;
            memcpy(keys + to, k + t * k_token + g * k_group, sizeof(float) * dim);
            memcpy(values + to, v + t * v_token + g * v_group, sizeof(float) * dim);
        }
}
