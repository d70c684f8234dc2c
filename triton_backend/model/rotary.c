/* Rotary position embedding of a step's packed q or k rows on CPU, as Megatron's unfused form computes it.
 *
 * Built and loaded through triton_backend/native.py, without -ffast-math and with -ffp-contract=off (see
 * rotary_kernel.py): each element is the same three float32 roundings torch's operations make,
 * x * cos + rotate_half(x) * sin, so the result is theirs bit for bit.
 *
 * x: [rows, heads, dim] with strides (row_stride, head_stride, 1); cos and sin: [rows, rot] contiguous (the
 * angles of each row's position, the two halves equal); out: [rows, heads, dim] contiguous. Elements past rot
 * (a partial rotary) are copied.
 */
#include <stdint.h>

void rotate_rows(const float *x, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, int64_t head_stride,
                 const float *cos, const float *sin, int64_t rot, float *out) {
    const int64_t half = rot / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * rot, *s = sin + r * rot;
        for (int64_t h = 0; h < heads; h++) {
            const float *in = x + r * row_stride + h * head_stride;
            float *o = out + (r * heads + h) * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = in[i] * c[i], b = -in[i + half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = half; i < rot; i++) {
                const float a = in[i] * c[i], b = in[i - half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = rot; i < dim; i++) o[i] = in[i];
        }
    }
}
