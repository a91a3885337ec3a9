/* Compiled CPU kernels of the DRR-Net training fast paths (loaded by models/cpu_kernels.py).
 *
 * Elementwise and row-wise passes that PyTorch would run as several separate operators, each here one
 * pass over the rows (OpenMP over rows, SIMD along a row). All arrays are row-major float32 (indices
 * int64), contiguous, with the shapes given per function; the Python wrappers check them. The results
 * equal the PyTorch compositions in models/fast_ops.py to fp32 rounding (tests/test_fast_paths.py).
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* RMSNorm without its scale: r[i] = 1 / sqrt(mean_j x[i,j]^2 + eps), xh = x * r.   x, xh (n, D); r (n). */
void rms_norm_fwd(int64_t n, int64_t D, const float *x, float eps, float *xh, float *r) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * D;
        float *o = xh + i * D;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < D; j++) ss += xi[j] * xi[j];
        const float ri = 1.0f / sqrtf(ss / (float)D + eps);
        r[i] = ri;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] = xi[j] * ri;
    }
}

/* Backward of rms_norm_fwd, added into gx:  gx += r * gxh - (r / D) * sum_j(gxh * xh) * xh.
 * gx, gxh, xh (n, D); r (n). */
void rms_norm_bwd(int64_t n, int64_t D, float *gx, const float *gxh, const float *xh, const float *r) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *g = gxh + i * D, *y = xh + i * D;
        float *o = gx + i * D;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < D; j++) s += g[j] * y[j];
        const float ri = r[i], m = s / (float)D * ri;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] += ri * g[j] - m * y[j];
    }
}

/* ReLU-gated GLU: h = relu(a) * b with ab = [a | b] (n, 2H); h (n, H). */
void glu_fwd(int64_t n, int64_t H, const float *ab, float *h) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *a = ab + i * 2 * H, *b = a + H;
        float *o = h + i * H;
        #pragma omp simd
        for (int64_t j = 0; j < H; j++) o[j] = (a[j] > 0.0f ? a[j] : 0.0f) * b[j];
    }
}

/* Backward of glu_fwd: gab = [gh * b * (a > 0) | gh * relu(a)] and, when h is not NULL, the forward's
 * h = relu(a) * b again (so the forward need not keep it).   gh, h (n, H); ab, gab (n, 2H). */
void glu_bwd(int64_t n, int64_t H, const float *gh, const float *ab, float *gab, float *h) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *a = ab + i * 2 * H, *b = a + H, *g = gh + i * H;
        float *ga = gab + i * 2 * H, *gb = ga + H;
        #pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const int pos = a[j] > 0.0f;
            ga[j] = pos ? g[j] * b[j] : 0.0f;
            gb[j] = pos ? g[j] * a[j] : 0.0f;
        }
        if (h) {
            float *o = h + i * H;
            #pragma omp simd
            for (int64_t j = 0; j < H; j++) o[j] = (a[j] > 0.0f ? a[j] : 0.0f) * b[j];
        }
    }
}

/* Transpose of the weighted corner gather:  out[idx[m,k], :] += w[m,k] * go[m, :].
 * idx, w (M, K); go (M, C); out (P, C). The threads split the channels (no two write the same element),
 * so the sums are race-free and, per element, in the order m = 0.., k = 0.. */
void scatter_corners(int64_t M, int64_t K, int64_t C, const int64_t *idx, const float *w, const float *go,
                     float *out) {
    #pragma omp parallel
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        /* channel ranges in multiples of 16 floats (one 64-byte line) where there are enough channels */
        const int64_t unit = C >= 16 * nt ? 16 : 1, units = (C + unit - 1) / unit;
        const int64_t c0 = units * t / nt * unit;
        int64_t c1 = units * (t + 1) / nt * unit;
        if (c1 > C) c1 = C;
        if (c0 < c1) {
            for (int64_t m = 0; m < M; m++) {
                const float *g = go + m * C;
                for (int64_t k = 0; k < K; k++) {
                    const float wk = w[m * K + k];
                    float *o = out + idx[m * K + k] * C;
                    #pragma omp simd
                    for (int64_t c = c0; c < c1; c++) o[c] += wk * g[c];
                }
            }
        }
    }
}

/* Weighted corner gather:  out[m, :] = sum_k w[m,k] * table[idx[m,k], :].   idx, w (M, K); table (P, C);
 * out (M, C). Corners are added in the order k = 0..K-1. */
void gather_corners(int64_t M, int64_t K, int64_t C, const int64_t *idx, const float *w, const float *table,
                    float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *o = out + m * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float wk = w[m * K + k];
            const float *t = table + idx[m * K + k] * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) o[c] += wk * t[c];
        }
    }
}

/* out = relu(x + bias[segment]) with nb segments of n_per rows each:  x, out (nb * n_per, H) (out may be x);
 * bias (nb, H). */
void bias_relu(int64_t nb, int64_t n_per, int64_t H, const float *x, const float *bias, float *out) {
    const int64_t n = nb * n_per;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * H, *b = bias + (i / n_per) * H;
        float *o = out + i * H;
        #pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const float v = xi[j] + b[j];
            o[j] = v > 0.0f ? v : 0.0f;
        }
    }
}

/* Backward of a ReLU whose output is h, with the per-segment column sums of the result (the gradient of the
 * bias added before the ReLU):  out = g * (h > 0);  segsum[b, :] += sum of out's rows of segment b.
 * g, h, out (nb * n_per, H) (out may be g); segsum (nb, H). The threads split the columns. */
void relu_bwd_segsum(int64_t nb, int64_t n_per, int64_t H, const float *g, const float *h, float *out,
                     float *segsum) {
    #pragma omp parallel
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        const int64_t unit = H >= 16 * nt ? 16 : 1, units = (H + unit - 1) / unit;
        const int64_t c0 = units * t / nt * unit;
        int64_t c1 = units * (t + 1) / nt * unit;
        if (c1 > H) c1 = H;
        for (int64_t b = 0; b < nb; b++) {
            for (int64_t cb = c0; cb < c1; cb += 64) {               /* sums in double, 64 columns at a time */
                const int64_t ce = cb + 64 < c1 ? cb + 64 : c1;
                double acc[64] = {0.0};
                for (int64_t i = b * n_per; i < (b + 1) * n_per; i++) {
                    const float *gi = g + i * H, *hi = h + i * H;
                    float *o = out + i * H;
                    #pragma omp simd
                    for (int64_t c = cb; c < ce; c++) {
                        const float v = hi[c] > 0.0f ? gi[c] : 0.0f;
                        o[c] = v;
                        acc[c - cb] += (double)v;
                    }
                }
                for (int64_t c = cb; c < ce; c++) segsum[b * H + c] += (float)acc[c - cb];
            }
        }
    }
}
